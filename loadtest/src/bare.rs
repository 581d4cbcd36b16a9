//! The broker's ceiling: the node's message patterns with no node.
//!
//! The same topology as a node declares (`bus::topology::declare_core` with the same shard count,
//! one durable queue per host bound to `<p>.down`), the same simulated fleet, and in the node's
//! place a driver that publishes the commands itself (confirmed, through [`Bus::publish`], as the
//! node does) and consumes the replies from the shard queues (quorum, as the node does):
//!
//! - **unicast**: one command per host queue (`<p>.down`, routing key = host id), one reply each;
//! - **broadcast**: one command published once on a fanout exchange bound to every host queue,
//!   fanned out by the broker, one reply each.
//!
//! The simulated hosts send routed heartbeats at the fleet scenario's period (`--heartbeat-s`),
//! as they do with a node: at 50,000 hosts and 300 s that is 167 heartbeats a second into the
//! shard queues (13–18 % as many as the replies of a 40–55 s wave), which the ceiling must carry
//! as well.
//!
//! Nothing is written to a store, nothing is looked up: what is left is the broker, the client
//! library and the fleet, on this machine. Every fleet figure is divided by these.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use comodit_bus::lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use comodit_bus::lapin::types::FieldTable;
use comodit_bus::lapin::ExchangeKind;
use comodit_bus::{topology, Bus, BusConfig, ConsumeOptions, OutMessage};
use comodit_protocol::{
    Body, Command, CommandId, Epoch, HostId, Names, Shard, Status, Up, UpKey, UpKind, V1,
};
use futures_util::StreamExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetConfig, Login};
use crate::measure::{CpuMeter, Wave};
use crate::rig::Broker;

/// The node's default prefetch per shard queue.
const DRIVER_PREFETCH: u16 = 256;

pub struct BareOptions {
    pub hosts: usize,
    pub n_shards: u32,
    pub hosts_per_conn: usize,
    /// The driver's publishes in flight (the node's bound).
    pub publishes_in_flight: usize,
    /// The command each host gets.
    pub body: Body,
    pub deadline: Duration,
    pub broadcast: bool,
    /// Unicast waves, one after the other on the same hosts (at least one).
    pub waves: usize,
    /// Routed heartbeat period of the simulated hosts (0 = none): the fleet scenario's own, so
    /// that the broker carries the same background of heartbeats under both.
    pub heartbeat_s: u64,
}

/// The bare waves a fleet figure is compared with.
pub struct Ceiling {
    /// Every unicast wave, in the order they ran.
    pub unicasts: Vec<Wave>,
    pub broadcast: Option<Wave>,
}

impl Ceiling {
    /// The unicast wave of median duration: the one the figures compare with.
    pub fn unicast(&self) -> &Wave {
        crate::measure::median_wave(&self.unicasts)
    }

    /// Every wave's summary, the unicasts first, for the report.
    pub fn summaries(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.unicasts
            .iter()
            .chain(self.broadcast.as_ref())
            .map(Wave::summary)
    }
}

pub struct BareResult {
    pub ceiling: Ceiling,
    pub setup: Duration,
    /// Routed heartbeats the simulated hosts sent over the whole bare run.
    pub heartbeats: u64,
}

