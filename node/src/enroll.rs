//! Enrollment and revocation of hosts (DESIGN §5, "Per-agent credentials").
//!
//! An agent that has no identity yet connects with the shared, low-privilege enrollment user
//! (it may only publish on `<p>.enroll`) and sends an [`EnrollRequest`] with a token an operator
//! created through the API. [`EnrollService`] consumes `<p>.enroll` and answers each request
//! through RabbitMQ's direct reply-to:
//!
//! ```text
//! request ─► decode (strict, bounded) ─► replay cache (message id) ─► use the token (store, counted)
//!   new host:   create host ─► initial runtime (facts, epoch 0) ─► broker user ─► agent queue
//!   re-enroll:  same environment + force ─► new password ─► close the old connections
//!   ─► audit ─► NodeEvent::HostEnrolled ─► reply {host, password, n_shards} ─► ack
//! ```
//!
//! Every step that fails after the host was created is undone (broker user, host record) and the
//! agent is told to retry. The replay cache makes the agent's retries safe: a request is
//! identified by its `message_id` (the agent keeps it across retries), so a retry whose first
//! reply was lost gets that same reply again instead of a second host. A request still being
//! processed when its retry arrives is dropped (the agent retries once more later). The cache
//! lives in one node's memory: with several nodes consuming `<p>.enroll`, a retry that lands on
//! another node enrolls a second host (the first one stays, without an agent, until revoked).
//!
//! [`HostLifecycle::revoke`] undoes an enrollment: the broker user goes (RabbitMQ closes its
//! connections, and the old password no longer logs in), then the host's queue, then its
//! records. Broker first, store last, so a revocation that fails half-way can be run again.
//!
//! The initial runtime record is written with [`Epoch`]`(0)`, the lowest epoch, so the facts
//! sent at enrollment are visible at once and any write of the shard's owner replaces them.
//!
//! Metrics: `comodit_node_enroll_total{outcome}`, `comodit_node_enroll_duration_seconds`,
//! `comodit_node_revoke_total{outcome}`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use comodit_actors::{HostLifecycle, NodeEvent, OpsError};
use comodit_bus::admin::{AdminError, BrokerAdmin};
use comodit_bus::{
    topology, Bus, BusError, ConsumeOptions, Consumer, Delivery, OutMessage, DIRECT_REPLY_TO,
};
use comodit_protocol::{
    EnrollReply, EnrollRequest, Epoch, Facts, HostId, Names, Secret, Status, V1,
};
use comodit_store::{AuditEntry, EnrollmentToken, Host, HostRuntime, Store, StoreError};
use rand::Rng;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::enroll_broker::BrokerWorkers;
pub use crate::enroll_broker::IMPORT_MIN;

/// `hex(sha256(secret))`: how the API stores enrollment tokens, and so how they are looked up.
pub use comodit_api::hash_token;

/// Largest enrollment request accepted, in bytes: facts and a token fit in a few kilobytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Requests processed at once (each makes a few store writes and waits for its broker user and
/// queue). When the broker is the bottleneck many wait together, and from
/// [`IMPORT_MIN`] waiting their users go in one import (ARCHITECTURE §21): this bounds that crowd.
pub const MAX_IN_FLIGHT: usize = 2048;
/// Attempts of a revocation whose broker steps fail, before the caller is told to retry.
const REVOKE_ATTEMPTS: u32 = 3;
/// How many recent requests the replay cache remembers, and for how long.
pub const REPLAY_ENTRIES: usize = 4096;
pub const REPLAY_TTL: Duration = Duration::from_secs(10 * 60);
/// Random bytes of a host's broker password (hex-encoded: 64 characters).
const PASSWORD_BYTES: usize = 32;
/// Longest host name kept from the reported hostname (a DNS name's limit).
const MAX_HOST_NAME_CHARS: usize = 253;
/// Longest token secret looked up; anything longer is not a token.
const MAX_TOKEN_BYTES: usize = 1024;
/// What a rejected agent is told about its token, whatever was wrong with it.
pub const INVALID_TOKEN: &str = "invalid or expired token";
/// What an agent is told when the node failed and a retry may succeed.
pub const RETRY_LATER: &str = "enrollment failed on the node side; retry later";

