//! Packages: a package present (optionally at a pinned version), absent, or at the newest version
//! the configured repositories offer, through the host's package manager.
//!
//! [`for_platform`] picks a [`Backend`] for the manager the platform detection found — [`Apt`],
//! [`Rpm`] (dnf, yum and zypper: they share `rpm` for queries) or [`Apk`] — and wraps it in
//! [`Packages`], which holds the logic every manager shares:
//!
//! 1. query the installed versions (and, for `ensure: latest`, whether an upgrade is offered);
//! 2. [`plan`]: plain code over those answers that yields the diff and the one action to take;
//! 3. in `Enforce` only, run the action, then query again and fail if the tool claimed success but
//!    the package is not in the wanted state (yum ignoring a downgrade, apk keeping a package that
//!    another one still depends on). A dry-run issues queries only.
//!
//! | manager | installed?                          | install / pin                       | upgrade offered?          | upgrade                 | remove          |
//! |---------|-------------------------------------|-------------------------------------|---------------------------|-------------------------|-----------------|
//! | apt     | `dpkg-query -W -f=${Status}\t${Version}\n` | `apt-get install … name[=v]`  | `apt-cache policy` Candidate | `apt-get install … name` | `apt-get remove` |
//! | dnf/yum | `rpm -q --qf %{VERSION}-%{RELEASE}\n` | `dnf -y install name[-v]` (`downgrade` when older) | `dnf -q check-update` exit 100 | `dnf -y upgrade` | `dnf -y remove` |
//! | zypper  | `rpm -q …`                          | `zypper -n install [--oldpackage] name[=v]` | `zypper -n -q list-updates` | `zypper -n update` | `zypper -n remove` |
//! | apk     | `apk list --installed name`         | `apk add name[=v]`                  | `apk list --upgradable name` | `apk add --upgrade name` | `apk del`   |
//!
//! Version pins are written in the manager's own syntax and compared with what its query prints:
//! exactly for apt (epoch included, as `dpkg-query` prints it) and apk (`2.10-r3`); for rpm
//! families a pin may leave out the release (`2.10` matches an installed `2.10-3.el9`) and an
//! epoch (`1:`) is ignored, since the query does not print it.
//!
//! `read` answers `{"ensure": "present", "version": "…"}` or `{"ensure": "absent"}`; when several
//! versions are installed side by side (kernels) it shows the last one the query printed, and a
//! pin is satisfied when any of them matches.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use comodit_protocol::{ApplyMode, FieldDiff, PackageEnsure, PackageSpec, ResourceId, Spec};
use serde_json::{json, Value};

use super::cmd::{trim_detail, CmdOutput, Invocation, Runner};
use super::{field_diff, no_under, Change, Provider, ProviderError, Unsupported};
use crate::platform::{PackageManager, Platform};

/// Read-only queries (dpkg-query, rpm -q, apt-cache, check-update).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Installs, upgrades and removals: downloads and maintainer scripts can be slow.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The packages provider for this host, or one that refuses every call when the host has no
/// package manager the agent knows.
pub fn for_platform(platform: &Platform, runner: Arc<dyn Runner>) -> Box<dyn Provider> {
    match platform.package_manager {
        Some(PackageManager::Apt) => Box::new(Packages::new(Apt::new(runner))),
        Some(PackageManager::Dnf) => Box::new(Packages::new(Rpm::new(runner, RpmTool::Dnf))),
        Some(PackageManager::Yum) => Box::new(Packages::new(Rpm::new(runner, RpmTool::Yum))),
        Some(PackageManager::Zypper) => Box::new(Packages::new(Rpm::new(runner, RpmTool::Zypper))),
        Some(PackageManager::Apk) => Box::new(Packages::new(Apk::new(runner))),
        None => Box::new(Unsupported::new(
            "packages",
            format!(
                "no supported package manager (apt, dnf, yum, zypper, apk) on this host ({} {})",
                platform.distribution, platform.version
            ),
        )),
    }
}

/// What one package manager knows how to do. Implementations only query and act; deciding what
/// to do is [`plan`]'s job.
pub trait Backend: Send + Sync {
    /// The installed versions of `name`, in the order the query printed them; empty when the
    /// package is not installed.
    fn installed(&self, name: &str) -> Result<Vec<String>, ProviderError>;

    /// The version an upgrade of the installed `name` would bring, `None` when it is up to date.
    fn upgrade_available(
        &self,
        name: &str,
        installed: &[String],
    ) -> Result<Option<String>, ProviderError>;

    /// Installs `name` (at `version` when pinned, possibly downgrading); `installed` is what the
    /// query found just before.
    fn install(
        &self,
        name: &str,
        version: Option<&str>,
        installed: &[String],
    ) -> Result<(), ProviderError>;

    fn upgrade(&self, name: &str) -> Result<(), ProviderError>;

    fn remove(&self, name: &str) -> Result<(), ProviderError>;

    /// Names of all installed packages (unsorted, may repeat).
    fn list(&self) -> Result<Vec<String>, ProviderError>;

    /// Whether an installed version satisfies a pin.
    fn version_matches(&self, installed: &str, pin: &str) -> bool {
        installed == pin
    }
}

/// The one change a package needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Install(Option<String>),
    /// Upgrade to the version the repositories offer.
    Upgrade(String),
    Remove,
}

/// Decides what differs and what to run. `upgrade` is the version an upgrade would bring (only
/// asked for `ensure: latest` on an installed package).
pub fn plan(
    spec: &PackageSpec,
    installed: &[String],
    upgrade: Option<&str>,
    matches: impl Fn(&str, &str) -> bool,
) -> (Vec<FieldDiff>, Action) {
    let current = installed.last().map(String::as_str);
    match (spec.ensure, current) {
        (PackageEnsure::Absent, None) => (vec![], Action::Nothing),
        (PackageEnsure::Absent, Some(_)) => (
            vec![field_diff("ensure", "present", "absent")],
            Action::Remove,
        ),
        (PackageEnsure::Present | PackageEnsure::Latest, None) => {
            let mut diff = vec![field_diff("ensure", "absent", "present")];
            if let Some(pin) = &spec.version {
                diff.push(field_diff("version", Value::Null, pin.as_str()));
            }
            (diff, Action::Install(spec.version.clone()))
        }
        (PackageEnsure::Present, Some(current)) => match &spec.version {
            Some(pin) if !installed.iter().any(|v| matches(v, pin)) => (
                vec![field_diff("version", current, pin.as_str())],
                Action::Install(Some(pin.clone())),
            ),
            _ => (vec![], Action::Nothing),
        },
        (PackageEnsure::Latest, Some(current)) => match upgrade {
            Some(to) => (
                vec![field_diff("version", current, to)],
                Action::Upgrade(to.to_owned()),
            ),
            None => (vec![], Action::Nothing),
        },
    }
}

/// The packages collection over one package manager.
pub struct Packages<B> {
    backend: B,
}

impl<B: Backend> Packages<B> {
    pub fn new(backend: B) -> Self {
        Packages { backend }
    }

