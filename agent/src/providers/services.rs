//! Services: whether a service runs now and starts at boot, and restarting or reloading it when a
//! resource that notifies it changed.
//!
//! [`for_platform`] picks the [`Backend`] for the host's init system — [`Systemd`], [`OpenRc`] or
//! [`SysV`] — and wraps it in [`Services`], which holds what they share: query the [`Status`],
//! let [`plan`] (plain code) decide the diff and the actions, run them in `Enforce` only, then
//! query again and fail if a start or stop reported success without effect. Fields the spec
//! leaves out (`running`, `enabled`) are neither compared nor touched. A service that does not
//! exist (no unit, no script) is an [`ProviderError::Invalid`] naming it.
//!
//! How each init system is read and driven:
//!
//! - **systemd**: `systemctl is-enabled` and `systemctl is-active`; `systemctl
//!   start|stop|enable|disable|restart|reload`; `list` from `systemctl list-unit-files
//!   --type=service`. `is-enabled` answers more than yes or no, mapped as follows:
//!   `enabled`, `enabled-runtime` → enabled; `disabled`, `linked`, `linked-runtime`, `indirect` →
//!   disabled (`systemctl enable` applies); `masked`, `masked-runtime` → disabled, and a spec
//!   asking to enable or start a masked unit is refused (masking is a deliberate act that the agent
//!   does not undo behind the admin's back); `static`, `alias`, `generated`, `transient` → no
//!   enablement of their own (`read` shows `"enabled": null`): `enabled: true` is accepted as
//!   satisfied, `enabled: false` is refused because only masking could keep such a unit from
//!   being started. `active`, `reloading`, `activating`, `refreshing` count as running.
//! - **OpenRC**: `rc-service --exists`, `rc-service <name> status` (exit 0 started, 8 starting →
//!   running; 3 stopped, 4 stopping, 16 inactive → not running; 32 crashed, 64 unsupervised → not
//!   running, and started again with `zap` then `start`, since OpenRC still counts a crashed service
//!   as started); boot = membership of the `default` runlevel (`rc-update show default`,
//!   `rc-update add|del <name> default`; the `boot` and `sysinit` runlevels are not considered).
//! - **SysV**: the LSB script `<init_dir>/<name> status|start|stop|restart|reload` (status exit 0
//!   running; 1, 2, 3 not running; anything else is an error). Enabled means an `S??<name>` link in
//!   `<rc_root>/rc[2-5S].d`; it is changed with `update-rc.d <name> enable|disable` (`defaults`
//!   when the script has no links yet) on Debian, or `chkconfig <name> on|off` (after `chkconfig
//!   --add` when it has none) on Red Hat and SUSE. `init_dir` and `rc_root` are fields so tests can
//!   point them at a temporary directory; `update-rc.d` and `chkconfig` always act on `/etc`.
//!
//! `refresh` restarts or reloads a running service and leaves a stopped one alone: restarting
//! would start a service that was meant to be stopped, and reloading a stopped one fails. The
//! diff it reports is `{"field": "refresh", "from": null, "to": "restart"|"reload"}`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comodit_protocol::{ApplyMode, Collection, FieldDiff, Refresh, ResourceId, ServiceSpec, Spec};
use serde_json::{json, Value};

use super::cmd::{trim_detail, CmdOutput, Invocation, Runner};
use super::{field_diff, Change, Provider, ProviderError};
use super::{no_under, Unsupported};
use crate::platform::{InitSystem, OsFamily, Platform};