/// How the enrollment service runs.
#[derive(Clone)]
pub struct EnrollConfig {
    /// The shared broker user agents enroll with; created (or updated) at start.
    pub enroll_user: String,
    pub enroll_password: String,
    /// The cluster's shard count, told to every enrolled agent for its routing keys.
    pub n_shards: u32,
    /// New hosts waiting together from which their broker users are made in one definitions
    /// import instead of three management calls each (ARCHITECTURE §21); the node uses
    /// [`IMPORT_MIN`].
    pub import_min: usize,
}

impl std::fmt::Debug for EnrollConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollConfig")
            .field("enroll_user", &self.enroll_user)
            .field("enroll_password", &"***")
            .field("n_shards", &self.n_shards)
            .finish()
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid enrollment configuration: {0}")]
    Config(String),
    #[error("broker management: {0}")]
    Admin(#[from] AdminError),
}

/// The node's enrollment service: answers `<p>.enroll` and revokes hosts. Cheap to clone.
#[derive(Clone)]
pub struct EnrollService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    bus: Bus,
    admin: BrokerAdmin,
    /// Creates new hosts' broker users and queues, many at a time.
    broker: BrokerWorkers,
    names: Names,
    n_shards: u32,
    events: Option<broadcast::Sender<NodeEvent>>,
    replay: Mutex<ReplayCache>,
    /// Set to true once the request loop has stopped and its requests are finished.
    stopped: watch::Sender<bool>,
}

/// How one request ended, for the metric's `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Enrolled,
    Reenrolled,
    InvalidToken,
    AlreadyEnrolled,
    OtherEnvironment,
    Malformed,
    Failed,
    Replayed,
    InProgress,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Enrolled => "enrolled",
            Outcome::Reenrolled => "reenrolled",
            Outcome::InvalidToken => "invalid_token",
            Outcome::AlreadyEnrolled => "already_enrolled",
            Outcome::OtherEnvironment => "other_environment",
            Outcome::Malformed => "malformed",
            Outcome::Failed => "failed",
            Outcome::Replayed => "replayed",
            Outcome::InProgress => "in_progress",
        }
    }

    /// A final answer is remembered for replays; a failure is not, so a retry tries again.
    fn is_final(self) -> bool {
        !matches!(self, Outcome::Failed | Outcome::InProgress)
    }
}

impl EnrollService {
    /// Registers the declaration of the core topology (which includes `<p>.enroll`) on every
    /// (re)connect of `bus` (and declares it at once if the bus is connected), ensures the
    /// enrollment user, and starts consuming enrollment requests until `shutdown`. Returns
    /// once the enrollment user is in place; the consumer subscribes as soon as the bus is
    /// connected (requests sent meanwhile wait in the durable queue).
    pub async fn start(
        store: Arc<dyn Store>,
        bus: Bus,
        admin: BrokerAdmin,
        names: Names,
        cfg: EnrollConfig,
        events: Option<broadcast::Sender<NodeEvent>>,
        shutdown: CancellationToken,
    ) -> Result<EnrollService, EnrollError> {
        if cfg.n_shards == 0 {
            return Err(EnrollError::Config("n_shards must be positive".into()));
        }
        if cfg.enroll_user.is_empty() || cfg.enroll_password.is_empty() {
            return Err(EnrollError::Config(
                "the enrollment user and password must not be empty".into(),
            ));
        }
        {
            let (names, n_shards) = (names.clone(), cfg.n_shards);
            bus.on_connect(move |ch| {
                let names = names.clone();
                async move { topology::declare_core(&ch, &names, n_shards).await }
            });
        }
        // A routine registered on a live connection runs in the background: declare now too,
        // so that once `start` returns on a connected bus, requests can be routed.
        if bus.is_connected() {
            let declared = match bus.channel().await {
                Ok(ch) => {
                    let r = topology::declare_core(&ch, &names, cfg.n_shards).await;
                    if ch.status().connected() {
                        let _ = ch.close(200, "done".into()).await;
                    }
                    r
                }
                Err(e) => Err(e),
            };
            if let Err(e) = declared {
                // The routine runs again on the next connection.
                warn!(error = %e, "enrollment topology not declared yet");
            }
        }
        admin
            .ensure_enroll_user(&names, &cfg.enroll_user, &cfg.enroll_password)
            .await?;
        let (stopped, _) = watch::channel(false);
        let service = EnrollService {
            inner: Arc::new(Inner {
                store,
                bus: bus.clone(),
                broker: BrokerWorkers::start(
                    bus.clone(),
                    admin.clone(),
                    names.clone(),
                    cfg.import_min,
                ),
                admin,
                names: names.clone(),
                n_shards: cfg.n_shards,
                events,
                replay: Mutex::new(ReplayCache::new(REPLAY_ENTRIES, REPLAY_TTL)),
                stopped,
            }),
        };
        let consumer = bus.consume(
            &names.enroll(),
            ConsumeOptions {
                prefetch: MAX_IN_FLIGHT as u16,
                consumer_tag: String::new(),
                exclusive: false,
            },
        );
        let span = info_span!("enroll_service", prefix = names.prefix());
        tokio::spawn(service.clone().serve(consumer, shutdown).instrument(span));
        info!(prefix = names.prefix(), "enrollment service started");
        Ok(service)
    }

