//! Repos: package repositories, each written in the host package manager's own format.
//!
//! A [`RepoSpec`] is rendered to text, and **that text is the state**: the provider compares the
//! rendered text with what is on disk, and the diff shows both (repository definitions carry no
//! secrets, only URLs and key paths). Where it goes depends on the [`RepoFormat`]:
//!
//! - **apt**: `<root>/etc/apt/sources.list.d/<id>.list`, a header comment, an optional
//!   `# description: …` line and one `deb [signed-by=<key_path>] <url> <distribution>
//!   <components…>` line. `enabled: false` writes the same file with the `deb` line commented out
//!   (`# deb …`): apt ignores it, the definition stays visible and re-enabling is a one-line diff.
//!   A distribution ending in `/` is a flat repository and takes no components; any other needs
//!   at least one.
//! - **dnf/yum**: `<root>/etc/yum.repos.d/<id>.repo`, one `[id]` section with `name` (the
//!   description, or the id), `baseurl`, `enabled`, `gpgcheck` and `gpgkey=file://<key_path>`.
//! - **zypper**: `<root>/etc/zypp/repos.d/<id>.repo`, the same keys as zypper writes them plus
//!   `autorefresh=1`, so zypper fetches the new metadata on its own.
//! - **apk**: two lines in the shared `<root>/etc/apk/repositories`: a marker comment
//!   `# comodit:<id> [description]` and the repository URL (`#<url>` when disabled). apk-tools 2
//!   takes everything after an optional `@tag` as the URL, so a trailing `# comodit:<id>` comment
//!   would break the line; a comment line of its own is ignored by every apk version. Other lines
//!   of the file are kept byte for byte. `key_path` and `gpgcheck` do not apply to apk (keys live
//!   in `/etc/apk/keys`, signatures are always checked).
//!
//! `distribution` and `components` are apt-only and ignored elsewhere. Files are written
//! atomically (temporary file, fsync, rename, fsync of the directory) with mode 0644.
//!
//! After a change in `Enforce` mode, apt and apk need their index refreshed before the new
//! repository is usable: the provider runs `apt-get update` / `apk update`. If that fails the
//! previous file is put back and the error returned, so a bad URL neither stays behind to break
//! every later update nor looks converged on the next run. dnf, yum and zypper refresh metadata by
//! themselves.
//!
//! `read` parses the file back into the spec's shape (best effort for files the agent did not
//! write: the first `deb` line, the `[id]` section or the first one). `list` answers the ids of the
//! `*.list` / `*.repo` files in the directory, or of the marked lines for apk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comodit_protocol::{ApplyMode, Collection, Ensure, FieldDiff, RepoSpec, ResourceId, Spec};
use serde_json::Value;

use super::cmd::{trim_detail, Invocation, Runner};
use super::{field_diff, Change, Provider, ProviderError};
use super::{no_under, Unsupported};
use crate::platform::{PackageManager, Platform};

/// `apt-get update` / `apk update` fetch every configured repository's index.
const INDEX_UPDATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

const HEADER: &str = "# managed by comodit; local changes are overwritten";
const APK_MARKER: &str = "# comodit:";

