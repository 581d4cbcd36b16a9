//! The `users` and `groups` collections: local accounts in `/etc/passwd`, `/etc/group` and
//! `/etc/shadow`.
//!
//! **Reads** parse the account files directly (never `getpwnam`: NSS would answer from LDAP/SSSD
//! and ignore the prefix). Malformed lines are skipped the way glibc skips them, and are reported
//! by file and line number only (a shadow line holds a hash).
//!
//! **Writes** go through the distribution's tools via the [`Runner`], so locking, `/etc/gshadow`,
//! nscd and SELinux stay the tools' business:
//! - shadow-utils (`useradd`, `usermod`, `userdel`, `groupadd`, `groupmod`, `groupdel`), each with
//!   `--prefix <p>` when the provider works on a throwaway root;
//! - Busybox/Alpine (`adduser`, `addgroup`, `deluser`, `delgroup`) when `useradd` is absent but
//!   `adduser` exists. Busybox has no `usermod`/`groupmod` and no prefix option, so it can create
//!   and delete accounts, set supplementary groups and the password, but changing the uid, primary
//!   group, home, shell or comment of an existing user, or the gid of an existing group, fails with
//!   [`ProviderError::Unsupported`] naming the field, and a prefix is refused.
//!
//! **Passwords.** A hash is set by piping `name:hash` into `chpasswd -e` on stdin — never
//! `usermod -p`, whose argv any local user can read in `/proc/<pid>/cmdline`. shadow-utils'
//! `chpasswd` has no `--prefix`; it takes `-R <root>` (chroot), which works on a root holding only
//! `etc/`. Tool errors are scrubbed of the hash before they are returned. `read()` shows
//! `"password_hash": "<redacted>"` when the account has a password field (a hash or a lock marker
//! such as `!`) and leaves the field out otherwise; the diff shows [`Secret::REDACTED`] on both
//! sides. Hashes are compared against `/etc/shadow`.
//!
//! **Reads** return the spec's shape: `{"ensure", "uid", "group", "groups", "home", "shell",
//! "comment", "password_hash"?}` for users (`group` is the primary group's name, or its number when
//! it has no entry), `{"ensure", "gid"}` for groups, `{"ensure": "absent"}` when missing.
//! `system` and `manage_home` act only at creation and are not read back.
//!
//! **Decisions.**
//! - `groups` is the exact supplementary list: missing groups are added and others removed
//!   (`usermod -G a,b`).
//! - A primary group that does not exist is an error at enforce time, except the user's own-name
//!   group when the user is created, which `useradd -U` creates (the distribution default). A
//!   dry-run does not fail on missing groups: an earlier resource of the same state may create them.
//! - `manage_home` (default: true for non-system users) only matters at creation (`-m`/`-M`). A
//!   changed `home` updates the passwd entry without moving files; `userdel` runs without `-r`, so
//!   the home directory of a removed user is kept.
//! - `system` only matters at creation (`useradd -r`, `groupadd -r`); it is not compared.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comodit_protocol::{
    ApplyMode, Collection, Ensure, FieldDiff, GroupSpec, ResourceId, Secret, Spec, UserSpec,
};
use serde_json::{json, Value};

use super::cmd::{Invocation, Runner};
use super::{field_diff, Change, Provider, ProviderError};

/// Account tools are quick, but `userdel`/`usermod -u` may walk a home directory.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// An account file larger than this is refused rather than read into memory.
const MAX_ACCOUNT_FILE_BYTES: u64 = 64 << 20;

// ---------------------------------------------------------------------------------------------
// The account files.

#[derive(Clone, Debug, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    /// The passwd field: `x` when the hash lives in /etc/shadow.
    password: String,
    uid: u32,
    gid: u32,
    gecos: String,
    home: String,
    shell: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A parsed snapshot of the account files of one root.
#[derive(Default)]
struct Accounts {
    passwd: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
    /// name → password field of /etc/shadow; `None` when shadow was not read or does not exist.
    shadow: Option<BTreeMap<String, String>>,
}

impl Accounts {
    fn user(&self, name: &str) -> Option<&PasswdEntry> {
        self.passwd.iter().find(|u| u.name == name)
    }

    fn group(&self, name: &str) -> Option<&GroupEntry> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The name of the group with `gid`, or the number when it has no entry.
    fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.clone())
            .unwrap_or_else(|| gid.to_string())
    }

    /// Groups listing `user` as a member, sorted.
    fn supplementary(&self, user: &str) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .groups
            .iter()
            .filter(|g| g.members.iter().any(|m| m == user))
            .map(|g| g.name.as_str())
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// The password field of `user`: its shadow entry, else its passwd field unless that defers
    /// to shadow (`x`). Empty means "no password".
    fn password<'a>(&'a self, user: &'a PasswdEntry) -> Option<&'a str> {
        if let Some(h) = self.shadow.as_ref().and_then(|s| s.get(&user.name)) {
            return Some(h.as_str());
        }
        (user.password != "x").then_some(user.password.as_str())
    }
}

/// Lines of an account file, without comments, blank lines and NIS compat entries (`+`/`-`).
fn records(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') || line.starts_with(['+', '-']) {
            None
        } else {
            Some((i + 1, line.split(':').collect()))
        }
    })
}

fn malformed(file: &Path, line: usize) {
    // Only the position: the content of a shadow line is a secret.
    tracing::warn!(file = %file.display(), line, "skipping malformed account line");
}

fn parse_passwd(text: &str, file: &Path) -> Vec<PasswdEntry> {
    records(text)
        .filter_map(|(n, f)| {
            let entry = (f.len() == 7 && !f[0].is_empty())
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
                .map(|(uid, gid)| PasswdEntry {
                    name: f[0].to_owned(),
                    password: f[1].to_owned(),
                    uid,
                    gid,
                    gecos: f[4].to_owned(),
                    home: f[5].to_owned(),
                    shell: f[6].to_owned(),
                });
            if entry.is_none() {
                malformed(file, n);
            }
            entry
        })
        .collect()
}

fn parse_group(text: &str, file: &Path) -> Vec<GroupEntry> {
    records(text)
        .filter_map(|(n, f)| {
            let entry = (f.len() == 4 && !f[0].is_empty())
                .then(|| f[2].parse().ok())
                .flatten()
                .map(|gid| GroupEntry {
                    name: f[0].to_owned(),
                    gid,
                    members: f[3]
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                        .collect(),
                });
            if entry.is_none() {
                malformed(file, n);
            }
            entry
        })
        .collect()
}

fn parse_shadow(text: &str, file: &Path) -> BTreeMap<String, String> {
    records(text)
        .filter_map(|(n, f)| {
            if f.len() < 2 || f[0].is_empty() {
                malformed(file, n);
                return None;
            }
            Some((f[0].to_owned(), f[1].to_owned()))
        })
        .collect()
}