    /// Waits until the request loop has stopped (after `shutdown`) and the requests it had
    /// taken are answered.
    pub async fn stopped(&self) {
        let mut rx = self.inner.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    async fn serve(self, mut consumer: Consumer, shutdown: CancellationToken) {
        let mut tasks = JoinSet::new();
        loop {
            while tasks.len() >= MAX_IN_FLIGHT {
                tasks.join_next().await;
            }
            // Reap finished tasks so the set does not hold their results.
            while tasks.try_join_next().is_some() {}
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = consumer.next() => d,
            };
            let Some(delivery) = delivery else { break };
            let this = self.clone();
            tasks.spawn(async move { this.handle(delivery).await });
        }
        // Requests already taken finish: each is bounded by the store's and the management
        // API's own timeouts. Unacked ones go back to the queue for another node.
        while tasks.join_next().await.is_some() {}
        info!("enrollment service stopped");
        self.inner.stopped.send_replace(true);
    }

    /// Answers one delivery, then acks it: whatever the request was, it is settled here.
    async fn handle(&self, d: Delivery) {
        let started = Instant::now();
        let reply_to = d.reply_to.as_deref().filter(|r| is_direct_reply_to(r));
        if reply_to.is_none() && d.reply_to.is_some() {
            // Answering anywhere else would let an enrolling client make the node publish into
            // any queue of the vhost.
            warn!("enrollment request with a reply_to that is not direct reply-to, not answered");
        }
        let (reply, outcome) = self.answer(&d).await;
        // Counted before the reply goes out: a client that has its answer finds it counted.
        metrics::counter!("comodit_node_enroll_total", "outcome" => outcome.label()).increment(1);
        if let (Some(reply), Some(to)) = (reply, reply_to) {
            let payload = serde_json::to_vec(&reply).expect("replies serialize");
            let mut msg = OutMessage::json("enroll_reply", payload);
            msg.correlation_id = d.correlation_id.clone().or_else(|| d.message_id.clone());
            if let Err(e) = self.inner.bus.publish("", to, msg).await {
                // The agent times out and retries; the replay cache answers it then.
                warn!(error = %e, outcome = outcome.label(), "enrollment reply not sent");
            }
        }
        metrics::histogram!("comodit_node_enroll_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = d.ack().await {
            // Redelivered later: the replay cache recognizes it.
            debug!(error = %e, "enrollment request not acked");
        }
    }

    /// The reply to one request (none for a duplicate still in progress) and how it ended.
    async fn answer(&self, d: &Delivery) -> (Option<EnrollReply>, Outcome) {
        let req = match decode(&d.payload) {
            Ok(req) => req,
            Err(reason) => {
                warn!(%reason, "malformed enrollment request");
                return (Some(rejected(reason)), Outcome::Malformed);
            }
        };
        let token_sha256 = hash_token(req.token.expose());
        // Only requests with an id the agent keeps across retries can be replayed.
        let key = d.message_id.clone().filter(|id| !id.is_empty());
        let mut tracked = None;
        if let Some(key) = key {
            let seen = self.replay().begin(&key, &token_sha256, Instant::now());
            match seen {
                Begin::New => tracked = Some(key),
                Begin::Untracked => {}
                Begin::Replay(reply) => {
                    debug!("enrollment request seen before, its reply is sent again");
                    return (Some(*reply), Outcome::Replayed);
                }
                Begin::InProgress => return (None, Outcome::InProgress),
            }
        }
        let (reply, outcome) = self.enroll(req, &token_sha256).await;
        if let Some(key) = &tracked {
            let keep = outcome.is_final().then(|| reply.clone());
            self.replay().finish(key, keep, Instant::now());
        }
        (Some(reply), outcome)
    }

