//! The [`Orchestrator`]: the actix system, the owned shards, and the [`HostOps`] the API calls.
//!
//! ```text
//!  caller's tokio runtime                               actix thread(s)
//!  ─────────────────────                                ───────────────
//!  ownership.changes ─► reconcile ─► shard task (one per owned shard)
//!                                     │ consume <p>.shard.<n>, validate
//!                                     └─ try_send(Inbound) ───────────► HostActor (Supervisor)
//!                                                                          │ one message at a time
//!  HostState work (store, publish, ack) ◄── spawned on the tokio runtime ──┘
//!  submit: append_change ─► publish kick on <p>.up ─► (shard task) ─► actor dispatches
//!          └─ waits on a oneshot the actor completes when the change is final
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Addr, MailboxError};
use actix_rt::{Arbiter, ArbiterHandle, System};
use async_trait::async_trait;
use chrono::Utc;
use comodit_bus::{Bus, OutMessage};
use comodit_protocol::{
    Body, Command, CommandId, HostId, Kick, Names, Shard, Up, UpKey, UpKind, V1,
};
use comodit_store::{Change, ChangeId, ChangeStatus, Store, StoreError};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::host::{status_name, Cancel, HostActor, LocalKick, Presence, Shutdown};
use crate::metrics as m;
use crate::ownership::Ownership;
use crate::pending::Timing;
use crate::shard::{self, ShardRt};
use crate::{ActorsConfig, HostOps, NodeEvent, OpsError, SubmitOptions, Submitted};

/// Capacity of the event broadcast: a reader that falls this far behind misses events.
const EVENTS_CAPACITY: usize = 4096;

/// What every part of the runtime shares.
pub(crate) struct Core {
    pub config: ActorsConfig,
    pub store: Arc<dyn Store>,
    pub bus: Bus,
    /// Where kicks are published ([`Buses`]).
    pub kick_bus: Bus,
    pub names: Names,
    pub down_exchange: String,
    pub ownership: Arc<dyn Ownership>,
    pub n_shards: u32,
    pub timing: Timing,
    /// The re-send timeout, adapted to the round trips ([`crate::rto`]).
    pub round_trips: crate::rto::RoundTrips,
    /// The caller's runtime, where all IO runs.
    pub rt: Handle,
    /// Bounds the host actors' work in flight ([`ActorsConfig::max_concurrent_tasks`]).
    pub work: Semaphore,
    /// The same bound for work on messages from the shard queues (replies, hellos): a lane of
    /// their own, so that an answer is recorded while thousands of new changes wait to be sent
    /// (a job releases every host at once), instead of waiting behind them in one queue.
    pub inbound_work: Semaphore,
    events: broadcast::Sender<NodeEvent>,
    /// `submit` calls waiting for a change to become final.
    waiters: Mutex<HashMap<ChangeId, oneshot::Sender<Change>>>,
    shards: Mutex<HashMap<Shard, Arc<ShardRt>>>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    actors: AtomicUsize,
    stopping: CancellationToken,
}

impl Core {
    /// The timing of the moment: the configured one, with the re-send timeout the round trips
    /// call for ([`crate::rto`]).
    pub fn timing_now(&self) -> Timing {
        Timing {
            command_timeout_ms: self.round_trips.timeout_ms(),
            ..self.timing
        }
    }

    pub fn emit(&self, event: NodeEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    pub fn complete(&self, change: &Change) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&change.id);
        if let Some(tx) = waiter {
            let _ = tx.send(change.clone());
        }
    }

    pub fn next_arbiter(&self) -> ArbiterHandle {
        let i = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        self.arbiters[i].clone()
    }

    pub fn actor_started(&self) {
        self.actors.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::HOST_ACTORS).increment(1.0);
    }

    pub fn actor_stopped(&self) {
        self.actors.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::HOST_ACTORS).decrement(1.0);
    }

    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// A connection event for a host whose actor runs here (others are ignored).
    pub fn presence(&self, host: HostId, msg: Presence) {
        if let Some(srt) = self.shard(host.shard(self.n_shards)) {
            if !srt.try_send(host, msg) {
                debug!(host_id = %host, "connection event not delivered (no actor or mailbox full)");
            }
        }
    }

    fn shard(&self, shard: Shard) -> Option<Arc<ShardRt>> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .cloned()
    }

    /// Starts the shards this node owns now and stops the others.
    fn reconcile(self: &Arc<Self>) {
        let owned: HashSet<Shard> = self
            .ownership
            .owned()
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| s.0 < self.n_shards)
            .collect();
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let lost: Vec<Shard> = shards
            .keys()
            .filter(|s| !owned.contains(s))
            .copied()
            .collect();
        for s in lost {
            if let Some(srt) = shards.remove(&s) {
                info!(shard = %s, "shard no longer owned, stopping it");
                srt.stop.cancel();
            }
        }
        if self.stopping.is_cancelled() {
            return;
        }
        for s in owned {
            if shards.contains_key(&s) {
                continue;
            }
            let srt = Arc::new(ShardRt::new(s));
            let task = self.rt.spawn(shard::run(self.clone(), srt.clone()));
            *srt.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            shards.insert(s, srt);
        }
    }
}

