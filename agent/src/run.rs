//! The `run` op (DESIGN §6, §12): run one program from an argv, bounded in time and output.
//!
//! [`run`] starts `argv[0]` directly — never through a shell, so `$(…)`, `;`, `|` in arguments are
//! plain bytes; a caller who wants a shell names one (`["sh", "-c", "…"]`). The child gets:
//!
//! - a clean environment: [`RUN_PATH`] as `PATH`, `LANG=C.UTF-8`, and `HOME` set to the home
//!   directory of the agent's effective user in the password database (`/root` for an agent running
//!   as root; `/` if there is no entry). `HOME` comes from the user database rather than the agent's
//!   own environment so that nothing of the agent's environment reaches the child, and a service
//!   manager that starts the agent without `HOME` changes nothing. `spec.env` is added on top and
//!   may override these three. `argv[0]` is looked up on the resulting `PATH`;
//! - `spec.cwd` as working directory (default `/`), `/dev/null` as stdin;
//! - its own process group, so everything it forks can be signalled at once.
//!
//! **Ending.** At the timeout, or when `cancel` fires, the whole group gets `SIGTERM`, then
//! `SIGKILL` after [`KILL_GRACE`]. When the program exits by itself, nothing may outlive it in its
//! group: leftovers still holding its output pipes get [`KILL_GRACE`] to finish writing, then the
//! same `SIGTERM`/`SIGKILL` sequence, and a final `SIGKILL` to the group sweeps any that closed
//! their output. A program that wants to leave a daemon behind must detach it from the group
//! (`setsid`), as daemons and init scripts do.
//!
//! The group is only ever signalled while its leader is not yet reaped: the leader's exit is
//! observed with `waitid(WNOWAIT)`, which leaves the zombie in place, so its pid — which is the
//! group id — cannot be reused by an unrelated process until the group has been swept. The leader
//! is reaped last.
//!
//! **Output.** Stdout and stderr are read as they come, decoded as UTF-8 (invalid bytes become
//! U+FFFD, exactly like `String::from_utf8_lossy` over the whole output, even when a character is
//! split between two reads) and kept up to [`MAX_RUN_OUTPUT_BYTES`] each; more sets `truncated`.
//! With a `chunks` channel, the same kept text is also sent as it arrives, in order, as pieces of
//! at most [`MAX_OUTPUT_CHUNK_BYTES`] cut on character boundaries — so the chunks of one stream
//! concatenate to exactly its captured text. A full channel is waited for (backpressure: the child
//! blocks on its pipe meanwhile) but never past the timeout, which then ends the run as any timeout.
//! If the receiver is dropped, streaming stops and capture goes on. Once the run is ending (timeout,
//! cancel, leftovers), a send that cannot complete within the current grace period abandons
//! streaming rather than the capture.
//!
//! **Errors.** A program that never started is a [`RunError`] (not found, not executable, bad
//! working directory, invalid spec); a program that started always gives a [`RunResult`]: its
//! exit code, or the signal that ended it. A cancelled run returns its result so far, with
//! `timed_out: false` and the signal that ended it.

use std::collections::BTreeMap;
use std::io;
use std::process::Stdio;
use std::time::Duration;