    fn replay(&self) -> std::sync::MutexGuard<'_, ReplayCache> {
        self.inner.replay.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn enroll(&self, req: EnrollRequest, token_sha256: &str) -> (EnrollReply, Outcome) {
        let store = &self.inner.store;
        if req.token.expose().is_empty() || req.token.expose().len() > MAX_TOKEN_BYTES {
            self.audit("enrollment token", "denied: invalid or expired token")
                .await;
            return (rejected(INVALID_TOKEN), Outcome::InvalidToken);
        }
        let token = match store.use_enrollment_token(token_sha256, Utc::now()).await {
            Ok(token) => token,
            Err(StoreError::NotFound(_) | StoreError::TokenUnusable(_)) => {
                info!("enrollment refused: invalid or expired token");
                self.audit("enrollment token", "denied: invalid or expired token")
                    .await;
                return (rejected(INVALID_TOKEN), Outcome::InvalidToken);
            }
            Err(e) => {
                warn!(error = %e, "enrollment token lookup failed");
                return (rejected(RETRY_LATER), Outcome::Failed);
            }
        };
        let (reply, outcome) = self.enroll_with(req, &token).await;
        // A token's uses count the hosts it enrolled: a request that enrolled nothing (failed
        // on the node's side, or refused) gives its use back, so the agent's retries after a
        // failure do not find the token used up.
        if !matches!(outcome, Outcome::Enrolled | Outcome::Reenrolled) {
            if let Err(e) = store.release_enrollment_token_use(token.id).await {
                warn!(token = %token.id, error = %e, "enrollment token use not given back");
            }
        }
        (reply, outcome)
    }

    /// What follows a counted use of `token`.
    async fn enroll_with(
        &self,
        req: EnrollRequest,
        token: &EnrollmentToken,
    ) -> (EnrollReply, Outcome) {
        let store = &self.inner.store;
        if let Some(id) = req.host {
            match store.get_host(id).await {
                Ok(Some(host)) if host.env != token.env || host.org != token.org => {
                    info!(host_id = %id, token = %token.id, "re-enrollment refused: the token is for another environment");
                    self.audit(
                        &id.to_string(),
                        "denied: the token is for another environment",
                    )
                    .await;
                    return (
                        rejected("this token cannot re-enroll that host"),
                        Outcome::OtherEnvironment,
                    );
                }
                Ok(Some(_)) if !req.force => {
                    self.audit(&id.to_string(), "denied: already enrolled")
                        .await;
                    return (
                        rejected("already enrolled; re-enroll with force"),
                        Outcome::AlreadyEnrolled,
                    );
                }
                Ok(Some(host)) => return self.reenroll(host, token).await,
                // Unknown (e.g. revoked): enrolled anew, under a new id.
                Ok(None) => {}
                Err(e) => {
                    warn!(host_id = %id, error = %e, "host lookup failed");
                    return (rejected(RETRY_LATER), Outcome::Failed);
                }
            }
        }
        self.enroll_new(req.facts, token).await
    }

    async fn enroll_new(&self, facts: Facts, token: &EnrollmentToken) -> (EnrollReply, Outcome) {
        let inner = &self.inner;
        let id = HostId::random();
        let shard = id.shard(inner.n_shards);
        let span = info_span!("enroll", host_id = %id, shard = shard.0, token = %token.id);
        async move {
            let now = Utc::now();
            let host = Host {
                id,
                org: token.org,
                env: token.env,
                name: host_name(&facts.hostname, id),
                labels: BTreeMap::new(),
                created_at: now,
                enrolled_at: now,
                shard: shard.0,
                version: 0,
            };
            if let Err(e) = inner.store.create_host(&host).await {
                warn!(error = %e, "host not recorded");
                self.audit(&id.to_string(), &format!("failed: {e}")).await;
                return (rejected(RETRY_LATER), Outcome::Failed);
            }
            let runtime = HostRuntime {
                host: id,
                epoch: Epoch(0),
                online: false,
                last_seen: None,
                facts: Some(facts),
                desired_digest: None,
                drift: Vec::new(),
                updated_at: now,
            };
            if let Err(e) = inner.store.put_runtime(&runtime).await {
                // Only a head start: the owner writes the facts again at the agent's hello.
                warn!(error = %e, "initial runtime not recorded");
            }
            let password = new_password();
            if let Err(e) = inner.broker.create(id, &password).await {
                warn!(error = %e, "broker credentials not created, undoing the enrollment");
                self.undo(id).await;
                self.audit(&id.to_string(), &format!("failed: {e}")).await;
                return (rejected(RETRY_LATER), Outcome::Failed);
            }
            self.audit(&id.to_string(), "ok").await;
            self.emit(NodeEvent::HostEnrolled { host: id });
            info!("host enrolled");
            (self.accepted(id, password), Outcome::Enrolled)
        }
        .instrument(span)
        .await
    }

