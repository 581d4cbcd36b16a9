//! One host's actor: the sequencer of everything that happens to the host on this node.
//!
//! The actix actor ([`HostActor`]) only keeps order: each message is handled with an
//! [`AtomicResponse`], so the next one starts after the previous one is done. The work itself —
//! store writes, publishes, acks — is [`HostState`]'s async code, moved onto the bus and store
//! runtime (tokio) for the time of one message and moved back into the actor afterwards. actix
//! threads never touch lapin or the store.
//!
//! What the actor keeps in memory is deliberately small (DESIGN §8, ≤ 2 KiB per idle host): ids,
//! online/last-seen, and the pending changes' ids with their deadlines ([`PendingList`]). Facts,
//! drift and requests live in the store and are read when needed.
//!
//! Errors: a store error leaves the delivery unacked (requeued after a short delay, never lost);
//! a backend error, whose outcome is unknown, also stops the actor, and its [`Supervisor`] restarts
//! it from the store. A fenced write refused with a higher epoch ([`StoreError::StaleEpoch`])
//! stops the actor from acting for the host until its shard epoch passes the stored one.
//!
//! [`Supervisor`]: actix::Supervisor

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, TimeZone, Utc};
use comodit_bus::OutMessage;
use comodit_protocol::{
    Body, Command, DriftReport, Epoch, HostId, Reply, Shard, Status, Up, UpKind, V1,
};
use comodit_store::{Change, ChangeId, ChangeStatus, HostRuntime, StoreError};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::metrics as m;
use crate::pending::{Due, PendingList};
use crate::runtime::Core;
use crate::ticket::Ticket;
use crate::{NodeEvent, OpsError};

/// Most drift entries kept per host (one per monitored resource; a command holds at most this
/// many resources).
const MAX_DRIFT_ENTRIES: usize = comodit_protocol::limits::MAX_RESOURCES_PER_COMMAND;

// --- messages ----------------------------------------------------------------------------------

/// A validated upward message and the delivery to settle once its effect is durable.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Inbound {
    pub up: Up,
    pub ticket: Ticket,
}

/// Something may be due (sent by the shard's sweep when the actor's deadline passed).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Tick;

/// Look at the store for new work (when a `kick` could not be published).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct LocalKick;

/// The store says this host has pending changes (the shard's periodic recheck), as of
/// `listed_at_ms`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Recheck {
    pub listed_at_ms: i64,
}

#[derive(Message)]
#[rtype(result = "Result<Change, OpsError>")]
pub(crate) struct Cancel(pub ChangeId);

/// The broker saw one of the host's connections open or close ([`crate::presence`]).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Presence {
    pub up: bool,
}

/// Finish what the mailbox holds before this, then stop for good.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Shutdown;

// --- the actor ---------------------------------------------------------------------------------

pub(crate) struct HostActor {
    /// `None` only while a message is being handled on the tokio runtime.
    state: Option<HostState>,
    core: Arc<Core>,
    host: HostId,
    /// Shared with the shard's sweep (kept here to rebuild the state after a lost task).
    due: Arc<AtomicI64>,
    /// Told to stop (shutdown, forget, shard lost): a supervisor restart must not bring it back.
    retired: bool,
}

/// What a handler tells the actor to do afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// The outcome of a store call is unknown: restart from the store.
    Restart,
}

/// The answer a handler gives when its task died (a panic: the state is lost, the actor restarts).
pub(crate) trait Lost {
    fn lost() -> Self;
}

impl Lost for () {
    fn lost() -> Self {}
}

impl Lost for Result<Change, OpsError> {
    fn lost() -> Self {
        Err(OpsError::Timeout)
    }
}

/// Which bound a host actor's work waits on ([`Core::work`], [`Core::inbound_work`]).
#[derive(Clone, Copy)]
enum Lane {
    /// Its own work: loading, sending changes, timers, API calls.
    Own,
    /// A message from the shard queue (already bounded by the queues' prefetch).
    Inbound,
}

impl HostActor {
    pub(crate) fn new(core: Arc<Core>, host: HostId, due: Arc<AtomicI64>) -> HostActor {
        core.actor_started();
        HostActor {
            state: Some(HostState::new(core.clone(), host, due.clone())),
            core,
            host,
            due,
            retired: false,
        }
    }