/// Status queries.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Start, stop, restart, reload, enable, disable: a unit's own start timeout is 90 s by default,
/// and stop may wait for as long again.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The services provider for this host's init system, or one that refuses every call when the
/// host has none the agent knows.
pub fn for_platform(platform: &Platform, runner: Arc<dyn Runner>) -> Box<dyn Provider> {
    match platform.init_system {
        Some(InitSystem::Systemd) => Box::new(Services::new(Systemd::new(runner))),
        Some(InitSystem::OpenRc) => Box::new(Services::new(OpenRc::new(runner))),
        Some(InitSystem::SysV) => {
            let enabler = SysvEnabler::detect(platform.family, &*runner);
            Box::new(Services::new(SysV::new(
                runner,
                PathBuf::from("/etc/init.d"),
                PathBuf::from("/etc"),
                enabler,
            )))
        }
        None => Box::new(Unsupported::new(
            "services",
            format!(
                "no supported init system (systemd, OpenRC, SysV init scripts) on this host ({} {})",
                platform.distribution, platform.version
            ),
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Running {
    Yes,
    No,
    /// OpenRC: marked started, but its process is gone.
    Crashed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enablement {
    On,
    Off,
    /// systemd `masked`: cannot be started or enabled until unmasked.
    Masked,
    /// systemd units with no enablement of their own (`static`, `alias`, `generated`,
    /// `transient`); holds the word systemd printed.
    Fixed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub running: Running,
    pub enabled: Enablement,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Start,
    Stop,
    Restart,
    Reload,
    Enable,
    Disable,
}

impl Act {
    pub fn verb(&self) -> &'static str {
        match self {
            Act::Start => "start",
            Act::Stop => "stop",
            Act::Restart => "restart",
            Act::Reload => "reload",
            Act::Enable => "enable",
            Act::Disable => "disable",
        }
    }
}

/// What one init system knows how to do.
pub trait Backend: Send + Sync {
    /// The state of `name`; [`ProviderError::Invalid`] naming it when there is no such service.
    fn status(&self, name: &str) -> Result<Status, ProviderError>;

    /// Runs one action; `status` is what [`Backend::status`] found just before.
    fn act(&self, name: &str, act: Act, status: &Status) -> Result<(), ProviderError>;

    /// The services of the host (unsorted, may repeat).
    fn list(&self) -> Result<Vec<String>, ProviderError>;
}

/// Decides the diff and the actions (enablement first, then running) for `spec` against
/// `status`, or refuses a spec the service cannot satisfy.
pub fn plan(
    name: &str,
    spec: &ServiceSpec,
    status: &Status,
) -> Result<(Vec<FieldDiff>, Vec<Act>), ProviderError> {
    let mut diff = Vec::new();
    let mut acts = Vec::new();
    if let Some(want) = spec.enabled {
        match (&status.enabled, want) {
            (Enablement::On, true)
            | (Enablement::Off, false)
            | (Enablement::Masked, false)
            | (Enablement::Fixed(_), true) => {}
            (Enablement::On, false) => {
                diff.push(field_diff("enabled", true, false));
                acts.push(Act::Disable);
            }
            (Enablement::Off, true) => {
                diff.push(field_diff("enabled", false, true));
                acts.push(Act::Enable);
            }
            (Enablement::Masked, true) => {
                return Err(ProviderError::Invalid(format!(
                    "service {name} is masked: unmask it before enabling it"
                )))
            }
            (Enablement::Fixed(kind), false) => {
                return Err(ProviderError::Invalid(format!(
                    "service {name} is {kind}: it has no install section of its own and cannot be disabled (mask it to keep it from starting)"
                )))
            }
        }
    }
    if let Some(want) = spec.running {
        let running = status.running == Running::Yes;
        if running != want {
            if want && status.enabled == Enablement::Masked {
                return Err(ProviderError::Invalid(format!(
                    "service {name} is masked: unmask it before starting it"
                )));
            }
            diff.push(field_diff("running", running, want));
            acts.push(if want { Act::Start } else { Act::Stop });
        }
    }
    Ok((diff, acts))
}

/// The services collection over one init system.
pub struct Services<B> {
    backend: B,
}

impl<B: Backend> Services<B> {
    pub fn new(backend: B) -> Self {
        Services { backend }
    }
}

impl<B: Backend> Provider for Services<B> {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let status = self.backend.status(id.as_str())?;
        let enabled = match status.enabled {
            Enablement::On => Value::Bool(true),
            Enablement::Off | Enablement::Masked => Value::Bool(false),
            Enablement::Fixed(_) => Value::Null,
        };
        Ok(json!({"running": status.running == Running::Yes, "enabled": enabled}))
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let Spec::Service(spec) = spec else {
            return Err(ProviderError::Invalid(format!(
                "service {id}: expected a service spec, got a {} spec",
                spec.collection()
            )));
        };
        let name = id.as_str();
        let status = self.backend.status(name)?;
        let (diff, acts) = plan(name, spec, &status)?;
        if mode == ApplyMode::DryRun || acts.is_empty() {
            return Ok(Change::from_diff(diff));
        }
        for act in &acts {
            tracing::info!(service = name, action = act.verb(), "changing service");
            self.backend.act(name, *act, &status)?;
        }
        if let Some(want) = spec
            .running
            .filter(|_| acts.iter().any(|a| matches!(a, Act::Start | Act::Stop)))
        {
            let after = self.backend.status(name)?;
            if (after.running == Running::Yes) != want {
                return Err(ProviderError::Failed {
                    what: format!("service {name}"),
                    detail: format!(
                        "{} reported success but the service is {}",
                        if want { "start" } else { "stop" },
                        if want { "not running" } else { "still running" }
                    ),
                });
            }
        }
        Ok(Change::from_diff(diff))
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        no_under(under)?;
        let mut names = self.backend.list()?;
        names.retain(|n| ResourceId::parse(Collection::Services, n).is_ok());
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn refresh(
        &self,
        id: &ResourceId,
        how: Refresh,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let name = id.as_str();
        let status = self.backend.status(name)?;
        if status.running != Running::Yes {
            return Ok(Change::none());
        }
        let act = match how {
            Refresh::Restart => Act::Restart,
            Refresh::Reload => Act::Reload,
        };
        let diff = vec![field_diff("refresh", Value::Null, act.verb())];
        if mode == ApplyMode::Enforce {
            tracing::info!(service = name, action = act.verb(), "refreshing service");
            self.backend.act(name, act, &status)?;
        }
        Ok(Change::from_diff(diff))
    }
}

fn not_found(name: &str, what: impl std::fmt::Display) -> ProviderError {
    ProviderError::Invalid(format!("service {name} does not exist ({what})"))
}

/// The error for a tool that ran and failed, naming the command.
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

/// Runs `parts`, which must exit 0.
fn run_checked(runner: &dyn Runner, parts: &[&str]) -> Result<(), ProviderError> {
    let out = runner.run(&Invocation::new(parts), ACTION_TIMEOUT)?;
    if out.success() {
        Ok(())
    } else {
        Err(failed(parts.join(" "), &out))
    }
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

// ----------------------------------------------------------------------------------------------
// systemd

pub struct Systemd {
    runner: Arc<dyn Runner>,
}

impl Systemd {
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        Systemd { runner }
    }
}

/// Maps `systemctl is-enabled` output; `None` for "no such unit".
pub fn parse_is_enabled(out: &CmdOutput) -> Result<Option<Enablement>, String> {
    let word = first_word(&out.stdout);
    Ok(Some(match word {
        "enabled" | "enabled-runtime" => Enablement::On,
        "disabled" | "linked" | "linked-runtime" | "indirect" => Enablement::Off,
        "masked" | "masked-runtime" => Enablement::Masked,
        "static" | "alias" | "generated" | "transient" => Enablement::Fixed(word.to_owned()),
        "not-found" => return Ok(None),
        "" if out.stderr.contains("No such file or directory")
            || out.stderr.contains("not found")
            || out.stderr.contains("does not exist") =>
        {
            return Ok(None)
        }
        "bad" => return Err("the unit file is invalid (is-enabled: bad)".to_owned()),
        _ => return Err(format!("unexpected answer {word:?}")),
    }))
}

/// Maps `systemctl is-active` output.
pub fn parse_is_active(stdout: &str) -> Result<Running, String> {
    match first_word(stdout) {
        "active" | "reloading" | "activating" | "refreshing" => Ok(Running::Yes),
        "inactive" | "failed" | "deactivating" | "maintenance" => Ok(Running::No),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

impl Backend for Systemd {
    fn status(&self, name: &str) -> Result<Status, ProviderError> {
        // is-enabled first: it is the call that tells an unknown unit apart (is-active just says
        // "inactive").
        let out = self.runner.run(
            &Invocation::new(&["systemctl", "is-enabled", name]),
            QUERY_TIMEOUT,
        )?;
        let enabled = match parse_is_enabled(&out) {
            Ok(Some(e)) => e,
            Ok(None) => return Err(not_found(name, "no systemd unit")),
            Err(why) => {
                let mut err = failed(format!("systemctl is-enabled {name}"), &out);
                if let ProviderError::Failed { detail, .. } = &mut err {
                    *detail = format!("{why}: {detail}");
                }
                return Err(err);
            }
        };
        let out = self.runner.run(
            &Invocation::new(&["systemctl", "is-active", name]),
            QUERY_TIMEOUT,
        )?;
        let running = parse_is_active(&out.stdout).map_err(|why| ProviderError::Failed {
            what: format!("systemctl is-active {name}"),
            detail: format!("{why}; {}", trim_detail(&out.stderr)),
        })?;
        Ok(Status { running, enabled })
    }

    fn act(&self, name: &str, act: Act, _status: &Status) -> Result<(), ProviderError> {
        run_checked(&*self.runner, &["systemctl", act.verb(), name])
    }

    fn list(&self) -> Result<Vec<String>, ProviderError> {
        let argv = [
            "systemctl",
            "list-unit-files",
            "--type=service",
            "--no-legend",
            "--plain",
        ];
        let out = self.runner.run(&Invocation::new(&argv), QUERY_TIMEOUT)?;
        if !out.success() {
            return Err(failed("systemctl list-unit-files", &out));
        }
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| first_word(l).strip_suffix(".service"))
            // Templates (`getty@.service`) are not services until instantiated.
            .filter(|n| !n.ends_with('@'))
            .map(str::to_owned)
            .collect())
    }
}

// ----------------------------------------------------------------------------------------------
// OpenRC

pub struct OpenRc {
    runner: Arc<dyn Runner>,
}

impl OpenRc {
    pub fn new(runner: Arc<dyn Runner>) -> Self {
        OpenRc { runner }
    }
}

/// Maps the exit code of `rc-service <name> status` (openrc-run's status function).
pub fn parse_openrc_status(code: Option<i32>) -> Option<Running> {
    match code? {
        0 | 8 => Some(Running::Yes),
        3 | 4 | 16 => Some(Running::No),
        32 | 64 => Some(Running::Crashed),
        _ => None,
    }
}

/// Whether `rc-update show default` lists `name` (lines are `  name | default`).
pub fn in_default_runlevel(stdout: &str, name: &str) -> bool {
    stdout.lines().any(|l| {
        l.split_once('|').is_some_and(|(svc, levels)| {
            svc.trim() == name && levels.split_whitespace().any(|r| r == "default")
        })
    })
}

impl Backend for OpenRc {
    fn status(&self, name: &str) -> Result<Status, ProviderError> {
        let out = self.runner.run(
            &Invocation::new(&["rc-service", "--exists", name]),
            QUERY_TIMEOUT,
        )?;
        match out.code {
            Some(0) => {}
            Some(1) => return Err(not_found(name, "no OpenRC service script")),
            _ => return Err(failed(format!("rc-service --exists {name}"), &out)),
        }
        let out = self.runner.run(
            &Invocation::new(&["rc-service", name, "status"]),
            QUERY_TIMEOUT,
        )?;
        let running = parse_openrc_status(out.code)
            .ok_or_else(|| failed(format!("rc-service {name} status"), &out))?;
        let out = self.runner.run(
            &Invocation::new(&["rc-update", "show", "default"]),
            QUERY_TIMEOUT,
        )?;
        if !out.success() {
            return Err(failed("rc-update show default", &out));
        }
        let enabled = if in_default_runlevel(&out.stdout, name) {
            Enablement::On
        } else {
            Enablement::Off
        };
        Ok(Status { running, enabled })
    }

    fn act(&self, name: &str, act: Act, status: &Status) -> Result<(), ProviderError> {
        let r = &*self.runner;
        match act {
            Act::Enable => run_checked(r, &["rc-update", "add", name, "default"]),
            Act::Disable => run_checked(r, &["rc-update", "del", name, "default"]),
            Act::Start if status.running == Running::Crashed => {
                // OpenRC still counts a crashed service as started and would ignore `start`.
                run_checked(r, &["rc-service", name, "zap"])?;
                run_checked(r, &["rc-service", name, "start"])
            }
            _ => run_checked(r, &["rc-service", name, act.verb()]),
        }
    }

    fn list(&self) -> Result<Vec<String>, ProviderError> {
        let out = self
            .runner
            .run(&Invocation::new(&["rc-service", "--list"]), QUERY_TIMEOUT)?;
        if !out.success() {
            return Err(failed("rc-service --list", &out));
        }
        Ok(out.stdout.lines().map(|l| l.trim().to_owned()).collect())
    }
}

// ----------------------------------------------------------------------------------------------
// SysV

/// The tool that edits the `rc?.d` links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysvEnabler {
    /// Debian and Ubuntu.
    UpdateRcD,
    /// Red Hat and SUSE.
    Chkconfig,
}

impl SysvEnabler {
    /// The tool present on the host, the family's own when both are.
    pub fn detect(family: OsFamily, runner: &dyn Runner) -> Option<SysvEnabler> {
        match (runner.exists("update-rc.d"), runner.exists("chkconfig")) {
            (true, true) if family == OsFamily::Debian => Some(SysvEnabler::UpdateRcD),
            (_, true) => Some(SysvEnabler::Chkconfig),
            (true, false) => Some(SysvEnabler::UpdateRcD),
            (false, false) => None,
        }
    }
}

pub struct SysV {
    runner: Arc<dyn Runner>,
    /// Where the init scripts are (`/etc/init.d`).
    pub init_dir: PathBuf,
    /// The directory holding `rc0.d` … `rc6.d` and `rcS.d` (`/etc`).
    pub rc_root: PathBuf,
    /// `None` when neither update-rc.d nor chkconfig is installed: enabling is unsupported.
    pub enabler: Option<SysvEnabler>,
}

/// Runlevel directories whose `S` links mean "started at boot".
const BOOT_RC_DIRS: [&str; 5] = ["rc2.d", "rc3.d", "rc4.d", "rc5.d", "rcS.d"];
const ALL_RC_DIRS: [&str; 8] = [
    "rc0.d", "rc1.d", "rc2.d", "rc3.d", "rc4.d", "rc5.d", "rc6.d", "rcS.d",
];
/// Files of init.d that are not services.
const NOT_SERVICES: [&str; 6] = ["README", "skeleton", "rc", "rcS", "functions", "halt"];

/// Whether `link` is `<prefix><digits><name>` (`S01ssh`, `K20nginx`).
fn rc_link_for(link: &str, prefix: char, name: &str) -> bool {
    link.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(name))
        .is_some_and(|digits| !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()))
}

impl SysV {
    pub fn new(
        runner: Arc<dyn Runner>,
        init_dir: PathBuf,
        rc_root: PathBuf,
        enabler: Option<SysvEnabler>,
    ) -> Self {
        SysV {
            runner,
            init_dir,
            rc_root,
            enabler,
        }
    }

    fn script(&self, name: &str) -> PathBuf {
        self.init_dir.join(name)
    }

    /// Whether any of `dirs` holds a link for `name` starting with one of `prefixes`.
    fn has_link(
        &self,
        dirs: &[&str],
        prefixes: &[char],
        name: &str,
    ) -> Result<bool, ProviderError> {
        for d in dirs {
            let dir = self.rc_root.join(d);
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ProviderError::io(format!("listing {}", dir.display()), e)),
            };
            for entry in entries.filter_map(|e| e.ok()) {
                let file = entry.file_name();
                let file = file.to_string_lossy();
                if prefixes.iter().any(|p| rc_link_for(&file, *p, name)) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn run_script(&self, script: &Path, action: &str) -> Result<CmdOutput, ProviderError> {
        let path = script.to_string_lossy();
        let timeout = if action == "status" {
            QUERY_TIMEOUT
        } else {
            ACTION_TIMEOUT
        };
        self.runner
            .run(&Invocation::new(&[path.as_ref(), action]), timeout)
    }
}

impl Backend for SysV {
    fn status(&self, name: &str) -> Result<Status, ProviderError> {
        let script = self.script(name);
        if !script.is_file() {
            return Err(not_found(
                name,
                format_args!("no init script {}", script.display()),
            ));
        }
        let out = self.run_script(&script, "status")?;
        // LSB: 0 running; 1 dead with a pid file; 2 dead with a lock file; 3 not running.
        let running = match out.code {
            Some(0) => Running::Yes,
            Some(1..=3) => Running::No,
            _ => {
                return Err(failed(format!("{} status", script.display()), &out));
            }
        };
        let enabled = if self.has_link(&BOOT_RC_DIRS, &['S'], name)? {
            Enablement::On
        } else {
            Enablement::Off
        };
        Ok(Status { running, enabled })
    }

    fn act(&self, name: &str, act: Act, _status: &Status) -> Result<(), ProviderError> {
        let r = &*self.runner;
        match act {
            Act::Enable | Act::Disable => {
                let enabler = self.enabler.ok_or_else(|| {
                    ProviderError::Unsupported(format!(
                        "service {name}: cannot {} it, neither update-rc.d nor chkconfig is installed",
                        act.verb()
                    ))
                })?;
                let linked = self.has_link(&ALL_RC_DIRS, &['S', 'K'], name)?;
                match (enabler, act) {
                    (SysvEnabler::UpdateRcD, Act::Enable) if !linked => {
                        run_checked(r, &["update-rc.d", name, "defaults"])
                    }
                    (SysvEnabler::UpdateRcD, _) => {
                        run_checked(r, &["update-rc.d", name, act.verb()])
                    }
                    (SysvEnabler::Chkconfig, Act::Enable) => {
                        if !linked {
                            run_checked(r, &["chkconfig", "--add", name])?;
                        }
                        run_checked(r, &["chkconfig", name, "on"])
                    }
                    (SysvEnabler::Chkconfig, _) => run_checked(r, &["chkconfig", name, "off"]),
                }
            }
            _ => {
                let script = self.script(name);
                let out = self.run_script(&script, act.verb())?;
                if out.success() {
                    Ok(())
                } else {
                    Err(failed(format!("{} {}", script.display(), act.verb()), &out))
                }
            }
        }
    }

    fn list(&self) -> Result<Vec<String>, ProviderError> {
        let entries = match fs::read_dir(&self.init_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(ProviderError::io(
                    format!("listing {}", self.init_dir.display()),
                    e,
                ))
            }
        };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                // Follows symlinks: some distributions link scripts into init.d.
                fs::metadata(e.path())
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !NOT_SERVICES.contains(&n.as_str()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::cmd::{RecordingRunner, SystemRunner};

    fn id(s: &str) -> ResourceId {
        ResourceId::parse(Collection::Services, s).unwrap()
    }

    fn svc(running: Option<bool>, enabled: Option<bool>) -> Spec {
        Spec::Service(ServiceSpec {
            running,
            enabled,
            refresh: Refresh::Restart,
        })
    }

    fn recorder() -> Arc<RecordingRunner> {
        Arc::new(RecordingRunner::new(&[]))
    }

    fn out(code: i32, stdout: &str) -> CmdOutput {
        CmdOutput {
            code: Some(code),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    // ---- plan -----------------------------------------------------------------------------

    #[test]
    fn plan_maps_every_enablement() {
        let st = |running, enabled| Status { running, enabled };
        let spec = |r, e| ServiceSpec {
            running: r,
            enabled: e,
            refresh: Refresh::Restart,
        };
        // Nothing asked, nothing done.
        assert_eq!(
            plan("x", &spec(None, None), &st(Running::No, Enablement::Off)).unwrap(),
            (vec![], vec![])
        );
        assert_eq!(
            plan(
                "x",
                &spec(Some(true), Some(true)),
                &st(Running::No, Enablement::Off)
            )
            .unwrap(),
            (
                vec![
                    field_diff("enabled", false, true),
                    field_diff("running", false, true)
                ],
                vec![Act::Enable, Act::Start]
            )
        );
        assert_eq!(
            plan(
                "x",
                &spec(Some(false), Some(false)),
                &st(Running::Yes, Enablement::On)
            )
            .unwrap(),
            (
                vec![
                    field_diff("enabled", true, false),
                    field_diff("running", true, false)
                ],
                vec![Act::Disable, Act::Stop]
            )
        );
        // Crashed counts as not running.
        assert_eq!(
            plan(
                "x",
                &spec(Some(true), None),
                &st(Running::Crashed, Enablement::On)
            )
            .unwrap()
            .1,
            vec![Act::Start]
        );
        // Static: true is satisfied, false is refused.
        let fixed = st(Running::Yes, Enablement::Fixed("static".into()));
        assert_eq!(
            plan("x", &spec(None, Some(true)), &fixed).unwrap(),
            (vec![], vec![])
        );
        let err = plan("x", &spec(None, Some(false)), &fixed).unwrap_err();
        assert!(err.to_string().contains("service x is static"), "{err}");
        // Masked: disabled already; enabling or starting refused.
        let masked = st(Running::No, Enablement::Masked);
        assert_eq!(
            plan("x", &spec(Some(false), Some(false)), &masked).unwrap(),
            (vec![], vec![])
        );
        for s in [spec(None, Some(true)), spec(Some(true), None)] {
            let err = plan("x", &s, &masked).unwrap_err();
            assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
            assert!(err.to_string().contains("masked"), "{err}");
        }
    }

    #[test]
    fn unsupported_platform_and_wrong_spec() {
        let platform = Platform {
            family: OsFamily::Unknown,
            distribution: "unknown".into(),
            version: String::new(),
            package_manager: None,
            init_system: None,
        };
        let p = for_platform(&platform, recorder());
        for err in [
            p.read(&id("x")).unwrap_err(),
            p.apply(&id("x"), &svc(Some(true), None), ApplyMode::DryRun)
                .unwrap_err(),
            p.list(None).unwrap_err(),
            p.refresh(&id("x"), Refresh::Restart, ApplyMode::Enforce)
                .unwrap_err(),
        ] {
            assert!(matches!(err, ProviderError::Unsupported(_)), "{err}");
            assert!(
                err.to_string().contains("no supported init system"),
                "{err}"
            );
        }
        let r = recorder();
        let s = Services::new(Systemd::new(r.clone()));
        let err = s
            .apply(
                &id("x"),
                &Spec::Package(Default::default()),
                ApplyMode::DryRun,
            )
            .unwrap_err();
        assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
        assert!(r.lines().is_empty());
    }

    // ---- systemd (recorded) ---------------------------------------------------------------

    fn systemd(r: &Arc<RecordingRunner>) -> Services<Systemd> {
        Services::new(Systemd::new(r.clone()))
    }

    #[test]
    fn systemd_read_and_parse() {
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(0, "active\n"));
        r.answer(out(0, "static\n")).answer(out(3, "inactive\n"));
        r.answer(out(1, "masked\n")).answer(out(3, "failed\n"));
        let s = systemd(&r);
        assert_eq!(
            s.read(&id("ssh")).unwrap(),
            json!({"running": true, "enabled": true})
        );
        assert_eq!(
            s.read(&id("dbus")).unwrap(),
            json!({"running": false, "enabled": null})
        );
        assert_eq!(
            s.read(&id("nope")).unwrap(),
            json!({"running": false, "enabled": false})
        );
        assert_eq!(
            r.lines(),
            vec![
                "systemctl is-enabled ssh",
                "systemctl is-active ssh",
                "systemctl is-enabled dbus",
                "systemctl is-active dbus",
                "systemctl is-enabled nope",
                "systemctl is-active nope",
            ]
        );
        for (word, want) in [
            ("enabled-runtime", Enablement::On),
            ("linked", Enablement::Off),
            ("indirect", Enablement::Off),
            ("alias", Enablement::Fixed("alias".into())),
            ("generated", Enablement::Fixed("generated".into())),
        ] {
            assert_eq!(
                parse_is_enabled(&out(0, word)).unwrap(),
                Some(want),
                "{word}"
            );
        }
        assert!(parse_is_enabled(&out(1, "bad\n")).is_err());
        assert_eq!(parse_is_active("activating\n").unwrap(), Running::Yes);
        assert_eq!(parse_is_active("deactivating\n").unwrap(), Running::No);
        assert!(parse_is_active("").is_err());
    }

    #[test]
    fn systemd_unknown_unit_is_a_clear_error() {
        for answer in [
            CmdOutput::fail(
                1,
                "Failed to get unit file state for nope.service: No such file or directory\n",
            ),
            out(4, "not-found\n"),
        ] {
            let r = recorder();
            r.answer(answer);
            let err = systemd(&r)
                .apply(&id("nope"), &svc(Some(true), None), ApplyMode::Enforce)
                .unwrap_err();
            assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
            assert_eq!(
                err.to_string(),
                "invalid: service nope does not exist (no systemd unit)"
            );
            assert_eq!(r.lines(), vec!["systemctl is-enabled nope"]);
        }
    }

    #[test]
    fn systemd_enforce_dry_run_and_idempotence() {
        let r = recorder();
        r.answer(out(1, "disabled\n")).answer(out(3, "inactive\n"));
        r.answer(CmdOutput::fail(
            0,
            "Created symlink /etc/systemd/system/multi-user.target.wants/nginx.service.\n",
        ));
        r.answer(out(0, ""));
        r.answer(out(0, "enabled\n")).answer(out(0, "active\n"));
        let c = systemd(&r)
            .apply(
                &id("nginx"),
                &svc(Some(true), Some(true)),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(
            c.diff,
            vec![
                field_diff("enabled", false, true),
                field_diff("running", false, true)
            ]
        );
        assert_eq!(
            r.lines(),
            vec![
                "systemctl is-enabled nginx",
                "systemctl is-active nginx",
                "systemctl enable nginx",
                "systemctl start nginx",
                "systemctl is-enabled nginx",
                "systemctl is-active nginx",
            ]
        );

        // Already there: queries only.
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(0, "active\n"));
        let c = systemd(&r)
            .apply(
                &id("nginx"),
                &svc(Some(true), Some(true)),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(c, Change::none());
        assert_eq!(r.lines().len(), 2);

        // Dry-run: queries only, same diff.
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(0, "active\n"));
        let c = systemd(&r)
            .apply(
                &id("nginx"),
                &svc(Some(false), Some(false)),
                ApplyMode::DryRun,
            )
            .unwrap();
        assert_eq!(
            c.diff,
            vec![
                field_diff("enabled", true, false),
                field_diff("running", true, false)
            ]
        );
        assert_eq!(
            r.lines(),
            vec!["systemctl is-enabled nginx", "systemctl is-active nginx"]
        );
    }

    #[test]
    fn systemd_failures_carry_stderr() {
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(3, "failed\n"));
        r.answer(CmdOutput::fail(
            1,
            "Job for nginx.service failed because the control process exited with error code.\n",
        ));
        let err = systemd(&r)
            .apply(&id("nginx"), &svc(Some(true), None), ApplyMode::Enforce)
            .unwrap_err();
        match err {
            ProviderError::Failed { what, detail } => {
                assert_eq!(what, "systemctl start nginx");
                assert!(
                    detail.starts_with("Job for nginx.service failed"),
                    "{detail}"
                );
            }
            other => panic!("{other}"),
        }

        // Start "succeeds" but the unit is not active afterwards.
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(3, "inactive\n"));
        r.answer(out(0, ""));
        r.answer(out(0, "enabled\n")).answer(out(3, "failed\n"));
        let err = systemd(&r)
            .apply(&id("nginx"), &svc(Some(true), None), ApplyMode::Enforce)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("start reported success but the service is not running"),
            "{err}"
        );

        // A query that fails for another reason is not "not found".
        let r = recorder();
        r.answer(CmdOutput::fail(
            1,
            "Failed to connect to bus: No medium found\n",
        ));
        let err = systemd(&r).read(&id("nginx")).unwrap_err();
        assert!(matches!(err, ProviderError::Failed { .. }), "{err}");
        assert!(
            err.to_string().contains("Failed to connect to bus"),
            "{err}"
        );
    }

    #[test]
    fn systemd_refresh_and_list() {
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(0, "active\n"));
        r.answer(out(0, ""));
        let c = systemd(&r)
            .refresh(&id("nginx"), Refresh::Reload, ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![field_diff("refresh", Value::Null, "reload")]);
        assert_eq!(r.lines()[2], "systemctl reload nginx");

        // Dry-run: no reload. Stopped: nothing at all.
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(0, "active\n"));
        let c = systemd(&r)
            .refresh(&id("nginx"), Refresh::Restart, ApplyMode::DryRun)
            .unwrap();
        assert!(c.changed);
        assert_eq!(r.lines().len(), 2);
        let r = recorder();
        r.answer(out(0, "enabled\n")).answer(out(3, "inactive\n"));
        let c = systemd(&r)
            .refresh(&id("nginx"), Refresh::Restart, ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c, Change::none());
        assert_eq!(r.lines().len(), 2);

        let r = recorder();
        r.answer(out(
            0,
            "ssh.service enabled enabled\ngetty@.service enabled enabled\ndbus.service static -\nssh.service enabled enabled\n",
        ));
        assert_eq!(systemd(&r).list(None).unwrap(), vec!["dbus", "ssh"]);
        assert_eq!(
            r.lines(),
            vec!["systemctl list-unit-files --type=service --no-legend --plain"]
        );
    }

    // ---- OpenRC (recorded) ----------------------------------------------------------------

    fn openrc(r: &Arc<RecordingRunner>) -> Services<OpenRc> {
        Services::new(OpenRc::new(r.clone()))
    }

    const RC_UPDATE: &str = "                acpid | default\n                sshd | default\n           networking | boot\n";

    #[test]
    fn openrc_status_codes_and_runlevels() {
        for (code, want) in [
            (0, Some(Running::Yes)),
            (8, Some(Running::Yes)),
            (3, Some(Running::No)),
            (4, Some(Running::No)),
            (16, Some(Running::No)),
            (32, Some(Running::Crashed)),
            (64, Some(Running::Crashed)),
            (1, None),
        ] {
            assert_eq!(parse_openrc_status(Some(code)), want, "{code}");
        }
        assert!(in_default_runlevel(RC_UPDATE, "sshd"));
        assert!(!in_default_runlevel(RC_UPDATE, "networking"));
        assert!(!in_default_runlevel(RC_UPDATE, "ssh"));

        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(0, " * status: started\n"))
            .answer(out(0, RC_UPDATE));
        assert_eq!(
            openrc(&r).read(&id("sshd")).unwrap(),
            json!({"running": true, "enabled": true})
        );
        assert_eq!(
            r.lines(),
            vec![
                "rc-service --exists sshd",
                "rc-service sshd status",
                "rc-update show default"
            ]
        );
    }

    #[test]
    fn openrc_enforce_dry_run_and_errors() {
        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(3, " * status: stopped\n"))
            .answer(out(0, RC_UPDATE));
        r.answer(out(0, " * service nginx added to runlevel default\n"));
        r.answer(out(0, " * Starting nginx ... [ ok ]\n"));
        r.answer(out(0, ""))
            .answer(out(0, ""))
            .answer(out(0, RC_UPDATE));
        let c = openrc(&r)
            .apply(
                &id("nginx"),
                &svc(Some(true), Some(true)),
                ApplyMode::Enforce,
            )
            .unwrap();
        assert_eq!(
            c.diff,
            vec![
                field_diff("enabled", false, true),
                field_diff("running", false, true)
            ]
        );
        assert_eq!(
            r.lines()[3..5],
            ["rc-update add nginx default", "rc-service nginx start"]
        );

        // Crashed: zap, then start.
        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(32, " * status: crashed\n"))
            .answer(out(0, RC_UPDATE));
        r.answer(out(0, "")).answer(out(0, ""));
        r.answer(out(0, ""))
            .answer(out(0, ""))
            .answer(out(0, RC_UPDATE));
        openrc(&r)
            .apply(&id("sshd"), &svc(Some(true), None), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(
            r.lines()[3..5],
            ["rc-service sshd zap", "rc-service sshd start"]
        );

        // Dry-run and disable.
        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(0, ""))
            .answer(out(0, RC_UPDATE));
        let c = openrc(&r)
            .apply(
                &id("sshd"),
                &svc(Some(false), Some(false)),
                ApplyMode::DryRun,
            )
            .unwrap();
        assert_eq!(c.diff.len(), 2);
        assert_eq!(r.lines().len(), 3);
        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(0, ""))
            .answer(out(0, RC_UPDATE));
        r.answer(out(0, ""));
        openrc(&r)
            .apply(&id("sshd"), &svc(None, Some(false)), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(r.lines()[3], "rc-update del sshd default");

        // Unknown service.
        let r = recorder();
        r.answer(out(1, ""));
        let err = openrc(&r).read(&id("nope")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid: service nope does not exist (no OpenRC service script)"
        );

        // A failing start.
        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(3, ""))
            .answer(out(0, RC_UPDATE));
        r.answer(CmdOutput::fail(1, " * ERROR: nginx failed to start\n"));
        let err = openrc(&r)
            .apply(&id("nginx"), &svc(Some(true), None), ApplyMode::Enforce)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rc-service nginx start failed: * ERROR: nginx failed to start"
        );

        // Refresh and list.
        let r = recorder();
        r.answer(out(0, ""))
            .answer(out(0, ""))
            .answer(out(0, RC_UPDATE))
            .answer(out(0, ""));
        openrc(&r)
            .refresh(&id("sshd"), Refresh::Restart, ApplyMode::Enforce)
            .unwrap();
        assert_eq!(r.lines()[3], "rc-service sshd restart");
        let r = recorder();
        r.answer(out(0, "sshd\nacpid\nlocal\n"));
        assert_eq!(
            openrc(&r).list(None).unwrap(),
            vec!["acpid", "local", "sshd"]
        );
        assert_eq!(r.lines(), vec!["rc-service --list"]);
    }

    // ---- SysV (recorded) ------------------------------------------------------------------

    struct SysvDirs {
        _dir: tempfile::TempDir,
        init: PathBuf,
        rc_root: PathBuf,
    }

    fn sysv_dirs(scripts: &[&str]) -> SysvDirs {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init.d");
        fs::create_dir_all(&init).unwrap();
        for s in scripts {
            let p = init.join(s);
            fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for d in ALL_RC_DIRS {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        SysvDirs {
            init,
            rc_root: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn sysv(
        r: &Arc<RecordingRunner>,
        d: &SysvDirs,
        enabler: Option<SysvEnabler>,
    ) -> Services<SysV> {
        Services::new(SysV::new(
            r.clone(),
            d.init.clone(),
            d.rc_root.clone(),
            enabler,
        ))
    }

    fn link(d: &SysvDirs, rc: &str, name: &str) {
        std::os::unix::fs::symlink("../init.d/x", d.rc_root.join(rc).join(name)).unwrap();
    }

    #[test]
    fn sysv_enablement_from_links_and_enablers() {
        let d = sysv_dirs(&["nginx"]);
        let script = d.init.join("nginx").display().to_string();
        let r = recorder();
        // No links: update-rc.d defaults.
        r.answer(out(3, "")).answer(out(0, ""));
        let c = sysv(&r, &d, Some(SysvEnabler::UpdateRcD))
            .apply(&id("nginx"), &svc(None, Some(true)), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![field_diff("enabled", false, true)]);
        assert_eq!(
            r.lines(),
            vec![
                format!("{script} status"),
                "update-rc.d nginx defaults".into()
            ]
        );

        // K links only (disabled earlier): update-rc.d enable.
        link(&d, "rc2.d", "K01nginx");
        link(&d, "rc0.d", "K01nginx");
        let r = recorder();
        r.answer(out(3, "")).answer(out(0, ""));
        sysv(&r, &d, Some(SysvEnabler::UpdateRcD))
            .apply(&id("nginx"), &svc(None, Some(true)), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(r.lines()[1], "update-rc.d nginx enable");

        // chkconfig: --add first when there are no links at all.
        let bare = sysv_dirs(&["nginx"]);
        let r = recorder();
        r.answer(out(3, "")).answer(out(0, "")).answer(out(0, ""));
        sysv(&r, &bare, Some(SysvEnabler::Chkconfig))
            .apply(&id("nginx"), &svc(None, Some(true)), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(
            r.lines()[1..],
            ["chkconfig --add nginx", "chkconfig nginx on"]
        );

        // An S link in a boot runlevel means enabled; S in rc0.d does not; a longer name does not.
        link(&d, "rc0.d", "S01nginx");
        link(&d, "rc3.d", "S01nginx-extra");
        let r = recorder();
        r.answer(out(0, ""));
        assert_eq!(
            sysv(&r, &d, None).read(&id("nginx")).unwrap(),
            json!({"running": true, "enabled": false})
        );
        link(&d, "rc3.d", "S20nginx");
        let r = recorder();
        r.answer(out(0, "")).answer(out(0, "")).answer(out(0, ""));
        let s = sysv(&r, &d, Some(SysvEnabler::Chkconfig));
        assert_eq!(
            s.read(&id("nginx")).unwrap(),
            json!({"running": true, "enabled": true})
        );
        s.apply(&id("nginx"), &svc(None, Some(false)), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(r.lines()[2], "chkconfig nginx off");

        // No enabler: enabling is unsupported, reading still works.
        let r = recorder();
        r.answer(out(0, ""));
        let err = sysv(&r, &d, None)
            .apply(&id("nginx"), &svc(None, Some(false)), ApplyMode::Enforce)
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{err}");
        assert!(
            err.to_string()
                .contains("neither update-rc.d nor chkconfig"),
            "{err}"
        );
    }

    #[test]
    fn sysv_status_codes_and_errors() {
        let d = sysv_dirs(&["nginx"]);
        let script = d.init.join("nginx").display().to_string();
        for (code, running) in [(0, true), (1, false), (2, false), (3, false)] {
            let r = recorder();
            r.answer(out(code, ""));
            assert_eq!(
                sysv(&r, &d, None).read(&id("nginx")).unwrap()["running"],
                running,
                "{code}"
            );
        }
        let r = recorder();
        r.answer(CmdOutput::fail(4, "status unknown\n"));
        let err = sysv(&r, &d, None).read(&id("nginx")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{script} status failed: status unknown")
        );

        let r = recorder();
        let err = sysv(&r, &d, None).read(&id("nope")).unwrap_err();
        assert!(matches!(err, ProviderError::Invalid(_)), "{err}");
        assert!(
            err.to_string()
                .contains("service nope does not exist (no init script"),
            "{err}"
        );
        assert!(r.lines().is_empty());

        let r = recorder();
        r.answer(out(3, ""))
            .answer(CmdOutput::fail(1, "nginx: [emerg] bad config\n"));
        let err = sysv(&r, &d, None)
            .apply(&id("nginx"), &svc(Some(true), None), ApplyMode::Enforce)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{script} start failed: nginx: [emerg] bad config")
        );
    }

    #[test]
    fn sysv_list_skips_non_services() {
        let d = sysv_dirs(&["nginx", "ssh", "README", "skeleton"]);
        fs::write(d.init.join("notes.txt"), "not executable").unwrap();
        let r = recorder();
        assert_eq!(sysv(&r, &d, None).list(None).unwrap(), vec!["nginx", "ssh"]);
    }

    #[test]
    fn sysv_enabler_detection() {
        let both = RecordingRunner::new(&["update-rc.d", "chkconfig"]);
        assert_eq!(
            SysvEnabler::detect(OsFamily::Debian, &both),
            Some(SysvEnabler::UpdateRcD)
        );
        assert_eq!(
            SysvEnabler::detect(OsFamily::Rhel, &both),
            Some(SysvEnabler::Chkconfig)
        );
        let upd = RecordingRunner::new(&["update-rc.d"]);
        assert_eq!(
            SysvEnabler::detect(OsFamily::Rhel, &upd),
            Some(SysvEnabler::UpdateRcD)
        );
        assert_eq!(
            SysvEnabler::detect(OsFamily::Debian, &RecordingRunner::new(&[])),
            None
        );
    }

    // ---- SysV for real --------------------------------------------------------------------

    /// An LSB-style script around `sleep 300`; the pid file lives next to it.
    fn sleeper_script(pidfile: &Path) -> String {
        format!(
            r#"#!/bin/sh
### BEGIN INIT INFO
# Provides:          comodit-sleeper
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: test service for comodit
### END INIT INFO
PIDFILE='{pid}'
running() {{ [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }}
case "$1" in
  start)
    running && exit 0
    # Detached from our pipes, or the caller would wait for sleep to close them.
    sleep 300 </dev/null >/dev/null 2>&1 &
    echo $! > "$PIDFILE"
    ;;
  stop)
    if running; then kill "$(cat "$PIDFILE")"; fi
    rm -f "$PIDFILE"
    ;;
  restart)
    "$0" stop && "$0" start
    ;;
  status)
    if running; then echo running; exit 0; fi
    echo stopped; exit 3
    ;;
  *)
    echo "usage: $0 start|stop|restart|status" >&2; exit 2
    ;;
esac
"#,
            pid = pidfile.display()
        )
    }

    /// Kills whatever pid the pid file names when the test ends, passed or not.
    struct KillSleeper {
        pidfile: PathBuf,
        seen: std::sync::Mutex<Vec<i32>>,
    }

    impl KillSleeper {
        fn pid(&self) -> Option<i32> {
            let pid = fs::read_to_string(&self.pidfile)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            self.seen.lock().unwrap().push(pid);
            Some(pid)
        }
    }

    impl Drop for KillSleeper {
        fn drop(&mut self) {
            let _ = self.pid();
            for pid in self.seen.lock().unwrap().iter() {
                if *pid > 1 {
                    // SAFETY: kill(2) on a pid this test started.
                    unsafe {
                        libc::kill(*pid, libc::SIGKILL);
                    }
                }
            }
        }
    }

    /// Alive = present in /proc and not a zombie (nothing may reap it in a container).
    fn alive(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    fn wait_until(what: &str, deadline_s: u64, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(deadline_s);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn real_sysv_script_start_refresh_stop() {
        let d = sysv_dirs(&[]);
        let pidfile = d.rc_root.join("sleeper.pid");
        let script = d.init.join("comodit-sleeper");
        fs::write(&script, sleeper_script(&pidfile)).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let guard = KillSleeper {
            pidfile: pidfile.clone(),
            seen: Default::default(),
        };
        let s = Services::new(SysV::new(
            Arc::new(SystemRunner),
            d.init.clone(),
            d.rc_root.clone(),
            None,
        ));
        let sleeper = id("comodit-sleeper");

        assert_eq!(
            s.read(&sleeper).unwrap(),
            json!({"running": false, "enabled": false})
        );
        assert_eq!(s.list(None).unwrap(), vec!["comodit-sleeper"]);

        let dry = s
            .apply(&sleeper, &svc(Some(true), None), ApplyMode::DryRun)
            .unwrap();
        assert_eq!(dry.diff, vec![field_diff("running", false, true)]);
        assert!(!pidfile.exists(), "dry-run started the service");

        let c = s
            .apply(&sleeper, &svc(Some(true), None), ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c, dry);
        let first = guard.pid().expect("pid file written by start");
        assert!(alive(first));
        assert_eq!(s.read(&sleeper).unwrap()["running"], true);
        assert_eq!(
            s.apply(&sleeper, &svc(Some(true), None), ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );

        // Refresh: a dry-run leaves the process alone, a restart replaces it.
        s.refresh(&sleeper, Refresh::Restart, ApplyMode::DryRun)
            .unwrap();
        assert_eq!(guard.pid(), Some(first));
        let c = s
            .refresh(&sleeper, Refresh::Restart, ApplyMode::Enforce)
            .unwrap();
        assert_eq!(c.diff, vec![field_diff("refresh", Value::Null, "restart")]);
        let second = guard.pid().unwrap();
        assert_ne!(second, first);
        wait_until("the first sleep to die", 10, || !alive(first));
        assert!(alive(second));
        // The script has no reload: the error says so.
        let err = s
            .refresh(&sleeper, Refresh::Reload, ApplyMode::Enforce)
            .unwrap_err();
        assert!(err.to_string().contains("usage:"), "{err}");

        let dry = s
            .apply(&sleeper, &svc(Some(false), None), ApplyMode::DryRun)
            .unwrap();
        assert_eq!(dry.diff, vec![field_diff("running", true, false)]);
        assert!(alive(second));
        s.apply(&sleeper, &svc(Some(false), None), ApplyMode::Enforce)
            .unwrap();
        wait_until("the sleep to die", 10, || !alive(second));
        assert_eq!(s.read(&sleeper).unwrap()["running"], false);
        assert_eq!(
            s.apply(&sleeper, &svc(Some(false), None), ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );
        // Stopped: a refresh does nothing.
        assert_eq!(
            s.refresh(&sleeper, Refresh::Restart, ApplyMode::Enforce)
                .unwrap(),
            Change::none()
        );
        assert!(!pidfile.exists());

        // Enabled-ness comes from the rc links.
        std::os::unix::fs::symlink(&script, d.rc_root.join("rc2.d/S01comodit-sleeper")).unwrap();
        assert_eq!(s.read(&sleeper).unwrap()["enabled"], true);

        let err = s.read(&id("comodit-no-such-service")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