    async fn reenroll(&self, host: Host, token: &EnrollmentToken) -> (EnrollReply, Outcome) {
        let inner = &self.inner;
        let id = host.id;
        let span = info_span!("reenroll", host_id = %id, shard = host.shard, token = %token.id);
        async move {
            let password = new_password();
            // The whole user again, not only its password: this also repairs a user that was
            // lost or whose permissions drifted.
            let broker = async {
                inner
                    .admin
                    .create_agent_user(&inner.names, id, &password)
                    .await
                    .map_err(|e| e.to_string())?;
                // The old agent (or whoever had the old password) is cut off now.
                inner
                    .admin
                    .close_connections(&id.to_string(), "host re-enrolled")
                    .await
                    .map_err(|e| e.to_string())?;
                self.declare_queue(id).await.map_err(|e| e.to_string())
            };
            if let Err(e) = broker.await {
                warn!(error = %e, "re-enrollment failed");
                self.audit(&id.to_string(), &format!("failed: {e}")).await;
                return (rejected(RETRY_LATER), Outcome::Failed);
            }
            self.audit(&id.to_string(), "ok: re-enrolled").await;
            self.emit(NodeEvent::HostEnrolled { host: id });
            info!("host re-enrolled");
            (self.accepted(id, password), Outcome::Reenrolled)
        }
        .instrument(span)
        .await
    }

    fn accepted(&self, host: HostId, password: String) -> EnrollReply {
        EnrollReply {
            v: V1,
            status: Status::Ok,
            reason: None,
            host: Some(host),
            password: Some(Secret::new(password)),
            n_shards: Some(self.inner.n_shards),
        }
    }

    async fn declare_queue(&self, host: HostId) -> Result<(), BusError> {
        let ch = self.inner.bus.channel().await?;
        let declared = topology::declare_agent_queue(&ch, &self.inner.names, host).await;
        if ch.status().connected() {
            let _ = ch.close(200, "done".into()).await;
        }
        declared
    }

    /// Best-effort removal of a half-made enrollment. Each step is idempotent; what fails is
    /// logged (a broker user left behind has no host and no queue to read).
    async fn undo(&self, host: HostId) {
        if let Err(e) = self.inner.admin.delete_user(&host.to_string()).await {
            warn!(host_id = %host, error = %e, "undo: broker user not deleted");
        }
        if let Ok(ch) = self.inner.bus.channel().await {
            if let Err(e) = topology::delete_agent_queue(&ch, &self.inner.names, host).await {
                warn!(host_id = %host, error = %e, "undo: agent queue not deleted");
            }
            if ch.status().connected() {
                let _ = ch.close(200, "done".into()).await;
            }
        }
        if let Err(e) = self.inner.store.delete_host(host).await {
            warn!(host_id = %host, error = %e, "undo: host record not deleted");
        }
    }

    fn emit(&self, event: NodeEvent) {
        if let Some(events) = &self.inner.events {
            // No subscriber is not an error.
            let _ = events.send(event);
        }
    }

    async fn audit(&self, target: &str, outcome: &str) {
        self.audit_action("enroll", target, outcome).await;
    }

    async fn audit_action(&self, action: &str, target: &str, outcome: &str) {
        let entry = AuditEntry {
            seq: 0,
            at: Utc::now(),
            actor: "enroll".into(),
            action: action.into(),
            target: target.into(),
            outcome: outcome.into(),
        };
        if let Err(e) = self.inner.store.append_audit(&entry).await {
            warn!(error = %e, action, target, "audit entry not written");
        }
    }

