//! The connected agent: the broker on one side, the executor on the other.
//!
//! ```text
//! <p>.agent.<host> ──► command loop ──► serial worker (apply, remove, set_desired, check)
//!                                   └─► concurrent tasks (run, read, list, facts, ping)
//!                        reply ──► recorded ──► published on <p>.up (confirmed) ──► delivery acked
//! events (drift, output) ──► bounded channel ──► publisher (retries until the broker confirms)
//! every (re)connect ──► hello;  every heartbeat_s ──► heartbeat;  shutdown ──► bye
//! ```
//! A delivery is acked only after its reply is confirmed by the broker; if the agent dies first the
//! broker redelivers it and the dedup window answers without running it again.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use comodit_bus::{Bus, BusConfig, ConsumeOptions, Delivery, OutMessage};
use comodit_protocol::{Body, Bye, Command, Heartbeat, Hello, HostId, Names, Up, UpKey, V1};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{url_with_credentials, with_frame_max, AgentConfig};
use crate::exec::{capabilities, Executor};
use crate::platform::Platform;
use crate::providers::cmd::SystemRunner;
use crate::state::{self, LocalStore};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("broker: {0}")]
    Bus(String),
}

/// Where the agent sends upward messages.
#[derive(Clone)]
pub struct Uplink {
    bus: Bus,
    exchange: String,
    host: HostId,
    n_shards: u32,
}

impl Uplink {
    pub fn new(bus: Bus, names: &Names, host: HostId, n_shards: u32) -> Self {
        Uplink {
            bus,
            exchange: names.up_exchange(),
            host,
            n_shards,
        }
    }

    /// Publishes once and waits for the broker's confirm.
    pub async fn publish(&self, up: &Up) -> Result<(), comodit_bus::BusError> {
        let key = UpKey::new(self.host, self.n_shards, up.kind());
        let mut msg = OutMessage::json(up.kind().as_str(), up.encode());
        msg.message_id = uuid::Uuid::new_v4().to_string();
        // The broker checks that user_id is the connection's user: the node can trust it.
        msg.user_id = Some(self.host.to_string());
        self.bus
            .publish(&self.exchange, &key.to_string(), msg)
            .await
    }

    /// Publishes until the broker confirms it, or shutdown. Returns whether it was confirmed.
    pub async fn publish_reliably(&self, up: &Up, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.publish(up).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(kind = up.kind().as_str(), error = %e, "publish failed; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// Runs the connected agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    state::ensure_state_dir(&config.state_dir)?;
    let creds = state::read_credentials(&config.state_dir)?;
    let host = creds.host;
    let store = LocalStore::open(&config.state_dir, config.dedup_window)?;
    let platform = Platform::detect(&SystemRunner);
    let providers = Executor::system_providers(&platform, config.system_root.clone());
    let stats = Arc::new(Stats::new());
    let (events_tx, mut events_rx) = mpsc::channel::<Up>(1024);
    let exec = Executor::new(
        host,
        platform,
        providers,
        store,
        stats.clone(),
        events_tx,
        shutdown.clone(),
    );
    let names = config.names();
    let span = tracing::info_span!("agent", host_id = %host);
    let _guard = span.enter();
    tracing::info!(state_dir = %config.state_dir.display(), "agent starting");

    // The bus outlives `shutdown` until in-flight replies are published.
    let hard_stop = CancellationToken::new();
    let bus = Bus::start(
        BusConfig {
            url: with_frame_max(
                &url_with_credentials(
                    &config.broker_url,
                    &host.to_string(),
                    creds.password.expose(),
                ),
                config.amqp_frame_max,
            ),
            heartbeat_s: config.amqp_heartbeat_s,
            connection_name: format!("comodit-agent {host}"),
            ..BusConfig::default()
        },
        hard_stop.clone(),
    );
    let uplink = Uplink::new(bus.clone(), &names, host, config.n_shards);
    let mut tasks = JoinSet::new();

    // Events: drift, drift_cleared, output.
    {
        let uplink = uplink.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            while let Some(up) = tokio::select! {
                up = events_rx.recv() => up,
                _ = shutdown.cancelled() => None,
            } {
                uplink.publish_reliably(&up, &shutdown).await;
            }
        });
    }

