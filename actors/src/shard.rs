//! One owned shard: its consumer, its host actors, its sweep.
//!
//! The shard task consumes `<prefix>.shard.<n>` with the configured prefetch, checks each
//! delivery ([`crate::validate`]), and hands it to the host's actor, started on first use under a
//! supervisor. A refused delivery is logged, counted and acked: input never stops the node.
//!
//! Mailboxes are bounded: when a host's mailbox is full the task waits for that host (keeping
//! the host's messages in order) and, through the prefetch, the broker waits for the task.
//!
//! Once per sweep interval the task pokes the actors whose deadline passed (silence, re-sends,
//! expiries) — one timer per shard rather than one per host.
//!
//! Stopping (shutdown, shard lost): stop reading, let every actor finish what its mailbox
//! holds, stop the actors, then drop the consumer so the deliveries still buffered go back to
//! the queue for the next owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::dev::SendError;
use actix::{Addr, MailboxError, Supervisor};
use comodit_bus::{ConsumeOptions, Delivery};
use comodit_protocol::{HostId, Shard};
use comodit_store::{HostFilter, Page};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::host::{now_ms, HostActor, Inbound, Recheck, Shutdown, Tick};
use crate::metrics as m;
use crate::pending::NEVER;
use crate::runtime::Core;
use crate::ticket::Ticket;
use crate::validate::{self, Reject};

/// A host actor as its shard knows it.
struct Slot {
    /// The shard task's own sender: a bounded mailbox only pushes back on the sender that
    /// filled it, so deliveries always go through this one.
    addr: Addr<HostActor>,
    /// The actor's next deadline (ms), for the sweep.
    due: Arc<AtomicI64>,
}