    /// Runs `f` on the state, on the tokio runtime, with the mailbox held until it is done.
    fn run<R, F, Fut>(&mut self, f: F) -> AtomicResponse<Self, R>
    where
        R: Lost + Send + 'static,
        F: FnOnce(HostState) -> Fut + Send + 'static,
        Fut: Future<Output = (HostState, R, Flow)> + Send + 'static,
    {
        AtomicResponse::new(self.task(Lane::Own, f))
    }

    /// `f` on the state as an actor future that puts the state back when done, once a slot of
    /// `lane` is free.
    fn task<R, F, Fut>(&mut self, lane: Lane, f: F) -> ResponseActFuture<Self, R>
    where
        R: Lost + Send + 'static,
        F: FnOnce(HostState) -> Fut + Send + 'static,
        Fut: Future<Output = (HostState, R, Flow)> + Send + 'static,
    {
        let Some(state) = self.state.take() else {
            // Cannot happen: atomic responses never overlap.
            error!(host_id = %self.host, "host actor state missing");
            return Box::pin(actix::fut::ready(R::lost()));
        };
        let span = info_span!(
            "host",
            host_id = %self.host,
            shard = %state.shard,
            epoch = tracing::field::Empty
        );
        let core = self.core.clone();
        let task = self.core.rt.spawn(
            async move {
                // Wait for a slot holding only this small future; the work's own future (a few
                // KiB) exists only while it runs.
                let slots = match lane {
                    Lane::Own => &core.work,
                    Lane::Inbound => &core.inbound_work,
                };
                let _slot = slots.acquire().await;
                Box::pin(f(state)).await
            }
            .instrument(span),
        );
        Box::pin(task.into_actor(self).map(|done, act, ctx| match done {
            Ok((state, r, flow)) => {
                state.publish_due();
                act.state = Some(state);
                if flow == Flow::Restart {
                    ctx.stop();
                }
                r
            }
            Err(e) => {
                act.state = Some(HostState::new(act.core.clone(), act.host, act.due.clone()));
                if e.is_cancelled() {
                    // The runtime is shutting down: nothing to restart on.
                    act.retired = true;
                } else {
                    error!(host_id = %act.host, error = %e, "host task failed, restarting");
                }
                ctx.stop();
                R::lost()
            }
        }))
    }
}

impl Drop for HostActor {
    fn drop(&mut self) {
        self.core.actor_stopped();
    }
}

impl Actor for HostActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.core.config.mailbox);
        if self.retired {
            return;
        }
        // Load before the first message (`wait` holds the mailbox); dispatch what is queued.
        let load = self.task(Lane::Own, move |mut s| async move {
            let flow = s.start().await;
            (s, (), flow)
        });
        ctx.wait(load);
    }
}

impl Supervised for HostActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        info!(host_id = %self.host, "host actor restarting from the store");
        if let Some(s) = self.state.as_mut() {
            s.reset();
        }
    }
}

impl Handler<Inbound> for HostActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Inbound, _: &mut Context<Self>) -> Self::Result {
        if self.retired {
            // Dropping the ticket puts the message back for whoever handles the host next.
            drop(msg);
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        AtomicResponse::new(self.task(Lane::Inbound, move |mut s| async move {
            let flow = s.on_inbound(msg).await;
            (s, (), flow)
        }))
    }
}

impl Handler<Tick> for HostActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Tick, _: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        self.run(move |mut s| async move {
            let flow = s.on_tick().await;
            (s, (), flow)
        })
    }
}

impl Handler<LocalKick> for HostActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: LocalKick, _: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        self.run(move |mut s| async move {
            let flow = s.on_kick().await.err().map_or(Flow::Continue, |f| f.flow());
            (s, (), flow)
        })
    }
}

impl Handler<Recheck> for HostActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Recheck, _: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        self.run(move |mut s| async move {
            let flow = if !missed_kick(
                s.loaded,
                !s.pending.is_empty(),
                s.caught_up_ms,
                msg.listed_at_ms,
            ) {
                Flow::Continue
            } else {
                metrics::counter!(m::RECHECKS).increment(1);
                s.on_kick().await.err().map_or(Flow::Continue, |f| f.flow())
            };
            (s, (), flow)
        })
    }
}

impl Handler<Cancel> for HostActor {
    type Result = AtomicResponse<Self, Result<Change, OpsError>>;

