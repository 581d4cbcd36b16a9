//! A test rig for the actor runtime against the real broker and the embedded store: a node
//! ([`Node`]: throwaway prefix and topology, a store file, an [`Orchestrator`] as the broker's
//! admin user) and simulated agents ([`Agent`]: each with its own broker user and the DESIGN §5
//! permissions, consuming its queue and publishing on `<p>.up` as itself).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::Utc;
use comodit_actors::ownership::{Ownership, SingleNode};
use comodit_actors::{ActorsConfig, NodeEvent, Orchestrator};
use comodit_bus::{topology, Bus, BusConfig, ConsumeOptions, Consumer, OutMessage};
use comodit_protocol::*;
use comodit_store::{ChangeId, ChangeStatus, EnvId, Environment, Host, OrgId, Organization, Store};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);

/// The broker's admin user, which the node runs as in tests (`node_user`).
pub const NODE_USER: &str = "guest";

pub fn open_store(path: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(comodit_store::embedded::EmbeddedStore::open(path).expect("store opens"))
}

/// Settings fast enough for tests.
pub fn test_config() -> ActorsConfig {
    ActorsConfig {
        node_user: NODE_USER.into(),
        command_timeout: Duration::from_secs(30),
        heartbeat_s: 0,
        sweep_interval: Duration::from_millis(100),
        requeue_delay: Duration::from_millis(200),
        publish_retry: Duration::from_millis(200),
        dispatch_record_delay: Duration::from_millis(200),
        connection_events: false,
        ..ActorsConfig::default()
    }
}

pub struct Node {
    pub names: Names,
    pub n_shards: u32,
    pub admin: Bus,
    admin_stop: CancellationToken,
    pub dir: tempfile::TempDir,
    pub store: Option<Arc<dyn Store>>,
    pub orch: Option<Orchestrator>,
    pub stop: CancellationToken,
    pub config: ActorsConfig,
    pub org: OrgId,
    pub env: EnvId,
    /// Deletes the prefix's queues and exchanges and the hosts' broker users when the test ends,
    /// also when it fails.
    cleanup: comodit_testkit::Cleanup,
}