    /// After an action: does the host now hold what was asked? Tools sometimes exit 0 without
    /// doing it (yum refusing a downgrade, apk keeping a package another one depends on).
    fn verify(&self, name: &str, action: &Action) -> Result<(), ProviderError> {
        let after = self.backend.installed(name)?;
        let fail = |wanted: String| {
            let now = match after.last() {
                Some(v) => format!("installed at {v}"),
                None => "not installed".to_owned(),
            };
            Err(ProviderError::Failed {
                what: format!("package {name}"),
                detail: format!(
                    "the package manager reported success but {name} is {now} (wanted {wanted})"
                ),
            })
        };
        match action {
            Action::Nothing => Ok(()),
            Action::Remove if after.is_empty() => Ok(()),
            Action::Remove => fail("absent".into()),
            Action::Install(None) if !after.is_empty() => Ok(()),
            Action::Install(None) => fail("present".into()),
            Action::Install(Some(v)) | Action::Upgrade(v) => {
                if after.iter().any(|i| self.backend.version_matches(i, v)) {
                    Ok(())
                } else {
                    fail(format!("version {v}"))
                }
            }
        }
    }
}

impl<B: Backend> Provider for Packages<B> {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let installed = self.backend.installed(id.as_str())?;
        Ok(match installed.last() {
            Some(v) => json!({"ensure": "present", "version": v}),
            None => json!({"ensure": "absent"}),
        })
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let Spec::Package(spec) = spec else {
            return Err(ProviderError::Invalid(format!(
                "package {id}: expected a package spec, got a {} spec",
                spec.collection()
            )));
        };
        if spec.ensure == PackageEnsure::Latest && spec.version.is_some() {
            return Err(ProviderError::Invalid(format!(
                "package {id}: a version pin and ensure: latest are exclusive"
            )));
        }
        let name = id.as_str();
        let installed = self.backend.installed(name)?;
        let upgrade = if spec.ensure == PackageEnsure::Latest && !installed.is_empty() {
            self.backend.upgrade_available(name, &installed)?
        } else {
            None
        };
        let (diff, action) = plan(spec, &installed, upgrade.as_deref(), |i, p| {
            self.backend.version_matches(i, p)
        });
        if mode == ApplyMode::DryRun || action == Action::Nothing {
            return Ok(Change::from_diff(diff));
        }
        tracing::info!(package = name, action = ?action, "changing package");
        match &action {
            Action::Nothing => {}
            Action::Install(v) => self.backend.install(name, v.as_deref(), &installed)?,
            Action::Upgrade(_) => self.backend.upgrade(name)?,
            Action::Remove => self.backend.remove(name)?,
        }
        self.verify(name, &action)?;
        Ok(Change::from_diff(diff))
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        no_under(under)?;
        let mut names = self.backend.list()?;
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// Runs `argv` and returns its output whatever the exit code (callers interpret it).
fn run(
    runner: &dyn Runner,
    inv: &Invocation,
    timeout: Duration,
) -> Result<CmdOutput, ProviderError> {
    runner.run(inv, timeout)
}

/// The error for a tool that ran and failed: names the command (program, subcommand, package)
/// and carries its stderr (or stdout when stderr is empty).
fn failed(what: impl Into<String>, out: &CmdOutput) -> ProviderError {
    let text = if out.stderr.trim().is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    let mut detail = trim_detail(text);
    if detail.is_empty() {
        detail = match out.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".to_owned(),
        };
    }
    ProviderError::Failed {
        what: what.into(),
        detail,
    }
}

fn argv(parts: &[&str]) -> Invocation {
    Invocation::new(parts)
}

// ----------------------------------------------------------------------------------------------
// apt / dpkg

/// Debian and Ubuntu: `dpkg-query` for state, `apt-get` for changes, `apt-cache policy` for the
/// candidate version.
pub struct Apt {
    runner: Arc<dyn Runner>,
    /// Pause before the one retry when apt-get finds the dpkg lock taken. apt 1.9.11 and later
    /// wait for the lock themselves (`DPkg::Lock::Timeout`); older ones fail at once, and a
    /// concurrent unattended-upgrades run is the usual reason.
    pub lock_retry_pause: Duration,
}

/// How long apt-get itself waits for the dpkg lock (apt ≥ 1.9.11; older versions ignore it).
const APT_LOCK_TIMEOUT: &str = "DPkg::Lock::Timeout=120";

impl Apt {
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        Apt {
            runner,
            lock_retry_pause: Duration::from_secs(10),
        }
    }

    /// Runs a mutating apt-get call, retrying once when the dpkg lock was taken.
    fn apt_get(&self, what: String, args: &[&str]) -> Result<(), ProviderError> {
        let mut parts = vec!["apt-get"];
        parts.extend_from_slice(args);
        let inv = argv(&parts).env("DEBIAN_FRONTEND", "noninteractive");
        let mut out = run(&*self.runner, &inv, CHANGE_TIMEOUT)?;
        if !out.success() && is_lock_error(&out.stderr) {
            tracing::warn!(command = %what, "dpkg lock taken, retrying once");
            std::thread::sleep(self.lock_retry_pause);
            out = run(&*self.runner, &inv, CHANGE_TIMEOUT)?;
        }
        if out.success() {
            Ok(())
        } else {
            Err(failed(what, &out))
        }
    }
}

fn is_lock_error(stderr: &str) -> bool {
    stderr.contains("Could not get lock")
        || stderr.contains("Unable to acquire the dpkg frontend lock")
        || stderr.contains("Unable to lock the administration directory")
}

/// Parses `${Status}\t${Version}` lines: the versions whose status word is `installed` (a removed
/// package keeps a `deinstall ok config-files` line, which is not installed).
pub fn parse_dpkg_status(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            let (status, version) = l.split_once('\t')?;
            (status.split_whitespace().nth(2) == Some("installed"))
                .then(|| version.trim().to_owned())
        })
        .filter(|v| !v.is_empty())
        .collect()
}

/// The `Candidate:` of `apt-cache policy`, `None` for `(none)` or an unknown package.
pub fn parse_apt_candidate(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|c| !c.is_empty())
        .filter(|c| *c != "(none)")
        .map(str::to_owned)
}

impl Backend for Apt {
    fn installed(&self, name: &str) -> Result<Vec<String>, ProviderError> {
        let out = run(
            &*self.runner,
            &argv(&["dpkg-query", "-W", "-f=${Status}\\t${Version}\\n", name]),
            QUERY_TIMEOUT,
        )?;
        match out.code {
            Some(0) => Ok(parse_dpkg_status(&out.stdout)),
            Some(1) if out.stderr.contains("no packages found") => Ok(vec![]),
            _ => Err(failed(format!("dpkg-query {name}"), &out)),
        }
    }

    fn upgrade_available(
        &self,
        name: &str,
        installed: &[String],
    ) -> Result<Option<String>, ProviderError> {
        let out = run(
            &*self.runner,
            &argv(&["apt-cache", "policy", name]),
            QUERY_TIMEOUT,
        )?;
        if !out.success() {
            return Err(failed(format!("apt-cache policy {name}"), &out));
        }
        // A package installed from elsewhere (a local .deb) may have no candidate: nothing to
        // upgrade to.
        Ok(parse_apt_candidate(&out.stdout).filter(|c| !installed.contains(c)))
    }

    fn install(
        &self,
        name: &str,
        version: Option<&str>,
        _installed: &[String],
    ) -> Result<(), ProviderError> {
        let target = match version {
            Some(v) => format!("{name}={v}"),
            None => name.to_owned(),
        };
        let mut args = vec![
            "install",
            "-y",
            "-q",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            "-o",
            APT_LOCK_TIMEOUT,
        ];
        // A pin below the installed version is a downgrade, which -y alone refuses.
        if version.is_some() {
            args.push("--allow-downgrades");
        }
        args.push(&target);
        self.apt_get(format!("apt-get install {target}"), &args)
    }