    fn handle(&mut self, msg: Cancel, _: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(OpsError::ShuttingDown))));
        }
        self.run(move |mut s| async move {
            let (r, flow) = s.on_cancel(msg.0).await;
            (s, r, flow)
        })
    }
}

impl Handler<Presence> for HostActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Presence, _: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        self.run(move |mut s| async move {
            let flow = s.on_presence(msg.up).await;
            (s, (), flow)
        })
    }
}

impl Handler<Shutdown> for HostActor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.retired = true;
        ctx.stop();
    }
}

// --- the state and its work --------------------------------------------------------------------

/// Why a step stopped.
#[derive(Debug)]
pub(crate) enum Fail {
    /// This node has no valid lease on the host's shard now.
    NoLease,
    /// The store holds a higher epoch: another node acts for the host.
    Fenced,
    Store(StoreError),
}

impl Fail {
    pub(crate) fn flow(&self) -> Flow {
        match self {
            Fail::Store(StoreError::Backend(_)) => Flow::Restart,
            _ => Flow::Continue,
        }
    }

    fn into_ops(self, host: HostId) -> OpsError {
        match self {
            Fail::NoLease | Fail::Fenced => OpsError::NotOwner(host),
            Fail::Store(e) => OpsError::Store(e),
        }
    }
}

/// A host as its actor knows it between messages.
pub(crate) struct HostState {
    core: Arc<Core>,
    host: HostId,
    shard: Shard,
    /// The next deadline (ms) for the shard's sweep; [`NEVER`] when nothing is due.
    due: Arc<AtomicI64>,
    loaded: bool,
    online: bool,
    /// Last message from the agent (ms), or when the actor loaded an online host: the silence
    /// clock. A node restart gives every online host a full silence window.
    heard_ms: i64,
    /// Last write of the runtime record (ms), to space out heartbeat writes.
    written_ms: i64,
    /// Open broker connections of the host as far as this actor heard ([`crate::presence`]).
    conns: i16,
    /// The store refused our epoch with this one: act only once ours is higher.
    fenced_at: Option<Epoch>,
    pending: PendingList,
    /// When this actor last read its pending log (the time before the read) or finished a
    /// change: a recheck listed before then is not a missed kick's sign ([`Recheck`]).
    caught_up_ms: i64,
}

impl HostState {
    fn new(core: Arc<Core>, host: HostId, due: Arc<AtomicI64>) -> HostState {
        let shard = host.shard(core.n_shards);
        HostState {
            core,
            host,
            shard,
            due,
            loaded: false,
            online: false,
            heard_ms: 0,
            written_ms: 0,
            conns: 0,
            fenced_at: None,
            pending: PendingList::default(),
            caught_up_ms: 0,
        }
    }

    /// Forget everything but who the host is: the next message reloads from the store.
    fn reset(&mut self) {
        self.loaded = false;
        self.online = false;
        self.conns = 0;
        self.fenced_at = None;
        self.pending = PendingList::default();
        self.caught_up_ms = 0;
    }

    fn publish_due(&self) {
        self.due.store(self.next_due(), Ordering::Relaxed);
    }

    fn next_due(&self) -> i64 {
        if !self.loaded {
            // Try the load again soon.
            return now_ms().saturating_add(ms(self.core.config.requeue_delay));
        }
        let mut due = self.pending.next_due(self.online, self.core.timing_now());
        if self.online {
            if let Some(silence) = self.core.config.silence_ms() {
                due = due.min(self.heard_ms.saturating_add(silence));
            }
        }
        due
    }

    fn epoch(&self) -> Result<Epoch, Fail> {
        let epoch = self.core.ownership.epoch(self.shard).ok_or(Fail::NoLease)?;
        tracing::Span::current().record("epoch", epoch.0);
        match self.fenced_at {
            Some(stored) if epoch <= stored => Err(Fail::Fenced),
            _ => Ok(epoch),
        }
    }

    /// Classifies a store error, and remembers a fence.
    fn fail(&mut self, e: StoreError) -> Fail {
        metrics::counter!(m::STORE_ERRORS).increment(1);
        match e {
            StoreError::StaleEpoch { given, stored } => {
                metrics::counter!(m::STALE_EPOCH).increment(1);
                warn!(%given, %stored, "the store holds a higher epoch: not acting for this host");
                self.fenced_at = Some(stored);
                Fail::Fenced
            }
            e => {
                warn!(error = %e, "store call failed");
                Fail::Store(e)
            }
        }
    }