/// The node's actor runtime. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    core: Arc<Core>,
    control: Arc<tokio::sync::Mutex<Option<Control>>>,
}

/// What `stop` tears down.
struct Control {
    watcher: tokio::task::JoinHandle<()>,
    system: System,
    thread: std::thread::JoinHandle<()>,
}

/// The broker connections of the runtime: `bus` for everything but kicks, `kicks` for those.
/// Kicks are messages in quorum shard queues, confirmed only once on disk; in a failover they come
/// by the hundred and their confirms took seconds, and on a shared connection they held the
/// publish slots (and the broker's flow control held the connection) that commands to the hosts
/// waited for. A node gives them a connection of their own; `From<Bus>` shares one.
#[derive(Clone)]
pub struct Buses {
    pub bus: Bus,
    pub kicks: Bus,
}

impl From<Bus> for Buses {
    fn from(bus: Bus) -> Buses {
        Buses {
            kicks: bus.clone(),
            bus,
        }
    }
}

impl Orchestrator {
    /// Starts the actix system and a shard task per owned shard, and follows ownership changes.
    /// The caller declares the broker topology (`comodit_bus::topology::declare_core`). Must be
    /// called on a tokio multi-thread runtime; everything but the actors runs there. Cancelling
    /// `shutdown` stops it like [`Orchestrator::stop`].
    pub async fn start(
        config: ActorsConfig,
        store: Arc<dyn Store>,
        buses: impl Into<Buses>,
        names: Names,
        ownership: Arc<dyn Ownership>,
        shutdown: CancellationToken,
    ) -> Result<Orchestrator, OpsError> {
        if shutdown.is_cancelled() {
            return Err(OpsError::ShuttingDown);
        }
        let n_shards = ownership.n_shards();
        let (system, arbiters, thread) = start_actix(config.arbiters.max(1))
            .map_err(|e| OpsError::Bus(format!("cannot start the actor threads: {e}")))?;
        let timing = Timing {
            command_timeout_ms: millis(config.command_timeout),
            max_retries: config.max_retries,
            publish_retry_ms: millis(config.publish_retry),
            record_delay_ms: millis(config.dispatch_record_delay),
        };
        let Buses { bus, kicks } = buses.into();
        let core = Arc::new(Core {
            work: Semaphore::new(config.max_concurrent_tasks.max(1)),
            inbound_work: Semaphore::new(config.max_concurrent_tasks.max(1)),
            config,
            store,
            down_exchange: names.down_exchange(),
            bus,
            kick_bus: kicks,
            names,
            ownership,
            n_shards,
            round_trips: crate::rto::RoundTrips::new(timing.command_timeout_ms),
            timing,
            rt: Handle::current(),
            events: broadcast::channel(EVENTS_CAPACITY).0,
            waiters: Mutex::new(HashMap::new()),
            shards: Mutex::new(HashMap::new()),
            arbiters,
            next_arbiter: AtomicUsize::new(0),
            actors: AtomicUsize::new(0),
            stopping: CancellationToken::new(),
        });
        core.reconcile();
        if core.config.connection_events {
            tokio::spawn(crate::presence::run(core.clone()));
        }
        let orchestrator = Orchestrator {
            core: core.clone(),
            control: Arc::new(tokio::sync::Mutex::new(None)),
        };
        let watcher = tokio::spawn(watch_ownership(orchestrator.clone(), shutdown));
        *orchestrator.control.lock().await = Some(Control {
            watcher,
            system,
            thread,
        });
        info!(n_shards, "actor runtime started");
        Ok(orchestrator)
    }