    // Hello on every (re)connect.
    {
        let uplink = uplink.clone();
        let exec = exec.clone();
        let shutdown = shutdown.clone();
        let mut generation = bus.generation();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = generation.changed() => if changed.is_err() { return },
                }
                if *generation.borrow_and_update() == 0 {
                    continue;
                }
                let hello = hello(&exec).await;
                if uplink.publish_reliably(&hello, &shutdown).await {
                    tracing::info!("hello sent");
                }
            }
        });
    }

    // Routed heartbeat, rare and jittered (presence rests mainly on AMQP heartbeats).
    if config.heartbeat_s > 0 {
        let uplink = uplink.clone();
        let exec = exec.clone();
        let shutdown = shutdown.clone();
        let period = Duration::from_secs(config.heartbeat_s);
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(crate::compliance::jittered(period, 20)) => {}
                }
                let drifted = exec.store.drift().map(|d| d.len() as u32).unwrap_or(0);
                let hb = Up::Heartbeat(Heartbeat {
                    v: V1,
                    host,
                    sent_at: Utc::now(),
                    drifted,
                });
                if let Err(e) = uplink.publish(&hb).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                }
            }
        });
    }

    // Compliance.
    tasks.spawn(crate::compliance::run_loop(
        exec.clone(),
        Duration::from_secs(config.check_interval_s),
        config.check_jitter_pct,
        config.inotify,
    ));

    // Metrics textfile.
    {
        let stats = stats.clone();
        let path = config.state_dir.join("metrics.prom");
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                if let Err(e) = stats.write_textfile(&path) {
                    tracing::debug!(error = %e, "metrics textfile not written");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = stats.write_textfile(&path);
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                }
            }
        });
    }

    command_loop(
        &bus, &names, host, &exec, &uplink, &config, &shutdown, &hard_stop,
    )
    .await;

    // Say goodbye if the broker is there; do not wait long for it.
    let bye = Up::Bye(Bye {
        v: V1,
        host,
        reason: "shutdown".into(),
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), uplink.publish(&bye)).await;
    hard_stop.cancel();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = stats.write_textfile(&config.state_dir.join("metrics.prom"));
    tracing::info!("agent stopped");
    Ok(())
}

/// The `hello` for the current state.
pub async fn hello(exec: &Arc<Executor>) -> Up {
    let platform = exec.platform.clone();
    let facts =
        tokio::task::spawn_blocking(move || crate::facts::gather(&platform, capabilities()))
            .await
            .unwrap_or_default();
    let baseline = exec.store.baseline().unwrap_or_default();
    Up::Hello(Hello {
        v: V1,
        host: exec.host,
        facts,
        desired_digest: state::baseline_digest(&baseline),
        epoch: exec.store.epoch().unwrap_or(comodit_protocol::Epoch(0)),
        sent_at: Utc::now(),
    })
}

/// Whether a command changes resources and must run in arrival order, one at a time.
fn is_serial(cmd: &Command) -> bool {
    matches!(
        cmd.body,
        Body::Apply { .. } | Body::Remove { .. } | Body::SetDesired { .. } | Body::Check {}
    )
}

#[allow(clippy::too_many_arguments)]
async fn command_loop(
    bus: &Bus,
    names: &Names,
    host: HostId,
    exec: &Arc<Executor>,
    uplink: &Uplink,
    config: &AgentConfig,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) {
    let mut consumer = bus.consume(
        &names.agent_queue(host),
        ConsumeOptions {
            prefetch: config.prefetch,
            consumer_tag: format!("agent-{host}"),
            exclusive: false,
        },
    );
    // Serial commands go through one worker, in order; the channel is bounded by the prefetch.
    let (serial_tx, mut serial_rx) = mpsc::channel::<(Delivery, Command)>(config.prefetch as usize);
    let mut inflight = JoinSet::new();
    {
        let exec = exec.clone();
        let uplink = uplink.clone();
        let hard_stop = hard_stop.clone();
        inflight.spawn(async move {
            while let Some((delivery, cmd)) = serial_rx.recv().await {
                let reply = exec.handle_command(cmd).await;
                finish(&uplink, delivery, reply, &hard_stop).await;
            }
        });
    }
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => match d { Some(d) => d, None => break },
        };
        match Command::decode(&delivery.payload) {
            Ok(cmd) if is_serial(&cmd) => {
                if serial_tx.send((delivery, cmd)).await.is_err() {
                    break;
                }
            }
            Ok(cmd) => {
                let exec = exec.clone();
                let uplink = uplink.clone();
                let hard_stop = hard_stop.clone();
                inflight.spawn(async move {
                    let reply = exec.handle_command(cmd).await;
                    finish(&uplink, delivery, reply, &hard_stop).await;
                });
            }
            Err(_) => {
                // handle() turns the decode error into a counted, reasoned refusal.
                let reply = exec.handle(&delivery.payload).await;
                finish(uplink, delivery, reply, hard_stop).await;
            }
        }
        // Reap finished tasks so the set stays small.
        while inflight.try_join_next().is_some() {}
    }
    drop(serial_tx);
    // Finish what is in flight (bounded by the prefetch), but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
    inflight.abort_all();
}

/// Publishes the reply, then acks. Without a confirmed reply the delivery is left unacked, so the
/// broker redelivers it (and the dedup window answers it).
async fn finish(
    uplink: &Uplink,
    delivery: Delivery,
    reply: Option<comodit_protocol::Reply>,
    shutdown: &CancellationToken,
) {
    let Some(reply) = reply else {
        // A redelivery of a command still executing: its own delivery carries the reply.
        if let Err(e) = delivery.ack().await {
            tracing::debug!(error = %e, "ack of a redelivery failed");
        }
        return;
    };
    let up = Up::Reply(reply);
    if uplink.publish_reliably(&up, shutdown).await {
        if let Err(e) = delivery.ack().await {
            tracing::warn!(error = %e, "ack failed; the command will be redelivered and answered from the dedup window");
        }
    }
}