    fn check<T>(&mut self, r: Result<T, StoreError>) -> Result<T, Fail> {
        r.map_err(|e| self.fail(e))
    }

    // --- entry points (one per actor message) ---------------------------------------------

    /// Actor start (and supervisor restart): load, then dispatch what is queued. A failed load
    /// is retried by the next message or sweep (never by an immediate restart, which would spin
    /// on a failing store).
    async fn start(&mut self) -> Flow {
        let fetched = match self.load().await {
            Ok(f) => f,
            Err(_) => return Flow::Continue,
        };
        match self.epoch() {
            Ok(epoch) => self.dispatch_due(epoch, &fetched).await,
            Err(_) => Flow::Continue,
        }
    }

    async fn on_inbound(&mut self, msg: Inbound) -> Flow {
        let Inbound { up, ticket } = msg;
        let kind = up.kind();
        let step = async {
            let mut fetched = self.ensure_loaded().await?;
            let epoch = self.epoch()?;
            fetched.extend(self.on_up(up, epoch).await?);
            Ok::<_, Fail>((epoch, fetched))
        }
        .await;
        match step {
            Ok((epoch, fetched)) => {
                ticket.ack().await;
                self.dispatch_due(epoch, &fetched).await
            }
            Err(f) => {
                debug!(kind = kind.as_str(), reason = ?f, "message put back in its queue");
                ticket.requeue_after(self.core.config.requeue_delay).await;
                f.flow()
            }
        }
    }

    async fn on_tick(&mut self) -> Flow {
        let fetched = match self.ensure_loaded().await {
            Ok(f) => f,
            Err(f) => return f.flow(),
        };
        let Ok(epoch) = self.epoch() else {
            return Flow::Continue;
        };
        let now = now_ms();
        if let (true, Some(silence)) = (self.online, self.core.config.silence_ms()) {
            if now.saturating_sub(self.heard_ms) >= silence {
                if let Err(f) = self.write_runtime(epoch, now, false, None, |_| {}).await {
                    return f.flow();
                }
                self.online = false;
                info!(
                    silent_ms = now - self.heard_ms,
                    "host offline after silence"
                );
                self.core.emit(NodeEvent::HostOffline { host: self.host });
            }
        }
        self.dispatch_due(epoch, &fetched).await
    }

    async fn on_presence(&mut self, up: bool) -> Flow {
        if let Err(f) = self.ensure_loaded().await {
            return f.flow();
        }
        if up {
            self.conns = self.conns.saturating_add(1);
            return Flow::Continue;
        }
        self.conns = self.conns.saturating_sub(1);
        debug!(connections = self.conns, "a connection of the host closed");
        if self.conns > 0 || !self.online {
            return Flow::Continue;
        }
        let Ok(epoch) = self.epoch() else {
            return Flow::Continue;
        };
        if let Err(f) = self
            .write_runtime(epoch, now_ms(), false, None, |_| {})
            .await
        {
            return f.flow();
        }
        self.online = false;
        info!("host offline: its broker connection closed");
        self.core.emit(NodeEvent::HostOffline { host: self.host });
        Flow::Continue
    }

    async fn on_kick(&mut self) -> Result<(), Fail> {
        let mut fetched = self.ensure_loaded().await?;
        let epoch = self.epoch()?;
        fetched.extend(self.sync_pending(now_ms()).await?);
        match self.dispatch_due(epoch, &fetched).await {
            Flow::Continue => Ok(()),
            Flow::Restart => Err(Fail::Store(StoreError::Backend("dispatch".into()))),
        }
    }

    async fn on_cancel(&mut self, id: ChangeId) -> (Result<Change, OpsError>, Flow) {
        match self.cancel(id).await {
            Ok(r) => (r, Flow::Continue),
            Err(f) => {
                let flow = f.flow();
                (Err(f.into_ops(self.host)), flow)
            }
        }
    }

