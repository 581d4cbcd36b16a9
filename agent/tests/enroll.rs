//! The `comodit-agent` binary's enrollment, against the node's real enrollment service and the
//! real broker: `enroll --token` writes the credentials (0600) and `run` then connects with
//! them; `run --enroll-token` enrolls first, and only once; refusals exit with code 3.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use comodit_bus::admin::BrokerAdmin;
use comodit_bus::{Bus, BusConfig, ConsumeOptions, Consumer};
use comodit_node::enroll::{hash_token, EnrollConfig, EnrollService};
use comodit_protocol::{HostId, Names, UpKey, UpKind};
use comodit_store::embedded::EmbeddedStore;
use comodit_store::{EnrollmentToken, EnvId, Environment, OrgId, Organization, Store, TokenId};
use comodit_testkit as kit;
use tokio_util::sync::CancellationToken;

const N_SHARDS: u32 = 2;
const WAIT: Duration = Duration::from_secs(30);
const AGENT: &str = env!("CARGO_BIN_EXE_comodit-agent");

/// (user, password, vhost) of the test broker's AMQP url.
fn url_parts(url: &str) -> (String, String, String) {
    let rest = url.split_once("://").expect("url has a scheme").1;
    let (userinfo, hostpath) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let vhost = hostpath.split_once('/').map_or("%2f", |(_, v)| v);
    let decode = |s: &str| s.replace("%2f", "/").replace("%2F", "/");
    (decode(user), decode(password), decode(vhost))
}