use comodit_protocol::limits::{MAX_OUTPUT_CHUNK_BYTES, MAX_RUN_OUTPUT_BYTES};
use comodit_protocol::{ProtocolError, RunResult, RunSpec, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// `PATH` of a run unless `spec.env` sets one: the usual system directories, sbin included
/// (the agent manages the host).
pub const RUN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `LANG` of a run unless `spec.env` sets one.
pub const RUN_LANG: &str = "C.UTF-8";

/// Time between `SIGTERM` and `SIGKILL`, and how long leftovers of a program that exited may keep
/// its output open.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// Bytes read from a pipe at once. Decoded, that is at most 3× as much text (every byte replaced
/// by U+FFFD); it is cut into chunks anyway.
const READ_BUF_BYTES: usize = 16 * 1024;

/// Why a program could not be started. The text names the program (`argv[0]`), never the other
/// arguments or the environment, which may hold secrets.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid run: {0}")]
    Invalid(#[from] ProtocolError),
    #[error("cannot run {program:?}: {detail}")]
    NotFound { program: String, detail: String },
    #[error("cannot run {program:?}: permission denied (not an executable file, or a directory on the way is not searchable)")]
    PermissionDenied { program: String },
    #[error("cannot run {program:?}: working directory {cwd:?} {detail}")]
    BadCwd {
        program: String,
        cwd: String,
        detail: String,
    },
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// The runtime cannot deliver `SIGCHLD` (built without its IO driver).
    #[error("cannot watch for child exits: {0}")]
    Watch(#[source] io::Error),
}

/// Runs `spec` to completion, the timeout or `cancel` (see the module documentation).
///
/// `chunks` is where streamed output goes (the agent passes one when `spec.stream` is set); the
/// capped copy in the result is kept either way. `spec` is validated first (protocol limits), so a
/// spec that did not come through `Command::decode` is still refused cleanly. Needs a tokio runtime
/// with its IO and time drivers (`enable_all`): exits are watched through `SIGCHLD`.
pub async fn run(
    spec: &RunSpec,
    chunks: Option<mpsc::Sender<(Stream, String)>>,
    cancel: CancellationToken,
) -> Result<RunResult, RunError> {
    run_with_grace(spec, chunks, cancel, KILL_GRACE).await
}

/// [`run`] with another grace period, so tests of the escalation need not wait seconds.
async fn run_with_grace(
    spec: &RunSpec,
    mut sink: Option<mpsc::Sender<(Stream, String)>>,
    cancel: CancellationToken,
    grace: Duration,
) -> Result<RunResult, RunError> {
    spec.validate()?;
    let program = spec.argv[0].clone();
    let cwd = spec.cwd.clone().unwrap_or_else(|| "/".to_owned());
    check_cwd(&program, &cwd)?;

    let env = child_env(&spec.env);
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);

    // Listen before spawning: an exit is then never missed (and the check runs first anyway).
    let mut exit = ExitWatch::new()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(spec.timeout_s);
    let child = cmd
        .spawn()
        .map_err(|e| spawn_error(&program, &env, &cwd, e))?;
    let mut group = Group::new(child);
    exit.pid = group.pgid;
    let mut stdout = group.child.stdout.take().expect("stdout is piped");
    let mut stderr = group.child.stderr.take().expect("stderr is piped");
    tracing::debug!(program = %program, pid = group.pgid, timeout_s = spec.timeout_s, "run started");

    let mut out = Capture::new();
    let mut err = Capture::new();
    let mut out_buf = vec![0u8; READ_BUF_BYTES];
    let mut err_buf = vec![0u8; READ_BUF_BYTES];
    let mut phase = Phase::Running;
    let mut leader_exited = false;
    let mut timed_out = false;

    loop {
        if leader_exited && !out.open && !err.open {
            break;
        }
        let phase_end = match phase {
            Phase::Running => deadline,
            Phase::Draining(t) | Phase::Terminating(t) | Phase::Killing(t) => t,
        };
        // What a read brought, handled below the select so the reads' borrows have ended.
        let read: Option<(Stream, io::Result<usize>)> = tokio::select! {
            biased;
            _ = cancel.cancelled(), if phase == Phase::Running => {
                tracing::debug!(program = %program, "run cancelled");
                group.signal(libc::SIGTERM);
                phase = Phase::Terminating(Instant::now() + grace);
                None
            }
            _ = sleep_until(phase_end) => {
                match phase {
                    Phase::Running => {
                        tracing::debug!(program = %program, timeout_s = spec.timeout_s, "run timed out");
                        timed_out = true;
                        group.signal(libc::SIGTERM);
                        phase = Phase::Terminating(Instant::now() + grace);
                    }
                    Phase::Draining(_) => {
                        group.signal(libc::SIGTERM);
                        phase = Phase::Terminating(Instant::now() + grace);
                    }
                    Phase::Terminating(_) => {
                        group.signal(libc::SIGKILL);
                        phase = Phase::Killing(Instant::now() + grace);
                    }
                    // Only a process that escaped the group (or one stuck in the kernel) can
                    // still hold the pipes; stop waiting for it.
                    Phase::Killing(_) => break,
                }
                None
            }
            _ = exit.exited(), if !leader_exited => {
                leader_exited = true;
                if phase == Phase::Running {
                    phase = Phase::Draining(Instant::now() + grace);
                }
                None
            }
            r = stdout.read(&mut out_buf), if out.open => Some((Stream::Stdout, r)),
            r = stderr.read(&mut err_buf), if err.open => Some((Stream::Stderr, r)),
        };
        let Some((stream, r)) = read else { continue };
        let (cap, buf) = match stream {
            Stream::Stdout => (&mut out, &out_buf),
            Stream::Stderr => (&mut err, &err_buf),
        };
        let kept_from = cap.text.len();
        match r {
            Ok(0) | Err(_) => cap.finish(),
            Ok(n) => cap.push(&buf[..n]),
        }
        let Some(tx) = &sink else { continue };
        // Before the end, a blocked receiver may hold the run up to its timeout; after, only up to
        // the current grace period.
        let send_until = if phase == Phase::Running {
            deadline
        } else {
            phase_end
        };
        let watch_cancel = phase == Phase::Running;
        match deliver(
            tx,
            stream,
            &cap.text[kept_from..],
            send_until,
            &cancel,
            watch_cancel,
        )
        .await
        {
            Delivery::Sent => {}
            Delivery::ReceiverGone => sink = None,
            Delivery::Cancelled => {
                group.signal(libc::SIGTERM);
                phase = Phase::Terminating(Instant::now() + grace);
            }
            Delivery::Expired if phase == Phase::Running => {
                timed_out = true;
                group.signal(libc::SIGTERM);
                phase = Phase::Terminating(Instant::now() + grace);
            }
            Delivery::Expired => {
                tracing::debug!(program = %program, "output receiver stuck while ending, streaming abandoned");
                sink = None;
            }
        }
    }

    // Sweep leftovers that closed their output; the unreaped leader still pins the group id.
    group.signal(libc::SIGKILL);
    let (exit_code, signal) = if leader_exited {
        group.reap().await
    } else {
        // Not dead even after SIGKILL and a grace period (stuck in the kernel). Leave it to the
        // runtime's reaper rather than block the agent.
        tracing::warn!(program = %program, pid = group.pgid, "run did not exit after SIGKILL");
        if !err.truncated {
            err.push(b"\n[comodit: the process did not exit after SIGKILL]\n");
        }
        (None, None)
    };
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::debug!(program = %program, ?exit_code, ?signal, timed_out, duration_ms, "run finished");
    Ok(RunResult {
        exit_code,
        signal,
        timed_out,
        truncated: out.truncated || err.truncated,
        stdout: out.text,
        stderr: err.text,
        duration_ms,
    })
}

/// Where a run is in its life. The instants are when the phase gives up waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Until the leader exits, the timeout or a cancel.
    Running,
    /// The leader exited; waiting for the pipes to close.
    Draining(Instant),
    /// `SIGTERM` sent to the group.
    Terminating(Instant),
    /// `SIGKILL` sent to the group.
    Killing(Instant),
}