    async fn cancel(&mut self, id: ChangeId) -> Result<Result<Change, OpsError>, Fail> {
        self.ensure_loaded().await?;
        let epoch = self.epoch()?;
        self.sync_pending(now_ms()).await?;
        let core = self.core.clone();
        match self.pending.get(id) {
            // Never sent: the agent cannot have it.
            Some(p) if !p.dispatched && p.sends == 0 => {
                let r = core
                    .store
                    .update_change(self.host, id, ChangeStatus::Cancelled, None, epoch)
                    .await;
                let change = self.check(r)?;
                self.pending.remove(id);
                info!(change = %id, "change cancelled");
                self.finished(&change);
                Ok(Ok(change))
            }
            Some(_) => Ok(Err(OpsError::Store(StoreError::Conflict(format!(
                "change {id} was already sent to the host"
            ))))),
            None => match self.check(core.store.get_change(self.host, id).await)? {
                None => Ok(Err(OpsError::Store(StoreError::NotFound(format!(
                    "change {id} of host {}",
                    self.host
                ))))),
                Some(c) => Ok(Err(OpsError::Store(StoreError::Conflict(format!(
                    "change {id} is {} already",
                    status_name(c.status)
                ))))),
            },
        }
    }

    // --- steps ----------------------------------------------------------------------------

    /// Loads if needed; returns the pending changes read (empty if already loaded).
    async fn ensure_loaded(&mut self) -> Result<Vec<Change>, Fail> {
        if self.loaded {
            Ok(Vec::new())
        } else {
            self.load().await
        }
    }

    async fn load(&mut self) -> Result<Vec<Change>, Fail> {
        let core = self.core.clone();
        let runtime = self.check(core.store.get_runtime(self.host).await)?;
        let stored = self.check(core.store.pending_changes(self.host).await)?;
        let now = now_ms();
        self.pending = PendingList::default();
        self.pending.sync(&stored, now);
        match runtime {
            Some(rt) => {
                self.online = rt.online;
                self.heard_ms = if rt.online {
                    now
                } else {
                    rt.last_seen.map_or(0, |t| t.timestamp_millis())
                };
                self.written_ms = rt.updated_at.timestamp_millis();
                if core
                    .ownership
                    .epoch(self.shard)
                    .is_some_and(|e| rt.epoch > e)
                {
                    metrics::counter!(m::STALE_EPOCH).increment(1);
                    warn!(stored = %rt.epoch, "the store holds a higher epoch: not acting for this host");
                    self.fenced_at = Some(rt.epoch);
                }
            }
            None => {
                self.online = false;
                self.heard_ms = 0;
                self.written_ms = 0;
            }
        }
        self.loaded = true;
        debug!(
            online = self.online,
            pending = self.pending.len(),
            "host actor loaded"
        );
        Ok(stored)
    }

