//! End-to-end rig: a real `comodit-node` process, real `comodit-agent` processes, the real broker.
//! Each rig has its own prefix, data directory, port and enrollment user, so rigs run side by side.
//! Every process is killed when its handle drops; every wait has a deadline.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const WAIT: Duration = Duration::from_secs(45);

/// `target/debug` (or release): where cargo put the binaries of the workspace.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        p.display()
    );
    p
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait (SIGKILL after the deadline).
    pub fn stop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub port: u16,
    pub proc: Option<Proc>,
    pub token: String,
    /// Extra `COMODIT_*` variables, set after (so over) the rig's defaults.
    pub env: Vec<(String, String)>,
    http: ureq::Agent,
}

/// A loopback port free now and never handed out before in this process: the kernel may give a
/// released port again at once, and a cluster test asks for its Raft ports first and its API ports
/// later, so a Raft port could come back as an API port (CI once saw a Raft port in use).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

impl Node {
    pub fn start() -> Node {
        Node::start_with(&comodit_testkit::unique_prefix(), Vec::new())
    }

    /// A node on `prefix` with extra environment `env`. When the store is shared and another node
    /// bootstrapped it, this node writes no admin token: `token` stays empty (set it yourself).
    pub fn start_with(prefix: &str, env: Vec<(String, String)>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut node = Node {
            dir,
            prefix: prefix.to_owned(),
            port: free_port(),
            proc: None,
            token: String::new(),
            env,
            http: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(90)))
                .build()
                .into(),
        };
        node.spawn();
        node
    }

    pub fn enroll_user(&self) -> String {
        format!("enroll-{}", self.prefix)
    }

    /// Starts (or restarts) the node process on the same data directory and port.
    pub fn spawn(&mut self) {
        assert!(self.proc.is_none());
        let log = self.dir.path().join(format!("node-{}.log", now_ms()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("comodit-node"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COMODIT_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("COMODIT_DATA_DIR", self.dir.path().join("data"))
            .env("COMODIT_PREFIX", &self.prefix)
            .env("COMODIT_N_SHARDS", "4")
            .env("COMODIT_HEARTBEAT_S", "1")
            .env("COMODIT_OFFLINE_AFTER_MISSED", "3")
            .env("COMODIT_COMMAND_TIMEOUT_S", "5")
            .env("COMODIT_ENROLL_USER", self.enroll_user())
            .env("COMODIT_ENROLL_PASSWORD", "enroll-secret")
            .env("COMODIT_LOG", "info,comodit=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("node starts");
        self.proc = Some(Proc { child, log });
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = self.http.get(&self.url("/healthz")).call() {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            if let Some(Ok(Some(status))) = self.proc.as_mut().map(|p| p.child.try_wait()) {
                panic!("node exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "node not healthy in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        match std::fs::read_to_string(self.dir.path().join("data/admin-token")) {
            Ok(t) => self.token = t.trim().to_owned(),
            Err(e) => assert!(!self.env.is_empty(), "admin token not written: {e}"),
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("node-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// An API call with the admin token; returns status and JSON body (Null if none).
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(&self.token.clone(), method, path, body)
    }

    pub fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = self.url(&format!("/api/v1{path}"));
        let auth = format!("Bearer {token}");
        let res = match (method, body) {
            ("GET", _) => self.http.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.http.delete(&url).header("Authorization", &auth).call(),
            ("POST", b) => self
                .http
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b.unwrap_or(json!({}))),
            ("PUT", b) => self
                .http
                .put(&url)
                .header("Authorization", &auth)
                .send_json(b.unwrap_or(json!({}))),
            (m, _) => panic!("method {m}"),
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = res.status().as_u16();
        let text = res.into_body().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Polls `f` until it returns Some, within WAIT.
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(t) = f() {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nnode log:\n{}",
                tail(&self.log())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn enrollment_token(&self, max_uses: u32) -> String {
        let (status, body) = self.api(
            "POST",
            "/orgs/default/envs/default/enrollment-tokens",
            Some(json!({"expires_in_s": 3600, "max_uses": max_uses, "description": "e2e"})),
        );
        assert_eq!(status, 201, "{body}");
        body["secret"].as_str().expect("secret").to_owned()
    }

    pub fn host(&self, id: &str) -> Value {
        let (status, body) = self.api("GET", &format!("/hosts/{id}"), None);
        assert_eq!(status, 200, "{body}");
        body
    }

    pub fn online(&self, id: &str) -> bool {
        self.host(id)["runtime"]["online"]
            .as_bool()
            .unwrap_or(false)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the node said is what explains most failures (CI keeps only the output).
            eprintln!("node log (tail) of the failed test:\n{}", tail(&self.log()));
        }
        self.stop();
        comodit_testkit::cleanup_prefix(&self.prefix);
    }
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// A real agent process with its own state directory.
pub struct Agent {
    pub state: tempfile::TempDir,
    pub proc: Option<Proc>,
    pub host: String,
    prefix: String,
    enroll_user: String,
}

impl Agent {
    fn command(&self, node: &Node) -> Command {
        let mut c = Command::new(bin("comodit-agent"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COMODIT_STATE_DIR", self.state.path())
            .env("COMODIT_BROKER_URL", "amqp://127.0.0.1:5672/%2f")
            .env("COMODIT_PREFIX", &node.prefix)
            .env("COMODIT_HEARTBEAT_S", "1")
            .env("COMODIT_CHECK_INTERVAL_S", "3600")
            .env("COMODIT_ENROLL_USER", &self.enroll_user)
            .env("COMODIT_ENROLL_PASSWORD", "enroll-secret")
            .env("COMODIT_LOG", "info");
        c
    }

    /// Enrolls a new agent with `token` (`comodit-agent enroll`), without starting it.
    pub fn enroll(node: &Node, token: &str) -> Agent {
        let mut agent = Agent {
            state: tempfile::tempdir().unwrap(),
            proc: None,
            host: String::new(),
            prefix: node.prefix.clone(),
            enroll_user: node.enroll_user(),
        };
        let out = agent
            .command(node)
            .args(["enroll", "--token", token])
            .output()
            .expect("agent enroll runs");
        assert!(
            out.status.success(),
            "enroll failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let creds: Value = serde_json::from_slice(
            &std::fs::read(agent.state.path().join("credentials.json")).unwrap(),
        )
        .unwrap();
        agent.host = creds["host"].as_str().unwrap().to_owned();
        agent
    }

    pub fn start(&mut self, node: &Node) {
        assert!(self.proc.is_none());
        let log = self.state.path().join(format!("agent-{}.log", now_ms()));
        let out = std::fs::File::create(&log).unwrap();
        let child = self
            .command(node)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("agent starts");
        self.proc = Some(Proc { child, log });
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if !self.host.is_empty() {
            comodit_testkit::delete_user(&self.host);
        }
        let _ = &self.prefix;
    }
}

/// A TCP proxy on 127.0.0.1:0 in front of `upstream`, with a switch: while off it drops every
/// connection it carries and closes new ones as soon as they are accepted — to the dialer, the link
/// is down. Closed (threads joined) on drop.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    shared: std::sync::Arc<ProxyShared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

struct ProxyShared {
    on: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    /// Both ends of every connection carried, to cut them.
    conns: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl ProxyShared {
    fn cut_all(&self) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Proxy {
    pub fn start(upstream: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = std::sync::Arc::new(ProxyShared {
            on: std::sync::atomic::AtomicBool::new(true),
            closed: std::sync::atomic::AtomicBool::new(false),
            conns: std::sync::Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for down in listener.incoming() {
                if s.closed.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = down else { continue };
                if !s.on.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(up) =
                    std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(2))
                else {
                    continue;
                };
                let (Ok(d2), Ok(u2), Ok(d3), Ok(u3)) = (
                    down.try_clone(),
                    up.try_clone(),
                    down.try_clone(),
                    up.try_clone(),
                ) else {
                    continue;
                };
                {
                    let mut conns = s.conns.lock().unwrap_or_else(|e| e.into_inner());
                    // Switched off meanwhile: do not carry it.
                    if !s.on.load(Ordering::SeqCst) {
                        continue;
                    }
                    conns.push(d3);
                    conns.push(u3);
                }
                std::thread::spawn(move || pipe(down, up));
                std::thread::spawn(move || pipe(u2, d2));
            }
        });
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Turns the link on (new connections are carried) or off (all of them dropped).
    pub fn set(&self, on: bool) {
        let _guard = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        self.shared
            .on
            .store(on, std::sync::atomic::Ordering::SeqCst);
        drop(_guard);
        if !on {
            self.shared.cut_all();
        }
    }
}

/// Copies `from` → `to` until either side closes, then closes both.
fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.cut_all();
        // Wake the accept loop so it sees `closed`.
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