    async fn revoke_steps(&self, host: HostId) -> Result<(), OpsError> {
        let inner = &self.inner;
        let user = host.to_string();
        let admin_err = |e: AdminError| OpsError::Bus(e.to_string());
        if inner.store.get_host(host).await?.is_none() {
            return Err(OpsError::UnknownHost(host));
        }
        // RabbitMQ closes the connections of a deleted user; closing them again covers a
        // connection that was being opened at that very moment.
        inner.admin.delete_user(&user).await.map_err(admin_err)?;
        inner
            .admin
            .close_connections(&user, "host revoked")
            .await
            .map_err(admin_err)?;
        let ch = inner
            .bus
            .channel()
            .await
            .map_err(|e| OpsError::Bus(e.to_string()))?;
        let deleted = topology::delete_agent_queue(&ch, &inner.names, host).await;
        if ch.status().connected() {
            let _ = ch.close(200, "done".into()).await;
        }
        deleted.map_err(|e| OpsError::Bus(e.to_string()))?;
        inner.store.delete_host(host).await?;
        Ok(())
    }
}

#[async_trait]
impl HostLifecycle for EnrollService {
    /// Deletes the host's broker user (which closes its connections and refuses its password
    /// from now on), its queue (and the commands waiting there), then its records. Run it again
    /// after a failure: every step is idempotent.
    async fn revoke(&self, host: HostId) -> Result<(), OpsError> {
        let span = info_span!("revoke", host_id = %host, shard = host.shard(self.inner.n_shards).0);
        async move {
            // Every step is idempotent, so a transient broker failure (e.g. the management API
            // racing the broker's own closing of the deleted user's connections) is retried
            // here rather than handed to the client as a 503.
            let mut attempt = 1;
            let result = loop {
                match self.revoke_steps(host).await {
                    Err(OpsError::Bus(e)) if attempt < REVOKE_ATTEMPTS => {
                        warn!(attempt, error = %e, "revocation step failed, trying again");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                        attempt += 1;
                    }
                    result => break result,
                }
            };
            let outcome = match &result {
                Ok(()) => {
                    self.emit(NodeEvent::HostRevoked { host });
                    info!("host revoked");
                    metrics::counter!("comodit_node_revoke_total", "outcome" => "revoked")
                        .increment(1);
                    "ok".to_owned()
                }
                Err(OpsError::UnknownHost(_)) => {
                    metrics::counter!("comodit_node_revoke_total", "outcome" => "unknown_host")
                        .increment(1);
                    return result;
                }
                Err(e) => {
                    warn!(error = %e, "revocation failed");
                    metrics::counter!("comodit_node_revoke_total", "outcome" => "failed")
                        .increment(1);
                    format!("failed: {e}")
                }
            };
            self.audit_action("revoke", &host.to_string(), &outcome)
                .await;
            result
        }
        .instrument(span)
        .await
    }
}

/// `amq.rabbitmq.reply-to.<...>`: the address RabbitMQ gives a direct reply-to requester.
fn is_direct_reply_to(reply_to: &str) -> bool {
    reply_to
        .strip_prefix(DIRECT_REPLY_TO)
        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('.'))
}

/// Parses a request strictly (unknown fields refused), within [`MAX_REQUEST_BYTES`]. The error
/// is meant for the sender and never quotes the token.
fn decode(payload: &[u8]) -> Result<EnrollRequest, String> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "malformed enrollment request: {} bytes > {MAX_REQUEST_BYTES}",
            payload.len()
        ));
    }
    serde_json::from_slice(payload).map_err(|e| {
        // serde's message may quote a value of the wrong type; say where, not what.
        let what = match e.classify() {
            serde_json::error::Category::Io | serde_json::error::Category::Eof => "truncated",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "not an enrollment request",
        };
        let detail = if e.classify() == serde_json::error::Category::Data {
            // Field names (in backquotes) stay; the text is cut before any quoted string value.
            let text = e.to_string();
            let text = text
                .rfind(" at line ")
                .map_or(text.as_str(), |at| &text[..at]);
            let cut = text.find('"').unwrap_or(text.len());
            format!(" ({})", text[..cut].trim_end_matches([' ', ':']))
        } else {
            String::new()
        };
        format!(
            "malformed enrollment request: {what}{detail} at line {} column {}",
            e.line(),
            e.column()
        )
    })
}

