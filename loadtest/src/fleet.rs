//! Simulated hosts: thousands per process, many per AMQP connection, speaking the real wire
//! protocol through the `protocol` and `bus` crates.
//!
//! ```text
//! hosts ─► split in groups of `hosts_per_conn` ─► one Bus (connection) per group
//!   per connection: consume_many(<p>.agent.<host> ...) ─► task per delivery:
//!       Command::decode ─► in-memory result (no OS change) ─► [slow?] ─► reply on <p>.up (confirmed) ─► ack
//!   on every (re)connect: hello for every host of the group
//!   every 250 ms: routed heartbeats of the hosts that are due (period ± 20 %, 0 = none)
//! ```
//!
//! Every host answers like the agent does: an `apply` changes its in-memory copy of the resource
//! (a second identical apply is `changed: false`), `run` answers exit code 0, a command id seen
//! before gets the same reply again and is counted as a duplicate. A configurable fraction of
//! commands is answered `failed`, another is answered after a delay.
//!
//! Credentials: either every host logs in as itself (its own broker user and password from the
//! real enrollment, one connection per host, like a real agent), or a group shares the run's
//! *fleet user* ([`comodit_bus::admin::BrokerAdmin::ensure_fleet_user`]): an `impersonator` whose
//! permissions are bounded to the run's prefix, so one connection can publish with every host's
//! `user_id`, which the node checks against the routing key exactly as for a real agent.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use comodit_bus::{Bus, BusConfig, ConsumeOptions, Delivery, OutMessage};
use comodit_protocol::{
    Body, Command, CommandId, Facts, FieldDiff, Heartbeat, Hello, HostId, Names, Reply, ReplyData,
    ResourceResult, RunResult, Secret, Status, Up, UpKey, V1,
};
use futures_util::StreamExt;
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// sha256 of `[]`: the digest of an empty monitored baseline, as the agent computes it.
const EMPTY_BASELINE_DIGEST: &str =
    "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";
/// Replies remembered per host for duplicates (the agent keeps 4,096; a loadtest needs few).
const DEDUP_WINDOW: usize = 4;
/// How often the heartbeat task looks for due hosts.
const HEARTBEAT_TICK: Duration = Duration::from_millis(250);
/// How long a reply is retried before the delivery is left unacked (the broker redelivers it).
const REPLY_RETRY_FOR: Duration = Duration::from_secs(30);

/// How a host logs in to the broker.
#[derive(Clone, Debug)]
pub enum Login {
    /// The run's fleet user, shared by `hosts_per_conn` hosts per connection.
    Shared { user: String, password: String },
    /// Each host as itself (its enrollment password), one connection per host.
    Own,
}

#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// `amqp://host:port/vhost` without credentials.
    pub broker: String,
    pub names: Names,
    pub n_shards: u32,
    pub login: Login,
    pub hosts_per_conn: usize,
    /// Routed heartbeat period in seconds (± 20 %); 0 = none (AMQP heartbeats only).
    pub heartbeat_s: u64,
    /// AMQP heartbeat of each connection.
    pub amqp_heartbeat_s: u16,
    /// Unacked commands per host queue.
    pub prefetch: u16,
    /// Fraction (0..=1) of commands answered `failed`.
    pub fail_fraction: f64,
    /// Fraction (0..=1) of commands answered after `slow_ms`.
    pub slow_fraction: f64,
    pub slow_ms: u64,
}

/// One simulated host.
pub struct SimHost {
    pub id: HostId,
    password: Option<Secret>,
    state: Mutex<HostState>,
}

#[derive(Default)]
struct HostState {
    recent: VecDeque<(CommandId, Reply)>,
    /// (resource ref, hash of its spec) applied so far.
    resources: Vec<(String, u64)>,
    received: u32,
    duplicates: u32,
    replied: u32,
    /// Milliseconds since the fleet's start; 0 = never.
    last_reply_ms: u64,
}

