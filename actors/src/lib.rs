//! # comodit-actors
//!
//! The node's host actors (DESIGN §4, §5, §8): one supervised actix actor per host of the shards
//! this node owns, fed by one consumer per shard queue, dispatching the host's change log to its
//! agent and recording what comes back.
//!
//! ## Main types
//!
//! - [`Orchestrator`]: starts the runtime ([`Orchestrator::start`]), follows shard
//!   [`Ownership`](ownership::Ownership), and implements [`HostOps`] for the API: `submit`
//!   records a change and kicks the host's actor through the broker, `cancel` goes through the
//!   actor, `events` is the node's event stream.
//! - [`ActorsConfig`]: timeouts, retries, heartbeat expectations, bounds.
//! - [`validate`]: the checks every upward message passes (routing key, broker identity, body).
//! - [`pending`]: a host's pending changes and their schedule (sans-IO).
//!
//! ## How data flows
//!
//! ```text
//!  agent ─► <p>.up ─► <p>.shard.<n> ─► shard task: validate ─► host actor (mailbox, in order)
//!                                      refused: counted, logged, acked      │
//!                                                                           ▼
//!  store ◄─ runtime (hello/heartbeat/drift/bye), change status + reply (fenced by epoch)
//!  API submit ─► append_change ─► kick on <p>.up ─► host actor ─► command on <p>.down ─► agent
//!  each delivery is acked once its effect is in the store; on a store error it is requeued
//! ```
//!
//! Threads: actix runs on its own threads (one `System`, [`ActorsConfig::arbiters`] arbiters);
//! the actors only keep order, and every store call, publish and ack runs on the caller's tokio
//! runtime.
//!
//! ## Decisions
//!
//! - **Kicks go through the broker.** `submit` records the change, then publishes a `kick` on
//!   `<p>.up` with the host's routing key (DESIGN §5), so it reaches the owning node in order with
//!   the host's own messages. If that publish fails the actor is kicked in-process; a `hello` also
//!   re-reads the change log.
//! - **Dispatch does not wait for the host to be online**: commands wait in the host's durable
//!   queue. Re-sends (same command id) happen only while the host is online, after
//!   [`ActorsConfig::command_timeout`] or the longer timeout the measured round trips call for
//!   (`rto`: replies queued behind a 50,000-host wave are not re-sent for), at most
//!   [`ActorsConfig::max_retries`] times; coming online restarts the timeout. After that the
//!   change waits for its reply or its expiry.
//! - **One sweep per shard**, not a timer per host: each actor publishes its next deadline in an
//!   atomic; the shard task pokes the actors whose deadline passed.
//! - **Heartbeats are cheap**: `last_seen` lives in memory and is written to the store at most
//!   every [`ActorsConfig::last_seen_write_s`]; online/offline changes are written at once.
//!   Connection events from the broker mark a host offline at once ([`ActorsConfig::connection_events`]).
//! - **Fencing**: every runtime and change write carries the shard epoch; a
//!   `StaleEpoch` from the store (or a higher epoch found when loading) stops the actor from
//!   acting for the host, and its deliveries go back to the queue for the real owner.
//! - **Memory**: an idle actor holds ids, online/last-heard, a deadline, and its pending changes'
//!   ids (about 1 KiB of heap per idle host with actix's context; see `tests/memory.rs`).

mod config;
mod host;
pub mod metrics;
pub mod ownership;
pub mod pending;
mod presence;
mod rto;
mod runtime;
mod shard;
mod ticket;
pub mod validate;

pub use config::ActorsConfig;
pub use runtime::{Buses, Orchestrator};

use std::time::Duration;

use async_trait::async_trait;
use comodit_protocol::{Body, DriftReport, HostId, ResourceRef, Stream};
use comodit_store::{Change, ChangeId, ChangeStatus, JobId};
use serde::Serialize;

/// How the API asks for work on a host.
#[derive(Clone, Debug)]
pub struct SubmitOptions {
    /// Wait this long for the agent's reply; `None` = return as soon as the change is recorded.
    pub wait: Option<Duration>,
    /// Who asked (token name), for the change log and audit.
    pub requested_by: String,
    /// The change expires if not applied within this time (default 10 min).
    pub ttl: Duration,
    /// Record the change under this id (the API derives it from an `Idempotency-Key`); `None`:
    /// a new random id. When the host already has a change with this id, that change is the
    /// answer, waited for like a new one: nothing is recorded or sent again (ARCHITECTURE §24).
    pub change_id: Option<ChangeId>,
    /// The job this change is one host's part of (the store keeps the job's result for the host
    /// in step with the change).
    pub job: Option<JobId>,
}

/// What became of a submitted change.
#[derive(Clone, Debug)]
pub enum Submitted {
    /// The agent answered within the wait: the change carries its reply.
    Completed(Change),
    /// Recorded (queued or dispatched) but not answered yet: follow it by id (HTTP 202).
    Pending(Change),
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("no such host: {0}")]
    UnknownHost(HostId),
    /// This node does not own the host's shard (the cluster issue forwards instead).
    #[error("host {0} is owned by another node")]
    NotOwner(HostId),
    #[error("store: {0}")]
    Store(#[from] comodit_store::StoreError),
    #[error("broker: {0}")]
    Bus(String),
    #[error("shutting down")]
    ShuttingDown,
    /// The actor did not answer in time (mailbox full or stuck): the outcome is unknown.
    #[error("timed out talking to the host actor")]
    Timeout,
}

/// Events for the API's SSE stream (`GET /api/v1/events`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    HostOnline {
        host: HostId,
    },
    HostOffline {
        host: HostId,
    },
    HostEnrolled {
        host: HostId,
    },
    HostRevoked {
        host: HostId,
    },
    Change {
        host: HostId,
        change: ChangeId,
        seq: u64,
        status: ChangeStatus,
    },
    Drift {
        host: HostId,
        report: DriftReport,
    },
    DriftCleared {
        host: HostId,
        r#ref: ResourceRef,
    },
    Output {
        host: HostId,
        change: ChangeId,
        seq: u64,
        stream: Stream,
        data: String,
    },
}

/// What the API needs from the node's actors. Implemented by [`Orchestrator`]-like runtimes;
/// tests of the API may fake it.
#[async_trait]
pub trait HostOps: Send + Sync + 'static {
    /// Records a change in the host's log and gets it to the host's actor, which dispatches it to the
    /// agent (or keeps it queued while the host is offline). Waits for the reply up to `opts.wait`.
    async fn submit(
        &self,
        host: HostId,
        body: Body,
        opts: SubmitOptions,
    ) -> Result<Submitted, OpsError>;
    /// Cancels a change that is still queued (not yet dispatched). Returns the updated change.
    async fn cancel(&self, host: HostId, change: ChangeId) -> Result<Change, OpsError>;
    /// A receiver of node events (a bounded broadcast: a slow reader misses events and is told so).
    fn events(&self) -> tokio::sync::broadcast::Receiver<NodeEvent>;
    /// Stops the host's actor and forgets its in-memory state (after a revoke).
    async fn forget(&self, host: HostId);
}

/// Host lifecycle beyond the actors: revocation deletes the host's broker user (which closes its
/// connections), its queue, and its records. Implemented by the node's enrollment service.
#[async_trait]
pub trait HostLifecycle: Send + Sync + 'static {
    async fn revoke(&self, host: HostId) -> Result<(), OpsError>;
}