    fn upgrade(&self, name: &str) -> Result<(), ProviderError> {
        // `apt-get install` of an installed package upgrades it to the candidate.
        self.install(name, None, &[])
    }

    fn remove(&self, name: &str) -> Result<(), ProviderError> {
        self.apt_get(
            format!("apt-get remove {name}"),
            &["remove", "-y", "-q", "-o", APT_LOCK_TIMEOUT, name],
        )
    }

    fn list(&self) -> Result<Vec<String>, ProviderError> {
        let out = run(
            &*self.runner,
            &argv(&["dpkg-query", "-W", "-f=${binary:Package}\\t${Status}\\n"]),
            QUERY_TIMEOUT,
        )?;
        if !out.success() {
            return Err(failed("dpkg-query", &out));
        }
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| {
                let (name, status) = l.split_once('\t')?;
                (status.split_whitespace().nth(2) == Some("installed")).then(|| name.to_owned())
            })
            .collect())
    }
}

// ----------------------------------------------------------------------------------------------
// rpm families

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpmTool {
    Dnf,
    Yum,
    Zypper,
}

/// Red Hat and SUSE families: `rpm -q` for state, dnf, yum or zypper for changes.
pub struct Rpm {
    runner: Arc<dyn Runner>,
    tool: RpmTool,
}

/// zypper's exit codes that mean "done": 0, 100–103 (updates/reboot/restart needed), 106 (some
/// repositories skipped). The query after the action tells whether the package really is there.
fn zypper_ok(code: Option<i32>) -> bool {
    matches!(code, Some(0 | 100..=103 | 106))
}

/// The version column of `dnf check-update` / `yum check-update` for `name` (lines are
/// `name.arch  version  repo`).
pub fn parse_check_update(stdout: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}.");
    stdout.lines().find_map(|l| {
        let mut cols = l.split_whitespace();
        let pkg = cols.next()?;
        let version = cols.next()?;
        let arch = pkg.strip_prefix(&prefix)?;
        // `name.arch` only: `name.foo.arch` belongs to package `name.foo`.
        (!arch.contains('.')).then(|| version.to_owned())
    })
}

/// The "Available Version" column of `zypper list-updates` for `name`.
pub fn parse_zypper_updates(stdout: &str, name: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let cols: Vec<&str> = l.split('|').map(str::trim).collect();
        (cols.len() >= 5 && cols[0] != "S" && cols[2] == name).then(|| cols[4].to_owned())
    })
}

/// Drops a leading `epoch:` from an rpm version string.
fn strip_epoch(v: &str) -> &str {
    match v.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()) => rest,
        _ => v,
    }
}

/// rpm's version comparison (`rpmvercmp`): alternating numeric and alphabetic segments,
/// separators ignored, numbers newer than letters, `~` sorts before anything (pre-releases) and
/// `^` after the base version but before any further segment (post-release snapshots).
pub fn rpmvercmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    let sep = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    loop {
        while a.first().is_some_and(|&c| sep(c)) {
            a = &a[1..];
        }
        while b.first().is_some_and(|&c| sep(c)) {
            b = &b[1..];
        }
        match (a.first(), b.first()) {
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (Some(b'^'), Some(b'^')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'^'), None) => return Ordering::Greater,
            (None, Some(b'^')) => return Ordering::Less,
            (Some(b'^'), _) => return Ordering::Less,
            (_, Some(b'^')) => return Ordering::Greater,
            (None, _) | (_, None) => break,
            _ => {}
        }
        let numeric = a[0].is_ascii_digit();
        let take = |s: &[u8]| -> usize {
            s.iter()
                .take_while(|c| {
                    if numeric {
                        c.is_ascii_digit()
                    } else {
                        c.is_ascii_alphabetic()
                    }
                })
                .count()
        };
        let (la, lb) = (take(a), take(b));
        let (sa, sb) = (&a[..la], &b[..lb]);
        if sb.is_empty() {
            // Segments of different kinds: a number is newer than letters.
            return if numeric {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let ord = if numeric {
            let trim =
                |s: &[u8]| -> Vec<u8> { s.iter().copied().skip_while(|&c| c == b'0').collect() };
            let (ta, tb) = (trim(sa), trim(sb));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(&tb))
        } else {
            sa.cmp(sb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
        a = &a[la..];
        b = &b[lb..];
    }
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// Compares a pin (`version` or `version-release`, epoch ignored) with an installed
/// `version-release`; a pin without a release compares versions only.
pub fn rpm_pin_cmp(pin: &str, installed: &str) -> Ordering {
    let pin = strip_epoch(pin);
    let (pv, pr) = match pin.split_once('-') {
        Some((v, r)) => (v, Some(r)),
        None => (pin, None),
    };
    let (iv, ir) = installed.split_once('-').unwrap_or((installed, ""));
    rpmvercmp(pv, iv).then_with(|| match pr {
        Some(pr) => rpmvercmp(pr, ir),
        None => Ordering::Equal,
    })
}

impl Rpm {
    pub fn new(runner: Arc<dyn Runner>, tool: RpmTool) -> Self {
        Rpm { runner, tool }
    }

    fn program(&self) -> &'static str {
        match self.tool {
            RpmTool::Dnf => "dnf",
            RpmTool::Yum => "yum",
            RpmTool::Zypper => "zypper",
        }
    }

    /// Runs a mutating command; `what` names it in errors.
    fn change(&self, what: String, parts: &[&str]) -> Result<(), ProviderError> {
        let out = run(&*self.runner, &argv(parts), CHANGE_TIMEOUT)?;
        let ok = match self.tool {
            RpmTool::Zypper => zypper_ok(out.code),
            _ => out.success(),
        };
        if ok {
            Ok(())
        } else {
            Err(failed(what, &out))
        }
    }
}

impl Backend for Rpm {
    fn installed(&self, name: &str) -> Result<Vec<String>, ProviderError> {
        let out = run(
            &*self.runner,
            &argv(&["rpm", "-q", "--qf", "%{VERSION}-%{RELEASE}\\n", name]),
            QUERY_TIMEOUT,
        )?;
        match out.code {
            Some(0) => Ok(out
                .stdout
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()),
            Some(1) if out.stdout.contains("is not installed") => Ok(vec![]),
            _ => Err(failed(format!("rpm -q {name}"), &out)),
        }
    }

    fn upgrade_available(
        &self,
        name: &str,
        _installed: &[String],
    ) -> Result<Option<String>, ProviderError> {
        match self.tool {
            RpmTool::Dnf | RpmTool::Yum => {
                let program = self.program();
                let out = run(
                    &*self.runner,
                    &argv(&[program, "-q", "check-update", name]),
                    QUERY_TIMEOUT,
                )?;
                match out.code {
                    // 100: updates are available, and listed.
                    Some(100) => match parse_check_update(&out.stdout, name) {
                        Some(v) => Ok(Some(v)),
                        None => Err(ProviderError::Failed {
                            what: format!("{program} check-update {name}"),
                            detail: format!(
                                "exit 100 but no line for {name} in: {}",
                                trim_detail(&out.stdout)
                            ),
                        }),
                    },
                    Some(0) => Ok(None),
                    _ => Err(failed(format!("{program} check-update {name}"), &out)),
                }
            }
            RpmTool::Zypper => {
                let out = run(
                    &*self.runner,
                    &argv(&["zypper", "--non-interactive", "--quiet", "list-updates"]),
                    QUERY_TIMEOUT,
                )?;
                if !zypper_ok(out.code) {
                    return Err(failed("zypper list-updates", &out));
                }
                Ok(parse_zypper_updates(&out.stdout, name))
            }
        }
    }

    fn install(
        &self,
        name: &str,
        version: Option<&str>,
        installed: &[String],
    ) -> Result<(), ProviderError> {
        match self.tool {
            RpmTool::Dnf | RpmTool::Yum => {
                let program = self.program();
                let target = match version {
                    Some(v) => format!("{name}-{v}"),
                    None => name.to_owned(),
                };
                // `install` of an older version is refused (yum) or a no-op; a single installed
                // version newer than the pin calls for `downgrade`.
                let older = match (version, installed) {
                    (Some(v), [only]) => rpm_pin_cmp(v, only) == Ordering::Less,
                    _ => false,
                };
                let verb = if older { "downgrade" } else { "install" };
                self.change(
                    format!("{program} {verb} {target}"),
                    &[program, "-y", verb, &target],
                )
            }
            RpmTool::Zypper => {
                let mut parts = vec![
                    "zypper",
                    "--non-interactive",
                    "install",
                    "--auto-agree-with-licenses",
                ];
                let target = match version {
                    Some(v) => {
                        // Allows the pin to be older than what is installed.
                        parts.push("--oldpackage");
                        format!("{name}={v}")
                    }
                    None => name.to_owned(),
                };
                parts.push(&target);
                self.change(format!("zypper install {target}"), &parts)
            }
        }
    }

    fn upgrade(&self, name: &str) -> Result<(), ProviderError> {
        match self.tool {
            RpmTool::Dnf | RpmTool::Yum => {
                let program = self.program();
                self.change(
                    format!("{program} upgrade {name}"),
                    &[program, "-y", "upgrade", name],
                )
            }
            RpmTool::Zypper => self.change(
                format!("zypper update {name}"),
                &[
                    "zypper",
                    "--non-interactive",
                    "update",
                    "--auto-agree-with-licenses",
                    name,
                ],
            ),
        }
    }

    fn remove(&self, name: &str) -> Result<(), ProviderError> {
        match self.tool {
            RpmTool::Dnf | RpmTool::Yum => {
                let program = self.program();
                self.change(
                    format!("{program} remove {name}"),
                    &[program, "-y", "remove", name],
                )
            }
            RpmTool::Zypper => self.change(
                format!("zypper remove {name}"),
                &["zypper", "--non-interactive", "remove", name],
            ),
        }
    }

    fn list(&self) -> Result<Vec<String>, ProviderError> {
        let out = run(
            &*self.runner,
            &argv(&["rpm", "-qa", "--qf", "%{NAME}\\n"]),
            QUERY_TIMEOUT,
        )?;
        if !out.success() {
            return Err(failed("rpm -qa", &out));
        }
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            // Imported signing keys show up as pseudo-packages.
            .filter(|l| !l.is_empty() && *l != "gpg-pubkey")
            .map(str::to_owned)
            .collect())
    }

    fn version_matches(&self, installed: &str, pin: &str) -> bool {
        let pin = strip_epoch(pin);
        installed == pin
            || installed
                .strip_prefix(pin)
                .is_some_and(|rest| rest.starts_with('-'))
    }
}