impl Node {
    pub async fn new(tune: impl FnOnce(&mut ActorsConfig)) -> Node {
        let names = comodit_testkit::unique_names();
        let cleanup = comodit_testkit::Cleanup {
            prefix: names.prefix().to_owned(),
            users: Vec::new(),
        };
        let n_shards = 4;
        let admin_stop = CancellationToken::new();
        let admin = Bus::start(
            BusConfig {
                url: comodit_testkit::amqp_url(),
                connection_name: "actors-test-node".into(),
                ..BusConfig::default()
            },
            admin_stop.clone(),
        );
        admin.wait_connected(WAIT).await.expect("broker reachable");
        let ch = admin.channel().await.expect("channel");
        topology::declare_core(&ch, &names, n_shards)
            .await
            .expect("topology");
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir.path().join("store.redb"));
        let org = Organization {
            id: OrgId::random(),
            name: "acme".into(),
            created_at: Utc::now(),
            version: 1,
        };
        store.create_org(&org).await.unwrap();
        let env = Environment {
            id: EnvId::random(),
            org: org.id,
            name: "prod".into(),
            created_at: Utc::now(),
            version: 1,
        };
        store.create_env(&env).await.unwrap();
        let mut config = test_config();
        tune(&mut config);
        let mut node = Node {
            names,
            n_shards,
            admin,
            admin_stop,
            dir,
            store: Some(store),
            orch: None,
            stop: CancellationToken::new(),
            config,
            org: org.id,
            env: env.id,
            cleanup,
        };
        node.start().await;
        node
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        self.store.as_ref().expect("store open")
    }

    pub fn orch(&self) -> &Orchestrator {
        self.orch.as_ref().expect("orchestrator running")
    }

    pub async fn start(&mut self) {
        self.start_with(Arc::new(SingleNode::new(self.n_shards)))
            .await;
    }

    pub async fn start_with(&mut self, ownership: Arc<dyn Ownership>) {
        assert!(self.orch.is_none());
        self.stop = CancellationToken::new();
        let orch = Orchestrator::start(
            self.config.clone(),
            self.store().clone(),
            self.admin.clone(),
            self.names.clone(),
            ownership,
            self.stop.clone(),
        )
        .await
        .expect("orchestrator starts");
        self.orch = Some(orch);
    }

    /// Stops the orchestrator, closes the store and opens it again from its file, and starts a
    /// new orchestrator on it: a node restart.
    pub async fn restart(&mut self) {
        self.stop_orchestrator().await;
        let path = self.store_path();
        // The orchestrator's tasks release their handles on the store when they end.
        let store = self.store.take().unwrap();
        wait_until("the old store to be released", || {
            Arc::strong_count(&store) == 1
        })
        .await;
        drop(store);
        self.store = Some(open_store(&path));
        self.start().await;
    }

    pub async fn stop_orchestrator(&mut self) {
        if let Some(o) = self.orch.take() {
            tokio::time::timeout(WAIT, o.stop())
                .await
                .expect("orchestrator stops in time");
        }
    }

    /// Waits until the store holds the change with this status.
    pub async fn wait_for_status(&self, host: HostId, change: ChangeId, status: ChangeStatus) {
        wait_until_async(&format!("change {change} {status:?}"), || async {
            self.store()
                .get_change(host, change)
                .await
                .unwrap()
                .is_some_and(|c| c.status == status)
        })
        .await;
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store.redb")
    }

    /// A host in the store with its queue and broker user; returns it and the user's password.
    pub async fn add_host(&mut self) -> (HostId, String) {
        let host = HostId::random();
        let now = Utc::now();
        self.store()
            .create_host(&Host {
                id: host,
                org: self.org,
                env: self.env,
                name: format!("h-{}", &host.to_string()[..8]),
                labels: BTreeMap::new(),
                created_at: now,
                enrolled_at: now,
                shard: host.shard(self.n_shards).0,
                version: 1,
            })
            .await
            .expect("host created");
        let ch = self.admin.channel().await.expect("channel");
        topology::declare_agent_queue(&ch, &self.names, host)
            .await
            .expect("agent queue");
        let password = comodit_testkit::create_agent_user(&self.names, host);
        self.cleanup.users.push(host.to_string());
        (host, password)
    }

    /// A broker user for a host the store does not know.
    pub fn stranger(&mut self) -> (HostId, String) {
        let host = HostId::random();
        let password = comodit_testkit::create_agent_user(&self.names, host);
        self.cleanup.users.push(host.to_string());
        (host, password)
    }

    pub async fn agent(&self, host: HostId, password: &str) -> Agent {
        Agent::connect(self, host, password).await
    }

    pub fn events(&self) -> Events {
        Events(self.orch().events_receiver())
    }

    /// Publishes raw bytes on `<p>.up` as the admin user.
    pub async fn publish_up(&self, key: &str, kind: &str, payload: Vec<u8>, user_id: Option<&str>) {
        let mut msg = OutMessage::json(kind, payload);
        msg.user_id = user_id.map(str::to_owned);
        self.admin
            .publish(&self.names.up_exchange(), key, msg)
            .await
            .expect("published");
    }

    /// Publishes raw bytes straight into a shard queue (default exchange) as the admin user.
    pub async fn publish_to_shard_queue(&self, shard: u32, payload: Vec<u8>) {
        self.admin
            .publish(
                "",
                &self.names.shard_queue(Shard(shard)),
                OutMessage::json("hello", payload),
            )
            .await
            .expect("published");
    }

    pub async fn finish(mut self) {
        self.stop_orchestrator().await;
        self.admin_stop.cancel();
        // `cleanup` runs on drop.
    }
}

/// Events of the node, read with a deadline.
pub struct Events(broadcast::Receiver<NodeEvent>);

impl Events {
    pub async fn wait_for(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&NodeEvent) -> bool,
    ) -> NodeEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.0.recv()).await {
                Err(_) => panic!("timed out waiting for {what}"),
                Ok(Ok(e)) if pick(&e) => return e,
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => panic!("missed {n} events"),
                Ok(Err(e)) => panic!("event stream closed: {e}"),
            }
        }
    }
}

impl Events {
    /// Fails if an event matching `pick` comes within `within` (a bounded check of absence).
    pub async fn expect_none(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&NodeEvent) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.0.recv()).await {
                Err(_) => return,
                Ok(Ok(e)) if pick(&e) => panic!("unexpected event {e:?}"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("event stream: {e}"),
            }
        }
    }
}

/// `events()` through the trait, named for the tests.
pub trait EventsExt {
    fn events_receiver(&self) -> broadcast::Receiver<NodeEvent>;
}

impl EventsExt for Orchestrator {
    fn events_receiver(&self) -> broadcast::Receiver<NodeEvent> {
        comodit_actors::HostOps::events(self)
    }
}

/// A simulated agent: the host's own broker user, its queue, and upward messages as itself.
pub struct Agent {
    pub host: HostId,
    pub names: Names,
    n_shards: u32,
    pub bus: Bus,
    stop: CancellationToken,
    commands: Consumer,
}