/// The child and its process group. Dropping it (the run's future dropped mid-way) kills the
/// group, before the child handle is dropped and possibly reaped.
struct Group {
    child: tokio::process::Child,
    /// The leader's pid, which is the group id (`process_group(0)`).
    pgid: libc::pid_t,
    reaped: bool,
}

impl Group {
    fn new(child: tokio::process::Child) -> Group {
        // A child that has not been waited for always has an id.
        let pid = child.id().expect("unreaped child has a pid");
        Group {
            child,
            pgid: libc::pid_t::try_from(pid).expect("pids fit pid_t"),
            reaped: false,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        debug_assert!(!self.reaped, "signalling a group whose leader was reaped");
        if self.reaped {
            return;
        }
        // SAFETY: kill has no memory effects. ESRCH (group already empty) is fine.
        unsafe { libc::kill(-self.pgid, sig) };
    }

    /// Reaps the (exited) leader: its exit code, or the signal that ended it.
    async fn reap(&mut self) -> (Option<i32>, Option<i32>) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.wait().await;
        self.reaped = true;
        match status {
            Ok(s) => (s.code(), s.signal()),
            Err(e) => {
                tracing::warn!(pid = self.pgid, error = %e, "cannot reap run");
                (None, None)
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: as in `signal`; the leader is not reaped yet, so the group id is still ours.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
    }
}

/// Tells when the leader has exited without reaping it.
struct ExitWatch {
    sigchld: tokio::signal::unix::Signal,
    pid: libc::pid_t,
}

impl ExitWatch {
    fn new() -> Result<ExitWatch, RunError> {
        let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(RunError::Watch)?;
        Ok(ExitWatch { sigchld, pid: 0 })
    }

    fn has_exited(&self) -> bool {
        loop {
            // SAFETY: siginfo_t is plain C data, zeroed is valid; waitid only writes into it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                // With WNOHANG, si_pid stays 0 while the child runs.
                return unsafe { info.si_pid() } != 0;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // ECHILD: not our child any more — it has certainly exited.
                _ => return true,
            }
        }
    }

    /// Resolves once the leader has exited. Cancel-safe: the check runs again on each poll.
    async fn exited(&mut self) {
        loop {
            if self.has_exited() {
                return;
            }
            if self.sigchld.recv().await.is_none() {
                // The runtime is shutting down; the deadline ends the run if anything does.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The environment of a run: the clean base, then `extra` on top.
fn child_env(extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), RUN_PATH.to_owned()),
        ("LANG".to_owned(), RUN_LANG.to_owned()),
        ("HOME".to_owned(), home_of_effective_user()),
    ]);
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The home directory of the agent's effective user in the password database, `/` without one.
/// Looked up once: the agent's own user does not change while it runs.
pub fn home_of_effective_user() -> String {
    static HOME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOME.get_or_init(lookup_home).clone()
}

fn lookup_home() -> String {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut buf = vec![0 as libc::c_char; 1024];
    // Entries longer than this are not homes we want to hand out.
    while buf.len() <= 64 * 1024 {
        // SAFETY: passwd is plain C data; getpwuid_r fills it with pointers into `buf`, which
        // outlives every use of them below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE {
            let len = buf.len() * 2;
            buf.resize(len, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
            break;
        }
        let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) }.to_string_lossy();
        if dir.starts_with('/') {
            return dir.into_owned();
        }
        break;
    }
    "/".to_owned()
}