// ----------------------------------------------------------------------------------------------
// apk

/// Alpine: `apk list` for state (one call gives presence and version), `apk add`/`del` for
/// changes.
pub struct Apk {
    runner: Arc<dyn Runner>,
}

impl Apk {
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        Apk { runner }
    }

    fn apk(&self, what: String, parts: &[&str]) -> Result<(), ProviderError> {
        let out = run(&*self.runner, &argv(parts), CHANGE_TIMEOUT)?;
        if out.success() {
            Ok(())
        } else {
            Err(failed(what, &out))
        }
    }

    fn query_list(&self, name: &str, filter: &str) -> Result<Vec<String>, ProviderError> {
        let out = run(
            &*self.runner,
            &argv(&["apk", "list", filter, name]),
            QUERY_TIMEOUT,
        )?;
        if !out.success() {
            return Err(failed(format!("apk list {filter} {name}"), &out));
        }
        Ok(parse_apk_list(&out.stdout, name))
    }
}

/// The versions of `name` in `apk list` output (`name-1.2-r3 x86_64 {origin} (license) [...]`).
/// The version is what follows `name-` and starts with a digit, so `name-doc-1.0` is not `name`.
pub fn parse_apk_list(stdout: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    stdout
        .lines()
        .filter_map(|l| {
            let first = l.split_whitespace().next()?;
            let version = first.strip_prefix(&prefix)?;
            version
                .starts_with(|c: char| c.is_ascii_digit())
                .then(|| version.to_owned())
        })
        .collect()
}

impl Backend for Apk {
    fn installed(&self, name: &str) -> Result<Vec<String>, ProviderError> {
        self.query_list(name, "--installed")
    }

    fn upgrade_available(
        &self,
        name: &str,
        _installed: &[String],
    ) -> Result<Option<String>, ProviderError> {
        Ok(self.query_list(name, "--upgradable")?.into_iter().next())
    }

    fn install(
        &self,
        name: &str,
        version: Option<&str>,
        _installed: &[String],
    ) -> Result<(), ProviderError> {
        let target = match version {
            Some(v) => format!("{name}={v}"),
            None => name.to_owned(),
        };
        self.apk(format!("apk add {target}"), &["apk", "add", &target])
    }

    fn upgrade(&self, name: &str) -> Result<(), ProviderError> {
        // `apk add --upgrade` rather than `apk upgrade`: it also replaces an earlier `name=ver`
        // constraint in /etc/apk/world, which `apk upgrade` would honour and so never upgrade.
        self.apk(
            format!("apk add --upgrade {name}"),
            &["apk", "add", "--upgrade", name],
        )
    }

    fn remove(&self, name: &str) -> Result<(), ProviderError> {
        self.apk(format!("apk del {name}"), &["apk", "del", name])
    }