    /// Stops consuming, lets every host actor finish what it holds, stops the actors and the
    /// actix threads. Idempotent; concurrent calls wait for the first.
    pub async fn stop(&self) {
        let mut control = self.control.lock().await;
        let Some(c) = control.take() else {
            return;
        };
        self.core.stopping.cancel();
        c.watcher.abort();
        let shards: Vec<Arc<ShardRt>> = self
            .core
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        let mut tasks = Vec::new();
        for srt in shards {
            srt.stop.cancel();
            if let Some(t) = srt.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                tasks.push(t);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        c.system.stop();
        let _ = tokio::task::spawn_blocking(move || c.thread.join()).await;
        info!("actor runtime stopped");
    }

    /// The sender side of the node's event stream, for other node services (enrollment) to
    /// publish on the same stream the API's SSE reads.
    pub fn event_sender(&self) -> broadcast::Sender<NodeEvent> {
        self.core.events.clone()
    }

    /// For metrics and tests: how many host actors are alive.
    pub fn host_actor_count(&self) -> usize {
        self.core.actors.load(Ordering::Relaxed)
    }

    fn running(&self) -> Result<&Arc<Core>, OpsError> {
        if self.core.stopping.is_cancelled() {
            Err(OpsError::ShuttingDown)
        } else {
            Ok(&self.core)
        }
    }

    /// The host's shard, if this node acts for it now.
    fn owned_shard(&self, host: HostId) -> Result<Arc<ShardRt>, OpsError> {
        let core = self.running()?;
        let shard = host.shard(core.n_shards);
        core.ownership
            .epoch(shard)
            .and_then(|_| core.shard(shard))
            .ok_or(OpsError::NotOwner(host))
    }

    /// Starts (or finds) the host's actor; for calls from the API, after checking the host.
    fn actor(&self, host: HostId) -> Result<Addr<HostActor>, OpsError> {
        let srt = self.owned_shard(host)?;
        Ok(srt.actor(&self.core, host))
    }

    /// `cancel` on a node that does not own the host: ask the owner, then watch the change.
    async fn cancel_through_owner(
        &self,
        core: &Arc<Core>,
        host: HostId,
        change: ChangeId,
    ) -> Result<Change, OpsError> {
        let Some(before) = core.store.get_change(host, change).await? else {
            return Err(OpsError::Store(StoreError::NotFound(format!(
                "change {change} of host {host}"
            ))));
        };
        if !before.status.is_pending() || before.status == ChangeStatus::Dispatched {
            return Err(OpsError::Store(StoreError::Conflict(format!(
                "change {change} is {} already",
                serde_json::to_value(before.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ))));
        }
        self.kick_with(host, Some(change)).await;
        let deadline = tokio::time::Instant::now() + core.config.actor_call_timeout;
        loop {
            let now = core.store.get_change(host, change).await?;
            match now {
                Some(c) if c.status == ChangeStatus::Cancelled => return Ok(c),
                Some(c) if c.status != ChangeStatus::Queued => {
                    return Err(OpsError::Store(StoreError::Conflict(format!(
                        "change {change} was already sent to the host"
                    ))))
                }
                None => {
                    return Err(OpsError::Store(StoreError::NotFound(format!(
                        "change {change} of host {host}"
                    ))))
                }
                Some(_) if tokio::time::Instant::now() >= deadline => {
                    // The owner has not acted yet (a shard moving?): the kick waits for it.
                    return Err(OpsError::Timeout);
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn kick(&self, host: HostId) {
        self.kick_with(host, None).await
    }

    /// Tells the host's owner to look at the store: the owner's own actor directly (`local`: this
    /// node owns the shard) — no broker round trip; a kick is a persistent message in a quorum
    /// shard queue, as costly to the broker as the command itself (ARCHITECTURE §15) — otherwise,
    /// or when the actor is not there, a kick.
    async fn tell_owner(&self, host: HostId, local: bool) {
        if local {
            if let Ok(addr) = self.actor(host) {
                return addr.do_send(LocalKick);
            }
        }
        self.kick(host).await
    }

    /// A kick through the host's own stream; `cancel`: the owner also cancels that change.
    async fn kick_with(&self, host: HostId, cancel: Option<ChangeId>) {
        let core = &self.core;
        let body = Up::Kick(Kick {
            v: V1,
            host,
            cancel: cancel.map(|c| c.0),
        })
        .encode();
        let mut msg = OutMessage::json(UpKind::Kick.as_str(), body);
        msg.user_id = Some(core.config.node_user.clone());
        let key = UpKey::new(host, core.n_shards, UpKind::Kick).to_string();
        let published = tokio::time::timeout(
            core.config.actor_call_timeout,
            core.kick_bus.publish(&core.names.up_exchange(), &key, msg),
        )
        .await;
        match published {
            Ok(Ok(())) => {}
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                // The change is in the store; tell the actor directly instead.
                warn!(host_id = %host, error = %why, "kick not published, kicking the actor locally");
                if let Ok(addr) = self.actor(host) {
                    addr.do_send(LocalKick);
                }
            }
        }
    }
}

/// How often a non-owner reads a change it submitted, waiting for the owner to finish it.
const REMOTE_POLL: Duration = Duration::from_millis(20);

/// Waits up to `wait` for another node's actor to finish `change`, reading it from the store (the
/// in-process waiters only see this node's actors).
async fn poll_outcome(core: &Core, change: Change, wait: Duration) -> Result<Submitted, OpsError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = change;
    loop {
        if let Some(now) = core.store.get_change(last.host, last.id).await? {
            last = now;
        }
        if !last.status.is_pending() {
            return Ok(Submitted::Completed(last));
        }
        if tokio::time::Instant::now() >= deadline || core.stopping.is_cancelled() {
            return Ok(Submitted::Pending(last));
        }
        tokio::time::sleep(REMOTE_POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

async fn watch_ownership(orchestrator: Orchestrator, shutdown: CancellationToken) {
    let core = orchestrator.core.clone();
    let mut changes = core.ownership.changes();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // `stop` aborts this task: run it on its own.
                let o = orchestrator.clone();
                tokio::spawn(async move { o.stop().await });
                return;
            }
            _ = core.stopping.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    // The ownership source is gone: keep what we have until shutdown.
                    shutdown.cancelled().await;
                    continue;
                }
                core.reconcile();
            }
        }
    }
}

#[async_trait]
impl HostOps for Orchestrator {
    async fn submit(
        &self,
        host: HostId,
        body: Body,
        opts: SubmitOptions,
    ) -> Result<Submitted, OpsError> {
        let core = self.running()?.clone();
        if core.store.get_host(host).await?.is_none() {
            return Err(OpsError::UnknownHost(host));
        }
        let shard = host.shard(core.n_shards);
        // The owner acts with its own epoch; another node submits with the epoch of the shard's
        // current assignment and lets the owner's actor pick the change up from its kick.
        let (epoch, local) = match core.ownership.epoch(shard) {
            Some(e) => (e, true),
            None => (
                core.ownership
                    .table_epoch(shard)
                    .ok_or(OpsError::NotOwner(host))?,
                false,
            ),
        };
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(opts.ttl)
            .map_err(|_| StoreError::Invalid(format!("ttl too large: {:?}", opts.ttl)))?;
        let command_id = CommandId::random();
        // The limits a command must meet, checked before anything is recorded.
        let cmd = Command {
            v: V1,
            id: command_id,
            host,
            epoch,
            issued_at: now,
            expires_at: now + ttl,
            body,
        };
        cmd.validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let body = cmd.body;
        let request = serde_json::to_value(&body)
            .map_err(|e| StoreError::Invalid(format!("request: {e}")))?;
        let id = opts.change_id.unwrap_or_else(ChangeId::random);
        let appended = core
            .store
            .append_change(&Change {
                id,
                host,
                seq: 0,
                request,
                status: ChangeStatus::Queued,
                command_id,
                epoch,
                requested_by: opts.requested_by.clone(),
                created_at: now,
                updated_at: now,
                expires_at: now + ttl,
                reply: None,
                job: opts.job,
            })
            .await;
        let change = match appended {
            Ok(c) => c,
            // Asked again under the same id (a retried request): the first change is the answer.
            Err(StoreError::Conflict(_)) if opts.change_id.is_some() => {
                let Some(first) = core.store.get_change(host, id).await? else {
                    return Err(StoreError::Conflict(format!("change {id} of host {host}")).into());
                };
                info!(host_id = %host, change = %id, status = status_name(first.status), "change asked for again: answering with the first");
                metrics::counter!(m::SUBMITS_JOINED).increment(1);
                if !first.status.is_pending() {
                    return Ok(Submitted::Completed(first));
                }
                // The node that recorded it may have died before it told the owner (the retry is
                // often why we are here): tell the owner again; a kick for work it already has is
                // a no-op.
                self.tell_owner(host, local).await;
                return match opts.wait {
                    None => Ok(Submitted::Pending(first)),
                    Some(wait) => poll_outcome(&core, first, wait).await,
                };
            }
            Err(e) => return Err(e.into()),
        };
        info!(host_id = %host, change = %change.id, seq = change.seq, command_id = %command_id, op = body.op(), "change queued");
        core.emit(NodeEvent::Change {
            host,
            change: change.id,
            seq: change.seq,
            status: change.status,
        });
        if !local {
            debug!(host_id = %host, shard = shard.0, epoch = epoch.0, change = %change.id, "submitted for another node's shard");
            self.tell_owner(host, false).await;
            return match opts.wait {
                None => Ok(Submitted::Pending(change)),
                Some(wait) => poll_outcome(&core, change, wait).await,
            };
        }
        let waiter = opts.wait.map(|wait| {
            let (tx, rx) = oneshot::channel();
            core.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(change.id, tx);
            (wait, rx)
        });
        self.tell_owner(host, true).await;
        let Some((wait, rx)) = waiter else {
            return Ok(Submitted::Pending(change));
        };
        if let Ok(Ok(done)) = tokio::time::timeout(wait, rx).await {
            return Ok(Submitted::Completed(done));
        }
        core.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&change.id);
        // It may have finished between the timeout and the removal.
        let now = core
            .store
            .get_change(host, change.id)
            .await?
            .unwrap_or(change);
        Ok(if now.status.is_pending() {
            Submitted::Pending(now)
        } else {
            Submitted::Completed(now)
        })
    }

    async fn cancel(&self, host: HostId, change: ChangeId) -> Result<Change, OpsError> {
        let core = self.running()?.clone();
        if core.store.get_host(host).await?.is_none() {
            return Err(OpsError::UnknownHost(host));
        }
        // Through the actor, so a cancel never races a dispatch; on a node that does not own the
        // host, through the owner's actor: a kick naming the change, then the store tells.
        let addr = match self.actor(host) {
            Ok(addr) => addr,
            Err(OpsError::NotOwner(_)) => {
                return self.cancel_through_owner(&core, host, change).await
            }
            Err(e) => return Err(e),
        };
        match addr
            .send(Cancel(change))
            .timeout(core.config.actor_call_timeout)
            .await
        {
            Ok(r) => r,
            Err(MailboxError::Timeout) => Err(OpsError::Timeout),
            Err(MailboxError::Closed) => Err(OpsError::ShuttingDown),
        }
    }

    fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.core.events.subscribe()
    }