fn check_cwd(program: &str, cwd: &str) -> Result<(), RunError> {
    let bad = |detail: &str| RunError::BadCwd {
        program: program.to_owned(),
        cwd: cwd.to_owned(),
        detail: detail.to_owned(),
    };
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad("is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(bad("does not exist")),
        Err(e) => Err(bad(&e.to_string())),
    }
}

fn spawn_error(program: &str, env: &BTreeMap<String, String>, cwd: &str, e: io::Error) -> RunError {
    let program_s = program.to_owned();
    match e.kind() {
        // ENOENT from exec also means a missing `#!` interpreter or dynamic loader: say which.
        io::ErrorKind::NotFound => {
            let path = env.get("PATH").map_or("", String::as_str);
            let exists = if program.contains('/') {
                std::path::Path::new(cwd).join(program).is_file()
            } else {
                path.split(':')
                    .filter(|d| !d.is_empty())
                    .any(|d| std::path::Path::new(d).join(program).is_file())
            };
            let detail = if exists {
                "its interpreter (#! line) or dynamic loader is missing".to_owned()
            } else if program.contains('/') {
                "no such file".to_owned()
            } else {
                format!("not found on PATH={path}")
            };
            RunError::NotFound {
                program: program_s,
                detail,
            }
        }
        io::ErrorKind::PermissionDenied => RunError::PermissionDenied { program: program_s },
        // The directory vanished between the check and the spawn.
        _ if !std::path::Path::new(cwd).is_dir() => RunError::BadCwd {
            program: program_s,
            cwd: cwd.to_owned(),
            detail: "does not exist".to_owned(),
        },
        _ => RunError::Spawn {
            program: program_s,
            source: e,
        },
    }
}

/// One output stream: decoded, capped text and the decoder's carry.
struct Capture {
    /// The kept text, at most [`MAX_RUN_OUTPUT_BYTES`].
    text: String,
    /// The start of a character split across reads (at most 3 bytes).
    carry: Vec<u8>,
    /// Output beyond the cap arrived (and was dropped).
    truncated: bool,
    /// The pipe has not reached EOF.
    open: bool,
}

impl Capture {
    fn new() -> Capture {
        Capture {
            text: String::new(),
            carry: Vec::new(),
            truncated: false,
            open: true,
        }
    }

    /// Adds bytes read from the pipe.
    fn push(&mut self, bytes: &[u8]) {
        if self.truncated {
            // Keep reading (so the child does not block) but drop everything.
            return;
        }
        let mut fresh = String::new();
        decode_lossy(&mut self.carry, bytes, false, &mut fresh);
        self.keep(&fresh);
    }

    /// The pipe reached EOF (or failed, which ends it the same way).
    fn finish(&mut self) {
        self.open = false;
        if !self.truncated {
            let mut fresh = String::new();
            decode_lossy(&mut self.carry, &[], true, &mut fresh);
            self.keep(&fresh);
        }
        self.carry.clear();
    }

    fn keep(&mut self, fresh: &str) {
        let room = MAX_RUN_OUTPUT_BYTES - self.text.len();
        if fresh.len() <= room {
            self.text.push_str(fresh);
        } else {
            self.text
                .push_str(&fresh[..floor_char_boundary(fresh, room)]);
            self.truncated = true;
        }
    }
}

/// Decodes `input` after the `carry` of the previous call into `out`, lossily: each invalid
/// sequence becomes one U+FFFD, as `String::from_utf8_lossy` does. An incomplete character at the
/// end is kept in `carry` for the next call, unless `eof`, when it is invalid.
fn decode_lossy(carry: &mut Vec<u8>, input: &[u8], eof: bool, out: &mut String) {
    let joined;
    let mut rest: &[u8] = if carry.is_empty() {
        input
    } else {
        carry.extend_from_slice(input);
        joined = std::mem::take(carry);
        &joined
    };
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                // SAFETY: from_utf8 just validated these bytes.
                out.push_str(unsafe { std::str::from_utf8_unchecked(valid) });
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    None if eof => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return;
                    }
                    None => {
                        carry.extend_from_slice(after);
                        return;
                    }
                }
            }
        }
    }
}