impl HostState {
    /// The stored reply of a command seen before (a duplicate, counted), like the agent's dedup
    /// window.
    fn replay(&mut self, id: CommandId) -> Option<Reply> {
        let seen = self
            .recent
            .iter()
            .find(|(seen, _)| *seen == id)
            .map(|(_, reply)| reply.clone());
        if seen.is_some() {
            self.duplicates += 1;
        }
        seen
    }

    /// The reply to a command not seen before, from (and into) this host's in-memory state: an
    /// `apply` records each resource's spec, so applying the same spec again is `changed: false`;
    /// a dry run records nothing. Remembered for duplicates.
    fn answer(
        &mut self,
        host: HostId,
        cmd: Command,
        fail: bool,
        started_at: chrono::DateTime<Utc>,
    ) -> Reply {
        let mut reply = Reply {
            v: V1,
            re: Some(cmd.id),
            host,
            status: Status::Ok,
            reason: None,
            results: Vec::new(),
            data: None,
            started_at,
            finished_at: started_at,
        };
        if fail {
            reply.status = Status::Failed;
            reply.reason = Some("simulated failure (loadtest fail_fraction)".into());
        } else {
            match cmd.body {
                Body::Apply {
                    mode, resources, ..
                } => {
                    let dry = mode == comodit_protocol::ApplyMode::DryRun;
                    for r in resources {
                        let key = r.r#ref.to_string();
                        let digest = spec_hash(&r.spec.to_json());
                        let known = self.resources.iter().position(|(k, _)| *k == key);
                        let before = known.map(|i| self.resources[i].1);
                        let changed = before != Some(digest);
                        if changed && !dry {
                            match known {
                                Some(i) => self.resources[i].1 = digest,
                                None => self.resources.push((key, digest)),
                            }
                        }
                        reply.results.push(ResourceResult {
                            r#ref: r.r#ref,
                            changed,
                            diff: if changed {
                                vec![FieldDiff {
                                    field: if before.is_some() {
                                        "content"
                                    } else {
                                        "ensure"
                                    }
                                    .into(),
                                    from: before.map_or("absent".into(), |h| {
                                        format!("spec:{h:016x}").into()
                                    }),
                                    to: if before.is_some() {
                                        format!("spec:{digest:016x}").into()
                                    } else {
                                        "present".into()
                                    },
                                }]
                            } else {
                                Vec::new()
                            },
                            error: None,
                            skipped: false,
                        });
                    }
                }
                Body::Run(_) => {
                    reply.data = Some(ReplyData::Run(RunResult {
                        exit_code: Some(0),
                        signal: None,
                        timed_out: false,
                        stdout: "ok\n".into(),
                        stderr: String::new(),
                        truncated: false,
                        duration_ms: 0,
                    }))
                }
                Body::Facts {} => reply.data = Some(ReplyData::Facts(Box::new(facts(host)))),
                Body::Check {} => reply.data = Some(ReplyData::Check { drift: Vec::new() }),
                _ => {}
            }
        }
        reply.finished_at = Utc::now();
        if self.recent.len() >= DEDUP_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((cmd.id, reply.clone()));
        reply
    }
}

/// What the fleet did, counted as it happens.
#[derive(Default)]
pub struct Counters {
    pub commands: AtomicU64,
    pub replies: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed_injected: AtomicU64,
    pub slow_injected: AtomicU64,
    pub hellos: AtomicU64,
    pub heartbeats: AtomicU64,
    pub publish_errors: AtomicU64,
    pub connects: AtomicU64,
}

/// A snapshot of [`Counters`] (the parts that tell what a wave did to the fleet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FleetCounts {
    /// Commands delivered to the hosts (duplicates included).
    pub commands: u64,
    /// Commands a host had seen before (same command id), answered again from its window.
    pub duplicates: u64,
    pub replies: u64,
    /// Publishes (replies, hellos, heartbeats) the broker did not confirm.
    pub publish_errors: u64,
    /// Connections (re)established, each followed by a hello for each of its hosts.
    pub connects: u64,
}

impl Counters {
    pub fn snapshot(&self) -> FleetCounts {
        FleetCounts {
            commands: self.commands.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            replies: self.replies.load(Ordering::Relaxed),
            publish_errors: self.publish_errors.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
        }
    }
}