impl Agent {
    pub async fn connect(node: &Node, host: HostId, password: &str) -> Agent {
        let stop = CancellationToken::new();
        let bus = Bus::start(
            BusConfig {
                url: comodit_testkit::amqp_url_for(&host.to_string(), password),
                connection_name: format!("sim-agent-{host}"),
                ..BusConfig::default()
            },
            stop.clone(),
        );
        bus.wait_connected(WAIT).await.expect("agent connects");
        let commands = bus.consume(
            &node.names.agent_queue(host),
            ConsumeOptions {
                prefetch: 16,
                ..ConsumeOptions::default()
            },
        );
        Agent {
            host,
            names: node.names.clone(),
            n_shards: node.n_shards,
            bus,
            stop,
            commands,
        }
    }

    /// The next command, acked; `None` if none came within `within`.
    pub async fn next_command(&mut self, within: Duration) -> Option<Command> {
        let d = tokio::time::timeout(within, self.commands.next())
            .await
            .ok()??;
        let cmd = Command::decode(&d.payload).expect("the node sends valid commands");
        d.ack().await.expect("ack");
        Some(cmd)
    }

    pub async fn command(&mut self) -> Command {
        self.next_command(WAIT)
            .await
            .expect("a command within the deadline")
    }

    pub async fn send(&self, up: Up) {
        self.send_raw(up.kind(), up.encode()).await;
    }

    /// Publishes bytes as this host with a valid key for `kind`.
    pub async fn send_raw(&self, kind: UpKind, payload: Vec<u8>) {
        let key = UpKey::new(self.host, self.n_shards, kind);
        let mut msg = OutMessage::json(kind.as_str(), payload);
        msg.user_id = Some(self.host.to_string());
        self.bus
            .publish(&self.names.up_exchange(), &key.to_string(), msg)
            .await
            .expect("agent publish");
    }

    pub fn reply(&self, cmd: &Command, status: Status) -> Up {
        let now = Utc::now();
        Up::Reply(Reply {
            v: V1,
            re: Some(cmd.id),
            host: self.host,
            status,
            reason: None,
            results: Vec::new(),
            data: None,
            started_at: now,
            finished_at: now,
        })
    }

    pub async fn reply_ok(&self, cmd: &Command) {
        self.send(self.reply(cmd, Status::Ok)).await;
    }

    pub fn hello_msg(&self, hostname: &str) -> Up {
        Up::Hello(Hello {
            v: V1,
            host: self.host,
            facts: Facts {
                hostname: hostname.into(),
                os_family: "debian".into(),
                cpus: 2,
                ..Facts::default()
            },
            desired_digest: "d1g3st".into(),
            epoch: Epoch(0),
            sent_at: Utc::now(),
        })
    }

    pub async fn hello(&self) {
        self.send(self.hello_msg("web-1")).await;
    }

    pub async fn heartbeat(&self) {
        self.send(Up::Heartbeat(Heartbeat {
            v: V1,
            host: self.host,
            sent_at: Utc::now(),
            drifted: 0,
        }))
        .await;
    }

    pub async fn bye(&self) {
        self.send(Up::Bye(Bye {
            v: V1,
            host: self.host,
            reason: "test".into(),
        }))
        .await;
    }

    /// Disconnects (unacked commands go back to the queue).
    pub async fn disconnect(self) {
        self.stop.cancel();
        drop(self.commands);
    }
}

/// Polls `cond` until true, or panics at the deadline. For state with no notification (store
/// records, counters); a bounded poll, not a sleep-to-wait.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- a metrics recorder for assertions ------------------------------------------------------

/// Counters by `name{label=value,...}` (labels sorted), process-wide.
#[derive(Default)]
pub struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<Counter>>>,
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl metrics::CounterFn for Counter {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

fn key_name(key: &metrics::Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let c = self
            .counters
            .lock()
            .unwrap()
            .entry(key_name(key))
            .or_default()
            .clone();
        metrics::Counter::from_arc(c)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();

/// The process-wide test recorder (installed on first use).
pub fn recorder() -> &'static TestRecorder {
    RECORDER.get_or_init(|| {
        let r: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(r).expect("no other recorder");
        r
    })
}

impl TestRecorder {
    /// The value of a counter, e.g. `counter("comodit_node_rejected_messages_total{reason=forged}")`.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }
}

/// Logs of the test run (`RUST_LOG=debug cargo test ...`), once per process.
pub fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

pub fn ping() -> Body {
    Body::Ping {}
}