    async fn forget(&self, host: HostId) {
        let Some(srt) = self.core.shard(host.shard(self.core.n_shards)) else {
            return;
        };
        if let Some(addr) = srt.remove(host) {
            let req = addr
                .send(Shutdown)
                .timeout(self.core.config.actor_call_timeout);
            drop(addr);
            if let Err(e) = req.await {
                debug!(host_id = %host, error = %e, "host actor did not confirm its stop");
            }
            info!(host_id = %host, "host actor forgotten");
        }
    }
}

/// One `System` on its own thread, with `n` arbiters (threads) for the host actors.
fn start_actix(
    n: usize,
) -> std::io::Result<(System, Vec<ArbiterHandle>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("comodit-actix".into())
        .spawn(move || {
            let runner = actix_rt::System::new();
            let arbiters: std::io::Result<Vec<Arbiter>> =
                (0..n).map(|_| Arbiter::try_new()).collect();
            let arbiters = match arbiters {
                Ok(a) => a,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let handles = arbiters.iter().map(|a| a.handle()).collect();
            if tx.send(Ok((System::current(), handles))).is_err() {
                return;
            }
            let _ = runner.run();
            for a in arbiters {
                a.stop();
                let _ = a.join();
            }
        })?;
    let (system, handles) = rx
        .recv()
        .map_err(|_| std::io::Error::other("actix thread ended before starting"))??;
    Ok((system, handles, thread))
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