impl FleetCounts {
    /// Whether every command delivered so far has its reply counted (each gets exactly one,
    /// unless its publish was given up on).
    pub fn settled(&self) -> bool {
        self.replies >= self.commands
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &FleetCounts) -> FleetCounts {
        FleetCounts {
            commands: self.commands.saturating_sub(before.commands),
            duplicates: self.duplicates.saturating_sub(before.duplicates),
            replies: self.replies.saturating_sub(before.replies),
            publish_errors: self.publish_errors.saturating_sub(before.publish_errors),
            connects: self.connects.saturating_sub(before.connects),
        }
    }
}

/// Per-host outcome, read after a wave.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostTally {
    pub received: u32,
    pub duplicates: u32,
    pub replied: u32,
    /// Milliseconds since the fleet started; 0 = never.
    pub last_reply_ms: u64,
}

pub struct Fleet {
    pub hosts: Arc<Vec<Arc<SimHost>>>,
    pub counters: Arc<Counters>,
    pub started: Instant,
    heartbeat: watch::Sender<u64>,
    buses: Vec<Bus>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Connects every host (in the background) and returns at once; see [`Fleet::wait_ready`].
    pub fn start(
        cfg: FleetConfig,
        hosts: Vec<(HostId, Option<Secret>)>,
        shutdown: CancellationToken,
    ) -> Fleet {
        let hosts: Arc<Vec<Arc<SimHost>>> = Arc::new(
            hosts
                .into_iter()
                .map(|(id, password)| {
                    Arc::new(SimHost {
                        id,
                        password,
                        state: Mutex::new(HostState::default()),
                    })
                })
                .collect(),
        );
        let counters = Arc::new(Counters::default());
        let started = Instant::now();
        let (heartbeat, _) = watch::channel(cfg.heartbeat_s);
        let mut fleet = Fleet {
            hosts: hosts.clone(),
            counters,
            started,
            heartbeat,
            buses: Vec::new(),
            shutdown,
            tasks: JoinSet::new(),
        };
        let per_conn = match cfg.login {
            Login::Own => 1,
            Login::Shared { .. } => cfg.hosts_per_conn.max(1),
        };
        let cfg = Arc::new(cfg);
        for (n, group) in hosts.chunks(per_conn).enumerate() {
            fleet.connect_group(&cfg, n, group.to_vec());
        }
        fleet
    }

    fn connect_group(&mut self, cfg: &Arc<FleetConfig>, n: usize, group: Vec<Arc<SimHost>>) {
        let (user, password) = match &cfg.login {
            Login::Shared { user, password } => (user.clone(), password.clone()),
            Login::Own => (
                group[0].id.to_string(),
                group[0]
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            ),
        };
        let bus = Bus::start(
            BusConfig {
                url: with_credentials(&cfg.broker, &user, &password),
                heartbeat_s: cfg.amqp_heartbeat_s,
                connection_name: format!("comodit-loadtest fleet {n}"),
                backoff_min_ms: 200,
                backoff_max_ms: 5_000,
                ..BusConfig::default()
            },
            self.shutdown.clone(),
        );
        self.buses.push(bus.clone());
        let conn = Arc::new(Conn {
            bus,
            cfg: cfg.clone(),
            by_queue: group
                .iter()
                .map(|h| (cfg.names.agent_queue(h.id), h.clone()))
                .collect(),
            hosts: group,
            counters: self.counters.clone(),
            started: self.started,
            up_exchange: cfg.names.up_exchange(),
        });
        self.tasks
            .spawn(conn.clone().commands(self.shutdown.clone()));
        self.tasks.spawn(conn.clone().hellos(self.shutdown.clone()));
        self.tasks
            .spawn(conn.heartbeats(self.heartbeat.subscribe(), self.shutdown.clone()));
    }