/// Reads an account file, bounded; `None` when it does not exist.
fn read_bounded(path: &Path) -> Result<Option<String>, ProviderError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ProviderError::io(format!("opening {}", path.display()), e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_ACCOUNT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ProviderError::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_ACCOUNT_FILE_BYTES {
        return Err(ProviderError::Invalid(format!(
            "{} is larger than {MAX_ACCOUNT_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// Where the files are and which tools write them.

/// The tool family that writes the account files on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tools {
    /// shadow-utils: useradd, usermod, userdel, groupadd, groupmod, groupdel, chpasswd.
    Shadow,
    /// Busybox: adduser, deluser, addgroup, delgroup, chpasswd.
    Busybox,
}

/// What both providers share: the runner, where the files are read and the prefix given to tools.
struct Root {
    runner: Arc<dyn Runner>,
    /// The directory holding `etc/passwd` and friends (`/` in production).
    files: PathBuf,
    /// Passed to the tools (`--prefix`, `chpasswd -R`); `None` writes the real /etc.
    prefix: Option<PathBuf>,
}

impl Root {
    fn new(runner: Arc<dyn Runner>, prefix: Option<PathBuf>) -> Self {
        Root {
            runner,
            files: prefix.clone().unwrap_or_else(|| PathBuf::from("/")),
            prefix,
        }
    }

    fn load(&self, with_shadow: bool) -> Result<Accounts, ProviderError> {
        let etc = self.files.join("etc");
        let passwd_path = etc.join("passwd");
        let group_path = etc.join("group");
        let passwd = read_bounded(&passwd_path)?
            .map(|t| parse_passwd(&t, &passwd_path))
            .unwrap_or_default();
        let groups = read_bounded(&group_path)?
            .map(|t| parse_group(&t, &group_path))
            .unwrap_or_default();
        let shadow = if with_shadow {
            let shadow_path = etc.join("shadow");
            read_bounded(&shadow_path)?.map(|t| parse_shadow(&t, &shadow_path))
        } else {
            None
        };
        Ok(Accounts {
            passwd,
            groups,
            shadow,
        })
    }

    /// Which tools write here; `probe` is the shadow-utils tool whose presence decides, `fallback`
    /// the Busybox one.
    fn tools(&self, probe: &str, fallback: &str) -> Result<Tools, ProviderError> {
        if self.runner.exists(probe) {
            return Ok(Tools::Shadow);
        }
        if self.runner.exists(fallback) {
            if self.prefix.is_some() {
                return Err(ProviderError::Unsupported(format!(
                    "busybox {fallback} cannot work on a prefix root"
                )));
            }
            return Ok(Tools::Busybox);
        }
        Err(ProviderError::Unsupported(format!(
            "neither {probe} nor {fallback} is installed"
        )))
    }

    fn prefix_str(&self) -> Result<Option<&str>, ProviderError> {
        self.prefix
            .as_deref()
            .map(|p| {
                p.to_str().ok_or_else(|| {
                    ProviderError::Invalid(format!("prefix {} is not UTF-8", p.display()))
                })
            })
            .transpose()
    }

    /// `[program, --prefix, p]` for a shadow-utils tool.
    fn shadow_tool(&self, program: &str) -> Result<Vec<String>, ProviderError> {
        let mut argv = vec![program.to_owned()];
        if let Some(p) = self.prefix_str()? {
            argv.extend(["--prefix".to_owned(), p.to_owned()]);
        }
        Ok(argv)
    }

    /// The invocation that sets `user`'s hash: `chpasswd -e`, fed `name:hash` on stdin.
    fn chpasswd(
        &self,
        tools: Tools,
        user: &str,
        hash: &Secret,
    ) -> Result<Invocation, ProviderError> {
        let mut argv = vec!["chpasswd", "-e"];
        let prefix = self.prefix_str()?;
        if let (Tools::Shadow, Some(p)) = (tools, prefix) {
            // chpasswd has no --prefix; -R chroots into the root, which needs only etc/ there.
            argv.extend(["-R", p]);
        }
        Ok(Invocation::new(&argv).stdin(format!("{user}:{}\n", hash.expose())))
    }

    /// Runs `plan` in order, stopping at the first failure. `secret` is scrubbed from errors.
    fn execute(&self, plan: &[Invocation], secret: Option<&Secret>) -> Result<(), ProviderError> {
        for inv in plan {
            // Only the argv is logged: the stdin of chpasswd holds the hash.
            tracing::info!(argv = ?inv.argv, "running account tool");
            let argv: Vec<&str> = inv.argv.iter().map(String::as_str).collect();
            let result = self
                .runner
                .run(inv, TOOL_TIMEOUT)
                .and_then(|out| out.check(&argv));
            if let Err(e) = result {
                return Err(scrub(e, secret));
            }
        }
        Ok(())
    }
}

/// Replaces any occurrence of the hash in a tool's error with [`Secret::REDACTED`].
fn scrub(err: ProviderError, secret: Option<&Secret>) -> ProviderError {
    let Some(secret) = secret.filter(|s| !s.expose().is_empty()) else {
        return err;
    };
    let clean = |s: String| s.replace(secret.expose(), Secret::REDACTED);
    match err {
        ProviderError::Failed { what, detail } => ProviderError::Failed {
            what,
            detail: clean(detail),
        },
        ProviderError::Invalid(m) => ProviderError::Invalid(clean(m)),
        ProviderError::Unsupported(m) => ProviderError::Unsupported(clean(m)),
        other => other,
    }
}

/// The id as an account name, re-checked: names become argv words.
fn account_name(collection: Collection, id: &ResourceId) -> Result<&str, ProviderError> {
    ResourceId::parse(collection, id.as_str())
        .map_err(|e| ProviderError::Invalid(format!("{collection} id {id}: {e}")))?;
    Ok(id.as_str())
}

fn ensure_diff(from: Ensure, to: Ensure) -> FieldDiff {
    let word = |e: Ensure| match e {
        Ensure::Present => "present",
        Ensure::Absent => "absent",
    };
    field_diff("ensure", word(from), word(to))
}

// ---------------------------------------------------------------------------------------------
// Users.

/// The `users` collection.
pub struct UserProvider {
    root: Root,
}

impl UserProvider {
    /// `prefix`: a throwaway root whose `etc/` is read and written instead of `/etc` (tests);
    /// production passes `None`.
    pub fn new(runner: Arc<dyn Runner>, prefix: Option<PathBuf>) -> Self {
        UserProvider {
            root: Root::new(runner, prefix),
        }
    }

    fn tools(&self) -> Result<Tools, ProviderError> {
        self.root.tools("useradd", "adduser")
    }
}

/// The supplementary groups a spec asks for, sorted and without duplicates.
fn wanted_groups(spec: &UserSpec) -> Option<Vec<String>> {
    spec.groups.as_ref().map(|g| {
        let set: BTreeSet<&String> = g.iter().collect();
        set.into_iter().cloned().collect()
    })
}

/// The fields of `spec` that `user` does not match, in the order of [`UserSpec`].
fn user_diff(db: &Accounts, user: &PasswdEntry, spec: &UserSpec) -> Vec<FieldDiff> {
    let mut diff = Vec::new();
    if let Some(uid) = spec.uid {
        if uid != user.uid {
            diff.push(field_diff("uid", user.uid, uid));
        }
    }
    if let Some(group) = &spec.group {
        let actual = db.group_name(user.gid);
        if &actual != group {
            diff.push(field_diff("group", actual, group.as_str()));
        }
    }
    if let Some(wanted) = wanted_groups(spec) {
        let actual = db.supplementary(&user.name);
        if actual != wanted {
            diff.push(field_diff("groups", actual, wanted));
        }
    }
    for (field, actual, wanted) in [
        ("home", &user.home, &spec.home),
        ("shell", &user.shell, &spec.shell),
        ("comment", &user.gecos, &spec.comment),
    ] {
        if let Some(wanted) = wanted {
            if actual != wanted {
                diff.push(field_diff(field, actual.as_str(), wanted.as_str()));
            }
        }
    }
    if let Some(hash) = &spec.password_hash {
        if db.password(user) != Some(hash.expose()) {
            diff.push(field_diff(
                "password_hash",
                Secret::REDACTED,
                Secret::REDACTED,
            ));
        }
    }
    diff
}

/// Enforce-time check that the groups a spec names exist. The user's own-name primary group may
/// be missing when `creating`: useradd creates it.
fn check_groups(
    db: &Accounts,
    name: &str,
    spec: &UserSpec,
    creating: bool,
) -> Result<(), ProviderError> {
    if let Some(group) = &spec.group {
        if db.group(group).is_none() && !(creating && group == name) {
            return Err(ProviderError::Invalid(format!(
                "user {name}: primary group {group:?} (field group) does not exist; \
                 declare it as a groups resource"
            )));
        }
    }
    let missing: Vec<&str> = spec
        .groups
        .iter()
        .flatten()
        .filter(|g| db.group(g).is_none())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(ProviderError::Invalid(format!(
            "user {name}: supplementary groups {missing:?} (field groups) do not exist"
        )));
    }
    Ok(())
}

impl UserProvider {
    /// The commands that create `name` as `spec` describes.
    fn plan_create(
        &self,
        tools: Tools,
        db: &Accounts,
        name: &str,
        spec: &UserSpec,
    ) -> Result<Vec<Invocation>, ProviderError> {
        let manage_home = spec.manage_home.unwrap_or(!spec.system);
        let own_group_missing = spec
            .group
            .as_deref()
            .is_some_and(|g| g == name && db.group(g).is_none());
        let groups = wanted_groups(spec).unwrap_or_default();
        let mut plan = Vec::new();
        match tools {
            Tools::Shadow => {
                let mut argv = self.root.shadow_tool("useradd")?;
                let mut push = |flag: &str, v: &str| argv.extend([flag.to_owned(), v.to_owned()]);
                if let Some(uid) = spec.uid {
                    push("-u", &uid.to_string());
                }
                if let Some(g) = spec.group.as_deref().filter(|_| !own_group_missing) {
                    push("-g", g);
                }
                if !groups.is_empty() {
                    push("-G", &groups.join(","));
                }
                if let Some(h) = &spec.home {
                    push("-d", h);
                }
                if let Some(s) = &spec.shell {
                    push("-s", s);
                }
                if let Some(c) = &spec.comment {
                    push("-c", c);
                }
                if own_group_missing {
                    // useradd creates the group named after the user, whatever USERGROUPS_ENAB says.
                    argv.push("-U".into());
                }
                if spec.system {
                    argv.push("-r".into());
                }
                argv.push(if manage_home { "-m" } else { "-M" }.into());
                argv.push(name.into());
                plan.push(Invocation {
                    argv,
                    ..Default::default()
                });
            }
            Tools::Busybox => {
                let mut argv: Vec<String> = vec!["adduser".into(), "-D".into()];
                if spec.system {
                    argv.push("-S".into());
                }
                let mut push = |flag: &str, v: &str| argv.extend([flag.to_owned(), v.to_owned()]);
                if let Some(uid) = spec.uid {
                    push("-u", &uid.to_string());
                }
                if let Some(g) = &spec.group {
                    if own_group_missing && spec.system {
                        // Busybox gives system users "nogroup" unless told: create theirs first.
                        plan.push(Invocation::new(&["addgroup", "-S", g]));
                        push("-G", g);
                    } else if !own_group_missing {
                        push("-G", g);
                    }
                    // Otherwise busybox adduser creates the user's own group (gid = uid).
                }
                if let Some(h) = &spec.home {
                    push("-h", h);
                }
                if let Some(s) = &spec.shell {
                    push("-s", s);
                }
                if let Some(c) = &spec.comment {
                    push("-g", c);
                }
                if !manage_home {
                    argv.push("-H".into());
                }
                argv.push(name.into());
                plan.push(Invocation {
                    argv,
                    ..Default::default()
                });
                for g in &groups {
                    plan.push(Invocation::new(&["addgroup", name, g]));
                }
            }
        }
        if let Some(hash) = &spec.password_hash {
            plan.push(self.root.chpasswd(tools, name, hash)?);
        }
        Ok(plan)
    }

    /// The commands that bring the existing `user` to `spec`.
    fn plan_modify(
        &self,
        tools: Tools,
        db: &Accounts,
        user: &PasswdEntry,
        spec: &UserSpec,
    ) -> Result<Vec<Invocation>, ProviderError> {
        let name = user.name.as_str();
        let diff = user_diff(db, user, spec);
        let changed = |field: &str| diff.iter().any(|d| d.field == field);
        let mut plan = Vec::new();
        match tools {
            Tools::Shadow => {
                let mut argv = self.root.shadow_tool("usermod")?;
                let base_len = argv.len();
                let mut push = |flag: &str, v: &str| argv.extend([flag.to_owned(), v.to_owned()]);
                if let (true, Some(uid)) = (changed("uid"), spec.uid) {
                    push("-u", &uid.to_string());
                }
                if let (true, Some(g)) = (changed("group"), &spec.group) {
                    push("-g", g);
                }
                if let (true, Some(groups)) = (changed("groups"), wanted_groups(spec)) {
                    // -G without -a sets the list exactly; "" removes every supplementary group.
                    push("-G", &groups.join(","));
                }
                if let (true, Some(h)) = (changed("home"), &spec.home) {
                    push("-d", h);
                }
                if let (true, Some(s)) = (changed("shell"), &spec.shell) {
                    push("-s", s);
                }
                if let (true, Some(c)) = (changed("comment"), &spec.comment) {
                    push("-c", c);
                }
                if argv.len() > base_len {
                    argv.push(name.into());
                    plan.push(Invocation {
                        argv,
                        ..Default::default()
                    });
                }
            }
            Tools::Busybox => {
                let unsupported: Vec<&str> = ["uid", "group", "home", "shell", "comment"]
                    .into_iter()
                    .filter(|f| changed(f))
                    .collect();
                if !unsupported.is_empty() {
                    return Err(ProviderError::Unsupported(format!(
                        "user {name}: busybox cannot change {} of an existing user (no usermod)",
                        unsupported.join(", ")
                    )));
                }
                if let (true, Some(wanted)) = (changed("groups"), wanted_groups(spec)) {
                    let actual = db.supplementary(name);
                    for g in wanted.iter().filter(|g| !actual.contains(g)) {
                        plan.push(Invocation::new(&["addgroup", name, g]));
                    }
                    for g in actual.iter().filter(|g| !wanted.contains(g)) {
                        plan.push(Invocation::new(&["delgroup", name, g]));
                    }
                }
            }
        }
        if let (true, Some(hash)) = (changed("password_hash"), &spec.password_hash) {
            plan.push(self.root.chpasswd(tools, name, hash)?);
        }
        Ok(plan)
    }

    fn plan_delete(&self, tools: Tools, name: &str) -> Result<Vec<Invocation>, ProviderError> {
        // Without -r / --remove-home: the home directory and mail spool are kept.
        let argv = match tools {
            Tools::Shadow => {
                let mut argv = self.root.shadow_tool("userdel")?;
                argv.push(name.into());
                argv
            }
            Tools::Busybox => vec!["deluser".into(), name.into()],
        };
        Ok(vec![Invocation {
            argv,
            ..Default::default()
        }])
    }
}

impl Provider for UserProvider {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let name = account_name(Collection::Users, id)?;
        let db = self.root.load(true)?;
        let Some(user) = db.user(name) else {
            return Ok(json!({ "ensure": "absent" }));
        };
        let mut out = json!({
            "ensure": "present",
            "uid": user.uid,
            "group": db.group_name(user.gid),
            "groups": db.supplementary(name),
            "home": user.home,
            "shell": user.shell,
            "comment": user.gecos,
        });
        if db.password(user).is_some_and(|p| !p.is_empty()) {
            out["password_hash"] = json!(Secret::REDACTED);
        }
        Ok(out)
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let name = account_name(Collection::Users, id)?;
        let Spec::User(spec) = spec else {
            return Err(ProviderError::Invalid(format!(
                "users/{name}: expected a user spec, got a {} spec",
                spec.collection()
            )));
        };
        let db = self.root.load(spec.password_hash.is_some())?;
        let actual = db.user(name);
        let diff = match (spec.ensure, actual) {
            (Ensure::Absent, None) => return Ok(Change::none()),
            (Ensure::Absent, Some(_)) => vec![ensure_diff(Ensure::Present, Ensure::Absent)],
            (Ensure::Present, None) => vec![ensure_diff(Ensure::Absent, Ensure::Present)],
            (Ensure::Present, Some(user)) => user_diff(&db, user, spec),
        };
        if diff.is_empty() || mode == ApplyMode::DryRun {
            return Ok(Change::from_diff(diff));
        }
        let tools = self.tools()?;
        let plan = match (spec.ensure, actual) {
            (Ensure::Absent, _) => self.plan_delete(tools, name)?,
            (Ensure::Present, None) => {
                check_groups(&db, name, spec, true)?;
                self.plan_create(tools, &db, name, spec)?
            }
            (Ensure::Present, Some(user)) => {
                check_groups(&db, name, spec, false)?;
                self.plan_modify(tools, &db, user, spec)?
            }
        };
        self.root.execute(&plan, spec.password_hash.as_ref())?;
        Ok(Change::from_diff(diff))
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        if under.is_some() {
            return Err(ProviderError::Invalid(
                "users are not a path collection: list takes no `under`".into(),
            ));
        }
        let mut names: Vec<String> = self
            .root
            .load(false)?
            .passwd
            .into_iter()
            .map(|u| u.name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

// ---------------------------------------------------------------------------------------------
// Groups.

/// The `groups` collection.
pub struct GroupProvider {
    root: Root,
}

impl GroupProvider {
    /// `prefix`: as for [`UserProvider::new`].
    pub fn new(runner: Arc<dyn Runner>, prefix: Option<PathBuf>) -> Self {
        GroupProvider {
            root: Root::new(runner, prefix),
        }
    }

    fn plan(
        &self,
        tools: Tools,
        name: &str,
        spec: &GroupSpec,
        actual: Option<&GroupEntry>,
    ) -> Result<Vec<Invocation>, ProviderError> {
        let argv = match (spec.ensure, actual, tools) {
            (Ensure::Absent, None, _) => return Ok(Vec::new()),
            (Ensure::Absent, Some(_), Tools::Shadow) => {
                let mut argv = self.root.shadow_tool("groupdel")?;
                argv.push(name.into());
                argv
            }
            (Ensure::Absent, Some(_), Tools::Busybox) => vec!["delgroup".into(), name.into()],
            (Ensure::Present, None, tools) => {
                let mut argv = match tools {
                    Tools::Shadow => self.root.shadow_tool("groupadd")?,
                    Tools::Busybox => vec!["addgroup".into()],
                };
                if spec.system {
                    argv.push(if tools == Tools::Shadow { "-r" } else { "-S" }.into());
                }
                if let Some(gid) = spec.gid {
                    argv.extend(["-g".into(), gid.to_string()]);
                }
                argv.push(name.into());
                argv
            }
            (Ensure::Present, Some(g), tools) => match spec.gid {
                Some(gid) if gid != g.gid => {
                    if tools == Tools::Busybox {
                        return Err(ProviderError::Unsupported(format!(
                            "group {name}: busybox cannot change the gid of an existing group \
                             (no groupmod)"
                        )));
                    }
                    let mut argv = self.root.shadow_tool("groupmod")?;
                    argv.extend(["-g".into(), gid.to_string(), name.into()]);
                    argv
                }
                _ => return Ok(Vec::new()),
            },
        };
        Ok(vec![Invocation {
            argv,
            ..Default::default()
        }])
    }
}

impl Provider for GroupProvider {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let name = account_name(Collection::Groups, id)?;
        let db = self.root.load(false)?;
        Ok(match db.group(name) {
            None => json!({ "ensure": "absent" }),
            Some(g) => json!({ "ensure": "present", "gid": g.gid }),
        })
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let name = account_name(Collection::Groups, id)?;
        let Spec::Group(spec) = spec else {
            return Err(ProviderError::Invalid(format!(
                "groups/{name}: expected a group spec, got a {} spec",
                spec.collection()
            )));
        };
        let db = self.root.load(false)?;
        let actual = db.group(name);
        let diff = match (spec.ensure, actual) {
            (Ensure::Absent, None) => Vec::new(),
            (Ensure::Absent, Some(_)) => vec![ensure_diff(Ensure::Present, Ensure::Absent)],
            (Ensure::Present, None) => vec![ensure_diff(Ensure::Absent, Ensure::Present)],
            (Ensure::Present, Some(g)) => match spec.gid {
                Some(gid) if gid != g.gid => vec![field_diff("gid", g.gid, gid)],
                _ => Vec::new(),
            },
        };
        if diff.is_empty() || mode == ApplyMode::DryRun {
            return Ok(Change::from_diff(diff));
        }
        let tools = self.root.tools("groupadd", "addgroup")?;
        let plan = self.plan(tools, name, spec, actual)?;
        self.root.execute(&plan, None)?;
        Ok(Change::from_diff(diff))
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        if under.is_some() {
            return Err(ProviderError::Invalid(
                "groups are not a path collection: list takes no `under`".into(),
            ));
        }
        let mut names: Vec<String> = self
            .root
            .load(false)?
            .groups
            .into_iter()
            .map(|g| g.name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::cmd::{which, CmdOutput, RecordingRunner, SystemRunner};

    use ApplyMode::{DryRun, Enforce};

    fn on_user(
        p: &UserProvider,
        name: &str,
        spec: Value,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        p.apply(&user(name), &user_spec(spec), mode)
    }

    fn on_group(
        p: &GroupProvider,
        name: &str,
        spec: Value,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        p.apply(&group(name), &group_spec(spec), mode)
    }

    const HASH_ONE: &str =
        "$6$c0m0d1t$hashOneAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    const HASH_TWO: &str =
        "$6$c0m0d1t$hashTwoBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\ndaemon:x:1:\nusers:x:100:\nnogroup:x:65534:\n";
    const SHADOW: &str = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n\
        nobody:*:19000:0:99999:7:::\n";
    const GSHADOW: &str = "root:*::\ndaemon:*::\nusers:*::\nnogroup:*::\n";
    /// What the tools need from login.defs, written here rather than copied from the host so the
    /// tests do not depend on its configuration. Without it useradd falls back to gid 100 and no
    /// user groups.
    const LOGIN_DEFS: &str = "UID_MIN 1000\nUID_MAX 60000\nSYS_UID_MIN 100\nSYS_UID_MAX 999\n\
        GID_MIN 1000\nGID_MAX 60000\nSYS_GID_MIN 100\nSYS_GID_MAX 999\n\
        USERGROUPS_ENAB yes\nENCRYPT_METHOD SHA512\nUMASK 022\n";

    /// A throwaway root holding only `etc/` with minimal account files.
    fn fake_root(passwd: &str, group: &str, shadow: &str) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        for (name, content, mode) in [
            ("passwd", passwd, 0o644),
            ("group", group, 0o644),
            ("shadow", shadow, 0o640),
            ("gshadow", GSHADOW, 0o640),
            ("login.defs", LOGIN_DEFS, 0o644),
        ] {
            let p = etc.join(name);
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        dir
    }

    /// The real shadow tools need root; on a machine without them or as a normal user the real
    /// tests say so and stop (the recording-runner tests below still run).
    fn real_tools_usable() -> bool {
        let ok = unsafe { libc::geteuid() } == 0 && which("useradd").is_some();
        if !ok {
            eprintln!("skipping: needs root and shadow-utils (useradd)");
        }
        ok
    }

    fn real(root: &tempfile::TempDir) -> (UserProvider, GroupProvider) {
        let runner: Arc<dyn Runner> = Arc::new(SystemRunner);
        let prefix = Some(root.path().to_path_buf());
        (
            UserProvider::new(runner.clone(), prefix.clone()),
            GroupProvider::new(runner, prefix),
        )
    }

    /// Providers that read a fixture root but write as in production (no prefix), through a
    /// recording runner.
    fn recorded(
        root: &tempfile::TempDir,
        rec: &Arc<RecordingRunner>,
        prefix: Option<&str>,
    ) -> (UserProvider, GroupProvider) {
        let mk = || Root {
            runner: rec.clone(),
            files: root.path().to_path_buf(),
            prefix: prefix.map(PathBuf::from),
        };
        (UserProvider { root: mk() }, GroupProvider { root: mk() })
    }

    fn user(name: &str) -> ResourceId {
        ResourceId::parse(Collection::Users, name).unwrap()
    }

    fn group(name: &str) -> ResourceId {
        ResourceId::parse(Collection::Groups, name).unwrap()
    }

    fn user_spec(v: Value) -> Spec {
        Spec::from_json(Collection::Users, v).unwrap()
    }

    fn group_spec(v: Value) -> Spec {
        Spec::from_json(Collection::Groups, v).unwrap()
    }

    fn etc_file(root: &tempfile::TempDir, name: &str) -> String {
        std::fs::read_to_string(root.path().join("etc").join(name)).unwrap()
    }

    fn etc_snapshot(root: &Path) -> Vec<Option<Vec<u8>>> {
        ["passwd", "group", "shadow", "gshadow", "subuid", "subgid"]
            .iter()
            .map(|f| std::fs::read(root.join("etc").join(f)).ok())
            .collect()
    }

    fn line_of<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(&format!("{name}:")))
    }

    fn diff(field: &str, from: Value, to: Value) -> FieldDiff {
        FieldDiff {
            field: field.into(),
            from,
            to,
        }
    }

    fn argvs(rec: &RecordingRunner) -> Vec<Vec<String>> {
        rec.calls
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.argv.clone())
            .collect()
    }

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    /// Everything a caller could see of a result, as text, to search for secrets.
    fn shown(change: &Result<Change, ProviderError>) -> String {
        match change {
            Ok(c) => format!("{}{:?}", serde_json::to_string(&c.diff).unwrap(), c),
            Err(e) => format!("{e}{e:?}"),
        }
    }

    // ----- real tools in a throwaway root -------------------------------------------------

    #[test]
    fn real_user_lifecycle_in_a_throwaway_root_never_touches_host_etc() {
        if !real_tools_usable() {
            return;
        }
        let host_before = etc_snapshot(Path::new("/"));
        let host_home_existed = Path::new("/home/alice").exists();
        let root = fake_root(PASSWD, GROUP, SHADOW);
        let (users, groups) = real(&root);
        let mut transcript = String::new();

        // Groups first, as a state would declare them.
        for (name, gid) in [("web", 2000), ("dev", 2001), ("ops", 2002)] {
            let spec = group_spec(json!({ "gid": gid }));
            let c = groups.apply(&group(name), &spec, Enforce).unwrap();
            assert_eq!(
                c.diff,
                vec![diff("ensure", json!("absent"), json!("present"))]
            );
            assert!(c.changed);
        }
        assert_eq!(
            groups.read(&group("web")).unwrap(),
            json!({"ensure": "present", "gid": 2000})
        );

        // Create the user with every field.
        let spec = user_spec(json!({
            "uid": 1500, "group": "web", "groups": ["ops", "dev"], "home": "/home/alice",
            "shell": "/bin/sh", "comment": "Alice Example", "password_hash": HASH_ONE,
        }));
        let c = users.apply(&user("alice"), &spec, Enforce);
        transcript += &shown(&c);
        let c = c.unwrap();
        assert!(c.changed);
        assert_eq!(
            c.diff,
            vec![diff("ensure", json!("absent"), json!("present"))]
        );

        let read = users.read(&user("alice")).unwrap();
        transcript += &read.to_string();
        assert_eq!(
            read,
            json!({
                "ensure": "present", "uid": 1500, "group": "web", "groups": ["dev", "ops"],
                "home": "/home/alice", "shell": "/bin/sh", "comment": "Alice Example",
                "password_hash": "<redacted>",
            })
        );
        // The files themselves, not only our reading of them.
        assert_eq!(
            line_of(&etc_file(&root, "passwd"), "alice"),
            Some("alice:x:1500:2000:Alice Example:/home/alice:/bin/sh")
        );
        let shadow_line = line_of(&etc_file(&root, "shadow"), "alice")
            .unwrap()
            .to_owned();
        assert_eq!(shadow_line.split(':').nth(1), Some(HASH_ONE));
        assert_eq!(
            line_of(&etc_file(&root, "group"), "dev"),
            Some("dev:x:2001:alice")
        );
        assert_eq!(
            line_of(&etc_file(&root, "group"), "ops"),
            Some("ops:x:2002:alice")
        );
        // The home was made inside the root, for the user.
        let home = root.path().join("home/alice");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&home).unwrap().uid(), 1500);
        assert_eq!(Path::new("/home/alice").exists(), host_home_existed);

        // Idempotent.
        let again = users.apply(&user("alice"), &spec, Enforce).unwrap();
        assert_eq!(again, Change::none());

        // Dry-run of a change reports it and writes nothing.
        let before = etc_snapshot(root.path());
        let mut bash = spec.clone();
        if let Spec::User(u) = &mut bash {
            u.shell = Some("/bin/bash".into());
        }
        let c = users.apply(&user("alice"), &bash, DryRun).unwrap();
        assert!(c.changed);
        assert_eq!(
            c.diff,
            vec![diff("shell", json!("/bin/sh"), json!("/bin/bash"))]
        );
        assert_eq!(etc_snapshot(root.path()), before);

        // The supplementary list is exact: ops is removed.
        let mut only_dev = spec.clone();
        if let Spec::User(u) = &mut only_dev {
            u.groups = Some(vec!["dev".into()]);
        }
        let c = users.apply(&user("alice"), &only_dev, Enforce).unwrap();
        assert_eq!(
            c.diff,
            vec![diff("groups", json!(["dev", "ops"]), json!(["dev"]))]
        );
        assert_eq!(
            line_of(&etc_file(&root, "group"), "ops"),
            Some("ops:x:2002:")
        );
        assert_eq!(
            line_of(&etc_file(&root, "group"), "dev"),
            Some("dev:x:2001:alice")
        );
        assert_eq!(
            users.read(&user("alice")).unwrap()["groups"],
            json!(["dev"])
        );

        // Drift: someone edits /etc/passwd behind the agent's back.
        let passwd = etc_file(&root, "passwd").replace(
            "alice:x:1500:2000:Alice Example:/home/alice:/bin/sh",
            "alice:x:1500:2000:Alice Example:/home/alice:/bin/dash",
        );
        std::fs::write(root.path().join("etc/passwd"), passwd).unwrap();
        let c = users.apply(&user("alice"), &only_dev, DryRun).unwrap();
        assert_eq!(
            c.diff,
            vec![diff("shell", json!("/bin/dash"), json!("/bin/sh"))]
        );
        users.apply(&user("alice"), &only_dev, Enforce).unwrap();
        assert_eq!(
            users.read(&user("alice")).unwrap()["shell"],
            json!("/bin/sh")
        );
        assert_eq!(
            users.apply(&user("alice"), &only_dev, Enforce).unwrap(),
            Change::none()
        );

        // A new hash: a redacted diff, in dry-run and enforce alike.
        let mut rehash = only_dev.clone();
        if let Spec::User(u) = &mut rehash {
            u.password_hash = Some(Secret::new(HASH_TWO));
        }
        let redacted = vec![diff(
            "password_hash",
            json!("<redacted>"),
            json!("<redacted>"),
        )];
        let before = etc_snapshot(root.path());
        let c = users.apply(&user("alice"), &rehash, DryRun);
        transcript += &shown(&c);
        assert_eq!(c.unwrap().diff, redacted);
        assert_eq!(etc_snapshot(root.path()), before);
        let c = users.apply(&user("alice"), &rehash, Enforce);
        transcript += &shown(&c);
        assert_eq!(c.unwrap().diff, redacted);
        let shadow_line = line_of(&etc_file(&root, "shadow"), "alice")
            .unwrap()
            .to_owned();
        assert_eq!(shadow_line.split(':').nth(1), Some(HASH_TWO));
        let c = users.apply(&user("alice"), &rehash, Enforce);
        transcript += &shown(&c);
        assert_eq!(c.unwrap(), Change::none());
        transcript += &users.read(&user("alice")).unwrap().to_string();
        assert_eq!(
            users.list(None).unwrap(),
            words(&["alice", "daemon", "nobody", "root"])
        );

        // Absent, twice; the home directory is kept.
        let absent = user_spec(json!({"ensure": "absent"}));
        let c = users.apply(&user("alice"), &absent, Enforce).unwrap();
        assert_eq!(
            c.diff,
            vec![diff("ensure", json!("present"), json!("absent"))]
        );
        assert_eq!(line_of(&etc_file(&root, "passwd"), "alice"), None);
        assert_eq!(line_of(&etc_file(&root, "shadow"), "alice"), None);
        assert!(home.is_dir());
        assert_eq!(
            users.apply(&user("alice"), &absent, Enforce).unwrap(),
            Change::none()
        );
        assert_eq!(
            users.read(&user("alice")).unwrap(),
            json!({"ensure": "absent"})
        );

        let absent = group_spec(json!({"ensure": "absent"}));
        for name in ["ops", "web"] {
            let c = groups.apply(&group(name), &absent, Enforce).unwrap();
            assert_eq!(
                c.diff,
                vec![diff("ensure", json!("present"), json!("absent"))]
            );
            assert_eq!(
                groups.apply(&group(name), &absent, Enforce).unwrap(),
                Change::none()
            );
            assert_eq!(line_of(&etc_file(&root, "group"), name), None);
        }
        assert_eq!(
            groups.list(None).unwrap(),
            words(&["daemon", "dev", "nogroup", "root", "users"])
        );

        for secret in [HASH_ONE, HASH_TWO, "hashOne", "hashTwo"] {
            assert!(!transcript.contains(secret), "a hash leaked: {transcript}");
        }
        assert!(
            transcript.contains("<redacted>"),
            "the transcript saw the redacted diffs"
        );
        assert_eq!(
            etc_snapshot(Path::new("/")),
            host_before,
            "the host's /etc was modified"
        );
    }

    #[test]
    fn real_missing_groups_are_clear_errors_at_enforce_only() {
        if !real_tools_usable() {
            return;
        }
        let root = fake_root(PASSWD, GROUP, SHADOW);
        let (users, _) = real(&root);
        let spec = user_spec(json!({"group": "nosuch"}));
        // A dry-run cannot know whether an earlier resource creates the group: it reports.
        let c = users.apply(&user("carol"), &spec, DryRun).unwrap();
        assert_eq!(
            c.diff,
            vec![diff("ensure", json!("absent"), json!("present"))]
        );
        let err = users.apply(&user("carol"), &spec, Enforce).unwrap_err();
        assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("carol") && msg.contains("\"nosuch\"") && msg.contains("field group"),
            "{msg}"
        );
        assert_eq!(line_of(&etc_file(&root, "passwd"), "carol"), None);

        let spec = user_spec(json!({"groups": ["users", "ghosts"]}));
        let err = users.apply(&user("carol"), &spec, Enforce).unwrap_err();
        assert!(
            err.to_string().contains("ghosts") && err.to_string().contains("field groups"),
            "{err}"
        );
        assert_eq!(line_of(&etc_file(&root, "passwd"), "carol"), None);

        // An existing user cannot be moved to a missing group either (only creation makes the
        // own-name group).
        on_user(&users, "carol", json!({}), Enforce).unwrap();
        let err = on_user(&users, "carol", json!({"group": "nosuch"}), Enforce).unwrap_err();
        assert!(err.to_string().contains("\"nosuch\""), "{err}");
    }

    #[test]
    fn real_own_name_group_system_users_and_gid_changes() {
        if !real_tools_usable() {
            return;
        }
        let root = fake_root(PASSWD, GROUP, SHADOW);
        let (users, groups) = real(&root);

        // The user's own group is created by useradd.
        let spec = user_spec(json!({"group": "bob", "uid": 1700}));
        users.apply(&user("bob"), &spec, Enforce).unwrap();
        assert_eq!(
            line_of(&etc_file(&root, "group"), "bob"),
            Some("bob:x:1700:")
        );
        assert_eq!(users.read(&user("bob")).unwrap()["group"], json!("bob"));
        assert!(
            root.path().join("home/bob").is_dir(),
            "manage_home defaults to true"
        );
        // No hash set: useradd leaves a lock marker, shown redacted.
        assert_eq!(
            users.read(&user("bob")).unwrap()["password_hash"],
            json!("<redacted>")
        );
        assert_eq!(
            users.apply(&user("bob"), &spec, Enforce).unwrap(),
            Change::none()
        );

        // A system user: a low uid and no home by default.
        let spec = user_spec(
            json!({"system": true, "home": "/var/lib/svc", "shell": "/usr/sbin/nologin"}),
        );
        users.apply(&user("svc"), &spec, Enforce).unwrap();
        let svc = users.read(&user("svc")).unwrap();
        assert!(svc["uid"].as_u64().unwrap() < 1000, "{svc}");
        assert!(!root.path().join("var/lib/svc").exists());

        // A group's gid changes with groupmod; a dry-run leaves the file alone.
        on_group(&groups, "app", json!({"gid": 3000}), Enforce).unwrap();
        let before = etc_file(&root, "group");
        let moved = group_spec(json!({"gid": 3001}));
        let c = groups.apply(&group("app"), &moved, DryRun).unwrap();
        assert_eq!(c.diff, vec![diff("gid", json!(3000), json!(3001))]);
        assert_eq!(etc_file(&root, "group"), before);
        groups.apply(&group("app"), &moved, Enforce).unwrap();
        assert_eq!(
            groups.read(&group("app")).unwrap(),
            json!({"ensure": "present", "gid": 3001})
        );
        assert_eq!(
            groups.apply(&group("app"), &moved, Enforce).unwrap(),
            Change::none()
        );

        // A system group gets a gid below GID_MIN.
        on_group(&groups, "sysgrp", json!({"system": true}), Enforce).unwrap();
        assert!(
            groups.read(&group("sysgrp")).unwrap()["gid"]
                .as_u64()
                .unwrap()
                < 1000
        );

        // A tool failure surfaces with its message: the primary group of a user cannot go.
        let err = on_group(&groups, "bob", json!({"ensure": "absent"}), Enforce).unwrap_err();
        assert!(
            err.to_string().contains("groupdel failed") && err.to_string().contains("bob"),
            "{err}"
        );
    }

    // ----- parsing ------------------------------------------------------------------------

    #[test]
    fn parsers_skip_comments_compat_and_malformed_lines() {
        let f = Path::new("/x");
        let passwd = parse_passwd(
            "# comment\n\nroot:x:0:0:root:/root:/bin/bash\r\n+nis\nbad:x:notanumber:0:::\n\
             short:x:1\nalice:x:1500:2000:A, B:/home/a:/bin/sh\n:x:1:1::/:/bin/sh\n",
            f,
        );
        assert_eq!(
            passwd.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            vec!["root", "alice"]
        );
        assert_eq!(passwd[0].shell, "/bin/bash", "CRLF is trimmed");
        assert_eq!(passwd[1].gecos, "A, B");
        let groups = parse_group("web:x:2000:\ndev:x:2001:alice,bob,\nbad:x::\n-x:x:1:\n", f);
        assert_eq!(groups.len(), 2);
        assert!(groups[0].members.is_empty());
        assert_eq!(groups[1].members, words(&["alice", "bob"]));
        let shadow = parse_shadow("alice:$6$x$y:1::::::\nlonely\nbob::1:\n", f);
        assert_eq!(shadow.get("alice").map(String::as_str), Some("$6$x$y"));
        assert_eq!(shadow.get("bob").map(String::as_str), Some(""));
        assert_eq!(shadow.len(), 2);
    }

    #[test]
    fn read_redacts_any_password_and_omits_an_empty_one() {
        let root = fake_root(
            "root:x:0:0:root:/root:/bin/bash\na:x:1001:0::/a:/bin/sh\nb:x:1002:0::/b:/bin/sh\n\
             c:x:1003:0::/c:/bin/sh\nd:legacyhash:1004:0::/d:/bin/sh\ne:x:1005:4242::/e:/bin/sh\n",
            GROUP,
            "a:$6$s$secret:1::::::\nb:!:1::::::\nc::1::::::\n",
        );
        let rec = Arc::new(RecordingRunner::new(&[]));
        let (users, _) = recorded(&root, &rec, None);
        for name in ["a", "b", "d"] {
            let r = users.read(&user(name)).unwrap();
            assert_eq!(r["password_hash"], json!("<redacted>"), "{name}");
            assert!(!r.to_string().contains("secret") && !r.to_string().contains("legacyhash"));
        }
        assert!(users
            .read(&user("c"))
            .unwrap()
            .get("password_hash")
            .is_none());
        assert!(users
            .read(&user("e"))
            .unwrap()
            .get("password_hash")
            .is_none());
        assert_eq!(
            users.read(&user("e")).unwrap()["group"],
            json!("4242"),
            "gid without a group"
        );
        assert!(rec.calls.lock().unwrap().is_empty());
    }

    // ----- exact command lines ------------------------------------------------------------

    const FIXTURE_PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1500:2000:Old Name:/home/old:/bin/bash\n";
    const FIXTURE_GROUP: &str =
        "root:x:0:\nwheel:x:10:\nweb:x:2000:\ndev:x:2001:alice\nops:x:2002:alice\n";
    const FIXTURE_SHADOW: &str = "root:*:19000::::::\nalice:$6$old$oldhash:19000::::::\n";

    fn fixture() -> tempfile::TempDir {
        fake_root(FIXTURE_PASSWD, FIXTURE_GROUP, FIXTURE_SHADOW)
    }

    const SHADOW_TOOLS: &[&str] = &[
        "useradd", "usermod", "userdel", "groupadd", "groupmod", "groupdel", "chpasswd",
    ];
    const BUSYBOX_TOOLS: &[&str] = &["adduser", "deluser", "addgroup", "delgroup", "chpasswd"];

    fn full_spec() -> Spec {
        user_spec(json!({
            "uid": 1600, "group": "web", "groups": ["ops", "dev", "ops"], "home": "/home/carol",
            "shell": "/bin/sh", "comment": "-Carol C", "password_hash": HASH_ONE,
        }))
    }

    fn answer_ok(rec: &RecordingRunner, n: usize) {
        for _ in 0..n {
            rec.answer(CmdOutput::ok(""));
        }
    }

    #[test]
    fn shadow_command_lines_in_production() {
        let root = fixture();
        let rec = Arc::new(RecordingRunner::new(SHADOW_TOOLS));
        let (users, groups) = recorded(&root, &rec, None);

        answer_ok(&rec, 2);
        users.apply(&user("carol"), &full_spec(), Enforce).unwrap();
        assert_eq!(
            argvs(&rec),
            vec![
                words(&[
                    "useradd",
                    "-u",
                    "1600",
                    "-g",
                    "web",
                    "-G",
                    "dev,ops",
                    "-d",
                    "/home/carol",
                    "-s",
                    "/bin/sh",
                    "-c",
                    "-Carol C",
                    "-m",
                    "carol",
                ]),
                words(&["chpasswd", "-e"]),
            ]
        );
        // The hash travels on stdin only.
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(
            calls[1].stdin.as_deref(),
            Some(format!("carol:{HASH_ONE}\n").as_str())
        );
        assert!(calls
            .iter()
            .all(|c| !c.argv.iter().any(|a| a.contains("hashOne"))));
        assert!(calls[0].stdin.is_none());

        // Modify: only what differs, in one usermod, then the hash.
        rec.calls.lock().unwrap().clear();
        answer_ok(&rec, 2);
        let spec = user_spec(json!({
            "uid": 1500, "group": "dev", "groups": ["wheel"], "home": "/home/alice",
            "shell": "/bin/sh", "comment": "", "password_hash": HASH_TWO, "manage_home": true,
        }));
        let c = users.apply(&user("alice"), &spec, Enforce).unwrap();
        assert_eq!(
            c.diff.iter().map(|d| d.field.as_str()).collect::<Vec<_>>(),
            vec![
                "group",
                "groups",
                "home",
                "shell",
                "comment",
                "password_hash"
            ]
        );
        assert_eq!(c.diff[0], diff("group", json!("web"), json!("dev")));
        assert_eq!(
            c.diff[1],
            diff("groups", json!(["dev", "ops"]), json!(["wheel"]))
        );
        assert_eq!(
            argvs(&rec),
            vec![
                words(&[
                    "usermod",
                    "-g",
                    "dev",
                    "-G",
                    "wheel",
                    "-d",
                    "/home/alice",
                    "-s",
                    "/bin/sh",
                    "-c",
                    "",
                    "alice",
                ]),
                words(&["chpasswd", "-e"]),
            ]
        );

        // Clearing every supplementary group; a hash-only change runs no usermod.
        rec.calls.lock().unwrap().clear();
        answer_ok(&rec, 1);
        on_user(&users, "alice", json!({"groups": []}), Enforce).unwrap();
        assert_eq!(rec.lines(), vec!["usermod -G  alice"]);
        rec.calls.lock().unwrap().clear();
        answer_ok(&rec, 1);
        on_user(&users, "alice", json!({"password_hash": HASH_TWO}), Enforce).unwrap();
        assert_eq!(rec.lines(), vec!["chpasswd -e"]);

        // Same hash: nothing runs.
        rec.calls.lock().unwrap().clear();
        let same = user_spec(json!({"password_hash": "$6$old$oldhash", "uid": 1500}));
        assert_eq!(
            users.apply(&user("alice"), &same, Enforce).unwrap(),
            Change::none()
        );

        // System user without a home, with its own (missing) group; then deletion.
        answer_ok(&rec, 2);
        on_user(
            &users,
            "svc",
            json!({"system": true, "group": "svc"}),
            Enforce,
        )
        .unwrap();
        on_user(&users, "alice", json!({"ensure": "absent"}), Enforce).unwrap();
        assert_eq!(rec.lines(), vec!["useradd -U -r -M svc", "userdel alice"]);

        rec.calls.lock().unwrap().clear();
        answer_ok(&rec, 3);
        on_group(
            &groups,
            "app",
            json!({"gid": 3000, "system": true}),
            Enforce,
        )
        .unwrap();
        on_group(&groups, "web", json!({"gid": 2100}), Enforce).unwrap();
        on_group(&groups, "ops", json!({"ensure": "absent"}), Enforce).unwrap();
        assert_eq!(
            rec.lines(),
            vec![
                "groupadd -r -g 3000 app",
                "groupmod -g 2100 web",
                "groupdel ops"
            ]
        );
    }

    #[test]
    fn shadow_command_lines_with_a_prefix() {
        let root = fixture();
        let rec = Arc::new(RecordingRunner::new(SHADOW_TOOLS));
        let (users, groups) = recorded(&root, &rec, Some("/srv/root"));
        answer_ok(&rec, 8);
        users.apply(&user("carol"), &full_spec(), Enforce).unwrap();
        on_user(
            &users,
            "alice",
            json!({"shell": "/bin/sh", "password_hash": HASH_TWO}),
            Enforce,
        )
        .unwrap();
        on_user(&users, "alice", json!({"ensure": "absent"}), Enforce).unwrap();
        on_group(&groups, "app", json!({}), Enforce).unwrap();
        on_group(&groups, "web", json!({"gid": 1}), Enforce).unwrap();
        on_group(&groups, "web", json!({"ensure": "absent"}), Enforce).unwrap();
        assert_eq!(
            rec.lines(),
            vec![
                "useradd --prefix /srv/root -u 1600 -g web -G dev,ops -d /home/carol -s /bin/sh -c -Carol C -m carol",
                "chpasswd -e -R /srv/root",
                "usermod --prefix /srv/root -s /bin/sh alice",
                "chpasswd -e -R /srv/root",
                "userdel --prefix /srv/root alice",
                "groupadd --prefix /srv/root app",
                "groupmod --prefix /srv/root -g 1 web",
                "groupdel --prefix /srv/root web",
            ]
        );
    }

    #[test]
    fn busybox_command_lines_and_limits() {
        let root = fixture();
        let rec = Arc::new(RecordingRunner::new(BUSYBOX_TOOLS));
        let (users, groups) = recorded(&root, &rec, None);

        answer_ok(&rec, 4);
        users.apply(&user("carol"), &full_spec(), Enforce).unwrap();
        assert_eq!(
            argvs(&rec),
            vec![
                words(&[
                    "adduser",
                    "-D",
                    "-u",
                    "1600",
                    "-G",
                    "web",
                    "-h",
                    "/home/carol",
                    "-s",
                    "/bin/sh",
                    "-g",
                    "-Carol C",
                    "carol",
                ]),
                words(&["addgroup", "carol", "dev"]),
                words(&["addgroup", "carol", "ops"]),
                words(&["chpasswd", "-e"]),
            ]
        );
        assert_eq!(
            rec.calls.lock().unwrap()[3].stdin.as_deref(),
            Some(format!("carol:{HASH_ONE}\n").as_str())
        );

        // System users: busybox would give them "nogroup", so their own group comes first; a
        // normal user's own group is left to adduser (gid = uid).
        rec.calls.lock().unwrap().clear();
        answer_ok(&rec, 3);
        on_user(
            &users,
            "svc",
            json!({"system": true, "group": "svc"}),
            Enforce,
        )
        .unwrap();
        on_user(
            &users,
            "dave",
            json!({"group": "dave", "manage_home": false}),
            Enforce,
        )
        .unwrap();
        assert_eq!(
            rec.lines(),
            vec![
                "addgroup -S svc",
                "adduser -D -S -G svc -H svc",
                "adduser -D -H dave"
            ]
        );

        // Supplementary groups and the hash can change; other fields cannot, and nothing runs.
        rec.calls.lock().unwrap().clear();
        answer_ok(&rec, 3);
        on_user(
            &users,
            "alice",
            json!({"groups": ["dev", "wheel"], "password_hash": HASH_TWO}),
            Enforce,
        )
        .unwrap();
        assert_eq!(
            rec.lines(),
            vec!["addgroup alice wheel", "delgroup alice ops", "chpasswd -e"]
        );
        rec.calls.lock().unwrap().clear();
        let err = on_user(
            &users,
            "alice",
            json!({"shell": "/bin/sh", "uid": 7, "groups": []}),
            Enforce,
        )
        .unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("uid, shell"), "{err}");
        assert!(rec.calls.lock().unwrap().is_empty());
        // A dry-run still reports the drift.
        let c = on_user(&users, "alice", json!({"shell": "/bin/sh"}), DryRun).unwrap();
        assert_eq!(
            c.diff,
            vec![diff("shell", json!("/bin/bash"), json!("/bin/sh"))]
        );

        answer_ok(&rec, 3);
        on_user(&users, "alice", json!({"ensure": "absent"}), Enforce).unwrap();
        on_group(
            &groups,
            "app",
            json!({"gid": 3000, "system": true}),
            Enforce,
        )
        .unwrap();
        on_group(&groups, "ops", json!({"ensure": "absent"}), Enforce).unwrap();
        assert_eq!(
            rec.lines(),
            vec!["deluser alice", "addgroup -S -g 3000 app", "delgroup ops"]
        );
        let err = on_group(&groups, "web", json!({"gid": 2100}), Enforce).unwrap_err();
        assert!(
            matches!(err, ProviderError::Unsupported(_)) && err.to_string().contains("gid"),
            "{err}"
        );

        // Busybox has no prefix option.
        let (users, groups) = recorded(&root, &rec, Some("/srv/root"));
        let err = users
            .apply(&user("carol"), &full_spec(), Enforce)
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{err:?}");
        let err = on_group(&groups, "app", json!({}), Enforce).unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{err:?}");
    }

    #[test]
    fn without_tools_dry_run_works_and_enforce_is_unsupported() {
        let root = fixture();
        let rec = Arc::new(RecordingRunner::new(&[]));
        let (users, groups) = recorded(&root, &rec, None);
        let c = users.apply(&user("carol"), &full_spec(), DryRun).unwrap();
        assert!(c.changed);
        let err = users
            .apply(&user("carol"), &full_spec(), Enforce)
            .unwrap_err();
        assert!(
            err.to_string().contains("neither useradd nor adduser"),
            "{err}"
        );
        let err = on_group(&groups, "x", json!({}), Enforce).unwrap_err();
        assert!(
            err.to_string().contains("neither groupadd nor addgroup"),
            "{err}"
        );
        assert!(rec.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn tool_failures_stop_the_plan_and_never_carry_the_hash() {
        let root = fixture();
        let rec = Arc::new(RecordingRunner::new(SHADOW_TOOLS));
        let (users, _) = recorded(&root, &rec, None);

        rec.answer(CmdOutput::fail(4, "useradd: UID 1600 is not unique\n"));
        let err = users
            .apply(&user("carol"), &full_spec(), Enforce)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "useradd failed: useradd: UID 1600 is not unique"
        );
        assert_eq!(
            rec.lines().len(),
            1,
            "chpasswd must not run after a failed useradd"
        );

        // A tool that echoes its input back in an error.
        rec.calls.lock().unwrap().clear();
        rec.answer(CmdOutput::ok(""));
        rec.answer(CmdOutput::fail(
            1,
            &format!("chpasswd: line 1: bad entry carol:{HASH_ONE}"),
        ));
        let result = users.apply(&user("carol"), &full_spec(), Enforce);
        let text = shown(&result);
        assert!(
            text.contains("chpasswd failed") && text.contains("<redacted>"),
            "{text}"
        );
        assert!(!text.contains("hashOne"), "{text}");
    }

    #[test]
    fn mismatched_specs_and_ids_are_invalid() {
        let root = fixture();
        let rec = Arc::new(RecordingRunner::new(SHADOW_TOOLS));
        let (users, groups) = recorded(&root, &rec, None);
        let err = users
            .apply(&user("alice"), &group_spec(json!({})), DryRun)
            .unwrap_err();
        assert!(err.to_string().contains("expected a user spec"), "{err}");
        let err = groups
            .apply(&group("web"), &user_spec(json!({})), DryRun)
            .unwrap_err();
        assert!(err.to_string().contains("expected a group spec"), "{err}");
        let path = ResourceId::parse(Collection::Files, "/etc/passwd").unwrap();
        assert!(matches!(users.read(&path), Err(ProviderError::Invalid(_))));
        assert!(users.list(Some("/home")).is_err());
        assert_eq!(users.list(None).unwrap(), words(&["alice", "root"]));
        assert_eq!(
            groups.list(None).unwrap(),
            words(&["dev", "ops", "root", "web", "wheel"])
        );
        assert!(rec.calls.lock().unwrap().is_empty());
    }
}