/// Runs bare unicast (and broadcast) on a prefix of its own, then deletes everything it made.
pub async fn run(
    broker: &Broker,
    opts: &BareOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<BareResult> {
    let prefix = crate::rig::run_prefix();
    let user = crate::rig::fleet_user(&prefix);
    let r = run_on(broker, &prefix, &user, opts, shutdown).await;
    crate::rig::cleanup(broker, &prefix, vec![user]).await;
    r
}

async fn run_on(
    broker: &Broker,
    prefix: &str,
    user: &str,
    opts: &BareOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<BareResult> {
    let setup_started = Instant::now();
    let names = Names::new(prefix)?;
    let stop = shutdown.child_token();
    let _guard = stop.clone().drop_guard();
    let driver = Bus::start(
        BusConfig {
            url: broker.admin_url(),
            connection_name: format!("comodit-loadtest bare driver {prefix}"),
            max_publishes_in_flight: opts.publishes_in_flight,
            ..BusConfig::default()
        },
        stop.clone(),
    );
    driver.wait_connected(Duration::from_secs(30)).await?;
    let hosts: Vec<HostId> = (0..opts.hosts).map(|_| HostId::random()).collect();
    let bcast = format!("{prefix}.bcast");
    {
        let ch = driver.channel().await?;
        topology::declare_core(&ch, &names, opts.n_shards).await?;
        declare_broadcast(&ch, &bcast).await?;
        for h in &hosts {
            topology::declare_agent_queue(&ch, &names, *h).await?;
            if opts.broadcast {
                bind_broadcast(&ch, &names, &bcast, *h).await?;
            }
        }
        let _ = ch.close(200, "declared".into()).await;
    }
    let password = uuid::Uuid::new_v4().to_string();
    broker
        .admin()?
        .ensure_fleet_user(&names, user, &password)
        .await
        .context("fleet user")?;
    let fleet = Fleet::start(
        FleetConfig {
            broker: broker.amqp.clone(),
            names: names.clone(),
            n_shards: opts.n_shards,
            login: Login::Shared {
                user: user.to_owned(),
                password,
            },
            hosts_per_conn: opts.hosts_per_conn,
            heartbeat_s: opts.heartbeat_s,
            amqp_heartbeat_s: 30,
            prefetch: 4,
            fail_fraction: 0.0,
            slow_fraction: 0.0,
            slow_ms: 0,
        },
        hosts.iter().map(|h| (*h, None)).collect(),
        stop.child_token(),
    );
    let r = async {
        fleet
            .wait_ready(Duration::from_secs(120 + opts.hosts as u64 / 100))
            .await?;
        // The replies of both waves arrive on the shard queues, like the node's.
        let replies = Replies::start(&driver, &names, opts.n_shards);
        // The hellos of the connect are in the shard queues too: let the consumer drain them.
        replies
            .wait_hellos(
                opts.hosts,
                Duration::from_secs(60 + opts.hosts as u64 / 500),
            )
            .await;
        let setup = setup_started.elapsed();
        eprintln!(
            "bare: {} hosts ready in {:.1} s",
            opts.hosts,
            setup.as_secs_f64()
        );
        let mut probe = crate::probe::Probe::new(fleet.counters.clone());
        let mut unicasts = Vec::new();
        for i in 0..opts.waves.max(1) {
            let name = crate::measure::wave_name("bare_unicast", i, opts.waves);
            let mut w = unicast(
                &driver,
                &names,
                &hosts,
                &opts.body,
                &replies,
                opts.deadline,
                &name,
            )
            .await?;
            eprintln!("{}", w.done_line());
            w.underneath = Some(probe.wave_ended(None, broker).await);
            unicasts.push(w);
        }
        let broadcast = if opts.broadcast {
            let mut w =
                broadcast(&driver, &bcast, &hosts, &opts.body, &replies, opts.deadline).await?;
            eprintln!("{}", w.done_line());
            w.underneath = Some(probe.wave_ended(None, broker).await);
            Some(w)
        } else {
            None
        };
        anyhow::Ok(BareResult {
            ceiling: Ceiling {
                unicasts,
                broadcast,
            },
            setup,
            heartbeats: fleet
                .counters
                .heartbeats
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }
    .await;
    fleet.stop().await;
    stop.cancel();
    r
}

/// Declares the broadcast (fanout) exchange `bcast`.
async fn declare_broadcast(ch: &comodit_bus::lapin::Channel, bcast: &str) -> anyhow::Result<()> {
    ch.exchange_declare(
        bcast.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Binds `host`'s queue to the broadcast exchange `bcast`.
async fn bind_broadcast(
    ch: &comodit_bus::lapin::Channel,
    names: &Names,
    bcast: &str,
    host: HostId,
) -> anyhow::Result<()> {
    ch.queue_bind(
        names.agent_queue(host).as_str().into(),
        bcast.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

pub fn command(host: HostId, body: &Body) -> Command {
    let now = Utc::now();
    Command {
        v: V1,
        id: CommandId::random(),
        host,
        epoch: Epoch(1),
        issued_at: now,
        expires_at: now + chrono::Duration::minutes(10),
        body: body.clone(),
    }
}

/// Who waits for the reply to each command id: (the answering host, answered ok).
type Waiting = Arc<Mutex<HashMap<CommandId, tokio::sync::mpsc::UnboundedSender<(HostId, bool)>>>>;

/// Consumes every shard queue as the node does, one consumer (and channel) per shard queue
/// with the node's prefetch, each in a task of its own; hands each reply to whoever waits for
/// its command id. (Until 2026-11-29 one consumer took all the shard queues on one channel and
/// acked each delivery before taking the next: a narrower path than the node's, which made the
/// ceiling slower than the node itself on the same fleet.)
struct Replies {
    waiting: Waiting,
    hellos: Arc<std::sync::atomic::AtomicUsize>,
}

impl Replies {
    fn start(bus: &Bus, names: &Names, n_shards: u32) -> Replies {
        let waiting: Waiting = Arc::default();
        let hellos = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for n in 0..n_shards {
            let mut consumer = bus.consume(
                &names.shard_queue(Shard(n)),
                ConsumeOptions {
                    prefetch: DRIVER_PREFETCH,
                    consumer_tag: String::new(),
                    exclusive: false,
                },
            );
            let (w, h) = (waiting.clone(), hellos.clone());
            tokio::spawn(async move {
                while let Some(d) = consumer.next().await {
                    let parsed = UpKey::parse(&d.routing_key, n_shards)
                        .ok()
                        .and_then(|k| Up::decode(k.kind, &d.payload).ok().map(|u| (k, u)));
                    match parsed {
                        Some((k, Up::Reply(r))) if k.kind == UpKind::Reply => {
                            if let Some(re) = r.re {
                                if let Some(tx) = w.lock().await.get(&re) {
                                    let _ = tx.send((r.host, r.status == Status::Ok));
                                }
                            }
                        }
                        Some((_, Up::Hello(_))) => {
                            h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    let _ = d.ack().await;
                }
            });
        }
        Replies { waiting, hellos }
    }

    async fn wait_hellos(&self, n: usize, deadline: Duration) {
        let until = Instant::now() + deadline;
        while self.hellos.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn unicast(
    bus: &Bus,
    names: &Names,
    hosts: &[HostId],
    body: &Body,
    replies: &Replies,
    deadline: Duration,
    name: &str,
) -> anyhow::Result<Wave> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cmds: Vec<Command> = hosts.iter().map(|h| command(*h, body)).collect();
    let mut sent_at: HashMap<HostId, Instant> = HashMap::with_capacity(hosts.len());
    {
        let mut w = replies.waiting.lock().await;
        w.clear();
        for c in &cmds {
            w.insert(c.id, tx.clone());
        }
    }
    drop(tx);
    let exchange = names.down_exchange();
    let in_flight = bus.config().max_publishes_in_flight;
    let meter = CpuMeter::start(&[]);
    let start = Instant::now();
    let (stx, mut srx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            futures_util::stream::iter(cmds)
                .map(|c| {
                    let (bus, exchange, stx) = (bus.clone(), exchange.clone(), stx.clone());
                    async move {
                        let at = Instant::now();
                        let msg = OutMessage::json("command", c.encode());
                        let r = bus.publish(&exchange, &c.host.to_string(), msg).await;
                        let _ = stx.send((c.host, at, r.is_ok()));
                    }
                })
                .buffer_unordered(in_flight)
                .collect::<Vec<()>>()
                .await;
        })
    };
    let mut wave = Wave::new(name, hosts.len());
    let mut publish_failed = 0;
    // A reply can overtake its send record (both come from tasks): kept until that record comes.
    let mut early: HashMap<HostId, (Instant, bool)> = HashMap::new();
    // Once every publish is recorded the channel is closed and would be ready at once, forever:
    // polling it then would spin this loop until the last reply (as it did before 2026-11-29,
    // on the CPU the broker and the fleet share with it).
    let mut sends_open = true;
    let deadline_at = tokio::time::sleep_until((start + deadline).into());
    tokio::pin!(deadline_at);
    while wave.answered < hosts.len() {
        tokio::select! {
            s = srx.recv(), if sends_open => match s {
                Some((h, at, ok)) => {
                    if !ok {
                        publish_failed += 1;
                    }
                    if let Some((got, ok)) = early.remove(&h) {
                        wave.record(got.duration_since(start), got.duration_since(at), ok);
                    }
                    sent_at.insert(h, at);
                }
                None => sends_open = false,
            },
            r = rx.recv() => match r {
                Some((h, ok)) => {
                    let got = Instant::now();
                    match sent_at.get(&h) {
                        Some(at) => {
                            wave.record(got.duration_since(start), got.duration_since(*at), ok)
                        }
                        None => {
                            early.insert(h, (got, ok));
                        }
                    }
                }
                None => break,
            },
            _ = &mut deadline_at => break,
        }
    }
    wave.elapsed = start.elapsed();
    wave.cpu = Some(meter.end(wave.answered));
    publisher.abort();
    replies.waiting.lock().await.clear();
    if publish_failed > 0 {
        bail!("bare unicast: {publish_failed} publishes failed");
    }
    Ok(wave)
}

async fn broadcast(
    bus: &Bus,
    exchange: &str,
    hosts: &[HostId],
    body: &Body,
    replies: &Replies,
    deadline: Duration,
) -> anyhow::Result<Wave> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // One command for all: its host is the first host's (each simulated host answers as itself).
    let cmd = command(hosts[0], body);
    replies.waiting.lock().await.insert(cmd.id, tx);
    let meter = CpuMeter::start(&[]);
    let start = Instant::now();
    bus.publish(exchange, "", OutMessage::json("command", cmd.encode()))
        .await
        .context("broadcast publish")?;
    let mut wave = Wave::new("bare_broadcast", hosts.len());
    let deadline_at = tokio::time::sleep_until((start + deadline).into());
    tokio::pin!(deadline_at);
    while wave.answered < hosts.len() {
        tokio::select! {
            r = rx.recv() => match r {
                Some((_, ok)) => {
                    let at = start.elapsed();
                    wave.record(at, at, ok);
                }
                None => break,
            },
            _ = &mut deadline_at => break,
        }
    }
    wave.elapsed = start.elapsed();
    wave.cpu = Some(meter.end(wave.answered));
    replies.waiting.lock().await.clear();
    Ok(wave)
}

/// The ceiling measured on the fleet a node serves, while that node is stopped (the scenarios'
/// `--interleave-bare`): the same host queues, shard queues, fleet connections and broker state
/// as the node's own waves, and each bare wave next to an API wave in time, so that the machine's
/// speed, which drifts by a third within an hour on the development VM, is the same for both.
pub struct OnFleet<'a> {
    pub broker: &'a Broker,
    pub names: &'a Names,
    pub hosts: &'a [HostId],
    pub n_shards: u32,
    /// The driver's publishes in flight (the node's bound).
    pub publishes_in_flight: usize,
    pub body: &'a Body,
    pub deadline: Duration,
}

/// A driver connection consuming every shard queue in the stopped node's place.
struct Driver {
    bus: Bus,
    replies: Replies,
    stop: CancellationToken,
}

impl Driver {
    async fn start(f: &OnFleet<'_>, shutdown: &CancellationToken) -> anyhow::Result<Driver> {
        let stop = shutdown.child_token();
        let bus = Bus::start(
            BusConfig {
                url: f.broker.admin_url(),
                connection_name: format!("comodit-loadtest bare driver {}", f.names.prefix()),
                max_publishes_in_flight: f.publishes_in_flight,
                ..BusConfig::default()
            },
            stop.clone(),
        );
        if let Err(e) = bus.wait_connected(Duration::from_secs(30)).await {
            stop.cancel();
            return Err(e.into());
        }
        let replies = Replies::start(&bus, f.names, f.n_shards);
        Ok(Driver { bus, replies, stop })
    }

    /// Closes the connection (its unacked deliveries go back to their queues) and waits, at
    /// most 10 s, until it is closed: the restarted node must be the shard queues' only consumer.
    async fn stop(self) {
        self.stop.cancel();
        let until = Instant::now() + Duration::from_secs(10);
        while self.bus.is_connected() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One bare unicast wave on the node's fleet (the node must be stopped).
pub async fn unicast_on_fleet(
    f: &OnFleet<'_>,
    name: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Wave> {
    let d = Driver::start(f, shutdown).await?;
    let w = unicast(
        &d.bus, f.names, f.hosts, f.body, &d.replies, f.deadline, name,
    )
    .await;
    d.stop().await;
    w
}

/// The bare broadcast on the node's fleet (the node must be stopped): a fanout exchange bound to
/// every host queue, one publish, one reply per host; the exchange is deleted afterwards.
pub async fn broadcast_on_fleet(
    f: &OnFleet<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Wave> {
    let d = Driver::start(f, shutdown).await?;
    let bcast = format!("{}.bcast", f.names.prefix());
    let r = async {
        let ch = d.bus.channel().await?;
        declare_broadcast(&ch, &bcast).await?;
        for h in f.hosts {
            bind_broadcast(&ch, f.names, &bcast, *h).await?;
        }
        let w = broadcast(&d.bus, &bcast, f.hosts, f.body, &d.replies, f.deadline).await;
        let _ = ch
            .exchange_delete(bcast.as_str().into(), Default::default())
            .await;
        let _ = ch.close(200, "done".into()).await;
        w
    }
    .await;
    d.stop().await;
    r
}