    /// Waits until every connection is up and every host said hello.
    pub async fn wait_ready(&self, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        let n = self.hosts.len() as u64;
        loop {
            let hellos = self.counters.hellos.load(Ordering::Relaxed);
            let up = self.buses.iter().filter(|b| b.is_connected()).count();
            if hellos >= n && up == self.buses.len() {
                return Ok(());
            }
            if Instant::now() >= until {
                anyhow::bail!(
                    "fleet not ready after {deadline:?}: {hellos} of {n} hellos, {up} of {} connections",
                    self.buses.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Changes the routed heartbeat period of every host (0 = none) from now on.
    pub fn set_heartbeat(&self, period_s: u64) {
        self.heartbeat.send_replace(period_s);
    }

    pub fn connections(&self) -> usize {
        self.buses.len()
    }

    /// Each host's counts, in the order the hosts were given.
    pub fn tallies(&self) -> Vec<HostTally> {
        self.hosts
            .iter()
            .map(|h| {
                let s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                HostTally {
                    received: s.received,
                    duplicates: s.duplicates,
                    replied: s.replied,
                    last_reply_ms: s.last_reply_ms,
                }
            })
            .collect()
    }

    /// Forgets the per-host counts (before a new wave).
    pub fn reset_tallies(&self) {
        for h in self.hosts.iter() {
            let mut s = h.state.lock().unwrap_or_else(|e| e.into_inner());
            s.received = 0;
            s.duplicates = 0;
            s.replied = 0;
            s.last_reply_ms = 0;
        }
    }

    /// Disconnects every host and waits (bounded) for the tasks to end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// `amqp://user:password@host...` from `amqp://host...` (user and password percent-encoded).
pub fn with_credentials(broker: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = broker.split_once("://").unwrap_or(("amqp", broker));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    format!("{scheme}://{}:{}@{rest}", pct(user), pct(password))
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One connection and the hosts it carries.
struct Conn {
    bus: Bus,
    cfg: Arc<FleetConfig>,
    hosts: Vec<Arc<SimHost>>,
    by_queue: HashMap<String, Arc<SimHost>>,
    counters: Arc<Counters>,
    started: Instant,
    up_exchange: String,
}

impl Conn {
    async fn publish(&self, host: HostId, up: &Up) -> Result<(), comodit_bus::BusError> {
        let key = UpKey::new(host, self.cfg.n_shards, up.kind());
        let mut msg = OutMessage::json(up.kind().as_str(), up.encode());
        msg.user_id = Some(host.to_string());
        let r = self
            .bus
            .publish(&self.up_exchange, &key.to_string(), msg)
            .await;
        if r.is_err() {
            self.counters.publish_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Consumes every host queue of the connection and answers each command.
    async fn commands(self: Arc<Self>, shutdown: CancellationToken) {
        let queues: Vec<String> = self
            .hosts
            .iter()
            .map(|h| self.cfg.names.agent_queue(h.id))
            .collect();
        let mut consumer = self.bus.consume_many(
            queues,
            ConsumeOptions {
                prefetch: self.cfg.prefetch.max(1),
                consumer_tag: String::new(),
                exclusive: false,
            },
        );
        let mut inflight = JoinSet::new();
        loop {
            let d = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = consumer.next() => match d { Some(d) => d, None => break },
            };
            let this = self.clone();
            let stop = shutdown.clone();
            inflight.spawn(async move { this.answer(d, stop).await });
            while inflight.try_join_next().is_some() {}
        }
        inflight.abort_all();
    }

    async fn answer(&self, d: Delivery, shutdown: CancellationToken) {
        let Some(host) = self.by_queue.get(&*d.queue).cloned() else {
            let _ = d.nack(false).await;
            return;
        };
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        let started_at = Utc::now();
        let (reply, slow) = match Command::decode(&d.payload) {
            Ok(cmd) => self.execute(&host, cmd, started_at),
            Err(e) => (
                Reply {
                    v: V1,
                    re: None,
                    host: host.id,
                    status: Status::Rejected,
                    reason: Some(format!("malformed command: {e}")),
                    results: Vec::new(),
                    data: None,
                    started_at,
                    finished_at: Utc::now(),
                },
                false,
            ),
        };
        if slow {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(self.cfg.slow_ms)) => {}
            }
        }
        let up = Up::Reply(reply);
        let until = Instant::now() + REPLY_RETRY_FOR;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.publish(host.id, &up).await {
                Ok(()) => break,
                Err(_) if Instant::now() < until && !shutdown.is_cancelled() => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                // Left unacked: the broker redelivers it and the dedup window answers.
                Err(_) => return,
            }
        }
        {
            let now = self.started.elapsed().as_millis().max(1) as u64;
            let mut s = host.state.lock().unwrap_or_else(|e| e.into_inner());
            s.replied += 1;
            s.last_reply_ms = now;
        }
        self.counters.replies.fetch_add(1, Ordering::Relaxed);
        let _ = d.ack().await;
    }

    /// The reply to `cmd` (and whether to answer it late), from the host's in-memory state.
    fn execute(
        &self,
        host: &SimHost,
        cmd: Command,
        started_at: chrono::DateTime<Utc>,
    ) -> (Reply, bool) {
        let mut s = host.state.lock().unwrap_or_else(|e| e.into_inner());
        s.received += 1;
        if let Some(reply) = s.replay(cmd.id) {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return (reply, false);
        }
        let (fail, slow) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_bool(self.cfg.fail_fraction.clamp(0.0, 1.0)),
                rng.gen_bool(self.cfg.slow_fraction.clamp(0.0, 1.0)),
            )
        };
        if slow {
            self.counters.slow_injected.fetch_add(1, Ordering::Relaxed);
        }
        if fail {
            self.counters
                .failed_injected
                .fetch_add(1, Ordering::Relaxed);
        }
        let reply = s.answer(host.id, cmd, fail, started_at);
        (reply, slow)
    }

    /// A hello for every host on every (re)connect, 64 at a time (the bus's confirm window).
    async fn hellos(self: Arc<Self>, shutdown: CancellationToken) {
        let mut generation = self.bus.generation();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = generation.changed() => if changed.is_err() { return },
            }
            if *generation.borrow_and_update() == 0 {
                continue;
            }
            self.counters.connects.fetch_add(1, Ordering::Relaxed);
            let sent = futures_util::stream::iter(self.hosts.clone())
                .map(|h| {
                    let this = self.clone();
                    async move {
                        let hello = Up::Hello(Hello {
                            v: V1,
                            host: h.id,
                            facts: facts(h.id),
                            desired_digest: EMPTY_BASELINE_DIGEST.into(),
                            epoch: comodit_protocol::Epoch(0),
                            sent_at: Utc::now(),
                        });
                        for _ in 0..20 {
                            if this.publish(h.id, &hello).await.is_ok() {
                                this.counters.hellos.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<()>>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sent => {}
            }
        }
    }

    /// Routed heartbeats: every host every `period` ± 20 %, first one at a random point of the
    /// first period so the fleet does not beat in step.
    async fn heartbeats(
        self: Arc<Self>,
        mut period_rx: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut period_s = *period_rx.borrow_and_update();
        let mut due = schedule(self.hosts.len(), period_s, true);
        let mut tick = tokio::time::interval(HEARTBEAT_TICK);
        let mut sending = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = period_rx.changed() => {
                    if changed.is_err() { break }
                    period_s = *period_rx.borrow_and_update();
                    due = schedule(self.hosts.len(), period_s, true);
                    continue;
                }
                _ = tick.tick() => {}
            }
            if period_s == 0 || !self.bus.is_connected() {
                continue;
            }
            let now = Instant::now();
            for (i, at) in due.iter_mut().enumerate() {
                if *at > now {
                    continue;
                }
                *at = now + jittered(period_s);
                let host = self.hosts[i].id;
                let this = self.clone();
                sending.spawn(async move {
                    let hb = Up::Heartbeat(Heartbeat {
                        v: V1,
                        host,
                        sent_at: Utc::now(),
                        drifted: 0,
                    });
                    if this.publish(host, &hb).await.is_ok() {
                        this.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            while sending.try_join_next().is_some() {}
        }
        sending.abort_all();
    }
}

/// When each of `n` hosts beats next: spread over the first period.
fn schedule(n: usize, period_s: u64, spread: bool) -> Vec<Instant> {
    let now = Instant::now();
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| {
            if period_s == 0 || !spread {
                now
            } else {
                now + Duration::from_millis(rng.gen_range(0..period_s * 1000))
            }
        })
        .collect()
}

/// `period` ± 20 %.
fn jittered(period_s: u64) -> Duration {
    let ms = period_s * 1000;
    let spread = ms / 5;
    Duration::from_millis(ms - spread + rand::thread_rng().gen_range(0..=2 * spread))
}

fn spec_hash(v: &serde_json::Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// Facts of a simulated host: plausible, small, the same shape as a real agent's.
pub fn facts(host: HostId) -> Facts {
    let short = host.to_string()[..8].to_owned();
    Facts {
        hostname: format!("sim-{short}"),
        os_family: "debian".into(),
        os_distribution: "debian".into(),
        os_version: "12".into(),
        kernel: "6.1.0-sim".into(),
        architecture: "x86_64".into(),
        cpus: 2,
        memory_bytes: 4 << 30,
        addresses: vec!["192.0.2.1".into()],
        uptime_s: 1000,
        package_manager: Some("apt".into()),
        init_system: Some("systemd".into()),
        agent_version: concat!("loadtest-", env!("CARGO_PKG_VERSION")).into(),
        capabilities: vec!["files".into(), "run".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_into_the_url_encoded() {
        assert_eq!(
            with_credentials("amqp://127.0.0.1:5672/%2f", "u", "p@ss/w"),
            "amqp://u:p%40ss%2Fw@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            with_credentials("amqp://old:x@h/v", "u", "p"),
            "amqp://u:p@h/v"
        );
    }

    #[test]
    fn counts_are_settled_once_every_command_has_its_reply() {
        let mut c = FleetCounts {
            commands: 200,
            replies: 199,
            ..FleetCounts::default()
        };
        assert!(!c.settled());
        c.replies = 200;
        assert!(c.settled());
    }

    fn apply(content: &str, mode: comodit_protocol::ApplyMode) -> Body {
        match crate::scenarios::apply_body(content).unwrap() {
            Body::Apply { resources, .. } => Body::Apply {
                mode,
                monitor: false,
                resources,
            },
            _ => unreachable!(),
        }
    }

    #[test]
    fn apply_is_idempotent_and_a_dry_run_changes_nothing() {
        use comodit_protocol::ApplyMode::{DryRun, Enforce};
        let host = HostId::random();
        let mut s = HostState::default();
        let mut answer =
            |body: Body| s.answer(host, crate::bare::command(host, &body), false, Utc::now());
        let dry = answer(apply("a\n", DryRun));
        assert!(dry.results[0].changed);
        let first = answer(apply("a\n", Enforce));
        assert!(first.results[0].changed, "the dry run recorded nothing");
        assert_eq!(first.results[0].diff[0].field, "ensure");
        assert_eq!(first.status, Status::Ok);
        let second = answer(apply("a\n", Enforce));
        assert!(!second.results[0].changed);
        assert!(second.results[0].diff.is_empty());
        let other = answer(apply("b\n", Enforce));
        assert!(other.results[0].changed);
        assert_eq!(other.results[0].diff[0].field, "content");
    }

    #[test]
    fn duplicates_get_the_same_reply_and_are_counted() {
        let host = HostId::random();
        let mut s = HostState::default();
        let cmd = crate::bare::command(host, &crate::scenarios::run_body());
        let id = cmd.id;
        assert!(s.replay(id).is_none());
        let reply = s.answer(host, cmd, true, Utc::now());
        assert_eq!(reply.status, Status::Failed, "an injected failure");
        assert_eq!(reply.re, Some(id));
        assert_eq!(s.replay(id), Some(reply));
        assert_eq!(s.duplicates, 1);
        let run = s.answer(
            host,
            crate::bare::command(host, &crate::scenarios::run_body()),
            false,
            Utc::now(),
        );
        assert!(matches!(
            run.data,
            Some(ReplyData::Run(RunResult {
                exit_code: Some(0),
                ..
            }))
        ));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let d = jittered(30).as_millis();
            assert!((24_000..=36_000).contains(&d), "{d}");
        }
    }
}
