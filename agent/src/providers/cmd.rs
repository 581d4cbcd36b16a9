//! Running the host's tools (dpkg, apt-get, systemctl, useradd, ...).
//!
//! Providers never build a shell line: every call is an argv. [`SystemRunner`] runs it for real;
//! [`RecordingRunner`] records the argv and answers from a script, for unit tests of exact command
//! lines and output parsing on machines that lack the tool.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use super::ProviderError;

/// What a tool printed and how it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CmdOutput {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn ok(stdout: &str) -> Self {
        CmdOutput {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    pub fn fail(code: i32, stderr: &str) -> Self {
        CmdOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `Ok(self)` on exit 0, else a [`ProviderError::Failed`] naming the program.
    pub fn check(self, argv: &[&str]) -> Result<CmdOutput, ProviderError> {
        if self.success() {
            Ok(self)
        } else {
            Err(ProviderError::Failed {
                what: argv.first().copied().unwrap_or("command").to_owned(),
                detail: trim_detail(if self.stderr.trim().is_empty() {
                    &self.stdout
                } else {
                    &self.stderr
                }),
            })
        }
    }
}

/// Keeps error details short: the last 2 KiB, trimmed.
pub fn trim_detail(s: &str) -> String {
    let s = s.trim();
    let limit = 2048;
    if s.len() <= limit {
        return s.to_owned();
    }
    let mut start = s.len() - limit;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// One tool invocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invocation {
    pub argv: Vec<String>,
    /// Extra environment (e.g. `DEBIAN_FRONTEND=noninteractive`).
    pub env: Vec<(String, String)>,
    pub stdin: Option<String>,
}

impl Invocation {
    pub fn new(argv: &[&str]) -> Self {
        Invocation {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn stdin(mut self, s: impl Into<String>) -> Self {
        self.stdin = Some(s.into());
        self
    }
}

pub trait Runner: Send + Sync {
    /// Runs the tool to completion (or `timeout`). An error only when it could not be started;
    /// a non-zero exit is an `Ok` with its code.
    fn run(&self, inv: &Invocation, timeout: Duration) -> Result<CmdOutput, ProviderError>;

    /// Whether `program` is on the PATH.
    fn exists(&self, program: &str) -> bool;
}

/// Runs tools for real, with a clean `LC_ALL=C` so output parsing does not depend on the locale.
#[derive(Clone, Debug, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, inv: &Invocation, timeout: Duration) -> Result<CmdOutput, ProviderError> {
        use std::io::Write;
        use std::os::unix::process::CommandExt;

        let (program, args) = inv
            .argv
            .split_first()
            .ok_or_else(|| ProviderError::Invalid("empty argv".into()))?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(if inv.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (k, v) in &inv.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ProviderError::io(format!("cannot start {program}"), e))?;
        if let Some(input) = &inv.stdin {
            if let Some(mut sin) = child.stdin.take() {
                // A tool that exits without reading its input is not an error here.
                let _ = sin.write_all(input.as_bytes());
            }
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let deadline = std::time::Instant::now() + timeout;
        let mut pipes = Pipes::new(stdout, stderr);
        let status = loop {
            // Read whatever is there (at most 5 ms of waiting), then look at the child.
            pipes.pump(Duration::from_millis(5));
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    // Kill the whole process group: package managers fork helpers.
                    unsafe {
                        libc::kill(-(child.id() as i32), libc::SIGKILL);
                    }
                    let _ = child.wait();
                    return Err(ProviderError::Failed {
                        what: program.clone(),
                        detail: format!("timed out after {}s", timeout.as_secs()),
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(ProviderError::io(format!("waiting for {program}"), e)),
            }
        };
        // A daemon started by the tool (an init script's `start`) may keep the pipes open for its
        // whole life: read what is left for a short grace, then stop listening rather than hang.
        let grace = std::time::Instant::now() + Duration::from_millis(500);
        while !pipes.closed() && std::time::Instant::now() < grace {
            pipes.pump(Duration::from_millis(20));
        }
        let (stdout, stderr) = pipes.into_output();
        Ok(CmdOutput {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    fn exists(&self, program: &str) -> bool {
        which(program).is_some()
    }
}

/// Non-blocking reads of a child's stdout and stderr with `poll(2)`, so the caller decides how long
/// to listen (no reader thread can be left blocked on a pipe a daemon keeps open).
struct Pipes {
    fds: [Option<std::fs::File>; 2],
    bufs: [Vec<u8>; 2],
}

impl Pipes {
    fn new(stdout: std::process::ChildStdout, stderr: std::process::ChildStderr) -> Self {
        use std::os::fd::{AsRawFd, OwnedFd};
        let files = [
            std::fs::File::from(OwnedFd::from(stdout)),
            std::fs::File::from(OwnedFd::from(stderr)),
        ];
        for f in &files {
            unsafe {
                let fd = f.as_raw_fd();
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let [a, b] = files;
        Pipes {
            fds: [Some(a), Some(b)],
            bufs: [Vec::new(), Vec::new()],
        }
    }

    fn closed(&self) -> bool {
        self.fds.iter().all(|f| f.is_none())
    }

    /// Waits up to `wait` for output, then reads all that is available.
    fn pump(&mut self, wait: Duration) {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let mut pollfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .flatten()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if pollfds.is_empty() {
            std::thread::sleep(wait);
            return;
        }
        unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                wait.as_millis() as libc::c_int,
            );
        }
        for (slot, buf) in self.fds.iter_mut().zip(self.bufs.iter_mut()) {
            let Some(f) = slot else { continue };
            let mut chunk = [0u8; 8192];
            loop {
                match f.read(&mut chunk) {
                    Ok(0) => {
                        *slot = None;
                        break;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        *slot = None;
                        break;
                    }
                }
            }
        }
    }

    fn into_output(self) -> (Vec<u8>, Vec<u8>) {
        let [a, b] = self.bufs;
        (a, b)
    }
}

/// The full path of `program` on the PATH (or the usual sbin directories, which a non-login PATH
/// may lack).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file());
    found
}

/// A scripted runner for unit tests: records every invocation and answers from a queue of outputs
/// (in order); `exists` answers from a fixed list.
#[derive(Default)]
pub struct RecordingRunner {
    pub calls: Mutex<Vec<Invocation>>,
    answers: Mutex<VecDeque<CmdOutput>>,
    programs: Vec<String>,
}

impl RecordingRunner {
    pub fn new(programs: &[&str]) -> Self {
        RecordingRunner {
            programs: programs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Queues the answer to the next invocation.
    pub fn answer(&self, out: CmdOutput) -> &Self {
        self.answers.lock().unwrap().push_back(out);
        self
    }

    /// The argv of every call so far, joined by spaces.
    pub fn lines(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.argv.join(" "))
            .collect()
    }
}

impl Runner for RecordingRunner {
    fn run(&self, inv: &Invocation, _timeout: Duration) -> Result<CmdOutput, ProviderError> {
        self.calls.lock().unwrap().push(inv.clone());
        // An unscripted call is a test bug: fail loudly with the argv so it shows in the assertion.
        Ok(self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| CmdOutput::fail(127, &format!("unscripted: {:?}", inv.argv))))
    }

    fn exists(&self, program: &str) -> bool {
        self.programs.iter().any(|p| p == program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_runner_captures_output_and_codes() {
        let r = SystemRunner;
        let out = r
            .run(
                &Invocation::new(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let out = r
            .run(
                &Invocation::new(&["cat"]).stdin("fed"),
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(out.stdout, "fed");
    }

    #[test]
    fn system_runner_kills_on_timeout() {
        let err = SystemRunner
            .run(
                &Invocation::new(&["sleep", "30"]),
                Duration::from_millis(200),
            )
            .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[test]
    fn a_daemon_holding_the_pipes_does_not_hang_the_call() {
        // Like an init script whose daemon inherits stdout: the call returns when the script does.
        let pidfile = tempfile::NamedTempFile::new().unwrap();
        let script = format!(
            "sleep 30 & echo $! > {}; echo started",
            pidfile.path().display()
        );
        let started = std::time::Instant::now();
        let out = SystemRunner
            .run(
                &Invocation::new(&["sh", "-c", &script]),
                Duration::from_secs(20),
            )
            .unwrap();
        let pid: i32 = std::fs::read_to_string(pidfile.path())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        assert_eq!(out.stdout, "started\n");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "waited for the daemon"
        );
    }

    #[test]
    fn large_output_is_read_while_the_tool_runs() {
        // More than a pipe buffer (64 KiB) on both streams: no deadlock.
        let out = SystemRunner
            .run(
                &Invocation::new(&["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a; head -c 200000 /dev/zero | tr '\\0' b >&2"]),
                Duration::from_secs(20),
            )
            .unwrap();
        assert_eq!(out.stdout.len(), 300_000);
        assert_eq!(out.stderr.len(), 200_000);
    }

    #[test]
    fn missing_program_is_an_error_not_a_panic() {
        assert!(SystemRunner
            .run(
                &Invocation::new(&["/nonexistent/tool"]),
                Duration::from_secs(1)
            )
            .is_err());
        assert!(!SystemRunner.exists("surely-not-a-program-xyz"));
        assert!(SystemRunner.exists("sh"));
    }
}