/// The repos provider for this host; `root` is `/` in production (a temporary directory in tests),
/// and every file is written under it.
pub fn for_platform(
    platform: &Platform,
    runner: Arc<dyn Runner>,
    root: PathBuf,
) -> Box<dyn Provider> {
    let format = match platform.package_manager {
        Some(PackageManager::Apt) => RepoFormat::Apt,
        Some(PackageManager::Dnf | PackageManager::Yum) => RepoFormat::Yum,
        Some(PackageManager::Zypper) => RepoFormat::Zypper,
        Some(PackageManager::Apk) => RepoFormat::Apk,
        None => {
            return Box::new(Unsupported::new(
                "repos",
                format!(
                "no supported package manager (apt, dnf, yum, zypper, apk) on this host ({} {})",
                platform.distribution, platform.version
            ),
            ))
        }
    };
    Box::new(Repos::new(format, runner, root))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoFormat {
    Apt,
    /// dnf and yum.
    Yum,
    Zypper,
    Apk,
}

pub struct Repos {
    format: RepoFormat,
    runner: Arc<dyn Runner>,
    root: PathBuf,
}

impl Repos {
    pub fn new(format: RepoFormat, runner: Arc<dyn Runner>, root: PathBuf) -> Self {
        Repos {
            format,
            runner,
            root,
        }
    }

    /// The directory of per-repository files, or the directory of the shared apk file.
    fn dir(&self) -> PathBuf {
        self.root.join(match self.format {
            RepoFormat::Apt => "etc/apt/sources.list.d",
            RepoFormat::Yum => "etc/yum.repos.d",
            RepoFormat::Zypper => "etc/zypp/repos.d",
            RepoFormat::Apk => "etc/apk",
        })
    }

    /// The file that holds repository `id`.
    fn path(&self, id: &str) -> PathBuf {
        self.dir().join(match self.format {
            RepoFormat::Apt => format!("{id}.list"),
            RepoFormat::Yum | RepoFormat::Zypper => format!("{id}.repo"),
            RepoFormat::Apk => "repositories".to_owned(),
        })
    }

    /// What the provider manages for `id`: the whole file, or the marked block for apk.
    fn current(&self, id: &str) -> Result<Option<String>, ProviderError> {
        let file = read_optional(&self.path(id))?;
        Ok(match self.format {
            RepoFormat::Apk => file.and_then(|f| apk_block(&f, id)),
            _ => file,
        })
    }

    fn render(&self, id: &str, spec: &RepoSpec) -> Result<String, ProviderError> {
        check_fields(id, spec)?;
        match self.format {
            RepoFormat::Apt => render_apt(id, spec),
            RepoFormat::Yum => Ok(render_ini(id, spec, false)),
            RepoFormat::Zypper => Ok(render_ini(id, spec, true)),
            RepoFormat::Apk => render_apk(id, spec),
        }
    }

    /// Puts `block` (or nothing) in place for `id`.
    fn write(&self, id: &str, block: Option<&str>) -> Result<(), ProviderError> {
        let path = self.path(id);
        match (self.format, block) {
            (RepoFormat::Apk, _) => {
                let old = read_optional(&path)?.unwrap_or_default();
                write_atomic(&path, &apk_splice(&old, id, block))
            }
            (_, Some(content)) => write_atomic(&path, content),
            (_, None) => remove_file(&path),
        }
    }

    /// Fetches the package index after a change, where the manager does not do it by itself.
    fn update_index(&self) -> Result<(), ProviderError> {
        let argv: &[&str] = match self.format {
            RepoFormat::Apt => &["apt-get", "update", "-q"],
            RepoFormat::Apk => &["apk", "update"],
            RepoFormat::Yum | RepoFormat::Zypper => return Ok(()),
        };
        let out = self
            .runner
            .run(&Invocation::new(argv), INDEX_UPDATE_TIMEOUT)?;
        if out.success() {
            return Ok(());
        }
        let text = if out.stderr.trim().is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        Err(ProviderError::Failed {
            what: argv[..2].join(" "),
            detail: trim_detail(text),
        })
    }
}

impl Provider for Repos {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let Some(text) = self.current(id.as_str())? else {
            return Ok(serde_json::json!({"ensure": "absent"}));
        };
        let spec = match self.format {
            RepoFormat::Apt => parse_apt(&text),
            RepoFormat::Yum | RepoFormat::Zypper => parse_ini(&text, id.as_str()),
            RepoFormat::Apk => parse_apk(&text),
        };
        Ok(serde_json::to_value(spec).expect("a repo spec serializes"))
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let Spec::Repo(spec) = spec else {
            return Err(ProviderError::Invalid(format!(
                "repo {id}: expected a repo spec, got a {} spec",
                spec.collection()
            )));
        };
        let id = id.as_str();
        let current = self.current(id)?;
        let (diff, desired): (Vec<FieldDiff>, Option<String>) = match spec.ensure {
            Ensure::Absent => match &current {
                Some(_) => (vec![field_diff("ensure", "present", "absent")], None),
                None => (vec![], None),
            },
            Ensure::Present => {
                let rendered = self.render(id, spec)?;
                let diff = match &current {
                    None => vec![
                        field_diff("ensure", "absent", "present"),
                        field_diff("content", Value::Null, rendered.as_str()),
                    ],
                    Some(c) if *c != rendered => {
                        vec![field_diff("content", c.as_str(), rendered.as_str())]
                    }
                    Some(_) => vec![],
                };
                (diff, Some(rendered))
            }
        };
        if mode == ApplyMode::DryRun || diff.is_empty() {
            return Ok(Change::from_diff(diff));
        }
        let path = self.path(id);
        let before = read_optional(&path)?;
        tracing::info!(repo = id, path = %path.display(), ensure = ?spec.ensure, "writing repository");
        self.write(id, desired.as_deref())?;
        if let Err(e) = self.update_index() {
            tracing::warn!(repo = id, error = %e, "index update failed, restoring the previous repository file");
            let restored = match &before {
                Some(text) => write_atomic(&path, text),
                None => remove_file(&path),
            };
            if let Err(r) = restored {
                return Err(ProviderError::Failed {
                    what: format!("repo {id}"),
                    detail: format!("{e}; and restoring {} failed: {r}", path.display()),
                });
            }
            return Err(e);
        }
        Ok(Change::from_diff(diff))
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        no_under(under)?;
        let mut ids: Vec<String> = match self.format {
            RepoFormat::Apk => read_optional(&self.dir().join("repositories"))?
                .map(|f| {
                    f.lines()
                        .filter_map(|l| marker_id(l).map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            _ => {
                let ext = if self.format == RepoFormat::Apt {
                    "list"
                } else {
                    "repo"
                };
                let dir = self.dir();
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                    Err(e) => {
                        return Err(ProviderError::io(format!("listing {}", dir.display()), e))
                    }
                };
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        name.strip_suffix(&format!(".{ext}")).map(str::to_owned)
                    })
                    .collect()
            }
        };
        ids.retain(|i| ResourceId::parse(Collection::Repos, i).is_ok());
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// Second line of defence after the protocol's validation: values that would break the line
/// syntax of a format (the protocol allows spaces in paths, for instance).
fn check_fields(id: &str, spec: &RepoSpec) -> Result<(), ProviderError> {
    let invalid =
        |field: &str, why: &str| Err(ProviderError::Invalid(format!("repo {id}: {field} {why}")));
    let Some(url) = &spec.url else {
        return invalid("url", "is required when present");
    };
    if url.is_empty() || url.contains(char::is_whitespace) {
        return invalid("url", "must be one word");
    }
    if url.starts_with(['#', '@', '[']) {
        return invalid("url", "must not start with '#', '@' or '['");
    }
    if let Some(k) = &spec.key_path {
        if k.contains(|c: char| c.is_whitespace() || c == ']' || c == ',') {
            return invalid("key_path", "must not contain spaces, ',' or ']'");
        }
    }
    if let Some(d) = &spec.distribution {
        if d.is_empty() || d.contains(char::is_whitespace) {
            return invalid("distribution", "must be one word");
        }
    }
    for text in [&spec.description].into_iter().flatten() {
        if text.contains(['\n', '\r']) {
            return invalid("description", "must be one line");
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// apt

pub fn render_apt(id: &str, spec: &RepoSpec) -> Result<String, ProviderError> {
    let url = spec.url.as_deref().unwrap_or_default();
    let Some(dist) = spec.distribution.as_deref() else {
        return Err(ProviderError::Invalid(format!(
            "repo {id}: apt needs a distribution (the suite, e.g. bookworm, or a path ending in '/' for a flat repository)"
        )));
    };
    let flat = dist.ends_with('/');
    if flat && !spec.components.is_empty() {
        return Err(ProviderError::Invalid(format!(
            "repo {id}: a flat repository (distribution ending in '/') takes no components"
        )));
    }
    if !flat && spec.components.is_empty() {
        return Err(ProviderError::Invalid(format!(
            "repo {id}: apt needs at least one component (e.g. main) for distribution {dist}"
        )));
    }
    let mut line = String::from("deb ");
    if let Some(k) = &spec.key_path {
        line.push_str(&format!("[signed-by={k}] "));
    }
    line.push_str(url);
    line.push(' ');
    line.push_str(dist);
    for c in &spec.components {
        line.push(' ');
        line.push_str(c);
    }
    let mut out = format!("{HEADER}\n");
    if let Some(d) = &spec.description {
        out.push_str(&format!("# description: {d}\n"));
    }
    if !spec.enabled {
        out.push_str("# ");
    }
    out.push_str(&line);
    out.push('\n');
    Ok(out)
}

/// Parses a `.list` file back: its first `deb` line, or a commented-out `# deb` line (disabled)
/// when there is no active one.
pub fn parse_apt(text: &str) -> RepoSpec {
    let description = text
        .lines()
        .find_map(|l| l.strip_prefix("# description: "))
        .map(str::to_owned);
    let active = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("deb ").map(|rest| (rest, true)));
    let entry = active.or_else(|| {
        text.lines().find_map(|l| {
            let l = l.trim().strip_prefix('#')?.trim_start();
            l.strip_prefix("deb ").map(|rest| (rest, false))
        })
    });
    let mut spec = RepoSpec {
        ensure: Ensure::Present,
        enabled: true,
        gpgcheck: true,
        description,
        ..Default::default()
    };
    let Some((rest, enabled)) = entry else {
        return spec;
    };
    spec.enabled = enabled;
    let mut rest = rest.trim_start();
    if let Some(opts) = rest.strip_prefix('[') {
        if let Some((opts, after)) = opts.split_once(']') {
            spec.key_path = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            rest = after;
        }
    }
    let mut words = rest.split_whitespace();
    spec.url = words.next().map(str::to_owned);
    spec.distribution = words.next().map(str::to_owned);
    spec.components = words.map(str::to_owned).collect();
    spec
}

// ----------------------------------------------------------------------------------------------
// dnf / yum / zypper (ini)

pub fn render_ini(id: &str, spec: &RepoSpec, zypper: bool) -> String {
    let flag = |b: bool| if b { "1" } else { "0" };
    let mut out = format!("{HEADER}\n[{id}]\n");
    out.push_str(&format!(
        "name={}\n",
        spec.description.as_deref().unwrap_or(id)
    ));
    if zypper {
        out.push_str(&format!("enabled={}\n", flag(spec.enabled)));
        out.push_str("autorefresh=1\n");
        out.push_str(&format!(
            "baseurl={}\n",
            spec.url.as_deref().unwrap_or_default()
        ));
    } else {
        out.push_str(&format!(
            "baseurl={}\n",
            spec.url.as_deref().unwrap_or_default()
        ));
        out.push_str(&format!("enabled={}\n", flag(spec.enabled)));
    }
    out.push_str(&format!("gpgcheck={}\n", flag(spec.gpgcheck)));
    if let Some(k) = &spec.key_path {
        out.push_str(&format!("gpgkey=file://{k}\n"));
    }
    out
}

/// Parses the `[id]` section of a `.repo` file (or its first section when there is none).
pub fn parse_ini(text: &str, id: &str) -> RepoSpec {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.push((name.trim().to_owned(), Vec::new()));
        } else if let (Some((k, v)), Some(last)) = (line.split_once('='), sections.last_mut()) {
            last.1.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let section = sections
        .iter()
        .find(|(n, _)| n == id)
        .or_else(|| sections.first());
    let get = |key: &str| -> Option<&str> {
        section.and_then(|(_, kv)| kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()))
    };
    // yum and zypper read 1/0, true/false, yes/no; anything else counts as the default (on).
    let flag = |key: &str| !matches!(get(key), Some("0" | "false" | "no" | "False" | "No"));
    RepoSpec {
        ensure: Ensure::Present,
        url: get("baseurl")
            .or_else(|| get("mirrorlist"))
            .or_else(|| get("metalink"))
            .map(str::to_owned),
        key_path: get("gpgkey")
            .and_then(|k| k.split([' ', ',']).next())
            .map(|k| k.strip_prefix("file://").unwrap_or(k).to_owned()),
        enabled: flag("enabled"),
        gpgcheck: flag("gpgcheck"),
        description: get("name").filter(|n| *n != id).map(str::to_owned),
        ..Default::default()
    }
}

// ----------------------------------------------------------------------------------------------
// apk

pub fn render_apk(id: &str, spec: &RepoSpec) -> Result<String, ProviderError> {
    let url = spec.url.as_deref().unwrap_or_default();
    let mut out = format!("{APK_MARKER}{id}");
    if let Some(d) = &spec.description {
        out.push(' ');
        out.push_str(d);
    }
    out.push('\n');
    if !spec.enabled {
        out.push('#');
    }
    out.push_str(url);
    out.push('\n');
    Ok(out)
}

/// The id of a marker line (`# comodit:<id> [description]`).
fn marker_id(line: &str) -> Option<&str> {
    line.strip_prefix(APK_MARKER)?.split_whitespace().next()
}

/// The marked block of `id` in the repositories file: the marker and the line after it (unless
/// that line is another marker).
pub fn apk_block(file: &str, id: &str) -> Option<String> {
    let lines: Vec<&str> = file.lines().collect();
    let i = lines.iter().position(|l| marker_id(l) == Some(id))?;
    let mut block = format!("{}\n", lines[i]);
    if let Some(next) = lines.get(i + 1).filter(|l| marker_id(l).is_none()) {
        block.push_str(next);
        block.push('\n');
    }
    Some(block)
}

/// The repositories file with `id`'s block replaced by `block` (appended when it was not there,
/// removed when `block` is `None`; duplicates of the block are dropped). Other lines are kept.
pub fn apk_splice(file: &str, id: &str, block: Option<&str>) -> String {
    let lines: Vec<&str> = file.lines().collect();
    let mut out: Vec<&str> = Vec::with_capacity(lines.len() + 2);
    let mut placed = false;
    let mut i = 0;
    while i < lines.len() {
        if marker_id(lines[i]) == Some(id) {
            let owns_next = lines.get(i + 1).is_some_and(|l| marker_id(l).is_none());
            i += if owns_next { 2 } else { 1 };
            if !placed {
                out.extend(block.into_iter().flat_map(str::lines));
                placed = true;
            }
            continue;
        }
        out.push(lines[i]);
        i += 1;
    }
    if !placed {
        out.extend(block.into_iter().flat_map(str::lines));
    }
    let mut text = out.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

pub fn parse_apk(block: &str) -> RepoSpec {
    let mut lines = block.lines();
    let description = lines
        .next()
        .and_then(|m| m.strip_prefix(APK_MARKER))
        .and_then(|rest| rest.split_once(' '))
        .map(|(_, d)| d.to_owned());
    let line = lines.next().unwrap_or_default().trim();
    let (url, enabled) = match line.strip_prefix('#') {
        Some(u) => (u.trim(), false),
        None => (line, true),
    };
    RepoSpec {
        ensure: Ensure::Present,
        url: (!url.is_empty()).then(|| url.to_owned()),
        enabled,
        gpgcheck: true,
        description,
        ..Default::default()
    }
}

// ----------------------------------------------------------------------------------------------
// files

fn read_optional(path: &Path) -> Result<Option<String>, ProviderError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ProviderError::io(format!("reading {}", path.display()), e)),
    }
}

/// Writes `content` to `path` so that readers see the old or the new file, never a half-written
/// one: a temporary file in the same directory, fsync, rename over, fsync of the directory.
fn write_atomic(path: &Path, content: &str) -> Result<(), ProviderError> {
    let dir = path.parent().expect("repo files live in a directory");
    let io = |what: &str, e| ProviderError::io(format!("{what} {}", path.display()), e);
    fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("repo");
    // A dot name without the .list/.repo extension: no package manager reads it meanwhile.
    let tmp = dir.join(format!(".{name}.comodit-tmp"));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| io("writing", e))
}