    fn list(&self) -> Result<Vec<String>, ProviderError> {
        let out = run(&*self.runner, &argv(&["apk", "info"]), QUERY_TIMEOUT)?;
        if !out.success() {
            return Err(failed("apk info", &out));
        }
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::OsFamily;
    use crate::providers::cmd::{CmdOutput, RecordingRunner, SystemRunner};
    use comodit_protocol::Collection;

    fn id(name: &str) -> ResourceId {
        ResourceId::parse(Collection::Packages, name).unwrap()
    }

    fn spec(ensure: PackageEnsure, version: Option<&str>) -> Spec {
        Spec::Package(PackageSpec {
            ensure,
            version: version.map(str::to_owned),
        })
    }

    fn present() -> Spec {
        spec(PackageEnsure::Present, None)
    }

    fn absent() -> Spec {
        spec(PackageEnsure::Absent, None)
    }

    fn latest() -> Spec {
        spec(PackageEnsure::Latest, None)
    }

    fn apt(r: &Arc<RecordingRunner>) -> Packages<Apt> {
        let mut apt = Apt::new(r.clone());
        apt.lock_retry_pause = Duration::ZERO;
        Packages::new(apt)
    }

    fn rpm(r: &Arc<RecordingRunner>, tool: RpmTool) -> Packages<Rpm> {
        Packages::new(Rpm::new(r.clone(), tool))
    }

    fn apk(r: &Arc<RecordingRunner>) -> Packages<Apk> {
        Packages::new(Apk::new(r.clone()))
    }

    fn recorder() -> Arc<RecordingRunner> {
        Arc::new(RecordingRunner::new(&[]))
    }

    fn diff(field: &str, from: impl Into<Value>, to: impl Into<Value>) -> FieldDiff {
        field_diff(field, from, to)
    }

    const DPKG_Q: &str = "dpkg-query -W -f=${Status}\\t${Version}\\n";
    const APT_INSTALL: &str = "apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o DPkg::Lock::Timeout=120";
    const NOT_FOUND: &str = "dpkg-query: no packages found matching hello\n";

    // ---- plan -----------------------------------------------------------------------------

    #[test]
    fn plan_covers_every_ensure() {
        let eq = |a: &str, b: &str| a == b;
        let p = |e, v: Option<&str>| PackageSpec {
            ensure: e,
            version: v.map(str::to_owned),
        };
        let none: Vec<String> = vec![];
        let one = vec!["1.0".to_owned()];
        assert_eq!(
            plan(&p(PackageEnsure::Absent, None), &none, None, eq),
            (vec![], Action::Nothing)
        );
        assert_eq!(
            plan(&p(PackageEnsure::Absent, None), &one, None, eq),
            (vec![diff("ensure", "present", "absent")], Action::Remove)
        );
        assert_eq!(
            plan(&p(PackageEnsure::Present, Some("2.0")), &none, None, eq),
            (
                vec![
                    diff("ensure", "absent", "present"),
                    diff("version", Value::Null, "2.0")
                ],
                Action::Install(Some("2.0".into()))
            )
        );
        assert_eq!(
            plan(&p(PackageEnsure::Present, Some("2.0")), &one, None, eq),
            (
                vec![diff("version", "1.0", "2.0")],
                Action::Install(Some("2.0".into()))
            )
        );
        assert_eq!(
            plan(&p(PackageEnsure::Present, Some("1.0")), &one, None, eq),
            (vec![], Action::Nothing)
        );
        assert_eq!(
            plan(&p(PackageEnsure::Present, None), &one, None, eq),
            (vec![], Action::Nothing)
        );
        assert_eq!(
            plan(&p(PackageEnsure::Latest, None), &none, None, eq),
            (
                vec![diff("ensure", "absent", "present")],
                Action::Install(None)
            )
        );
        assert_eq!(
            plan(&p(PackageEnsure::Latest, None), &one, Some("1.1"), eq),
            (
                vec![diff("version", "1.0", "1.1")],
                Action::Upgrade("1.1".into())
            )
        );
        assert_eq!(
            plan(&p(PackageEnsure::Latest, None), &one, None, eq),
            (vec![], Action::Nothing)
        );
    }

    #[test]
    fn wrong_spec_and_latest_with_pin_are_invalid() {
        let r = recorder();
        let p = apt(&r);
        let err = p
            .apply(
                &id("hello"),
                &Spec::Service(Default::default()),
                ApplyMode::Enforce,
            )
            .unwrap_err();
        assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
        let err = p
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Latest, Some("1")),
                ApplyMode::Enforce,
            )
            .unwrap_err();
        assert!(err.to_string().contains("exclusive"), "{err}");
        assert!(r.lines().is_empty(), "{:?}", r.lines());
        assert!(p.list(Some("/x")).is_err());
    }

    #[test]
    fn unsupported_platform_refuses_everything() {
        let platform = Platform {
            family: OsFamily::Arch,
            distribution: "arch".into(),
            version: String::new(),
            package_manager: None,
            init_system: None,
        };
        let p = for_platform(&platform, recorder());
        for err in [
            p.read(&id("x")).unwrap_err(),
            p.apply(&id("x"), &present(), ApplyMode::DryRun)
                .unwrap_err(),
            p.list(None).unwrap_err(),
        ] {
            assert!(matches!(err, ProviderError::Unsupported(_)), "{err}");
            assert!(
                err.to_string().contains("no supported package manager"),
                "{err}"
            );
        }
    }

    // ---- apt (recorded) -------------------------------------------------------------------

    #[test]
    fn apt_read_parses_dpkg_status() {
        let r = recorder();
        r.answer(CmdOutput::ok("install ok installed\t5.2.15-2+b8\n"));
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        r.answer(CmdOutput::ok("deinstall ok config-files\t2.10-3\n"));
        r.answer(CmdOutput::ok("unknown ok not-installed\t\n"));
        let p = apt(&r);
        assert_eq!(
            p.read(&id("bash")).unwrap(),
            json!({"ensure": "present", "version": "5.2.15-2+b8"})
        );
        for n in ["hello", "hello", "hello"] {
            assert_eq!(p.read(&id(n)).unwrap(), json!({"ensure": "absent"}));
        }
        assert_eq!(
            r.lines(),
            vec![
                format!("{DPKG_Q} bash"),
                format!("{DPKG_Q} hello"),
                format!("{DPKG_Q} hello"),
                format!("{DPKG_Q} hello"),
            ]
        );
    }

    #[test]
    fn apt_query_failure_is_an_error_with_stderr() {
        let r = recorder();
        r.answer(CmdOutput::fail(
            2,
            "dpkg-query: error: database is locked\n",
        ));
        let err = apt(&r).read(&id("hello")).unwrap_err();
        match err {
            ProviderError::Failed { what, detail } => {
                assert_eq!(what, "dpkg-query hello");
                assert_eq!(detail, "dpkg-query: error: database is locked");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn apt_install_then_idempotent() {
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        r.answer(CmdOutput::ok("Setting up hello (2.10-3) ...\n"));
        r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
        let p = apt(&r);
        let c = p
            .apply(&id("hello"), &present(), ApplyMode::Enforce)
            .unwrap();
        assert!(c.changed);
        assert_eq!(c.diff, vec![diff("ensure", "absent", "present")]);
        assert_eq!(
            r.lines(),
            vec![
                format!("{DPKG_Q} hello"),
                format!("{APT_INSTALL} hello"),
                format!("{DPKG_Q} hello"),
            ]
        );
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(
            calls[1].env,
            vec![("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned())]
        );

        // Already installed: one query, nothing else.
        let r = recorder();
        r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
        let c = apt(&r)
            .apply(&id("hello"), &present(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c, Change::none());
        assert_eq!(r.lines(), vec![format!("{DPKG_Q} hello")]);
    }

    #[test]
    fn apt_dry_run_only_queries() {
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        let c = apt(&r)
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Present, Some("2.10-3")),
                ApplyMode::DryRun,
            )
            .unwrap();
        assert!(c.changed);
        assert_eq!(
            c.diff,
            vec![
                diff("ensure", "absent", "present"),
                diff("version", Value::Null, "2.10-3")
            ]
        );
        assert_eq!(r.lines(), vec![format!("{DPKG_Q} hello")]);

        let r = recorder();
        r.answer(CmdOutput::ok("install ok installed\t2.10-2\n"));
        r.answer(CmdOutput::ok(
            "hello:\n  Installed: 2.10-2\n  Candidate: 2.10-3\n  Version table:\n",
        ));
        let c = apt(&r)
            .apply(&id("hello"), &latest(), ApplyMode::DryRun)
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.10-2", "2.10-3")]);
        assert_eq!(
            r.lines(),
            vec![format!("{DPKG_Q} hello"), "apt-cache policy hello".into()]
        );
    }

    #[test]
    fn apt_pin_allows_downgrades() {
        let r = recorder();
        r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("install ok installed\t2.10-2\n"));
        let c = apt(&r)
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Present, Some("2.10-2")),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.10-3", "2.10-2")]);
        assert_eq!(
            r.lines()[1],
            format!("{APT_INSTALL} --allow-downgrades hello=2.10-2")
        );
    }

    #[test]
    fn apt_latest_upgrades_only_when_candidate_differs() {
        let r = recorder();
        r.answer(CmdOutput::ok("install ok installed\t2.10-2\n"));
        r.answer(CmdOutput::ok(
            "hello:\n  Installed: 2.10-2\n  Candidate: 2.10-3\n",
        ));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
        let c = apt(&r)
            .apply(&id("hello"), &latest(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.10-2", "2.10-3")]);
        assert_eq!(
            r.lines(),
            vec![
                format!("{DPKG_Q} hello"),
                "apt-cache policy hello".into(),
                format!("{APT_INSTALL} hello"),
                format!("{DPKG_Q} hello"),
            ]
        );

        for candidate in ["2.10-3", "(none)"] {
            let r = recorder();
            r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
            r.answer(CmdOutput::ok(&format!(
                "hello:\n  Installed: 2.10-3\n  Candidate: {candidate}\n"
            )));
            let c = apt(&r)
                .apply(&id("hello"), &latest(), ApplyMode::Enforce)
                .unwrap();
            assert_eq!(c, Change::none());
            assert_eq!(r.lines().len(), 2);
        }
    }

    #[test]
    fn apt_remove() {
        let r = recorder();
        r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("deinstall ok config-files\t2.10-3\n"));
        let c = apt(&r)
            .apply(&id("hello"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![diff("ensure", "present", "absent")]);
        assert_eq!(
            r.lines()[1],
            "apt-get remove -y -q -o DPkg::Lock::Timeout=120 hello"
        );
        // Absent already: a single query.
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        let c = apt(&r)
            .apply(&id("hello"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c, Change::none());
        assert_eq!(r.lines().len(), 1);
    }

    #[test]
    fn apt_install_failure_carries_stderr() {
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        r.answer(CmdOutput::fail(100, "E: Unable to locate package hello\n"));
        let err = apt(&r)
            .apply(&id("hello"), &present(), ApplyMode::Enforce)
            .unwrap_err();
        match err {
            ProviderError::Failed { what, detail } => {
                assert_eq!(what, "apt-get install hello");
                assert_eq!(detail, "E: Unable to locate package hello");
            }
            other => panic!("{other}"),
        }
        assert_eq!(r.lines().len(), 2, "no verification after a failure");
    }

    #[test]
    fn apt_retries_once_on_lock() {
        let lock = "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 42 (apt-get)\n";
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        r.answer(CmdOutput::fail(100, lock));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("install ok installed\t2.10-3\n"));
        let c = apt(&r)
            .apply(&id("hello"), &present(), ApplyMode::Enforce)
            .unwrap();
        assert!(c.changed);
        assert_eq!(r.lines()[1], r.lines()[2]);

        // Twice taken: the error is reported, with apt's message.
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        r.answer(CmdOutput::fail(100, lock));
        r.answer(CmdOutput::fail(100, lock));
        let err = apt(&r)
            .apply(&id("hello"), &present(), ApplyMode::Enforce)
            .unwrap_err();
        assert!(err.to_string().contains("Could not get lock"), "{err}");
        assert_eq!(r.lines().len(), 3);
    }

    #[test]
    fn success_without_effect_is_an_error() {
        let r = recorder();
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::fail(1, NOT_FOUND));
        let err = apt(&r)
            .apply(&id("hello"), &present(), ApplyMode::Enforce)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("hello is not installed (wanted present)"),
            "{err}"
        );
    }

    #[test]
    fn apt_list_keeps_installed_only() {
        let r = recorder();
        r.answer(CmdOutput::ok(
            "zlib1g:amd64\tinstall ok installed\nbash\tinstall ok installed\nhello\tdeinstall ok config-files\nbash\tinstall ok installed\n",
        ));
        assert_eq!(
            apt(&r).list(None).unwrap(),
            vec!["bash".to_owned(), "zlib1g:amd64".to_owned()]
        );
        assert_eq!(
            r.lines(),
            vec!["dpkg-query -W -f=${binary:Package}\\t${Status}\\n"]
        );
    }

    // ---- dnf / yum (recorded) -------------------------------------------------------------

    const RPM_Q: &str = "rpm -q --qf %{VERSION}-%{RELEASE}\\n";

    #[test]
    fn dnf_install_pin_and_idempotence() {
        let r = recorder();
        r.answer(CmdOutput {
            code: Some(1),
            stdout: "package hello is not installed\n".into(),
            stderr: String::new(),
        });
        r.answer(CmdOutput::ok("Complete!\n"));
        r.answer(CmdOutput::ok("2.10-3.el9\n"));
        let p = rpm(&r, RpmTool::Dnf);
        let c = p
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Present, Some("2.10")),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(
            c.diff,
            vec![
                diff("ensure", "absent", "present"),
                diff("version", Value::Null, "2.10")
            ]
        );
        assert_eq!(
            r.lines(),
            vec![
                format!("{RPM_Q} hello"),
                "dnf -y install hello-2.10".into(),
                format!("{RPM_Q} hello"),
            ]
        );
        // The pin without release matches the installed version-release; an epoch is ignored.
        for pin in ["2.10", "2.10-3.el9", "1:2.10-3.el9"] {
            let r = recorder();
            r.answer(CmdOutput::ok("2.10-3.el9\n"));
            let c = rpm(&r, RpmTool::Dnf)
                .apply(
                    &id("hello"),
                    &spec(PackageEnsure::Present, Some(pin)),
                    ApplyMode::Enforce,
                )
                .unwrap();
            assert_eq!(c, Change::none(), "{pin}");
            assert_eq!(r.lines().len(), 1);
        }
        // `2.1` is not a prefix match of `2.10-3`.
        assert!(!Rpm::new(recorder(), RpmTool::Dnf).version_matches("2.10-3", "2.1"));
    }

    #[test]
    fn dnf_downgrades_to_an_older_pin() {
        let r = recorder();
        r.answer(CmdOutput::ok("2.12-1.el9\n"));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("2.10-3.el9\n"));
        let c = rpm(&r, RpmTool::Dnf)
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Present, Some("2.10-3.el9")),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.12-1.el9", "2.10-3.el9")]);
        assert_eq!(r.lines()[1], "dnf -y downgrade hello-2.10-3.el9");
    }

    #[test]
    fn dnf_latest_via_check_update() {
        let r = recorder();
        r.answer(CmdOutput::ok("2.10-3.el9\n"));
        r.answer(CmdOutput {
            code: Some(100),
            stdout: "\nhello.x86_64                 2.12-1.el9                 appstream\nhello-doc.noarch  9-1  appstream\n".into(),
            stderr: String::new(),
        });
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("2.12-1.el9\n"));
        let c = rpm(&r, RpmTool::Dnf)
            .apply(&id("hello"), &latest(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.10-3.el9", "2.12-1.el9")]);
        assert_eq!(
            r.lines(),
            vec![
                format!("{RPM_Q} hello"),
                "dnf -q check-update hello".into(),
                "dnf -y upgrade hello".into(),
                format!("{RPM_Q} hello"),
            ]
        );
        // Up to date: exit 0 and no change.
        let r = recorder();
        r.answer(CmdOutput::ok("2.12-1.el9\n"));
        r.answer(CmdOutput::ok(""));
        let c = rpm(&r, RpmTool::Dnf)
            .apply(&id("hello"), &latest(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c, Change::none());
        // A failing check is an error, not "up to date".
        let r = recorder();
        r.answer(CmdOutput::ok("2.12-1.el9\n"));
        r.answer(CmdOutput::fail(
            1,
            "Error: Failed to download metadata for repo 'appstream'",
        ));
        let err = rpm(&r, RpmTool::Dnf)
            .apply(&id("hello"), &latest(), ApplyMode::DryRun)
            .unwrap_err();
        assert!(
            err.to_string().contains("Failed to download metadata"),
            "{err}"
        );
    }

    #[test]
    fn yum_uses_the_same_verbs() {
        let r = recorder();
        r.answer(CmdOutput::ok("2.10-3.el7\n"));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput {
            code: Some(1),
            stdout: "package hello is not installed\n".into(),
            stderr: String::new(),
        });
        let c = rpm(&r, RpmTool::Yum)
            .apply(&id("hello"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert!(c.changed);
        assert_eq!(r.lines()[1], "yum -y remove hello");

        let r = recorder();
        r.answer(CmdOutput::ok("2.10-3.el7\n"));
        r.answer(CmdOutput {
            code: Some(100),
            stdout: "hello.x86_64 2.10-4.el7 updates\n".into(),
            stderr: String::new(),
        });
        r.answer(CmdOutput::fail(1, "Error: Nothing to do\n"));
        let err = rpm(&r, RpmTool::Yum)
            .apply(&id("hello"), &latest(), ApplyMode::Enforce)
            .unwrap_err();
        assert_eq!(
            r.lines()[1..],
            ["yum -q check-update hello", "yum -y upgrade hello"]
        );
        match err {
            ProviderError::Failed { what, detail } => {
                assert_eq!(what, "yum upgrade hello");
                assert_eq!(detail, "Error: Nothing to do");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn rpm_list_skips_gpg_keys() {
        let r = recorder();
        r.answer(CmdOutput::ok("bash\ngpg-pubkey\nglibc\ngpg-pubkey\n"));
        assert_eq!(
            rpm(&r, RpmTool::Zypper).list(None).unwrap(),
            vec!["bash".to_owned(), "glibc".to_owned()]
        );
        assert_eq!(r.lines(), vec!["rpm -qa --qf %{NAME}\\n"]);
    }

    #[test]
    fn rpm_query_error_is_not_absent() {
        let r = recorder();
        r.answer(CmdOutput::fail(
            1,
            "error: rpmdb: BDB0113 Thread/process failed\n",
        ));
        let err = rpm(&r, RpmTool::Dnf).read(&id("hello")).unwrap_err();
        assert!(err.to_string().contains("rpmdb"), "{err}");
    }

    #[test]
    fn rpmvercmp_orders_like_rpm() {
        use Ordering::*;
        for (a, b, want) in [
            ("1.0", "1.0", Equal),
            ("1.0", "2.0", Less),
            ("2.0.1", "2.0", Greater),
            ("1.10", "1.9", Greater),
            ("1.010", "1.10", Equal),
            ("1.0a", "1.0", Greater),
            ("1.0", "1.a", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0~rc1", "1.0~rc2", Less),
            ("1.0^git1", "1.0", Greater),
            ("1.0^git1", "1.0.1", Less),
            ("2.10", "2.12", Less),
            ("abc", "abd", Less),
            ("1_0", "1.0", Equal),
        ] {
            assert_eq!(rpmvercmp(a, b), want, "{a} vs {b}");
            assert_eq!(rpmvercmp(b, a), want.reverse(), "{b} vs {a}");
        }
        assert_eq!(rpm_pin_cmp("2.10", "2.12-1.el9"), Less);
        assert_eq!(rpm_pin_cmp("2.12", "2.12-1.el9"), Equal);
        assert_eq!(rpm_pin_cmp("1:2.12-2", "2.12-1.el9"), Greater);
    }

    // ---- zypper (recorded) ----------------------------------------------------------------

    #[test]
    fn zypper_commands_and_exit_codes() {
        let r = recorder();
        r.answer(CmdOutput {
            code: Some(1),
            stdout: "package hello is not installed\n".into(),
            stderr: String::new(),
        });
        // 103: "restart needed" is a success.
        r.answer(CmdOutput::fail(103, ""));
        r.answer(CmdOutput::ok("2.10-1.1\n"));
        let c = rpm(&r, RpmTool::Zypper)
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Present, Some("2.10-1.1")),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert!(c.changed);
        assert_eq!(
            r.lines()[1],
            "zypper --non-interactive install --auto-agree-with-licenses --oldpackage hello=2.10-1.1"
        );

        let r = recorder();
        r.answer(CmdOutput::ok("2.10-1.1\n"));
        r.answer(CmdOutput::ok(
            "S | Repository | Name  | Current Version | Available Version | Arch\n--+------------+-------+-----------------+-------------------+-------\nv | Main       | hello | 2.10-1.1        | 2.12-1.1          | x86_64\nv | Main       | hello-doc | 1 | 2 | noarch\n",
        ));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok("2.12-1.1\n"));
        let c = rpm(&r, RpmTool::Zypper)
            .apply(&id("hello"), &latest(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.10-1.1", "2.12-1.1")]);
        assert_eq!(
            r.lines()[1..3],
            [
                "zypper --non-interactive --quiet list-updates",
                "zypper --non-interactive update --auto-agree-with-licenses hello"
            ]
        );

        let r = recorder();
        r.answer(CmdOutput::ok("2.10-1.1\n"));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput {
            code: Some(1),
            stdout: "package hello is not installed\n".into(),
            stderr: String::new(),
        });
        rpm(&r, RpmTool::Zypper)
            .apply(&id("hello"), &absent(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(r.lines()[1], "zypper --non-interactive remove hello");

        // 104: no such package.
        let r = recorder();
        r.answer(CmdOutput {
            code: Some(1),
            stdout: "package nope is not installed\n".into(),
            stderr: String::new(),
        });
        r.answer(CmdOutput {
            code: Some(104),
            stdout: "Package 'nope' not found.\n".into(),
            stderr: String::new(),
        });
        let err = rpm(&r, RpmTool::Zypper)
            .apply(&id("nope"), &present(), ApplyMode::Enforce)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "zypper install nope failed: Package 'nope' not found."
        );
    }

    // ---- apk (recorded) -------------------------------------------------------------------

    #[test]
    fn apk_query_install_upgrade_remove() {
        let r = recorder();
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok(
            "(1/1) Installing hello (2.10-r3)\nOK: 8 MiB in 16 packages\n",
        ));
        r.answer(CmdOutput::ok(
            "hello-2.10-r3 x86_64 {hello} (GPL-3.0-or-later) [installed]\n",
        ));
        let c = apk(&r)
            .apply(
                &id("hello"),
                &spec(PackageEnsure::Present, Some("2.10-r3")),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert!(c.changed);
        assert_eq!(
            r.lines(),
            vec![
                "apk list --installed hello",
                "apk add hello=2.10-r3",
                "apk list --installed hello"
            ]
        );

        let r = recorder();
        r.answer(CmdOutput::ok(
            "hello-2.10-r3 x86_64 {hello} (GPL-3.0-or-later) [installed]\n",
        ));
        r.answer(CmdOutput::ok(
            "hello-2.12-r0 x86_64 {hello} (GPL-3.0-or-later) [upgradable from: hello-2.10-r3]\n",
        ));
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::ok(
            "hello-2.12-r0 x86_64 {hello} (GPL-3.0-or-later) [installed]\n",
        ));
        let c = apk(&r)
            .apply(&id("hello"), &latest(), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![diff("version", "2.10-r3", "2.12-r0")]);
        assert_eq!(
            r.lines()[1..3],
            ["apk list --upgradable hello", "apk add --upgrade hello"]
        );

        // apk del succeeds but another package still needs it: the verification says so.
        let r = recorder();
        r.answer(CmdOutput::ok(
            "hello-2.12-r0 x86_64 {hello} (GPL) [installed]\n",
        ));
        r.answer(CmdOutput::ok(
            "World updated, but the following packages are not removed due to:\n",
        ));
        r.answer(CmdOutput::ok(
            "hello-2.12-r0 x86_64 {hello} (GPL) [installed]\n",
        ));
        let err = apk(&r)
            .apply(&id("hello"), &absent(), ApplyMode::Enforce)
            .unwrap_err();
        assert_eq!(r.lines()[1], "apk del hello");
        assert!(
            err.to_string()
                .contains("installed at 2.12-r0 (wanted absent)"),
            "{err}"
        );

        let r = recorder();
        r.answer(CmdOutput::ok(""));
        r.answer(CmdOutput::fail(
            1,
            "ERROR: unable to select packages:\n  nope (no such package)\n",
        ));
        let err = apk(&r)
            .apply(&id("nope"), &present(), ApplyMode::Enforce)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("apk add nope failed: ERROR: unable to select"),
            "{err}"
        );
    }

    #[test]
    fn apk_list_parsing_is_exact_on_names() {
        let out = "hello-doc-1.0-r0 noarch {hello} (GPL) [installed]\nhello-2.10-r3 x86_64 {hello} (GPL) [installed]\n";
        assert_eq!(parse_apk_list(out, "hello"), vec!["2.10-r3".to_owned()]);
        assert_eq!(parse_apk_list(out, "hello-doc"), vec!["1.0-r0".to_owned()]);
        assert!(parse_apk_list(out, "hell").is_empty());
        let r = recorder();
        r.answer(CmdOutput::ok("musl\nbusybox\n"));
        assert_eq!(apk(&r).list(None).unwrap(), vec!["busybox", "musl"]);
        assert_eq!(r.lines(), vec!["apk info"]);
    }

    // ---- real apt on this host ------------------------------------------------------------

    fn skip_apt() -> bool {
        if std::env::var("COMODIT_SKIP_APT_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: COMODIT_SKIP_APT_TESTS=1");
            return true;
        }
        false
    }

    fn dpkg_status(name: &str) -> String {
        let out = std::process::Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn real_dpkg_queries() {
        if skip_apt() {
            return;
        }
        let p = Packages::new(Apt::new(Arc::new(SystemRunner)));
        let bash = p.read(&id("bash")).unwrap();
        assert_eq!(bash["ensure"], "present");
        assert!(bash["version"].as_str().unwrap().starts_with('5'), "{bash}");
        assert_eq!(
            p.read(&id("comodit-surely-not-a-package")).unwrap(),
            json!({"ensure": "absent"})
        );
        let all = p.list(None).unwrap();
        assert!(all.iter().any(|n| n == "bash"));
        assert!(all.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    }

    /// Removes `hello` if the test left it installed.
    struct RemoveHello;

    impl Drop for RemoveHello {
        fn drop(&mut self) {
            if dpkg_status("hello").contains(" installed") {
                let _ = std::process::Command::new("apt-get")
                    .args(["remove", "-y", "-q", "hello"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .output();
            }
        }
    }

    #[test]
    fn real_apt_install_and_remove() {
        if skip_apt() {
            return;
        }
        let runner: Arc<dyn Runner> = Arc::new(SystemRunner);
        let policy = runner
            .run(&argv(&["apt-cache", "policy", "hello"]), QUERY_TIMEOUT)
            .unwrap();
        if parse_apt_candidate(&policy.stdout).is_none() {
            let out = runner
                .run(&argv(&["apt-get", "update", "-q"]), CHANGE_TIMEOUT)
                .unwrap();
            assert!(out.success(), "apt-get update: {}", out.stderr);
        }
        let _guard = RemoveHello;
        let p = Packages::new(Apt::new(runner));
        let hello = id("hello");

        // Start from absent, whatever an earlier run left.
        p.apply(&hello, &absent(), ApplyMode::Enforce).unwrap();
        assert!(!dpkg_status("hello").contains(" installed"));

        let c = p.apply(&hello, &present(), ApplyMode::Enforce).unwrap();
        assert_eq!(c.diff, vec![diff("ensure", "absent", "present")]);
        assert_eq!(dpkg_status("hello"), "install ok installed");
        let read = p.read(&hello).unwrap();
        assert_eq!(read["ensure"], "present");

        let again = p.apply(&hello, &present(), ApplyMode::Enforce).unwrap();
        assert_eq!(again, Change::none());
        // Pinned to what is installed: still nothing to do.
        let pinned = spec(PackageEnsure::Present, read["version"].as_str());
        assert_eq!(
            p.apply(&hello, &pinned, ApplyMode::Enforce).unwrap(),
            Change::none()
        );
        assert_eq!(
            p.apply(&hello, &latest(), ApplyMode::Enforce).unwrap(),
            Change::none()
        );

        let dry = p.apply(&hello, &absent(), ApplyMode::DryRun).unwrap();
        assert_eq!(dry.diff, vec![diff("ensure", "present", "absent")]);
        assert_eq!(dpkg_status("hello"), "install ok installed");

        let c = p.apply(&hello, &absent(), ApplyMode::Enforce).unwrap();
        assert_eq!(c.diff, vec![diff("ensure", "present", "absent")]);
        assert!(!dpkg_status("hello").contains(" installed"));
        assert_eq!(p.read(&hello).unwrap(), json!({"ensure": "absent"}));
        assert_eq!(
            p.apply(&hello, &absent(), ApplyMode::Enforce).unwrap(),
            Change::none()
        );

        // A package apt does not know: apt-get's own message comes back.
        let err = p
            .apply(
                &id("comodit-surely-not-a-package"),
                &present(),
                ApplyMode::Enforce,
            )
            .unwrap_err();
        match err {
            ProviderError::Failed { what, detail } => {
                assert_eq!(what, "apt-get install comodit-surely-not-a-package");
                assert!(detail.contains("Unable to locate package"), "{detail}");
            }
            other => panic!("{other}"),
        }
    }
}
