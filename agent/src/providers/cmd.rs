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
        use std::io::{Read, Write};
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
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_thread = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = stdout.read_to_end(&mut b);
            b
        });
        let err_thread = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = stderr.read_to_end(&mut b);
            b
        });
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
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
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(ProviderError::io(format!("waiting for {program}"), e)),
            }
        };
        let stdout = out_thread.join().unwrap_or_default();
        let stderr = err_thread.join().unwrap_or_default();
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
            .run(&Invocation::new(&["sh", "-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(10))
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let out = r
            .run(&Invocation::new(&["cat"]).stdin("fed"), Duration::from_secs(10))
            .unwrap();
        assert_eq!(out.stdout, "fed");
    }

    #[test]
    fn system_runner_kills_on_timeout() {
        let err = SystemRunner
            .run(&Invocation::new(&["sleep", "30"]), Duration::from_millis(200))
            .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[test]
    fn missing_program_is_an_error_not_a_panic() {
        assert!(SystemRunner
            .run(&Invocation::new(&["/nonexistent/tool"]), Duration::from_secs(1))
            .is_err());
        assert!(!SystemRunner.exists("surely-not-a-program-xyz"));
        assert!(SystemRunner.exists("sh"));
    }
}