fn remove_file(path: &Path) -> Result<(), ProviderError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ProviderError::io(format!("removing {}", path.display()), e)),
    }
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ProviderError::io(format!("syncing {}", dir.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::OsFamily;
    use crate::providers::cmd::{CmdOutput, RecordingRunner};
    use proptest::prelude::*;

    fn id(s: &str) -> ResourceId {
        ResourceId::parse(Collection::Repos, s).unwrap()
    }

    fn docker() -> RepoSpec {
        RepoSpec {
            ensure: Ensure::Present,
            url: Some("https://download.docker.com/linux/debian".into()),
            distribution: Some("bookworm".into()),
            components: vec!["stable".into()],
            key_path: Some("/etc/apt/keyrings/docker.gpg".into()),
            enabled: true,
            gpgcheck: true,
            description: Some("Docker CE".into()),
        }
    }

    fn absent() -> Spec {
        Spec::Repo(RepoSpec {
            ensure: Ensure::Absent,
            enabled: true,
            gpgcheck: true,
            ..Default::default()
        })
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        runner: Arc<RecordingRunner>,
        repos: Repos,
    }

    fn fixture(format: RepoFormat) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let runner = Arc::new(RecordingRunner::new(&[]));
        let repos = Repos::new(format, runner.clone(), root.clone());
        Fixture {
            _dir: dir,
            root,
            runner,
            repos,
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    const DOCKER_LIST: &str = "# managed by comodit; local changes are overwritten\n# description: Docker CE\ndeb [signed-by=/etc/apt/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable\n";

    #[test]
    fn apt_file_lifecycle_with_index_update() {
        let f = fixture(RepoFormat::Apt);
        let path = f.root.join("etc/apt/sources.list.d/docker.list");
        let spec = Spec::Repo(docker());

        // Dry-run: the diff, no file, no command.
        let dry = f
            .repos
            .apply(&id("docker"), &spec, ApplyMode::DryRun)
            .unwrap();
        assert_eq!(
            dry.diff,
            vec![
                field_diff("ensure", "absent", "present"),
                field_diff("content", Value::Null, DOCKER_LIST),
            ]
        );
        assert!(!path.exists());
        assert!(f.runner.lines().is_empty());

        f.runner.answer(CmdOutput::ok("Reading package lists...\n"));
        let c = f
            .repos
            .apply(&id("docker"), &spec, ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c, dry);
        assert_eq!(fs::read_to_string(&path).unwrap(), DOCKER_LIST);
        assert_eq!(mode_of(&path), 0o644);
        assert_eq!(f.runner.lines(), vec!["apt-get update -q"]);

        // Idempotent: no change, no update.
        let again = f
            .repos
            .apply(&id("docker"), &spec, ApplyMode::Enforce)
            .unwrap();
        assert_eq!(again, Change::none());
        assert_eq!(f.runner.lines().len(), 1);

        // Read parses the file back into the spec.
        let read = f.repos.read(&id("docker")).unwrap();
        assert_eq!(read, serde_json::to_value(docker()).unwrap());
        assert_eq!(f.repos.list(None).unwrap(), vec!["docker"]);

        // Disabled: the line is commented out, the diff shows both versions.
        let mut disabled = docker();
        disabled.enabled = false;
        let dry = f
            .repos
            .apply(
                &id("docker"),
                &Spec::Repo(disabled.clone()),
                ApplyMode::DryRun,
            )
            .unwrap();
        let want = DOCKER_LIST.replace("\ndeb ", "\n# deb ");
        assert_eq!(
            dry.diff,
            vec![field_diff("content", DOCKER_LIST, want.as_str())]
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), DOCKER_LIST);
        f.runner.answer(CmdOutput::ok(""));
        f.repos
            .apply(
                &id("docker"),
                &Spec::Repo(disabled.clone()),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), want);
        assert_eq!(
            f.repos.read(&id("docker")).unwrap(),
            serde_json::to_value(&disabled).unwrap()
        );

        // Absent: dry-run keeps it, enforce removes it and updates the index.
        let dry = f
            .repos
            .apply(&id("docker"), &absent(), ApplyMode::DryRun)
            .unwrap();
        assert_eq!(dry.diff, vec![field_diff("ensure", "present", "absent")]);
        assert!(path.exists());
        f.runner.answer(CmdOutput::ok(""));
        f.repos
            .apply(&id("docker"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert!(!path.exists());
        assert_eq!(
            f.runner.lines(),
            vec![
                "apt-get update -q",
                "apt-get update -q",
                "apt-get update -q"
            ]
        );
        assert_eq!(
            f.repos
                .apply(&id("docker"), &absent(), ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );
        assert_eq!(
            f.repos.read(&id("docker")).unwrap(),
            serde_json::json!({"ensure": "absent"})
        );
        assert!(f.repos.list(None).unwrap().is_empty());
    }

    #[test]
    fn failed_index_update_restores_the_previous_file() {
        let f = fixture(RepoFormat::Apt);
        let path = f.root.join("etc/apt/sources.list.d/docker.list");
        // New file: removed again.
        f.runner.answer(CmdOutput::fail(
            100,
            "E: The repository 'https://download.docker.com/linux/debian bookworm Release' does not have a Release file.\n",
        ));
        let err = f
            .repos
            .apply(&id("docker"), &Spec::Repo(docker()), ApplyMode::Enforce)
            .unwrap_err();
        match &err {
            ProviderError::Failed { what, detail } => {
                assert_eq!(what, "apt-get update");
                assert!(detail.contains("does not have a Release file"), "{detail}");
            }
            other => panic!("{other}"),
        }
        assert!(!path.exists());

        // Changed file: the old content comes back.
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "deb http://old/ stable main\n").unwrap();
        f.runner.answer(CmdOutput::fail(100, "E: nope\n"));
        f.repos
            .apply(&id("docker"), &Spec::Repo(docker()), ApplyMode::Enforce)
            .unwrap_err();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "deb http://old/ stable main\n"
        );
        // Still a diff on the next run: the failure is not mistaken for convergence.
        let dry = f
            .repos
            .apply(&id("docker"), &Spec::Repo(docker()), ApplyMode::DryRun)
            .unwrap();
        assert!(dry.changed);
    }

    #[test]
    fn apt_rendering_rules() {
        let mut flat = docker();
        flat.distribution = Some("./".into());
        flat.components.clear();
        flat.key_path = None;
        flat.description = None;
        assert_eq!(
            render_apt("x", &flat).unwrap(),
            format!("{HEADER}\ndeb https://download.docker.com/linux/debian ./\n")
        );
        flat.components = vec!["main".into()];
        assert!(render_apt("x", &flat).is_err());
        let mut no_comp = docker();
        no_comp.components.clear();
        let err = render_apt("x", &no_comp).unwrap_err();
        assert!(err.to_string().contains("at least one component"), "{err}");
        let mut no_dist = docker();
        no_dist.distribution = None;
        assert!(render_apt("x", &no_dist)
            .unwrap_err()
            .to_string()
            .contains("distribution"));
        let mut spaced = docker();
        spaced.key_path = Some("/etc/my keys/k.gpg".into());
        let f = fixture(RepoFormat::Apt);
        let err = f
            .repos
            .apply(&id("x"), &Spec::Repo(spaced), ApplyMode::DryRun)
            .unwrap_err();
        assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("key_path"), "{err}");
    }

    /// apt's own parser reads what the provider writes: `apt-get indextargets` against the temp
    /// root (no network, nothing written outside it).
    #[test]
    fn real_apt_parses_the_rendered_files() {
        let f = fixture(RepoFormat::Apt);
        let spec = docker();
        let mut second = docker();
        second.url = Some("http://deb.example.org/debian".into());
        second.components = vec!["main".into(), "contrib".into()];
        second.key_path = None;
        let mut disabled = docker();
        disabled.url = Some("http://disabled.example.org/debian".into());
        disabled.enabled = false;
        for (name, s) in [("docker", spec), ("second", second), ("off", disabled)] {
            f.runner.answer(CmdOutput::ok(""));
            f.repos
                .apply(&id(name), &Spec::Repo(s), ApplyMode::Enforce)
                .unwrap();
        }
        let parts = f.root.join("etc/apt/sources.list.d");
        let lists = f.root.join("lists");
        fs::create_dir_all(lists.join("partial")).unwrap();
        let out = std::process::Command::new("apt-get")
            .arg("indextargets")
            .arg("--no-release-info")
            .arg("-o")
            .arg("Dir::Etc::sourcelist=/dev/null")
            .arg("-o")
            .arg(format!("Dir::Etc::sourceparts={}", parts.display()))
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()))
            .arg("Identifier: Packages")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let repos: std::collections::BTreeSet<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("Repo-URI: "))
            .collect();
        assert_eq!(
            repos.into_iter().collect::<Vec<_>>(),
            vec![
                "http://deb.example.org/debian/",
                "https://download.docker.com/linux/debian/"
            ]
        );
        let components: std::collections::BTreeSet<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("Component: "))
            .collect();
        assert_eq!(
            components.into_iter().collect::<Vec<_>>(),
            vec!["contrib", "main", "stable"]
        );
    }

    const YUM_REPO: &str = "# managed by comodit; local changes are overwritten\n[epel]\nname=Extra Packages\nbaseurl=https://dl.example.org/epel/9/x86_64/\nenabled=1\ngpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-9\n";

    fn epel() -> RepoSpec {
        RepoSpec {
            ensure: Ensure::Present,
            url: Some("https://dl.example.org/epel/9/x86_64/".into()),
            key_path: Some("/etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-9".into()),
            enabled: true,
            gpgcheck: true,
            description: Some("Extra Packages".into()),
            ..Default::default()
        }
    }

    #[test]
    fn yum_file_lifecycle() {
        let f = fixture(RepoFormat::Yum);
        let path = f.root.join("etc/yum.repos.d/epel.repo");
        let spec = Spec::Repo(epel());
        f.repos
            .apply(&id("epel"), &spec, ApplyMode::DryRun)
            .unwrap();
        assert!(!path.exists());
        let c = f
            .repos
            .apply(&id("epel"), &spec, ApplyMode::Enforce)
            .unwrap();
        assert!(c.changed);
        assert_eq!(fs::read_to_string(&path).unwrap(), YUM_REPO);
        assert_eq!(mode_of(&path), 0o644);
        assert_eq!(
            f.repos
                .apply(&id("epel"), &spec, ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );
        assert_eq!(
            f.repos.read(&id("epel")).unwrap(),
            serde_json::to_value(epel()).unwrap()
        );

        let mut off = epel();
        off.enabled = false;
        off.gpgcheck = false;
        off.key_path = None;
        off.description = None;
        f.repos
            .apply(&id("epel"), &Spec::Repo(off.clone()), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{HEADER}\n[epel]\nname=epel\nbaseurl=https://dl.example.org/epel/9/x86_64/\nenabled=0\ngpgcheck=0\n")
        );
        assert_eq!(
            f.repos.read(&id("epel")).unwrap(),
            serde_json::to_value(off).unwrap()
        );
        // Other files in the directory are listed too; the temp file never stays behind.
        fs::write(
            f.root.join("etc/yum.repos.d/baseos.repo"),
            "[baseos]\nname=BaseOS\nmirrorlist=https://m.example.org/\n",
        )
        .unwrap();
        assert_eq!(f.repos.list(None).unwrap(), vec!["baseos", "epel"]);
        assert_eq!(
            f.repos.read(&id("baseos")).unwrap()["url"],
            "https://m.example.org/"
        );
        f.repos
            .apply(&id("epel"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert!(!path.exists());
        assert_eq!(f.repos.list(None).unwrap(), vec!["baseos"]);
        // yum and dnf refresh metadata by themselves: no command, ever.
        assert!(f.runner.lines().is_empty());
    }

    #[test]
    fn zypper_file_lifecycle() {
        let f = fixture(RepoFormat::Zypper);
        let path = f.root.join("etc/zypp/repos.d/epel.repo");
        let spec = Spec::Repo(epel());
        let c = f
            .repos
            .apply(&id("epel"), &spec, ApplyMode::Enforce)
            .unwrap();
        assert!(c.changed);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{HEADER}\n[epel]\nname=Extra Packages\nenabled=1\nautorefresh=1\nbaseurl=https://dl.example.org/epel/9/x86_64/\ngpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-9\n")
        );
        assert_eq!(
            f.repos
                .apply(&id("epel"), &spec, ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );
        assert_eq!(
            f.repos.read(&id("epel")).unwrap(),
            serde_json::to_value(epel()).unwrap()
        );
        let dry = f
            .repos
            .apply(&id("epel"), &absent(), ApplyMode::DryRun)
            .unwrap();
        assert!(dry.changed);
        assert!(path.exists());
        f.repos
            .apply(&id("epel"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert!(!path.exists());
        assert!(f.runner.lines().is_empty());
    }

    const ALPINE: &str = "https://dl-cdn.alpinelinux.org/alpine/v3.20/main\n#https://dl-cdn.alpinelinux.org/alpine/v3.20/community\n@edge https://dl-cdn.alpinelinux.org/alpine/edge/main\n";

    #[test]
    fn apk_lines_are_marked_and_the_rest_kept() {
        let f = fixture(RepoFormat::Apk);
        let path = f.root.join("etc/apk/repositories");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, ALPINE).unwrap();
        let spec = RepoSpec {
            ensure: Ensure::Present,
            url: Some("https://pkgs.example.org/alpine/v3.20/main".into()),
            enabled: true,
            gpgcheck: true,
            description: Some("our packages".into()),
            ..Default::default()
        };
        let block = "# comodit:ours our packages\nhttps://pkgs.example.org/alpine/v3.20/main\n";
        let dry = f
            .repos
            .apply(&id("ours"), &Spec::Repo(spec.clone()), ApplyMode::DryRun)
            .unwrap();
        assert_eq!(
            dry.diff,
            vec![
                field_diff("ensure", "absent", "present"),
                field_diff("content", Value::Null, block)
            ]
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), ALPINE);
        assert!(f.runner.lines().is_empty());

        f.runner
            .answer(CmdOutput::ok("OK: 3 distinct packages available\n"));
        f.repos
            .apply(&id("ours"), &Spec::Repo(spec.clone()), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{ALPINE}{block}")
        );
        assert_eq!(f.runner.lines(), vec!["apk update"]);
        assert_eq!(
            f.repos
                .apply(&id("ours"), &Spec::Repo(spec.clone()), ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );
        assert_eq!(
            f.repos.read(&id("ours")).unwrap(),
            serde_json::to_value(&spec).unwrap()
        );
        assert_eq!(f.repos.list(None).unwrap(), vec!["ours"]);

        // A second one, then disabling the first: edited in place, order kept.
        let other = RepoSpec {
            url: Some("https://other.example.org/alpine".into()),
            description: None,
            ..spec.clone()
        };
        f.runner.answer(CmdOutput::ok(""));
        f.repos
            .apply(&id("other"), &Spec::Repo(other), ApplyMode::Enforce)
            .unwrap();
        let mut off = spec.clone();
        off.enabled = false;
        f.runner.answer(CmdOutput::ok(""));
        let c = f
            .repos
            .apply(&id("ours"), &Spec::Repo(off.clone()), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(
            c.diff,
            vec![field_diff(
                "content",
                block,
                "# comodit:ours our packages\n#https://pkgs.example.org/alpine/v3.20/main\n"
            )]
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{ALPINE}# comodit:ours our packages\n#https://pkgs.example.org/alpine/v3.20/main\n# comodit:other\nhttps://other.example.org/alpine\n")
        );
        assert_eq!(
            f.repos.read(&id("ours")).unwrap(),
            serde_json::to_value(&off).unwrap()
        );
        assert_eq!(f.repos.list(None).unwrap(), vec!["other", "ours"]);

        // Removing both gives the original file back, byte for byte.
        for name in ["ours", "other"] {
            f.runner.answer(CmdOutput::ok(""));
            f.repos
                .apply(&id(name), &absent(), ApplyMode::Enforce)
                .unwrap();
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), ALPINE);
        assert_eq!(f.runner.lines().len(), 5);

        // A failed `apk update` puts the file back.
        f.runner.answer(CmdOutput::fail(1, "ERROR: https://pkgs.example.org/alpine/v3.20/main: temporary error (try again later)\n"));
        let err = f
            .repos
            .apply(&id("ours"), &Spec::Repo(spec), ApplyMode::Enforce)
            .unwrap_err();
        assert!(
            err.to_string().starts_with("apk update failed: ERROR"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), ALPINE);
    }

    #[test]
    fn apk_urls_that_would_change_meaning_are_refused() {
        let f = fixture(RepoFormat::Apk);
        for bad in ["@edge", "#x"] {
            let spec = RepoSpec {
                ensure: Ensure::Present,
                url: Some(bad.into()),
                enabled: true,
                gpgcheck: true,
                ..Default::default()
            };
            let err = f
                .repos
                .apply(&id("x"), &Spec::Repo(spec), ApplyMode::DryRun)
                .unwrap_err();
            assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
        }
    }

    #[test]
    fn unsupported_and_wrong_spec() {
        let platform = Platform {
            family: OsFamily::Unknown,
            distribution: "unknown".into(),
            version: String::new(),
            package_manager: None,
            init_system: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = for_platform(
            &platform,
            Arc::new(RecordingRunner::new(&[])),
            dir.path().into(),
        );
        let err = p.list(None).unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{err}");
        assert!(err
            .to_string()
            .starts_with("unsupported: repos: no supported package manager"));
        let f = fixture(RepoFormat::Yum);
        assert!(matches!(
            f.repos
                .apply(
                    &id("x"),
                    &Spec::Service(Default::default()),
                    ApplyMode::DryRun
                )
                .unwrap_err(),
            ProviderError::Invalid(_)
        ));
        assert!(f.repos.list(Some("/etc")).is_err());
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._-]{0,12}"
    }

    proptest! {
        /// Whatever is written reads back as the same spec, for every format.
        #[test]
        fn render_then_parse_round_trips(
            host in word(),
            dist in word(),
            components in proptest::collection::vec(word(), 1..4),
            key in proptest::option::of(word()),
            enabled: bool,
            gpgcheck: bool,
            description in proptest::option::of("[A-Za-z0-9][A-Za-z0-9 ()._-]{0,30}"),
        ) {
            // A name equal to the id reads back as "no description".
            let description = description.map(|d| d.trim().to_owned()).filter(|d| !d.is_empty() && d != "r");
            let base = RepoSpec {
                ensure: Ensure::Present,
                url: Some(format!("https://{host}/repo")),
                key_path: key.map(|k| format!("/etc/keys/{k}")),
                enabled,
                gpgcheck: true,
                description,
                ..Default::default()
            };
            let apt = RepoSpec { distribution: Some(dist), components, ..base.clone() };
            prop_assert_eq!(parse_apt(&render_apt("r", &apt).unwrap()), apt);

            let rpm = RepoSpec { gpgcheck, ..base.clone() };
            prop_assert_eq!(parse_ini(&render_ini("r", &rpm, false), "r"), rpm.clone());
            prop_assert_eq!(parse_ini(&render_ini("r", &rpm, true), "r"), rpm);

            let apk = RepoSpec { key_path: None, ..base };
            prop_assert_eq!(parse_apk(&render_apk("r", &apk).unwrap()), apk);
        }
    }
}