/// The largest character boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `text` cut into pieces of at most `max` bytes on character boundaries (`max` ≥ 4, so every
/// piece makes progress).
fn split_chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    debug_assert!(max >= 4);
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = floor_char_boundary(rest, max);
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

enum Delivery {
    Sent,
    ReceiverGone,
    Cancelled,
    Expired,
}

/// Sends `text` through the channel in chunks, waiting for room until `until`.
async fn deliver(
    tx: &mpsc::Sender<(Stream, String)>,
    stream: Stream,
    text: &str,
    until: Instant,
    cancel: &CancellationToken,
    watch_cancel: bool,
) -> Delivery {
    for piece in split_chunks(text, MAX_OUTPUT_CHUNK_BYTES) {
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if watch_cancel => return Delivery::Cancelled,
            _ = sleep_until(until) => return Delivery::Expired,
            sent = tx.send((stream, piece.to_owned())) => {
                if sent.is_err() {
                    return Delivery::ReceiverGone;
                }
            }
        }
    }
    Delivery::Sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    fn spec(argv: &[&str]) -> RunSpec {
        RunSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            timeout_s: 30,
            stream: false,
        }
    }

    fn sh(script: &str) -> RunSpec {
        spec(&["sh", "-c", script])
    }

    async fn run_ok(s: &RunSpec) -> RunResult {
        run(s, None, CancellationToken::new()).await.unwrap()
    }

    /// A run, with the test failing instead of hanging if `run` never returns.
    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("run did not return within 60 s")
    }

    /// Whether `pid` is gone (or only a zombie waiting for its new parent to reap it).
    fn pid_gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the parenthesised command name.
            Ok(stat) => {
                let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
                matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
            }
        }
    }

    /// Waits (with a deadline) for `pid` to disappear.
    async fn assert_pid_disappears(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pid_gone(pid) {
            assert!(Instant::now() < deadline, "process {pid} still alive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn read_pid(path: &Path) -> u32 {
        let text = std::fs::read_to_string(path).unwrap();
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad pid file {text:?}"))
    }

    #[tokio::test]
    async fn exit_codes_and_output() {
        let r = run_ok(&sh("echo out; echo err >&2; exit 7")).await;
        assert_eq!(r.exit_code, Some(7));
        assert_eq!(r.signal, None);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert!(!r.timed_out && !r.truncated);

        let r = run_ok(&spec(&["true"])).await;
        assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), ""));
        let r = run_ok(&spec(&["false"])).await;
        assert_eq!(r.exit_code, Some(1));

        // stdin is /dev/null: cat ends at once with nothing.
        let r = run_ok(&spec(&["cat"])).await;
        assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), ""));
    }

    #[tokio::test]
    async fn exit_by_signal() {
        let r = run_ok(&sh("kill -KILL $$")).await;
        assert_eq!(r.exit_code, None);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(!r.timed_out);
    }

    #[tokio::test]
    async fn environment_is_clean_plus_spec() {
        std::env::set_var("COMODIT_RUN_TEST_MARKER", "leaked");
        let mut s = spec(&["env"]);
        s.env.insert("FOO".into(), "bar baz=qux".into());
        s.env.insert("LANG".into(), "C".into());
        let r = run_ok(&s).await;
        assert_eq!(r.exit_code, Some(0), "{}", r.stderr);
        let env: BTreeMap<&str, &str> = r
            .stdout
            .lines()
            .map(|l| l.split_once('=').expect("NAME=value"))
            .collect();
        assert!(
            !r.stdout.contains("COMODIT_RUN_TEST_MARKER"),
            "{}",
            r.stdout
        );
        let home = home_of_effective_user();
        let expected = BTreeMap::from([
            ("FOO", "bar baz=qux"),
            ("HOME", home.as_str()),
            ("LANG", "C"),
            ("PATH", RUN_PATH),
        ]);
        assert_eq!(env, expected);
        // The documented HOME choice, on this machine where tests run as root.
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(env["HOME"], "/root");
        }
    }

    #[tokio::test]
    async fn program_is_looked_up_on_the_spec_path() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("only-here");
        std::fs::write(&tool, "#!/bin/sh\necho found\n").unwrap();
        std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = run(&spec(&["only-here"]), None, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::NotFound { .. }), "{err}");
        let mut s = spec(&["only-here"]);
        s.env.insert(
            "PATH".into(),
            format!("{}:{RUN_PATH}", dir.path().display()),
        );
        let r = run_ok(&s).await;
        assert_eq!(r.stdout, "found\n");
    }

    #[tokio::test]
    async fn working_directory() {
        let r = run_ok(&spec(&["pwd"])).await;
        assert_eq!(r.stdout, "/\n");
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&["pwd"]);
        s.cwd = Some(dir.path().to_str().unwrap().to_owned());
        let r = run_ok(&s).await;
        assert_eq!(
            r.stdout,
            format!("{}\n", dir.path().canonicalize().unwrap().display())
        );
    }

    #[tokio::test]
    async fn arguments_are_literal_and_a_shell_only_when_asked() {
        let r = run_ok(&spec(&["echo", "$(id); rm -rf /tmp/x", "|", "&&"])).await;
        assert_eq!(r.stdout, "$(id); rm -rf /tmp/x | &&\n");
        let r = run_ok(&spec(&["printf", "%s\\n", "`id`", "*", "a\nb", "'\""])).await;
        assert_eq!(r.stdout, "`id`\n*\na\nb\n'\"\n");
        let r = run_ok(&sh("echo $((1 + 2)) | tr 3 x")).await;
        assert_eq!(r.stdout, "x\n");
    }

    #[tokio::test]
    async fn programs_that_cannot_start_are_errors() {
        let token = CancellationToken::new;
        let err = run(&spec(&["surely-not-a-program-xyz"]), None, token())
            .await
            .unwrap_err();
        assert!(matches!(&err, RunError::NotFound { .. }), "{err}");
        assert!(
            err.to_string().contains("surely-not-a-program-xyz"),
            "{err}"
        );
        assert!(err.to_string().contains(RUN_PATH), "{err}");

        let err = run(&spec(&["/nonexistent/tool"]), None, token())
            .await
            .unwrap_err();
        assert!(matches!(&err, RunError::NotFound { .. }), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let orphan = dir.path().join("bad-interpreter");
        std::fs::write(&orphan, "#!/nonexistent/interpreter\n").unwrap();
        std::fs::set_permissions(&orphan, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = run(&spec(&[orphan.to_str().unwrap()]), None, token())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("interpreter"), "{err}");

        let script = dir.path().join("not-executable");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let err = run(&spec(&[script.to_str().unwrap()]), None, token())
            .await
            .unwrap_err();
        assert!(matches!(&err, RunError::PermissionDenied { .. }), "{err}");

        let mut s = spec(&["true"]);
        s.cwd = Some(dir.path().join("missing").to_str().unwrap().to_owned());
        let err = run(&s, None, token()).await.unwrap_err();
        assert!(matches!(&err, RunError::BadCwd { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        s.cwd = Some(script.to_str().unwrap().to_owned());
        let err = run(&s, None, token()).await.unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        let err = run(&spec(&[]), None, token()).await.unwrap_err();
        assert!(matches!(err, RunError::Invalid(_)), "{err}");
        let mut s = spec(&["true"]);
        s.timeout_s = 0;
        assert!(matches!(
            run(&s, None, token()).await,
            Err(RunError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let mut s = sh(&format!(
            "sleep 300 & echo $! > {}; echo started; sleep 300",
            pidfile.display()
        ));
        s.timeout_s = 1;
        let r = bounded(run(&s, None, CancellationToken::new()))
            .await
            .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.signal, Some(libc::SIGTERM));
        assert_eq!(r.stdout, "started\n");
        assert!(r.duration_ms >= 1000, "{}", r.duration_ms);
        assert!(r.duration_ms < 1000 + KILL_GRACE.as_millis() as u64 + 5000);
        assert_pid_disappears(read_pid(&pidfile)).await;
    }

    #[tokio::test]
    async fn sigterm_is_followed_by_sigkill() {
        // The ignored SIGTERM is inherited by sleep too, so only SIGKILL ends the group.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let mut s = sh(&format!(
            "trap '' TERM; sleep 300 & echo $! > {}; sleep 300",
            pidfile.display()
        ));
        s.timeout_s = 1;
        let grace = Duration::from_millis(300);
        let r = bounded(run_with_grace(&s, None, CancellationToken::new(), grace))
            .await
            .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(r.duration_ms >= 1300, "{}", r.duration_ms);
        assert_pid_disappears(read_pid(&pidfile)).await;
    }

    #[tokio::test]
    async fn leftovers_of_a_finished_program_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_millis(300);

        // A leftover holding stdout: the run ends one grace period after the program, not at the
        // timeout, and with the program's own exit code.
        let holder = dir.path().join("holder.pid");
        let s = sh(&format!(
            "sleep 300 & echo $! > {}; echo done",
            holder.display()
        ));
        let r = bounded(run_with_grace(&s, None, CancellationToken::new(), grace))
            .await
            .unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert!(!r.timed_out);
        assert_eq!(r.stdout, "done\n");
        assert!(r.duration_ms < 10_000, "{}", r.duration_ms);
        assert_pid_disappears(read_pid(&holder)).await;

        // A leftover that closed its output: swept when the program ends.
        let quiet = dir.path().join("quiet.pid");
        let s = sh(&format!(
            "sleep 300 >/dev/null 2>&1 & echo $! > {}",
            quiet.display()
        ));
        let r = bounded(run_with_grace(&s, None, CancellationToken::new(), grace))
            .await
            .unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert_pid_disappears(read_pid(&quiet)).await;
    }

    /// `sh -c` producing exactly `n` bytes of `a` on stdout.
    fn produce(n: usize) -> RunSpec {
        sh(&format!("head -c {n} /dev/zero | tr '\\0' a"))
    }

    #[tokio::test]
    async fn output_is_capped_exactly_at_the_limit() {
        let r = run_ok(&produce(MAX_RUN_OUTPUT_BYTES)).await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stdout.len(), MAX_RUN_OUTPUT_BYTES);
        assert!(!r.truncated);

        let r = run_ok(&produce(MAX_RUN_OUTPUT_BYTES + 1)).await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stdout.len(), MAX_RUN_OUTPUT_BYTES);
        assert!(r.stdout.bytes().all(|b| b == b'a'));
        assert!(r.truncated);

        // Far over the cap: the child is not blocked, the rest is read and dropped.
        let r = run_ok(&sh(&format!(
            "head -c {} /dev/zero >&2",
            4 * MAX_RUN_OUTPUT_BYTES
        )))
        .await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stderr.len(), MAX_RUN_OUTPUT_BYTES);
        assert!(r.truncated && r.stdout.is_empty());
    }

    /// Collects every chunk until the sender side is gone.
    fn collector(
        mut rx: mpsc::Receiver<(Stream, String)>,
    ) -> tokio::task::JoinHandle<Vec<(Stream, String)>> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(c) = rx.recv().await {
                got.push(c);
            }
            got
        })
    }

    fn joined(chunks: &[(Stream, String)], stream: Stream) -> String {
        chunks
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, t)| t.as_str())
            .collect()
    }

    #[tokio::test]
    async fn streamed_chunks_are_ordered_bounded_and_equal_the_capture() {
        // Multi-byte text, so reads split characters; more than one chunk's worth.
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..60_000)
            .map(|i| format!("{i}:é€😀\n"))
            .collect::<String>();
        assert!(text.len() > 3 * MAX_OUTPUT_CHUNK_BYTES && text.len() < MAX_RUN_OUTPUT_BYTES);
        let file = dir.path().join("text");
        std::fs::write(&file, &text).unwrap();
        let s = sh(&format!(
            "cat {f}; cat {f} >&2; printf '\\377tail'",
            f = file.display()
        ));

        // A tiny channel: the run must wait for the slow receiver, not drop anything.
        let (tx, rx) = mpsc::channel(1);
        let got = collector(rx);
        let r = bounded(run(&s, Some(tx), CancellationToken::new()))
            .await
            .unwrap();
        let chunks = got.await.unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stdout, format!("{text}\u{FFFD}tail"));
        assert_eq!(r.stderr, text);
        assert!(chunks.len() > 6, "{} chunks", chunks.len());
        assert!(chunks
            .iter()
            .all(|(_, c)| !c.is_empty() && c.len() <= MAX_OUTPUT_CHUNK_BYTES));
        assert_eq!(joined(&chunks, Stream::Stdout), r.stdout);
        assert_eq!(joined(&chunks, Stream::Stderr), r.stderr);
    }

    #[tokio::test]
    async fn streamed_output_is_capped_like_the_capture() {
        let (tx, rx) = mpsc::channel(8);
        let got = collector(rx);
        let r = bounded(run(
            &produce(MAX_RUN_OUTPUT_BYTES + 1),
            Some(tx),
            CancellationToken::new(),
        ))
        .await
        .unwrap();
        let chunks = got.await.unwrap();
        assert!(r.truncated);
        assert_eq!(joined(&chunks, Stream::Stdout).len(), MAX_RUN_OUTPUT_BYTES);
    }

    #[tokio::test]
    async fn a_stuck_receiver_holds_the_run_no_longer_than_its_timeout() {
        let (tx, _rx) = mpsc::channel(1);
        let mut s = produce(4 * MAX_RUN_OUTPUT_BYTES);
        s.timeout_s = 1;
        let r = bounded(run_with_grace(
            &s,
            Some(tx),
            CancellationToken::new(),
            Duration::from_millis(300),
        ))
        .await
        .unwrap();
        assert!(r.timed_out);
        assert!(r.duration_ms < 10_000, "{}", r.duration_ms);
    }

    #[tokio::test]
    async fn a_dropped_receiver_stops_streaming_not_the_capture() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let r = run_ok_with(&produce(300_000), Some(tx)).await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.stdout.len(), 300_000);
    }

    async fn run_ok_with(s: &RunSpec, tx: Option<mpsc::Sender<(Stream, String)>>) -> RunResult {
        bounded(run(s, tx, CancellationToken::new())).await.unwrap()
    }

    #[tokio::test]
    async fn cancel_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let s = sh(&format!(
            "sleep 300 & echo $! > {}; echo ready; sleep 300",
            pidfile.display()
        ));
        let cancel = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(4);
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                // Cancel only once the program is certainly running.
                let first = rx.recv().await;
                cancel.cancel();
                while rx.recv().await.is_some() {}
                first
            })
        };
        let r = bounded(run(&s, Some(tx), cancel)).await.unwrap();
        assert_eq!(
            canceller.await.unwrap(),
            Some((Stream::Stdout, "ready\n".to_owned()))
        );
        assert!(!r.timed_out);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.signal, Some(libc::SIGTERM));
        assert!(r.duration_ms < 30_000);
        assert_pid_disappears(read_pid(&pidfile)).await;
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("leader.pid");
        let s = sh(&format!(
            "echo $$ > {}; echo ready; sleep 300",
            pidfile.display()
        ));
        let (tx, mut rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        // Boxed so that dropping it really drops the future (a stack pin would only drop a
        // reference).
        let mut fut = Box::pin(run(&s, Some(tx), cancel));
        // Drive the run until the program has said it is ready, then drop the future.
        tokio::select! {
            _ = &mut fut => panic!("run ended on its own"),
            first = rx.recv() => assert_eq!(first.unwrap().1, "ready\n"),
        }
        drop(fut);
        assert_pid_disappears(read_pid(&pidfile)).await;
    }

    #[test]
    fn chunks_are_cut_on_character_boundaries() {
        let max = MAX_OUTPUT_CHUNK_BYTES;
        let a = "a".repeat(max + 1);
        let pieces: Vec<&str> = split_chunks(&a, max).collect();
        assert_eq!(pieces.iter().map(|p| p.len()).collect::<Vec<_>>(), [max, 1]);
        let exact = "a".repeat(max);
        assert_eq!(split_chunks(&exact, max).count(), 1);
        // A 4-byte character straddling the limit moves whole to the next piece.
        let s = format!("{}😀b", "a".repeat(max - 2));
        let pieces: Vec<&str> = split_chunks(&s, max).collect();
        assert_eq!(pieces, [&s[..max - 2], "😀b"]);
        assert_eq!(split_chunks("", max).count(), 0);
    }

    #[test]
    fn capture_keeps_whole_characters_under_the_cap() {
        let mut c = Capture::new();
        c.push("a".repeat(MAX_RUN_OUTPUT_BYTES - 1).as_bytes());
        assert!(!c.truncated);
        // Two bytes do not fit in the one left: nothing of it is kept, and it counts as truncated.
        c.push("é".as_bytes());
        assert_eq!(c.text.len(), MAX_RUN_OUTPUT_BYTES - 1);
        assert!(c.truncated);
    }

    #[test]
    fn decoding_carries_split_characters() {
        let mut carry = Vec::new();
        let mut out = String::new();
        let euro = "€".as_bytes();
        decode_lossy(&mut carry, &euro[..1], false, &mut out);
        decode_lossy(&mut carry, &euro[1..2], false, &mut out);
        assert_eq!((out.as_str(), carry.len()), ("", 2));
        decode_lossy(&mut carry, &euro[2..], false, &mut out);
        assert_eq!((out.as_str(), carry.len()), ("€", 0));
        // An unfinished character at EOF is one replacement character.
        decode_lossy(&mut carry, &euro[..2], true, &mut out);
        assert_eq!(out, "€\u{FFFD}");
    }

    proptest! {
        /// Decoding in pieces, wherever the reads split, equals decoding the whole.
        #[test]
        fn decoding_in_pieces_equals_lossy_decoding(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(0xe2u8), Just(0x82), Just(0xac), Just(0xf0), Just(0x9f)],
                0..200,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            let mut carry = Vec::new();
            let mut out = String::new();
            let mut start = 0;
            for cut in cuts {
                decode_lossy(&mut carry, &bytes[start..cut], false, &mut out);
                prop_assert!(carry.len() <= 3);
                start = cut;
            }
            decode_lossy(&mut carry, &bytes[start..], false, &mut out);
            decode_lossy(&mut carry, &[], true, &mut out);
            prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
        }

        #[test]
        fn chunks_concatenate_to_the_text(s in "\\PC{0,300}", max in 4usize..40) {
            let pieces: Vec<&str> = split_chunks(&s, max).collect();
            prop_assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= max));
            prop_assert_eq!(pieces.concat(), s);
        }
    }
}