    /// Applies one upward message. Returns pending changes it read from the store.
    async fn on_up(&mut self, up: Up, epoch: Epoch) -> Result<Vec<Change>, Fail> {
        let now = now_ms();
        let kind = up.kind();
        let was_online = self.online;
        let online_after = match kind {
            UpKind::Bye => false,
            UpKind::Kick => was_online,
            _ => true,
        };
        if !matches!(kind, UpKind::Bye | UpKind::Kick) {
            self.heard_ms = now;
            // It came over a connection, even if we missed that connection's event.
            self.conns = self.conns.max(1);
        }
        let came_online = online_after && !was_online;
        let mut fetched = Vec::new();
        match up {
            Up::Hello(h) => {
                self.write_runtime(epoch, now, true, Some(now), |rt| {
                    rt.facts = Some(h.facts);
                    rt.desired_digest = Some(h.desired_digest);
                })
                .await?;
                // New work whose kick was lost is found here too.
                fetched = self.sync_pending(now).await?;
            }
            Up::Heartbeat(_) => {
                let every = i64::try_from(self.core.config.last_seen_write_s)
                    .unwrap_or(i64::MAX / 1000)
                    .saturating_mul(1000);
                if came_online || now.saturating_sub(self.written_ms) >= every {
                    self.write_runtime(epoch, now, true, Some(now), |_| {})
                        .await?;
                }
            }
            Up::Reply(r) => {
                if came_online {
                    self.write_runtime(epoch, now, true, Some(now), |_| {})
                        .await?;
                }
                self.on_reply(r, epoch, now).await?;
            }
            Up::Drift(d) => {
                let report = d.report;
                let stored = report.clone();
                self.write_runtime(epoch, now, true, Some(now), move |rt| {
                    upsert_drift(&mut rt.drift, stored)
                })
                .await?;
                self.core.emit(NodeEvent::Drift {
                    host: self.host,
                    report,
                });
            }
            Up::DriftCleared(d) => {
                let r = d.r#ref.clone();
                self.write_runtime(epoch, now, true, Some(now), move |rt| {
                    rt.drift.retain(|x| x.r#ref != r)
                })
                .await?;
                self.core.emit(NodeEvent::DriftCleared {
                    host: self.host,
                    r#ref: d.r#ref,
                });
            }
            Up::Output(o) => {
                if came_online {
                    self.write_runtime(epoch, now, true, Some(now), |_| {})
                        .await?;
                }
                match self.pending.by_command(o.re) {
                    Some(p) => self.core.emit(NodeEvent::Output {
                        host: self.host,
                        change: p.change,
                        seq: o.seq,
                        stream: o.stream,
                        data: o.data,
                    }),
                    None => debug!(command_id = %o.re, "output of an unknown or finished command"),
                }
            }
            Up::Bye(b) => {
                if was_online {
                    self.write_runtime(epoch, now, false, Some(now), |_| {})
                        .await?;
                }
                info!(reason = %b.reason, "agent said bye");
            }
            Up::Kick(k) => {
                fetched = self.sync_pending(now).await?;
                if let Some(change) = k.cancel {
                    // Asked by another node: the answer is in the store, where it watches.
                    match self.cancel(ChangeId(change)).await? {
                        Ok(_) => {}
                        Err(e) => {
                            debug!(change = %change, error = %e, "cancel asked through a kick not done")
                        }
                    }
                }
            }
        }
        if online_after != was_online {
            self.online = online_after;
            if online_after {
                self.pending.host_online(now);
                info!("host online");
                self.core.emit(NodeEvent::HostOnline { host: self.host });
            } else {
                info!("host offline");
                self.core.emit(NodeEvent::HostOffline { host: self.host });
            }
        }
        Ok(fetched)
    }

    async fn on_reply(&mut self, r: Reply, epoch: Epoch, now: i64) -> Result<(), Fail> {
        let found = r.re.and_then(|re| self.pending.by_command(re).cloned());
        let Some(p) = found else {
            metrics::counter!(m::REPLIES, "status" => "unknown").increment(1);
            debug!(command_id = ?r.re, "reply to an unknown or finished command");
            return Ok(());
        };
        let (status, label) = match r.status {
            Status::Ok => (ChangeStatus::Applied, "ok"),
            Status::Failed => (ChangeStatus::Failed, "failed"),
            Status::Rejected => (ChangeStatus::Failed, "rejected"),
            Status::Expired => (ChangeStatus::Expired, "expired"),
        };
        let core = self.core.clone();
        let updated = core
            .store
            .update_change(self.host, p.change, status, Some(r), epoch)
            .await;
        let change = match updated {
            Ok(c) => c,
            // The host's records are gone (deleted meanwhile): nothing to record.
            Err(StoreError::NotFound(_)) => {
                self.pending.remove(p.change);
                return Ok(());
            }
            Err(e) => return Err(self.fail(e)),
        };
        self.pending.remove(p.change);
        metrics::counter!(m::REPLIES, "status" => label).increment(1);
        if let Some(t0) = p.first_sent_ms {
            metrics::histogram!(m::ROUND_TRIP).record((now - t0).max(0) as f64 / 1000.0);
            if p.timed && p.sends == 1 {
                core.round_trips.sample(now - t0);
            }
        }
        info!(change = %p.change, command_id = %p.command, status = status_name(status), "reply recorded");
        self.finished(&change);
        Ok(())
    }

    async fn sync_pending(&mut self, now: i64) -> Result<Vec<Change>, Fail> {
        let core = self.core.clone();
        let stored = self.check(core.store.pending_changes(self.host).await)?;
        self.pending.sync(&stored, now);
        self.caught_up_ms = self.caught_up_ms.max(now);
        Ok(stored)
    }

    /// Expires, sends and re-sends what is due, in log order. Sends stop at the first publish
    /// that fails so the agent never gets a later change before an earlier one; any store error
    /// stops the round (what is left stays due for the next one).
    async fn dispatch_due(&mut self, epoch: Epoch, fetched: &[Change]) -> Flow {
        let now = now_ms();
        let mut sending = true;
        for due in self.pending.due(now, self.online, self.core.timing_now()) {
            let step = match due {
                Due::Expire(id) => self.expire(id, epoch).await,
                Due::Send(id) if sending => self.send(id, epoch, fetched, false, now).await,
                Due::Resend(id) if sending => self.send(id, epoch, fetched, true, now).await,
                Due::Send(_) | Due::Resend(_) => Ok(false),
                Due::Record(id) => self.record_dispatched(id, epoch, now).await,
            };
            match step {
                Ok(sent) => sending &= sent || matches!(due, Due::Expire(_)),
                Err(f) => return f.flow(),
            }
        }
        Flow::Continue
    }

    async fn expire(&mut self, id: ChangeId, epoch: Epoch) -> Result<bool, Fail> {
        let core = self.core.clone();
        let r = core
            .store
            .update_change(self.host, id, ChangeStatus::Expired, None, epoch)
            .await;
        let change = match r {
            Ok(c) => c,
            Err(StoreError::NotFound(_)) => {
                self.pending.remove(id);
                return Ok(true);
            }
            Err(e) => return Err(self.fail(e)),
        };
        self.pending.remove(id);
        metrics::counter!(m::EXPIRED).increment(1);
        info!(change = %id, "change expired");
        self.finished(&change);
        Ok(true)
    }

    /// Publishes the change's command (the same command id every time). Ok(false): the publish
    /// failed and is retried later.
    async fn send(
        &mut self,
        id: ChangeId,
        epoch: Epoch,
        fetched: &[Change],
        resend: bool,
        now: i64,
    ) -> Result<bool, Fail> {
        let core = self.core.clone();
        let change = match fetched.iter().find(|c| c.id == id) {
            Some(c) => c.clone(),
            None => match self.check(core.store.get_change(self.host, id).await)? {
                Some(c) => c,
                None => {
                    self.pending.remove(id);
                    return Ok(true);
                }
            },
        };
        let body: Body = match serde_json::from_value(change.request.clone()) {
            Ok(b) => b,
            Err(e) => {
                error!(change = %id, error = %e, "stored request is not a command body: failing the change");
                let r = core
                    .store
                    .update_change(self.host, id, ChangeStatus::Failed, None, epoch)
                    .await;
                let failed = self.check(r)?;
                self.pending.remove(id);
                self.finished(&failed);
                return Ok(true);
            }
        };
        let cmd = Command {
            v: V1,
            id: change.command_id,
            host: self.host,
            epoch,
            issued_at: at(now),
            expires_at: change.expires_at,
            body,
        };
        let span = info_span!("dispatch", command_id = %cmd.id, %epoch, resend);
        let mut msg = OutMessage::json("command", cmd.encode());
        msg.message_id = cmd.id.to_string();
        // A host whose queue is gone is an error to see, not a silent drop.
        msg.mandatory = true;
        let routing_key = self.host.to_string();
        let publish = core.bus.publish(&core.down_exchange, &routing_key, msg);
        let outcome = tokio::time::timeout(core.config.actor_call_timeout, publish)
            .instrument(span.clone())
            .await;
        let _in_span = span.enter();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "command not published, retrying later");
                self.pending.send_failed(id, now, core.timing);
                return Ok(false);
            }
            Err(_) => {
                warn!("command publish timed out, retrying later");
                self.pending.send_failed(id, now, core.timing);
                return Ok(false);
            }
        }
        metrics::counter!(m::DISPATCHED, "attempt" => if resend { "resend" } else { "first" })
            .increment(1);
        drop(_in_span);
        self.pending.sent(id, now, core.timing);
        debug!(command_id = %change.command_id, resend, "command dispatched");
        Ok(true)
    }

    /// Writes `dispatched` for a change sent `record_delay` ago and still unanswered (one that is
    /// answered sooner goes from `queued` to its final status in one write). Until then the store
    /// says `queued`; a new owner then sends it again, with the same command id, which the
    /// agent's de-duplication answers with its stored reply.
    async fn record_dispatched(
        &mut self,
        id: ChangeId,
        epoch: Epoch,
        now: i64,
    ) -> Result<bool, Fail> {
        let core = self.core.clone();
        let r = core
            .store
            .update_change(self.host, id, ChangeStatus::Dispatched, None, epoch)
            .await;
        match r {
            Ok(c) => {
                self.pending.recorded(id);
                self.core.emit(NodeEvent::Change {
                    host: self.host,
                    change: c.id,
                    seq: c.seq,
                    status: c.status,
                });
                Ok(true)
            }
            // Gone meanwhile (host deleted): nothing left to send or record.
            Err(StoreError::NotFound(_)) => {
                self.pending.remove(id);
                Ok(true)
            }
            Err(e) => {
                let f = self.fail(e);
                self.pending.record_failed(id, now, core.timing);
                Err(f)
            }
        }
    }

    /// Rewrites the runtime record (read, change, write: only this actor writes it).
    async fn write_runtime(
        &mut self,
        epoch: Epoch,
        now: i64,
        online: bool,
        last_seen: Option<i64>,
        f: impl FnOnce(&mut HostRuntime),
    ) -> Result<(), Fail> {
        let core = self.core.clone();
        let current = self.check(core.store.get_runtime(self.host).await)?;
        let mut rt = current.unwrap_or_else(|| HostRuntime {
            host: self.host,
            epoch,
            online: false,
            last_seen: None,
            facts: None,
            desired_digest: None,
            drift: Vec::new(),
            updated_at: at(now),
        });
        f(&mut rt);
        rt.epoch = epoch;
        rt.online = online;
        if let Some(seen) = last_seen {
            rt.last_seen = Some(at(seen));
        }
        rt.updated_at = at(now);
        let r = core.store.put_runtime(&rt).await;
        self.check(r)?;
        self.written_ms = now;
        Ok(())
    }

    /// A change reached a final status (or was dispatched): tell the event stream and the
    /// `submit` waiting for it.
    fn finished(&mut self, change: &Change) {
        self.core.emit(NodeEvent::Change {
            host: self.host,
            change: change.id,
            seq: change.seq,
            status: change.status,
        });
        if !change.status.is_pending() {
            self.caught_up_ms = self.caught_up_ms.max(now_ms());
            self.core.complete(change);
        }
    }
}