pub(crate) struct ShardRt {
    pub shard: Shard,
    hosts: Mutex<HashMap<HostId, Slot>>,
    pub stop: CancellationToken,
    pub task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ShardRt {
    pub fn new(shard: Shard) -> ShardRt {
        ShardRt {
            shard,
            hosts: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        }
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Slot>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host's actor, started if needed (the caller checked the host exists).
    pub fn actor(&self, core: &Arc<Core>, host: HostId) -> Addr<HostActor> {
        let mut hosts = self.hosts();
        if let Some(slot) = hosts.get(&host).filter(|s| s.addr.connected()) {
            return slot.addr.clone();
        }
        let due = Arc::new(AtomicI64::new(NEVER));
        let arbiter = core.next_arbiter();
        let (c, d) = (core.clone(), due.clone());
        let addr = Supervisor::start_in_arbiter(&arbiter, move |_| HostActor::new(c, host, d));
        hosts.insert(
            host,
            Slot {
                addr: addr.clone(),
                due,
            },
        );
        addr
    }

    /// Sends to the host's actor if it runs and its mailbox has room (best effort).
    pub fn try_send<M>(&self, host: HostId, msg: M) -> bool
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        HostActor: actix::Handler<M>,
    {
        self.hosts()
            .get(&host)
            .is_some_and(|slot| slot.addr.try_send(msg).is_ok())
    }

    /// Takes the host's actor out of the shard; once the returned sender is dropped too, a
    /// stopped actor is not restarted.
    pub fn remove(&self, host: HostId) -> Option<Addr<HostActor>> {
        self.hosts().remove(&host).map(|s| s.addr)
    }
}

/// The shard task: consume, route, sweep; then stop the shard's actors.
pub(crate) async fn run(core: Arc<Core>, srt: Arc<ShardRt>) {
    let shard = srt.shard;
    let queue = core.names.shard_queue(shard);
    let mut consumer = core.bus.consume(
        &queue,
        ConsumeOptions {
            prefetch: core.config.prefetch,
            consumer_tag: String::new(),
            exclusive: false,
        },
    );
    info!(%shard, %queue, "shard started");
    let resume = tokio::spawn(resume(core.clone(), srt.clone()));
    let mut sweep = tokio::time::interval(core.config.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The first recheck one period after the start: `resume` covers the start itself.
    let mut recheck = tokio::time::interval_at(
        tokio::time::Instant::now() + core.config.pending_recheck,
        core.config.pending_recheck,
    );
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut rechecking: Option<tokio::task::JoinHandle<()>> = None;
    let mut log = LogLimit::default();
    loop {
        tokio::select! {
            // The sweep before the deliveries: it is ready once per interval, so it cannot
            // starve them, while a steady flow of deliveries would starve it.
            biased;
            _ = srt.stop.cancelled() => break,
            _ = sweep.tick() => sweep_once(&core, &srt),
            _ = recheck.tick() => {
                // One at a time per shard: a slow store skips a round rather than piling up.
                if rechecking.as_ref().is_none_or(|t| t.is_finished()) {
                    rechecking = Some(tokio::spawn(recheck_pending(core.clone(), srt.clone())));
                }
            }
            d = consumer.next() => match d {
                Some(d) => route(&core, &srt, d, &mut log).await,
                None => break,
            },
        }
    }
    resume.abort();
    if let Some(t) = rechecking {
        t.abort();
    }
    stop_actors(&core, &srt).await;
    // Deliveries still buffered go back to the queue with the consumer's channel.
    drop(consumer);
    info!(%shard, "shard stopped");
}

/// After a start or a shard gain: actors for the hosts with pending changes (so queued work
/// resumes) and for the hosts the store says are online (so their silence is watched).
async fn resume(core: Arc<Core>, srt: Arc<ShardRt>) {
    let shard = srt.shard;
    let mut delay = Duration::from_millis(200);
    loop {
        match resume_once(&core, &srt).await {
            Ok(n) => {
                info!(%shard, actors = n, "shard resumed");
                return;
            }
            Err(e) => {
                warn!(%shard, error = %e, "cannot list the shard's hosts, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn resume_once(core: &Arc<Core>, srt: &ShardRt) -> Result<usize, comodit_store::StoreError> {
    let mut n = 0;
    for host in core.store.hosts_with_pending_changes(srt.shard.0).await? {
        srt.actor(core, host);
        n += 1;
    }
    let filter = HostFilter {
        shard: Some(srt.shard.0),
        online: Some(true),
        ..HostFilter::default()
    };
    let mut page = Page::first(Page::MAX_LIMIT);
    loop {
        let got = core.store.list_hosts(&filter, &page).await?;
        for h in &got.items {
            srt.actor(core, h.id);
            n += 1;
        }
        match got.next {
            Some(cursor) => page.cursor = Some(cursor),
            None => return Ok(n),
        }
    }
}

async fn route(core: &Arc<Core>, srt: &ShardRt, d: Delivery, log: &mut LogLimit) {
    let checked = validate::check(
        &d.routing_key,
        d.user_id.as_deref(),
        &d.payload,
        core.n_shards,
        srt.shard,
        &core.config.node_user,
    );
    let (key, up) = match checked {
        Ok(x) => x,
        Err(r) => return reject(srt.shard, d, r, log).await,
    };
    m::message(key.kind.as_str());
    let host = key.host;
    let mut msg = Inbound {
        up,
        ticket: Ticket::new(d, core.rt.clone()),
    };
    // Two rounds: a closed mailbox (actor retired meanwhile) gets one fresh actor.
    for _ in 0..2 {
        let sent = {
            let hosts = srt.hosts();
            match hosts.get(&host) {
                Some(slot) => match slot.addr.try_send(msg) {
                    Ok(()) => Sent::Queued,
                    Err(SendError::Full(m)) => Sent::Full(m, slot.addr.clone()),
                    Err(SendError::Closed(m)) => Sent::Closed(m),
                },
                None => Sent::NoActor(msg),
            }
        };
        match sent {
            Sent::Queued => return,
            Sent::Full(m, addr) => {
                // Wait for this host (its order matters), with a bound.
                match addr.send(m).timeout(core.config.actor_call_timeout).await {
                    Ok(()) => {}
                    Err(MailboxError::Timeout) => {
                        warn!(host_id = %host, "host actor busy; its message waits in its mailbox")
                    }
                    Err(MailboxError::Closed) => debug!(host_id = %host, "host actor stopped"),
                }
                return;
            }
            Sent::Closed(m) => {
                srt.remove(host);
                msg = m;
            }
            Sent::NoActor(m) => {
                msg = m;
                match core.store.get_host(host).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let Inbound { ticket, .. } = msg;
                        m::rejected(Reject::UnknownHost.reason());
                        log.warn(|| warn!(shard = %srt.shard, host_id = %host, "message for an unknown host rejected"));
                        return ticket.ack().await;
                    }
                    Err(e) => {
                        warn!(host_id = %host, error = %e, "cannot look the host up; message put back");
                        return msg.ticket.requeue_after(core.config.requeue_delay).await;
                    }
                }
                srt.actor(core, host);
            }
        }
    }
    // Dropping the message requeues its delivery.
    warn!(host_id = %host, "host actor unavailable; message put back");
}

enum Sent {
    Queued,
    Full(Inbound, Addr<HostActor>),
    Closed(Inbound),
    NoActor(Inbound),
}

async fn reject(shard: Shard, d: Delivery, r: Reject, log: &mut LogLimit) {
    m::rejected(r.reason());
    log.warn(|| {
        warn!(
            %shard,
            reason = r.reason(),
            routing_key = %d.routing_key.chars().take(120).collect::<String>(),
            user_id = ?d.user_id.as_deref().map(|u| u.chars().take(64).collect::<String>()),
            error = %r,
            "message rejected"
        )
    });
    if let Err(e) = d.ack().await {
        debug!(error = %e, "ack of a rejected message not sent");
    }
}

/// Sends [`Recheck`] to the actor of every host of the shard the store has pending changes for
/// (starting the actors that do not run).
async fn recheck_pending(core: Arc<Core>, srt: Arc<ShardRt>) {
    if core.ownership.epoch(srt.shard).is_none() {
        return;
    }
    let listed_at_ms = now_ms();
    match core.store.hosts_with_pending_changes(srt.shard.0).await {
        Ok(hosts) => {
            for host in hosts {
                if srt.stop.is_cancelled() {
                    return;
                }
                // Waits for room in the mailbox rather than dropping the recheck.
                let _ = srt.actor(&core, host).send(Recheck { listed_at_ms }).await;
            }
        }
        Err(e) => warn!(shard = %srt.shard, error = %e, "cannot list the shard's pending changes"),
    }
}

fn sweep_once(core: &Core, srt: &ShardRt) {
    if core.ownership.epoch(srt.shard).is_none() {
        return;
    }
    let now = now_ms();
    for slot in srt.hosts().values() {
        if slot.due.load(Ordering::Relaxed) <= now && slot.addr.try_send(Tick).is_ok() {
            // The actor sets its next deadline when it has handled the tick.
            slot.due.store(NEVER, Ordering::Relaxed);
        }
    }
}

async fn stop_actors(core: &Core, srt: &ShardRt) {
    let slots: Vec<(HostId, Slot)> = srt.hosts().drain().collect();
    let timeout = core.config.actor_call_timeout;
    let waits = slots.into_iter().map(|(host, slot)| {
        let req = slot.addr.send(Shutdown).timeout(timeout);
        drop(slot);
        async move {
            if let Err(e) = req.await {
                debug!(host_id = %host, error = %e, "host actor did not confirm its stop");
            }
        }
    });
    futures_util::future::join_all(waits).await;
}

/// Bounds the warnings about refused input: a flood of garbage is counted in full but logged
/// at most [`LogLimit::PER_SECOND`] times a second per shard.
#[derive(Default)]
struct LogLimit {
    window: Option<Instant>,
    count: u32,
}

impl LogLimit {
    const PER_SECOND: u32 = 10;

    fn warn(&mut self, log: impl FnOnce()) {
        let now = Instant::now();
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        if self.count <= Self::PER_SECOND {
            log();
        }
    }
}