fn strip_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, after)) => format!("{scheme}://{after}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// A node's enrollment service on a throwaway prefix, with a store holding one environment.
struct Node {
    names: Names,
    store: Arc<dyn Store>,
    org: OrgId,
    env: EnvId,
    bus: Bus,
    service: EnrollService,
    enroll_user: String,
    enroll_password: String,
    stop: CancellationToken,
    cleanup: kit::Cleanup,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        let names = kit::unique_names();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("comodit.redb");
        let store: Arc<dyn Store> = Arc::new(
            tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
                .await
                .unwrap()
                .expect("embedded store opens"),
        );
        let now = Utc::now();
        let (org, env) = (OrgId::random(), EnvId::random());
        store
            .create_org(&Organization {
                id: org,
                name: format!("org-{}", names.prefix()),
                created_at: now,
                version: 0,
            })
            .await
            .unwrap();
        store
            .create_env(&Environment {
                id: env,
                org,
                name: "prod".into(),
                created_at: now,
                version: 0,
            })
            .await
            .unwrap();
        let enroll_user = format!("{}-enroll", names.prefix());
        let enroll_password = format!("pw-{}", HostId::random());
        let cleanup = kit::Cleanup {
            prefix: names.prefix().to_owned(),
            users: vec![enroll_user.clone()],
        };
        let stop = CancellationToken::new();
        let bus = Bus::start(
            BusConfig {
                url: kit::amqp_url(),
                connection_name: format!("agent-enroll-test-node {}", names.prefix()),
                ..BusConfig::default()
            },
            stop.clone(),
        );
        bus.wait_connected(WAIT).await.unwrap();
        let (user, password, vhost) = url_parts(&kit::amqp_url());
        let mgmt = std::env::var("COMODIT_TEST_MGMT_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
        let admin = BrokerAdmin::new(&mgmt, &user, &password, &vhost).unwrap();
        let service = EnrollService::start(
            store.clone(),
            bus.clone(),
            admin,
            names.clone(),
            EnrollConfig {
                enroll_user: enroll_user.clone(),
                enroll_password: enroll_password.clone(),
                n_shards: N_SHARDS,
                import_min: comodit_node::enroll::IMPORT_MIN,
            },
            None,
            stop.clone(),
        )
        .await
        .expect("enrollment service starts");
        Node {
            names,
            store,
            org,
            env,
            bus,
            service,
            enroll_user,
            enroll_password,
            stop,
            cleanup,
            _dir: dir,
        }
    }

    async fn token(&self) -> (TokenId, String) {
        let secret = format!("tok-{}", HostId::random());
        let id = TokenId::random();
        self.store
            .create_enrollment_token(&EnrollmentToken {
                id,
                org: self.org,
                env: self.env,
                description: "agent test".into(),
                secret_sha256: hash_token(&secret),
                expires_at: Utc::now() + chrono::Duration::hours(1),
                max_uses: Some(5),
                uses: 0,
                revoked: false,
                created_at: Utc::now(),
                created_by: "test".into(),
            })
            .await
            .unwrap();
        (id, secret)
    }

    async fn uses(&self, token: TokenId) -> u32 {
        let t = self.store.get_enrollment_token(token).await.unwrap();
        t.unwrap().uses
    }

    /// `comodit-agent` with this node's broker settings and a state directory; no config file.
    fn agent(&self, state: &Path) -> Command {
        let mut cmd = Command::new(AGENT);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COMODIT_STATE_DIR", state)
            .env("COMODIT_BROKER_URL", strip_credentials(&kit::amqp_url()))
            .env("COMODIT_PREFIX", self.names.prefix())
            .env("COMODIT_ENROLL_USER", &self.enroll_user)
            .env("COMODIT_ENROLL_PASSWORD", &self.enroll_password)
            .env("COMODIT_HEARTBEAT_S", "0")
            .env("COMODIT_CHECK_INTERVAL_S", "3600")
            .env("COMODIT_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    /// The next upward message on the host's shard queue, within the deadline.
    fn shard_consumer(&self, host: HostId) -> Consumer {
        self.bus.consume(
            &self.names.shard_queue(host.shard(N_SHARDS)),
            ConsumeOptions::default(),
        )
    }

    async fn finish(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.service.stopped())
            .await
            .expect("service stops");
        drop(self.cleanup);
    }
}

/// Runs a short command to its end, off the async workers; returns (exit code, stderr).
async fn run_to_end(mut cmd: Command) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().expect("comodit-agent runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A long-running agent process, its log in a file; stopped with SIGTERM when dropped.
struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn spawn(mut cmd: Command, log: std::path::PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("comodit-agent starts");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let until = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "agent exit {status}: {}", self.log());
                return;
            }
            assert!(
                Instant::now() < until,
                "agent does not stop: {}",
                self.log()
            );
            // A bounded poll of a child process.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for the host's hello on its shard queue, sent as its own broker user (other messages,
/// e.g. the `bye` of a previous run, are skipped).
async fn hello_from(shard: &mut Consumer, host: HostId, daemon: &Daemon) {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let d = tokio::time::timeout_at(until, shard.next())
            .await
            .unwrap_or_else(|_| panic!("no hello within {WAIT:?}; agent log:\n{}", daemon.log()))
            .expect("consumer open");
        let key =
            UpKey::parse(&d.routing_key, N_SHARDS).expect("routing key for the node's n_shards");
        assert_eq!(key.host, host);
        assert_eq!(d.user_id.as_deref(), Some(host.to_string().as_str()));
        d.ack().await.unwrap();
        if key.kind == UpKind::Hello {
            return;
        }
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_writes_private_credentials_and_run_connects_with_them() {
    let mut node = Node::start().await;
    let (token_id, token) = node.token().await;
    let state = tempfile::tempdir().unwrap();

    // A token nobody issued: refused, exit code 3, nothing written.
    let mut bad = node.agent(state.path());
    bad.args(["enroll", "--token", "tok-not-issued"]);
    let (code, stderr) = run_to_end(bad).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("invalid or expired token"), "{stderr}");
    assert!(
        !stderr.contains("tok-not-issued"),
        "the token is never printed: {stderr}"
    );
    assert!(!comodit_agent::state::credentials_path(state.path()).exists());

    let mut enroll = node.agent(state.path());
    enroll.arg("enroll").env("COMODIT_ENROLL_TOKEN", &token);
    let (code, stderr) = run_to_end(enroll).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains(&token),
        "the token is never printed: {stderr}"
    );
    let creds_path = comodit_agent::state::credentials_path(state.path());
    assert_eq!(mode(&creds_path), 0o600);
    let creds = comodit_agent::state::read_credentials(state.path()).unwrap();
    let host = creds.host;
    node.cleanup.users.push(host.to_string());
    assert!(!stderr.contains(creds.password.expose()), "{stderr}");
    let enrollment = comodit_agent::enroll::read_enrollment(state.path())
        .unwrap()
        .expect("enrollment.json");
    assert_eq!((enrollment.host, enrollment.n_shards), (host, N_SHARDS));
    assert_eq!(
        mode(&comodit_agent::enroll::enrollment_path(state.path())),
        0o600
    );
    assert_eq!(node.uses(token_id).await, 1);
    assert!(node.store.get_host(host).await.unwrap().is_some());

    // `run` uses the stored credentials and the shard count learned at enrollment (the
    // configuration's default is 256: a hello routed with it would not reach this shard).
    let mut shard = node.shard_consumer(host);
    let mut run = node.agent(state.path());
    run.arg("run");
    let daemon = Daemon::spawn(run, state.path().join("run.log"));
    hello_from(&mut shard, host, &daemon).await;
    daemon.stop().await;

    // Enrolling again without --force: refused (exit 3), the credentials stay.
    let mut again = node.agent(state.path());
    again.args(["enroll", "--token", &token]);
    let (code, stderr) = run_to_end(again).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("already enrolled"), "{stderr}");
    let kept = comodit_agent::state::read_credentials(state.path()).unwrap();
    assert_eq!(kept.password.expose(), creds.password.expose());
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_an_enroll_token_enrolls_once() {
    let mut node = Node::start().await;
    let (token_id, token) = node.token().await;
    let state = tempfile::tempdir().unwrap();

    let mut run = node.agent(state.path());
    run.args(["run", "--enroll-token", &token]);
    let daemon = Daemon::spawn(run, state.path().join("run1.log"));
    // The host id is known once the credentials are written; its hello waits in the queue.
    let creds_path = comodit_agent::state::credentials_path(state.path());
    let until = Instant::now() + WAIT;
    while !creds_path.exists() {
        assert!(Instant::now() < until, "never enrolled: {}", daemon.log());
        // A bounded poll of a file another process writes.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let host = comodit_agent::state::read_credentials(state.path())
        .unwrap()
        .host;
    node.cleanup.users.push(host.to_string());
    let mut shard = node.shard_consumer(host);
    hello_from(&mut shard, host, &daemon).await;
    daemon.stop().await;
    assert_eq!(node.uses(token_id).await, 1);

    // Started again with the same token: the credentials are there, no second enrollment.
    let mut run = node.agent(state.path());
    run.args(["run", "--enroll-token", &token]);
    let daemon = Daemon::spawn(run, state.path().join("run2.log"));
    hello_from(&mut shard, host, &daemon).await;
    daemon.stop().await;
    assert_eq!(node.uses(token_id).await, 1, "no second enrollment");
    assert_eq!(
        comodit_agent::state::read_credentials(state.path())
            .unwrap()
            .host,
        host
    );
    node.finish().await;
}