fn rejected(reason: impl Into<String>) -> EnrollReply {
    EnrollReply {
        v: V1,
        status: Status::Rejected,
        reason: Some(reason.into()),
        host: None,
        password: None,
        n_shards: None,
    }
}

/// A label for people: the reported hostname without control characters, bounded; the start
/// of the host id when the agent reported none.
fn host_name(hostname: &str, id: HostId) -> String {
    let name: String = hostname
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_HOST_NAME_CHARS)
        .collect();
    if name.is_empty() {
        format!("host-{}", &id.to_string()[..8])
    } else {
        name
    }
}

fn new_password() -> String {
    let bytes: [u8; PASSWORD_BYTES] = rand::thread_rng().gen();
    hex::encode(bytes)
}

/// What the replay cache knows of a request id.
#[derive(Debug, PartialEq)]
enum Begin {
    /// First time: process it, then [`ReplayCache::finish`] it.
    New,
    /// The id is taken by a request with another token: process it on its own, without
    /// finishing it (it must not replace the first one's entry).
    Untracked,
    /// Already answered: send this again.
    Replay(Box<EnrollReply>),
    /// Being processed right now: drop this copy.
    InProgress,
}

/// Recent requests by message id, with the hash of their token (a replay must carry the same
/// token to get the reply: the id alone is not a secret). Bounded in entries and in age.
struct ReplayCache {
    max_entries: usize,
    ttl: Duration,
    entries: HashMap<String, ReplayEntry>,
    /// Insertion order, to evict the oldest; an item whose entry was removed or replaced is
    /// skipped.
    order: VecDeque<(Instant, String)>,
}

struct ReplayEntry {
    token_sha256: String,
    reply: Option<EnrollReply>,
    at: Instant,
}