/// Whether a recheck (the store listed pending changes for this host at `listed_at_ms`) means the
/// actor missed a kick and must read its log. Not when it tracks pending work (it reads its log
/// again on the next kick), nor when the listing is older than its last read of its log or its
/// last finished change (`caught_up_ms`): then the store listed work this actor has done since —
/// a wave's replies keep coming while a shard sends its rechecks, which cost 17,452 needless log
/// reads in one 50,000-host wave (2026-11-29). A missed kick behind such a listing is found by
/// the next recheck, one interval later.
fn missed_kick(loaded: bool, tracking: bool, caught_up_ms: i64, listed_at_ms: i64) -> bool {
    !loaded || !(tracking || caught_up_ms >= listed_at_ms)
}

fn upsert_drift(drift: &mut Vec<DriftReport>, report: DriftReport) {
    if let Some(d) = drift.iter_mut().find(|d| d.r#ref == report.r#ref) {
        *d = report;
    } else if drift.len() < MAX_DRIFT_ENTRIES {
        drift.push(report);
    }
}

pub(crate) fn status_name(s: ChangeStatus) -> &'static str {
    match s {
        ChangeStatus::Queued => "queued",
        ChangeStatus::Dispatched => "dispatched",
        ChangeStatus::Applied => "applied",
        ChangeStatus::Failed => "failed",
        ChangeStatus::Expired => "expired",
        ChangeStatus::Cancelled => "cancelled",
    }
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub(crate) fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use comodit_protocol::{Collection, FieldDiff, ResourceRef};

    #[test]
    fn a_recheck_reads_the_log_only_when_a_kick_may_have_been_missed() {
        // Idle since before the listing: the listed change is one it never heard of.
        assert!(missed_kick(true, false, 1_000, 2_000));
        // Not loaded yet: it reads its log in any case.
        assert!(missed_kick(false, true, 5_000, 2_000));
        // Tracking work: the next kick or reply brings it back to its log.
        assert!(!missed_kick(true, true, 0, 2_000));
        // Finished a change (or read its log) after the listing: the listing was that work.
        assert!(!missed_kick(true, false, 2_000, 2_000));
        assert!(!missed_kick(true, false, 3_000, 2_000));
    }

    fn report(id: &str, n: i64) -> DriftReport {
        DriftReport {
            r#ref: ResourceRef::new(Collection::Files, id).unwrap(),
            diff: vec![FieldDiff {
                field: "content".into(),
                from: n.into(),
                to: 0.into(),
            }],
            since: at(n),
            repaired: false,
            repair_error: None,
        }
    }

    #[test]
    fn drift_is_kept_once_per_resource() {
        let mut d = Vec::new();
        upsert_drift(&mut d, report("/a", 1));
        upsert_drift(&mut d, report("/b", 2));
        upsert_drift(&mut d, report("/a", 3));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].since, at(3));
    }
}