impl ReplayCache {
    fn new(max_entries: usize, ttl: Duration) -> Self {
        ReplayCache {
            max_entries: max_entries.max(1),
            ttl,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn begin(&mut self, id: &str, token_sha256: &str, now: Instant) -> Begin {
        self.evict(now);
        if let Some(entry) = self.entries.get(id) {
            if entry.token_sha256 == token_sha256 {
                return match &entry.reply {
                    Some(reply) => Begin::Replay(Box::new(reply.clone())),
                    None => Begin::InProgress,
                };
            }
            // Same id, other token: not a retry of that request.
            return Begin::Untracked;
        }
        while self.entries.len() >= self.max_entries {
            if !self.pop_oldest() {
                break;
            }
        }
        self.entries.insert(
            id.to_owned(),
            ReplayEntry {
                token_sha256: token_sha256.to_owned(),
                reply: None,
                at: now,
            },
        );
        self.order.push_back((now, id.to_owned()));
        Begin::New
    }

    /// Records the final reply of a request begun with [`ReplayCache::begin`], or forgets the
    /// request (`None`) so that a retry is processed again.
    fn finish(&mut self, id: &str, reply: Option<EnrollReply>, now: Instant) {
        match reply {
            Some(reply) => {
                if let Some(entry) = self.entries.get_mut(id) {
                    if entry.reply.is_none() {
                        entry.reply = Some(reply);
                    }
                }
            }
            None => {
                if self.entries.get(id).is_some_and(|e| e.reply.is_none()) {
                    self.entries.remove(id);
                }
            }
        }
        self.evict(now);
    }

    fn evict(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            self.pop_oldest();
        }
        // Items of removed entries pile up only until they age out; keep them bounded too.
        if self.order.len() > 2 * self.max_entries {
            let entries = &self.entries;
            self.order
                .retain(|(at, id)| entries.get(id).is_some_and(|e| e.at == *at));
        }
    }

    /// Removes the oldest item (and its entry if it is still that one). False if empty.
    fn pop_oldest(&mut self) -> bool {
        let Some((at, id)) = self.order.pop_front() else {
            return false;
        };
        if self.entries.get(&id).is_some_and(|e| e.at == at) {
            self.entries.remove(&id);
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_reply() -> EnrollReply {
        EnrollReply {
            v: V1,
            status: Status::Ok,
            reason: None,
            host: Some(HostId::random()),
            password: Some(Secret::new("p")),
            n_shards: Some(4),
        }
    }

    #[test]
    fn token_hash_is_hex_sha256() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn replays_need_the_same_token_and_only_final_answers_are_kept() {
        let t0 = Instant::now();
        let mut cache = ReplayCache::new(8, Duration::from_secs(60));
        assert_eq!(cache.begin("m1", "h1", t0), Begin::New);
        assert_eq!(cache.begin("m1", "h1", t0), Begin::InProgress);
        // Another token with the same id is processed on its own.
        assert_eq!(cache.begin("m1", "h2", t0), Begin::Untracked);
        let reply = ok_reply();
        cache.finish("m1", Some(reply.clone()), t0);
        assert_eq!(cache.begin("m1", "h1", t0), Begin::Replay(Box::new(reply)));
        assert_eq!(cache.begin("m1", "h2", t0), Begin::Untracked);
        // A failure is forgotten: the retry runs again.
        assert_eq!(cache.begin("m2", "h1", t0), Begin::New);
        cache.finish("m2", None, t0);
        assert_eq!(cache.begin("m2", "h1", t0), Begin::New);
    }

    #[test]
    fn the_cache_is_bounded_in_size_and_age() {
        let t0 = Instant::now();
        let mut cache = ReplayCache::new(3, Duration::from_secs(60));
        for i in 0..3 {
            assert_eq!(cache.begin(&format!("m{i}"), "h", t0), Begin::New);
            cache.finish(&format!("m{i}"), Some(ok_reply()), t0);
        }
        assert_eq!(cache.len(), 3);
        // At the limit, the oldest goes.
        assert_eq!(cache.begin("m3", "h", t0), Begin::New);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.begin("m0", "h", t0), Begin::New, "m0 was evicted");
        assert!(matches!(cache.begin("m2", "h", t0), Begin::Replay(_)));
        // After the TTL everything is forgotten.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(cache.begin("m2", "h", later), Begin::New);
        assert_eq!(cache.len(), 1);
        // Forgotten failures do not let the order queue grow without bound.
        for i in 0..100 {
            let id = format!("f{i}");
            assert_eq!(cache.begin(&id, "h", later), Begin::New);
            cache.finish(&id, None, later);
        }
        assert!(cache.order.len() <= 2 * 3 + 1, "{}", cache.order.len());
    }

    #[test]
    fn malformed_requests_get_a_reason_without_the_token() {
        let err = decode(b"{not json").unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
        let facts = serde_json::to_value(Facts::default()).unwrap();
        let good = serde_json::json!({"v": 1, "token": "s3cr3t", "facts": facts});
        assert!(decode(good.to_string().as_bytes()).is_ok());
        let mut extra = good.clone();
        extra["extra"] = 1.into();
        let err = decode(extra.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("not an enrollment request"), "{err}");
        assert!(err.contains("unknown field `extra`"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        // The secret where a number is expected: serde would quote it.
        let mut wrong = good.clone();
        wrong["v"] = "s3cr3t".into();
        let err = decode(wrong.to_string().as_bytes()).unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(decode(&big).unwrap_err().contains("bytes"));
        assert!(decode(&vec![b' '; MAX_REQUEST_BYTES]).is_err());
    }

    #[test]
    fn only_direct_reply_to_addresses_are_answered() {
        assert!(is_direct_reply_to("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAy"));
        assert!(!is_direct_reply_to("amq.rabbitmq.reply-to"));
        assert!(!is_direct_reply_to("amq.rabbitmq.reply-to."));
        assert!(!is_direct_reply_to(
            "comodit.agent.7c9e6679-7425-40de-944b-e07fc1f90ae7"
        ));
        assert!(!is_direct_reply_to("amq.rabbitmq.reply-tox.y"));
    }

    #[test]
    fn host_names_are_bounded_labels() {
        let id: HostId = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        assert_eq!(host_name(" web-1\n", id), "web-1");
        assert_eq!(host_name("", id), "host-7c9e6679");
        assert_eq!(host_name(&"a".repeat(300), id).len(), MAX_HOST_NAME_CHARS);
        assert_eq!(host_name("a\u{7}b", id), "ab");
    }

    #[test]
    fn passwords_are_long_and_random() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 2 * PASSWORD_BYTES);
        assert_ne!(a, b);
    }
}
