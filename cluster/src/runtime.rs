//! The running control-plane member (DESIGN §7): [`ClusterNode`] puts the sans-IO
//! [`RaftNode`], the durable [`FileLogStore`] and the authenticated [`Transport`] together, keeps
//! this node's lease, and, on the leader, the shard table.
//!
//! **One task drives Raft.** It ticks every `tick_ms`, steps what the transport delivers, and after
//! each of those calls [`RaftNode::ready`], which persists (the store is durable on return) before
//! it hands out the messages that depend on it; the task then sends them, looks at what was applied
//! and publishes a new view (shard table, lease validity) for [`ClusterNode::owned`] and a tick on
//! [`ClusterNode::changes`] when ownership or lease validity changed. A fresh `data_dir` is
//! bootstrapped with the founding voters; otherwise the node restarts from it.
//!
//! **Leases** (the rules and their proof are in [`crate::lease`]). Every node, followers included,
//! proposes [`Command::RenewLease`] every `renew_every_ms` (a follower's proposal is forwarded by
//! raft to the leader). Each proposal carries a random tag; the holder remembers the send time of
//! each tag on its own clock and, when the renewal applies, counts its [`HeldLease`] from that send
//! time (obligation 3). The renewal names the holder's current lease number; the leader revokes a
//! lease that surely expired with [`Command::RevokeLease`] before reassigning its shards, and the
//! state machine rejects renewals of a revoked lease (obligation 1). A new leader starts a
//! [`GrantedLease`] for every node at its own takeover time (obligation 2) and renews it when it sees
//! a renewal apply; a node is *live* while its granted lease has not surely expired.
//!
//! **Shard table** (leader only, one proposal outstanding at a time): `Init{n_shards}` on an empty
//! state; `AddNode` for founding voters missing from the node table; `RevokeLease` for nodes whose
//! lease surely expired; then [`allocate`] over the live nodes. A shard whose owner is dead (or
//! none) goes to its new owner directly: the old owner surely stopped. A shard moving between two
//! *live* nodes is handed off in two steps so that no two nodes ever act for it at once: first it
//! is unassigned, and only once the old owner reported (through the `applied` index of a renewal)
//! that it applied the unassignment, or its lease surely expired, does the leader give it out. A
//! new leader does not know which handoff its predecessor left half done, so it first waits the
//! same way for every node to apply the log it inherited.
//!
//! **Membership.** A node started with `join` contacts the members it was given over the
//! transport's join connection (`transport::request_join`); the member that answers proposes
//! [`Command::AddNode`] for it (forwarded to the leader) and tells it every member's address. The
//! leader then, one `ConfChangeV2` at a time: adds every node of the node table that Raft does not
//! know yet as a *learner*; promotes a caught-up active learner to voter while there are fewer than
//! [`MAX_VOTERS`]; removes a node that left, promoting a learner in the same change when a voter
//! goes (joint consensus). Adding a node makes every member compact its log, so a newcomer always
//! starts from a snapshot (the founding membership is in the bootstrap snapshot, not in the log).
//! A newcomer is *live* (gets shards) only once one of its lease renewals applied.
//!
//! **Decommission** ([`ClusterNode::decommission`]): the node is marked `Leaving`; the allocation
//! skips it, so its shards leave it through the usual two-step handoff (it keeps renewing its lease
//! and acting for what it still owns meanwhile); once it owns nothing, the leader proposes
//! [`Command::RemoveNode`] (`Left`), waits until the node applied that (or surely stopped), and
//! removes it from the Raft configuration (handing leadership away first if the leader itself
//! leaves). [`ClusterNode::finished`] tells the process when it may exit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, Message, MessageType};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::allocator::allocate;
use crate::lease::{GrantedLease, HeldLease, LeaseConfig, LeaseConfigError};
use crate::log_store::{FileLogStore, FileStoreError};
use crate::raft_node::{tracing_logger, AppliedKind, RaftNode, RaftNodeConfig, RaftNodeError};
use crate::state::{ClusterState, Command, NodeState, Outcome, ShardEntry, MAX_COMMAND_BYTES};
use crate::transport::{
    request_join, JoinCall, JoinReply, JoinRequest, Transport, TransportConfig, TransportError,
};
use crate::NodeId;

/// Messages from peers waiting for the driver task.
const INBOUND_QUEUE: usize = 4096;
/// Renewals in flight whose send time the holder remembers; older ones are forgotten (a forgotten
/// renewal that applies later extends nothing, which is safe).
const MAX_RENEWALS_IN_FLIGHT: usize = 8;
/// Name of the Raft log file inside `data_dir`.
const LOG_FILE: &str = "raft.redb";
/// Most voters; further nodes stay learners (they own shards all the same).
pub const MAX_VOTERS: usize = 5;
/// A learner within this many entries of the commit index counts as caught up.
const CATCH_UP_SLACK: u64 = 50;
/// Pause between two rounds of join requests while this node is not a member yet.
const JOIN_RETRY: Duration = Duration::from_secs(1);
/// A node that left but never confirmed it knows is removed from the configuration after this
/// many lease lengths (it died while leaving).
const LEFT_GIVE_UP_LEASES: u64 = 10;
/// Requests from the API waiting for the driver.
const ADMIN_QUEUE: usize = 64;

/// Settings of one control-plane member.
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's Raft id (never 0).
    pub id: NodeId,
    /// Address the Raft transport listens on.
    pub listen: SocketAddr,
    /// Shared secret of the cluster (authenticates peers; never logged).
    pub cluster_secret: String,
    /// Where the Raft log lives.
    pub data_dir: PathBuf,
    /// The founding voters, this node included, with their Raft addresses (for bootstrap).
    /// Empty for a node that joins a running cluster.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Members to ask for admission (a node that joins a running cluster); empty for founders.
    pub join: Vec<SocketAddr>,
    /// Number of shards the cluster is initialized with.
    pub n_shards: u32,
    /// Raft tick period (100 in production).
    pub tick_ms: u64,
    /// Lease timing (the same on every node).
    pub lease: LeaseConfig,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("peers", &self.peers)
            .field("join", &self.join)
            .field("n_shards", &self.n_shards)
            .field("tick_ms", &self.tick_ms)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Why a node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings do not make sense.
    #[error("cluster config: {0}")]
    Config(String),
    /// The lease settings are unsafe.
    #[error("cluster lease config: {0}")]
    Lease(#[from] LeaseConfigError),
    /// The Raft log could not be opened.
    #[error("raft log: {0}")]
    Store(#[from] FileStoreError),
    /// Raft refused to start (or failed while running).
    #[error("raft: {0}")]
    Raft(#[from] RaftNodeError),
    /// The transport could not start.
    #[error("raft transport: {0}")]
    Transport(#[from] TransportError),
    /// Creating the data directory failed.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A node of the node table, as [`ClusterNode::status`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Raft id.
    pub id: NodeId,
    /// Address recorded in the node table.
    pub addr: String,
    /// Life-cycle state.
    pub state: NodeState,
}

/// What one member knows of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This node.
    pub id: NodeId,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// The node table (as applied here).
    pub nodes: Vec<NodeStatus>,
    /// Whether this node's lease is valid now.
    pub lease_valid: bool,
    /// Raft voters (as applied here).
    pub voters: Vec<NodeId>,
    /// Raft learners (as applied here).
    pub learners: Vec<NodeId>,
}

/// Why [`ClusterNode::add_node`] or [`ClusterNode::decommission`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The request contradicts the node table (unknown node, id taken, last active node, ...).
    #[error("{0}")]
    Invalid(String),
    /// The cluster cannot take it now (no leader, the driver is busy or stopped): retry.
    #[error("{0}")]
    Unavailable(String),
}

/// Membership requests from outside the driver (the API).
pub(crate) enum AdminCall {
    AddNode(
        JoinRequest,
        oneshot::Sender<Result<Vec<(NodeId, String)>, MembershipError>>,
    ),
    Decommission(NodeId, oneshot::Sender<Result<(), MembershipError>>),
}

/// What the driver task publishes for readers.
struct View {
    leader: Option<NodeId>,
    term: u64,
    commit: u64,
    nodes: Vec<NodeStatus>,
    shards: Vec<ShardEntry>,
    lease: HeldLease,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
    /// When (own clock) this node saw itself `Left`.
    left_at: Option<u64>,
}

pub(crate) struct Shared {
    id: NodeId,
    origin: Instant,
    view: Mutex<View>,
    changes: watch::Sender<u64>,
    admin: mpsc::Sender<AdminCall>,
    /// How long a node that left waits to be removed from the configuration before it stops anyway.
    linger_ms: u64,
}

impl Shared {
    pub(crate) fn new(
        cfg: &ClusterConfig,
        held: HeldLease,
        admin: mpsc::Sender<AdminCall>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            id: cfg.id,
            origin: Instant::now(),
            view: Mutex::new(View {
                leader: None,
                term: 0,
                commit: 0,
                nodes: Vec::new(),
                shards: Vec::new(),
                lease: held,
                voters: Vec::new(),
                learners: Vec::new(),
                left_at: None,
            }),
            changes: watch::channel(0).0,
            admin,
            // Long enough for a few renewals to tell the leader this node saw itself leave.
            linger_ms: 3 * cfg.lease.renew_every_ms + 500,
        })
    }

    /// The shards this node acts for at `now` (its clock): those it owns while its lease is valid.
    pub(crate) fn owned_at(&self, now: u64) -> Vec<(u32, u64)> {
        let v = self.view();
        if !v.lease.is_valid(now) {
            return Vec::new();
        }
        owned_in(&v.shards, self.id)
    }

    /// The epoch of every shard in this node's view of the table.
    pub(crate) fn table_epochs(&self) -> Vec<u64> {
        self.view().shards.iter().map(|s| s.epoch).collect()
    }

    /// The node table as this node applied it.
    pub(crate) fn node_states(&self) -> BTreeMap<NodeId, NodeState> {
        self.view().nodes.iter().map(|n| (n.id, n.state)).collect()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running control-plane member. Cheap to clone; see the module doc.
#[derive(Clone)]
pub struct ClusterNode {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Open (or bootstrap) the Raft log in `data_dir`, start the transport and the driver task.
    /// Everything stops when `shutdown` is cancelled.
    pub async fn start(
        cfg: ClusterConfig,
        shutdown: CancellationToken,
    ) -> Result<ClusterNode, ClusterError> {
        if cfg.id == 0 {
            return Err(ClusterError::Config("node id 0 is reserved".into()));
        }
        if cfg.join.is_empty() && !cfg.peers.contains_key(&cfg.id) {
            return Err(ClusterError::Config(format!(
                "peers must include this node ({})",
                cfg.id
            )));
        }
        if !cfg.join.is_empty() && cfg.listen.ip().is_unspecified() {
            return Err(ClusterError::Config(
                "a joining node must listen on the address the members dial (not 0.0.0.0)".into(),
            ));
        }
        if cfg.tick_ms == 0 {
            return Err(ClusterError::Config("tick_ms must be at least 1".into()));
        }
        let held = HeldLease::new(&cfg.lease)?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ClusterError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        // A joiner starts empty: it receives a snapshot once the leader added it.
        let voters: Vec<NodeId> = if cfg.join.is_empty() {
            cfg.peers.keys().copied().collect()
        } else {
            Vec::new()
        };
        let path = cfg.data_dir.join(LOG_FILE);
        // Opening reads the whole log: off the async threads.
        let store = tokio::task::spawn_blocking(move || FileLogStore::bootstrap(&path, &voters))
            .await
            .map_err(|e| ClusterError::Config(format!("opening the raft log panicked: {e}")))??;
        let node = RaftNode::new(&RaftNodeConfig::new(cfg.id), store, &tracing_logger())?;

        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let transport = Transport::start(
            TransportConfig::new(cfg.listen, cfg.cluster_secret.clone()),
            cfg.id,
            inbound_tx,
            shutdown.clone(),
        )
        .await?;
        for (&id, &addr) in &cfg.peers {
            if id != cfg.id {
                transport.set_peer(id, addr);
            }
        }
        let (joins_tx, joins_rx) = mpsc::channel(ADMIN_QUEUE);
        transport.serve_joins(joins_tx);
        let (admin_tx, admin_rx) = mpsc::channel(ADMIN_QUEUE);
        let shared = Shared::new(&cfg, held, admin_tx);
        if !cfg.join.is_empty() {
            tokio::spawn(
                ask_to_join(
                    cfg.clone(),
                    transport.clone(),
                    shared.clone(),
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("cluster_join", node = cfg.id)),
            );
        }
        let driver = Driver::new(cfg, node, transport, shared.clone())?;
        let id = driver.cfg.id;
        tokio::spawn(
            driver
                .run(inbound_rx, joins_rx, admin_rx, shutdown)
                .instrument(tracing::info_span!("cluster_node", node = id)),
        );
        Ok(ClusterNode { shared })
    }

    /// What this node knows of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let now = self.shared.now_ms();
        let v = self.shared.view();
        ClusterStatus {
            id: self.shared.id,
            leader: v.leader,
            term: v.term,
            commit: v.commit,
            nodes: v.nodes.clone(),
            lease_valid: v.lease.is_valid(now),
            voters: v.voters.clone(),
            learners: v.learners.clone(),
        }
    }

    /// Add node `id` whose transport listens at `addr` (what a join request does; the node itself
    /// must run with `join` set to learn the members). Answers once proposed, not once applied.
    /// Answers the members' addresses `(id, addr)`.
    pub async fn add_node(
        &self,
        id: NodeId,
        addr: String,
    ) -> Result<Vec<(NodeId, String)>, MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.call(AdminCall::AddNode(JoinRequest { id, addr }, tx))
            .await?;
        rx.await.map_err(|_| stopped())?
    }

    /// Start the graceful removal of node `id` (see the module doc). Answers once proposed; the
    /// node table shows `leaving`, then `left`.
    pub async fn decommission(&self, id: NodeId) -> Result<(), MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.call(AdminCall::Decommission(id, tx)).await?;
        rx.await.map_err(|_| stopped())?
    }

    async fn call(&self, call: AdminCall) -> Result<(), MembershipError> {
        tokio::time::timeout(Duration::from_secs(5), self.shared.admin.send(call))
            .await
            .map_err(|_| MembershipError::Unavailable("the cluster driver is busy".into()))?
            .map_err(|_| stopped())
    }

    /// True once this node left the cluster and was removed from the Raft configuration (or left
    /// long enough ago that it will not be needed): the process may exit.
    pub fn finished(&self) -> bool {
        let now = self.shared.now_ms();
        let v = self.shared.view();
        match v.left_at {
            None => false,
            Some(at) => {
                let id = self.shared.id;
                let in_conf = v.voters.contains(&id) || v.learners.contains(&id);
                !in_conf || now >= at.saturating_add(self.shared.linger_ms)
            }
        }
    }

    /// The shard table as applied on this node (index = shard number).
    pub fn shard_table(&self) -> Vec<ShardEntry> {
        self.shared.view().shards.clone()
    }

    /// This node's view for the actors: shards it owns with their epochs, only while its lease is
    /// valid (empty otherwise).
    pub fn owned(&self) -> Vec<(u32, u64)> {
        self.shared.owned_at(self.shared.now_ms())
    }

    /// Ticks whenever [`Self::owned`] may have changed (ownership or lease validity).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}

fn stopped() -> MembershipError {
    MembershipError::Unavailable("the cluster node is stopping".into())
}

/// A joiner's loop: ask the contacts until this node shows in its own node table.
async fn ask_to_join(
    cfg: ClusterConfig,
    transport: Transport,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let me = cfg.id;
    let my_addr = cfg.listen.to_string();
    let secret = cfg.cluster_secret.as_bytes().to_vec();
    loop {
        if shared.view().nodes.iter().any(|n| n.id == me) {
            info!(node = me, "member of the cluster");
            return;
        }
        for &contact in &cfg.join {
            match request_join(contact, &secret, me, &my_addr).await {
                Ok(JoinReply::Accepted { members }) => {
                    for (id, addr) in members {
                        if id == me {
                            continue;
                        }
                        match addr.parse::<SocketAddr>() {
                            Ok(a) => transport.set_peer(id, a),
                            Err(_) => warn!(node = me, peer = id, addr, "member address unusable"),
                        }
                    }
                    debug!(node = me, %contact, "join accepted");
                    break;
                }
                Ok(JoinReply::Refused(why)) => {
                    warn!(node = me, %contact, reason = why, "join refused")
                }
                Err(e) => debug!(node = me, %contact, error = %e, "join request failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(JOIN_RETRY) => {}
        }
    }
}

fn owned_in(shards: &[ShardEntry], id: NodeId) -> Vec<(u32, u64)> {
    shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.owner == Some(id))
        .map(|(i, s)| (i as u32, s.epoch))
        .collect()
}

/// A validated lease setting to start [`GrantedLease`]s from.
struct Grant(GrantedLease);

impl Grant {
    /// A lease the leader counts from `now` (its own clock).
    fn fresh(&self, now: u64) -> GrantedLease {
        let mut g = self.0.clone();
        g.renewed(now);
        g
    }
}

type Published = (Vec<(u32, u64)>, bool, bool, Vec<NodeId>, Vec<NodeId>);

/// Leader-only bookkeeping, reset at every takeover.
struct LeaderState {
    term: u64,
    /// Per node: its lease as the leader sees it, and the lease number it was last renewed under.
    granted: BTreeMap<NodeId, (GrantedLease, u64)>,
    /// Per node: highest applied index it reported in a renewal.
    acked: BTreeMap<NodeId, u64>,
    /// Log index of the one admin proposal not applied yet.
    outstanding: Option<u64>,
    /// A handoff in progress: the index of the unassignment and the nodes that must apply it.
    handoff: Option<(u64, BTreeSet<NodeId>)>,
    /// Last log index at the takeover (what a node must have applied for a predecessor's
    /// proposals to be known to it).
    takeover_index: u64,
    /// Per node that left: the index of its [`Command::RemoveNode`] as proposed by this leader.
    left_at: BTreeMap<NodeId, u64>,
    /// Per node that left and is still in the configuration: when this leader first saw that.
    left_seen: BTreeMap<NodeId, u64>,
}

/// Raft's membership as the leader sees it.
struct Membership {
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
    matched: BTreeMap<NodeId, u64>,
    commit: u64,
}

impl Membership {
    fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    fn caught_up(&self, id: NodeId) -> bool {
        self.matched
            .get(&id)
            .is_some_and(|m| m.saturating_add(CATCH_UP_SLACK) >= self.commit)
    }
}

/// What the leader does next.
#[derive(Debug, Clone, PartialEq)]
enum Admin {
    Command(Command),
    ConfChange(ConfChangeV2),
    TransferLeader(NodeId),
}

fn conf_change(changes: &[(ConfChangeType, NodeId)]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    cc.set_changes(
        changes
            .iter()
            .map(|&(t, id)| {
                let mut c = ConfChangeSingle::default();
                c.set_change_type(t);
                c.node_id = id;
                c
            })
            .collect::<Vec<_>>()
            .into(),
    );
    cc
}

/// Where the driver's messages go: the TCP transport, or the simulator's network.
pub(crate) trait Outbox {
    fn send(&self, msg: Message);
    fn set_peer(&self, id: NodeId, addr: SocketAddr);
    fn remove_peer(&self, id: NodeId);
}

impl Outbox for Transport {
    fn send(&self, msg: Message) {
        Transport::send(self, msg)
    }
    fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        Transport::set_peer(self, id, addr)
    }
    fn remove_peer(&self, id: NodeId) {
        Transport::remove_peer(self, id)
    }
}

/// The member's logic over any log store and outbox, with the time given from outside (`now`,
/// milliseconds of this node's clock): the runtime drives it with the real clock and the TCP
/// transport, `crate::lease_sim` with simulated clocks and network.
pub(crate) struct Driver<S: crate::raft_node::LogStore = FileLogStore, O: Outbox = Transport> {
    cfg: ClusterConfig,
    grant: Grant,
    node: RaftNode<S>,
    transport: O,
    shared: Arc<Shared>,
    /// This node's clock at the current step (set by whoever drives the driver).
    now: u64,
    /// Renewal tag → send time (own clock).
    in_flight: BTreeMap<u64, u64>,
    last_renew_sent: Option<u64>,
    leader: Option<LeaderState>,
    /// (owned, lease valid, left, voters, learners) as last announced on `changes`.
    published: Option<Published>,
    /// A renewal should go out now (it acknowledges a release).
    ack_now: bool,
}

impl Driver {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<(NodeId, Message)>,
        mut joins: mpsc::Receiver<JoinCall>,
        mut admin: mpsc::Receiver<AdminCall>,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.cfg.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(node = self.cfg.id, "cluster node running");
        loop {
            let ticked = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => { self.now = self.shared.now_ms(); self.node.tick(); true }
                msg = inbound.recv() => match msg {
                    Some((from, m)) => {
                        if let Err(e) = self.node.step(m) {
                            debug!(node = self.cfg.id, peer = from, error = %e, "raft message not stepped");
                        }
                        false
                    }
                    None => break,
                },
                Some((req, reply)) = joins.recv() => {
                    self.now = self.shared.now_ms();
                    let answer = match self.admit(&req) {
                        Ok(members) => JoinReply::Accepted { members },
                        Err(e) => JoinReply::Refused(e.to_string()),
                    };
                    let _ = reply.send(answer);
                    false
                }
                Some(call) = admin.recv() => {
                    self.now = self.shared.now_ms();
                    match call {
                        AdminCall::AddNode(req, reply) => {
                            let _ = reply.send(self.admit(&req));
                        }
                        AdminCall::Decommission(id, reply) => {
                            let _ = reply.send(self.decommission(id));
                        }
                    }
                    false
                }
            };
            self.now = self.shared.now_ms();
            if let Err(e) = self.round(ticked) {
                // A lost write cannot be recovered from in place: stop, the data dir restarts us.
                warn!(node = self.cfg.id, error = %e, "cluster node stops");
                break;
            }
        }
        info!(node = self.cfg.id, "cluster node stopped");
    }
}

impl<S: crate::raft_node::LogStore, O: Outbox> Driver<S, O> {
    pub(crate) fn new(
        cfg: ClusterConfig,
        node: RaftNode<S>,
        transport: O,
        shared: Arc<Shared>,
    ) -> Result<Self, ClusterError> {
        Ok(Driver {
            grant: Grant(GrantedLease::new(&cfg.lease, 0)?),
            cfg,
            node,
            transport,
            shared,
            now: 0,
            in_flight: BTreeMap::new(),
            last_renew_sent: None,
            leader: None,
            published: None,
            ack_now: false,
        })
    }

    /// Set this node's clock for the next calls.
    pub(crate) fn set_now(&mut self, now: u64) {
        self.now = now;
    }

    pub(crate) fn raft(&mut self) -> &mut RaftNode<S> {
        &mut self.node
    }

    /// Admit node `req.id` at `req.addr` (a join request, or the API): propose it to the node table
    /// unless it is there already, and answer with the members' addresses `(id, addr)`.
    pub(crate) fn admit(
        &mut self,
        req: &JoinRequest,
    ) -> Result<Vec<(NodeId, String)>, MembershipError> {
        let refuse = |why: String| Err(MembershipError::Invalid(why));
        let retry = |why: String| Err(MembershipError::Unavailable(why));
        if req.id == 0 {
            return refuse("node id 0 is reserved".into());
        }
        let Ok(addr) = req.addr.parse::<SocketAddr>() else {
            return refuse(format!("{:?} is not an ip:port address", req.addr));
        };
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return refuse(format!("{addr} cannot be dialed"));
        }
        let state = self.node.state();
        match state.nodes.get(&req.id) {
            Some(n) if n.state == NodeState::Left => {
                return refuse(format!(
                    "node {} left the cluster; ids are never reused",
                    req.id
                ))
            }
            Some(n) if n.addr != req.addr => {
                return refuse(format!("node {} is a member at {}", req.id, n.addr))
            }
            Some(_) => {}
            None if req.id == self.cfg.id => {
                return retry(format!("node {} is not a member yet", req.id))
            }
            None => {
                if state.n_shards == 0 || self.node.leader().is_none() {
                    return retry("the cluster has no leader yet".into());
                }
                let cmd = Command::AddNode {
                    id: req.id,
                    addr: req.addr.clone(),
                };
                if let Err(e) = self.propose_anywhere(&cmd) {
                    return retry(format!("not proposed: {e}"));
                }
                info!(node = self.cfg.id, joiner = req.id, addr = %req.addr, "node admission proposed");
            }
        }
        if req.id != self.cfg.id {
            self.transport.set_peer(req.id, addr);
        }
        let mut members: BTreeMap<NodeId, String> = self
            .cfg
            .peers
            .iter()
            .map(|(id, a)| (*id, a.to_string()))
            .collect();
        for (id, n) in &self.node.state().nodes {
            if n.state == NodeState::Left {
                members.remove(id);
            } else {
                members.insert(*id, n.addr.clone());
            }
        }
        members.insert(self.cfg.id, self.cfg.listen.to_string());
        Ok(members.into_iter().collect())
    }

    /// Mark `id` as leaving (see the module doc, "Decommission").
    pub(crate) fn decommission(&mut self, id: NodeId) -> Result<(), MembershipError> {
        let state = self.node.state();
        match state.nodes.get(&id).map(|n| n.state) {
            None => {
                return Err(MembershipError::Invalid(format!(
                    "node {id} is not a member"
                )))
            }
            Some(NodeState::Left) => {
                return Err(MembershipError::Invalid(format!("node {id} already left")))
            }
            Some(NodeState::Leaving) => return Ok(()),
            Some(NodeState::Active) => {}
        }
        if !state.active_nodes().iter().any(|&n| n != id) {
            return Err(MembershipError::Invalid(format!(
                "node {id} is the last active node: nobody could take its shards"
            )));
        }
        if self.node.leader().is_none() {
            return Err(MembershipError::Unavailable(
                "the cluster has no leader yet".into(),
            ));
        }
        self.propose_anywhere(&Command::NodeLeaving { id })
            .map_err(|e| MembershipError::Unavailable(format!("not proposed: {e}")))?;
        info!(node = self.cfg.id, leaving = id, "decommission proposed");
        Ok(())
    }

    /// One pass after a tick or a message: ready (persist, apply), send, react, publish.
    pub(crate) fn round(&mut self, ticked: bool) -> Result<(), RaftNodeError> {
        let applied = self.flush()?;
        // Between ticks too when something applied or a release must be acknowledged: a
        // handoff is a chain of such steps, each otherwise waiting for the next tick.
        if ticked || applied || self.ack_now {
            let now = self.now;
            self.maybe_renew(now)?;
            if self.node.is_leader() {
                self.lead(now)?;
            } else {
                self.leader = None;
            }
            self.flush()?;
        }
        Ok(())
    }

    /// Persist and apply what raft has, send its messages, note applied renewals, publish.
    /// Returns whether any entry applied.
    fn flush(&mut self) -> Result<bool, RaftNodeError> {
        let out = self.node.ready()?;
        for m in out.messages {
            self.transport.send(m);
        }
        let now = self.now;
        for applied in &out.applied {
            let AppliedKind::Command(
                Command::RenewLease {
                    node,
                    lease_seq,
                    renewal,
                    applied,
                },
                outcome,
            ) = &applied.kind
            else {
                continue;
            };
            if let Some(l) = self.leader.as_mut() {
                let acked = l.acked.entry(*node).or_default();
                *acked = (*acked).max(*applied);
            }
            if *outcome != Outcome::Applied {
                continue;
            }
            if *node == self.cfg.id {
                if let Some(sent_at) = self.in_flight.remove(renewal) {
                    self.shared.view().lease.renewed(sent_at);
                }
            }
            if let Some(l) = self.leader.as_mut() {
                match l.granted.get_mut(node) {
                    Some((g, seq)) => {
                        g.renewed(now);
                        *seq = *lease_seq;
                    }
                    None => {
                        l.granted.insert(*node, (self.grant.fresh(now), *lease_seq));
                    }
                }
            }
        }
        self.publish(now);
        Ok(!out.applied.is_empty())
    }

    fn publish(&mut self, now: u64) {
        let state = self.node.state();
        let mut v = self.shared.view();
        v.leader = self.node.leader();
        v.term = self.node.term();
        v.commit = self.node.commit_index();
        if v.shards != state.shards {
            v.shards = state.shards.clone();
        }
        let conf = self.node.conf_state();
        v.voters = conf.voters.clone();
        v.voters.sort_unstable();
        v.learners = conf.learners.clone();
        v.learners.sort_unstable();
        let me_left = state
            .nodes
            .get(&self.cfg.id)
            .is_some_and(|n| n.state == NodeState::Left);
        match (me_left, v.left_at) {
            (true, None) => {
                info!(node = self.cfg.id, "this node left the cluster");
                v.left_at = Some(now);
            }
            (false, Some(_)) => v.left_at = None,
            _ => {}
        }
        if v.nodes.len() != state.nodes.len()
            || v.nodes
                .iter()
                .zip(&state.nodes)
                .any(|(a, (id, n))| a.id != *id || a.state != n.state || a.addr != n.addr)
        {
            v.nodes = state
                .nodes
                .iter()
                .map(|(id, n)| NodeStatus {
                    id: *id,
                    addr: n.addr.clone(),
                    state: n.state,
                })
                .collect();
        }
        // The node table is where members learn each other's addresses. A node that left keeps
        // its link until Raft removed it from the configuration: it must still hear that it left.
        for (id, n) in &state.nodes {
            if *id == self.cfg.id {
                continue;
            }
            let in_conf = v.voters.contains(id) || v.learners.contains(id);
            match (n.state, n.addr.parse::<SocketAddr>()) {
                (NodeState::Left, _) if !in_conf => self.transport.remove_peer(*id),
                (_, Ok(addr)) => self.transport.set_peer(*id, addr),
                (_, Err(_)) => {}
            }
        }
        let now_view = (
            owned_in(&v.shards, self.cfg.id),
            v.lease.is_valid(now),
            v.left_at.is_some(),
            v.voters.clone(),
            v.learners.clone(),
        );
        drop(v);
        if self.published.as_ref() != Some(&now_view) {
            // Shards released: tell the leader at once that this node applied it (the handoff
            // waits for that), instead of at the next periodic renewal.
            if let Some(before) = &self.published {
                if before
                    .0
                    .iter()
                    .any(|(s, _)| !now_view.0.iter().any(|(n, _)| n == s))
                {
                    self.ack_now = true;
                }
            }
            self.published = Some(now_view);
            self.shared.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Send a renewal when the lease asks for one and none is fresh in flight.
    fn maybe_renew(&mut self, now: u64) -> Result<(), RaftNodeError> {
        let ack = self.ack_now;
        if !ack && !self.shared.view().lease.must_renew(now) {
            return Ok(());
        }
        let retry_after = (self.cfg.lease.renew_every_ms / 2).max(2 * self.cfg.tick_ms);
        if !ack
            && self
                .last_renew_sent
                .is_some_and(|t| now < t.saturating_add(retry_after))
        {
            return Ok(());
        }
        self.ack_now = false;
        let Some(leader) = self.node.leader() else {
            return Ok(());
        };
        let state = self.node.state();
        let renewal = rand::random::<u64>();
        let cmd = Command::RenewLease {
            node: self.cfg.id,
            lease_seq: state.lease_seq(self.cfg.id),
            renewal,
            applied: state.applied_index,
        };
        self.last_renew_sent = Some(now);
        if self.in_flight.len() >= MAX_RENEWALS_IN_FLIGHT {
            // Forget the oldest send: if it still applies, it extends nothing.
            if let Some((&oldest, _)) = self.in_flight.iter().min_by_key(|(_, &t)| t) {
                self.in_flight.remove(&oldest);
            }
        }
        self.in_flight.insert(renewal, now);
        debug!(node = self.cfg.id, leader, "lease renewal proposed");
        if let Err(e) = self.propose_anywhere(&cmd) {
            debug!(node = self.cfg.id, error = %e, "lease renewal not proposed");
        }
        Ok(())
    }

    /// Propose from any role: the leader appends, a follower forwards to its leader (raft does).
    fn propose_anywhere(&mut self, cmd: &Command) -> Result<(), RaftNodeError> {
        if self.node.is_leader() {
            return self.node.propose(cmd);
        }
        let data = cmd.encode()?;
        if data.len() as u64 > MAX_COMMAND_BYTES {
            return Err(RaftNodeError::CommandTooLarge(data.len()));
        }
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.cfg.id;
        m.to = self.cfg.id;
        m.set_entries(
            vec![Entry {
                data: data.into(),
                ..Entry::default()
            }]
            .into(),
        );
        self.node.step(m)
    }

    /// The leader's upkeep of the shard table and the membership: one proposal at a time.
    fn lead(&mut self, now: u64) -> Result<(), RaftNodeError> {
        let term = self.node.term();
        if self.leader.as_ref().is_none_or(|l| l.term != term) {
            // Takeover: every lease counts from now (obligation 2).
            let granted = self
                .node
                .state()
                .nodes
                .keys()
                .map(|&id| (id, (self.grant.fresh(now), self.node.state().lease_seq(id))))
                .collect();
            info!(node = self.cfg.id, term, "leading the control plane");
            let takeover_index = self.node.last_index();
            self.leader = Some(LeaderState {
                term,
                granted,
                acked: BTreeMap::new(),
                outstanding: None,
                // A handoff the previous leader started may be half done: before giving out any
                // unowned shard, every live node must have applied the whole log it inherited.
                handoff: Some((
                    takeover_index,
                    self.node.state().nodes.keys().copied().collect(),
                )),
                takeover_index,
                left_at: BTreeMap::new(),
                left_seen: BTreeMap::new(),
            });
        }
        let state = self.node.state().clone();
        let Some(l) = self.leader.as_mut() else {
            return Ok(());
        };
        if l.outstanding.is_some_and(|i| i > state.applied_index) {
            return Ok(());
        }
        l.outstanding = None;
        let mut conf = self.node.conf_state();
        conf.voters.sort_unstable();
        conf.learners.sort_unstable();
        let members = Membership {
            voters: conf.voters,
            learners: conf.learners,
            matched: self.node.matched(),
            commit: self.node.commit_index(),
        };
        let Some(next) = next_admin_command(&self.cfg, &state, l, now, &members) else {
            return Ok(());
        };
        debug!(node = self.cfg.id, ?next, "leader proposes");
        let cmd = match next {
            Admin::TransferLeader(to) => {
                info!(
                    node = self.cfg.id,
                    to, "handing leadership over before leaving"
                );
                self.node.transfer_leader(to);
                return Ok(());
            }
            Admin::ConfChange(cc) => {
                info!(node = self.cfg.id, changes = ?cc.get_changes(), "membership change proposed");
                self.node.propose_conf_change(cc)?;
                let index = self.node.last_index();
                if let Some(l) = self.leader.as_mut() {
                    l.outstanding = Some(index);
                }
                return Ok(());
            }
            Admin::Command(cmd) => cmd,
        };
        self.node.propose(&cmd)?;
        let index = self.node.last_index();
        if let Some(l) = self.leader.as_mut() {
            l.outstanding = Some(index);
            match &cmd {
                Command::AssignShards { owners } => {
                    // An unassignment of shards whose owner is live starts a handoff.
                    let released: BTreeSet<NodeId> = state
                        .shards
                        .iter()
                        .zip(owners)
                        .filter_map(|(s, o)| match (s.owner, o) {
                            (Some(old), None) => Some(old),
                            _ => None,
                        })
                        .collect();
                    if !released.is_empty() {
                        l.handoff = Some((index, released));
                    }
                }
                Command::RemoveNode { id } => {
                    l.left_at.insert(*id, index);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The next thing the leader should do, if any (see the module doc for the order).
fn next_admin_command(
    cfg: &ClusterConfig,
    state: &ClusterState,
    l: &mut LeaderState,
    now: u64,
    members: &Membership,
) -> Option<Admin> {
    if state.n_shards == 0 {
        return Some(Admin::Command(Command::Init {
            n_shards: cfg.n_shards,
        }));
    }
    if let Some(&id) = members
        .voters
        .iter()
        .find(|id| !state.nodes.contains_key(id))
    {
        let addr = cfg
            .peers
            .get(&id)
            .map(|a| a.to_string())
            .unwrap_or_default();
        return Some(Admin::Command(Command::AddNode { id, addr }));
    }
    let alive = |id: &NodeId| {
        l.granted
            .get(id)
            .is_some_and(|(g, _)| !g.surely_expired(now))
    };
    // Nodes that may act for shards: active, and leaving ones until they hand everything off.
    let acting: Vec<NodeId> = state
        .nodes
        .iter()
        .filter(|(_, n)| n.state != NodeState::Left)
        .map(|(id, _)| *id)
        .collect();
    // Revoke a surely expired lease before its shards go elsewhere.
    for id in &acting {
        if let Some((g, seq)) = l.granted.get(id) {
            if g.surely_expired(now) && state.lease_seq(*id) == *seq {
                return Some(Admin::Command(Command::RevokeLease {
                    node: *id,
                    lease_seq: *seq,
                }));
            }
        }
    }
    for (id, n) in &state.nodes {
        if n.state == NodeState::Left && members.contains(*id) {
            l.left_seen.entry(*id).or_insert(now);
        }
    }
    if let Some(admin) = membership_change(cfg, state, l, members, now) {
        return Some(admin);
    }
    // A handoff waits until every old owner applied the unassignment or surely stopped.
    if let Some((index, owners)) = &l.handoff {
        let done = owners.iter().all(|o| {
            l.acked.get(o).is_some_and(|a| a >= index)
                || (*o == cfg.id && state.applied_index >= *index)
                || !alive(o)
        });
        if !done {
            return None;
        }
        l.handoff = None;
    }
    let targets: Vec<NodeId> = state
        .active_nodes()
        .into_iter()
        .filter(|id| alive(id))
        .collect();
    let current: Vec<Option<NodeId>> = state.shards.iter().map(|s| s.owner).collect();
    let plan = allocate(&targets, &current);
    // Shards leaving a live owner for another node are first unassigned (two-step handoff).
    let step: Vec<Option<NodeId>> = current
        .iter()
        .zip(&plan)
        .map(|(cur, new)| match cur {
            Some(old) if alive(old) && acting.contains(old) && cur != new => None,
            _ => *new,
        })
        .collect();
    if step != current {
        return Some(Admin::Command(Command::AssignShards { owners: step }));
    }
    // A leaving node that owns nothing any more has left.
    let done_leaving = state.nodes.iter().find(|(id, n)| {
        n.state == NodeState::Leaving && !state.shards.iter().any(|s| s.owner == Some(**id))
    });
    done_leaving.map(|(id, _)| Admin::Command(Command::RemoveNode { id: *id }))
}

/// The next change of the Raft configuration, if one is due: add new nodes as learners, take out
/// nodes that left (once they applied it), promote caught-up learners to voters.
fn membership_change(
    cfg: &ClusterConfig,
    state: &ClusterState,
    l: &LeaderState,
    members: &Membership,
    now: u64,
) -> Option<Admin> {
    use ConfChangeType::{AddLearnerNode, AddNode, RemoveNode};
    let promotable = |exclude: NodeId| {
        members.learners.iter().copied().find(|&id| {
            id != exclude
                && members.caught_up(id)
                && state
                    .nodes
                    .get(&id)
                    .is_some_and(|n| n.state == NodeState::Active)
        })
    };
    if let Some((&id, _)) = state
        .nodes
        .iter()
        .find(|(id, n)| n.state != NodeState::Left && !members.contains(**id))
    {
        return Some(Admin::ConfChange(conf_change(&[(AddLearnerNode, id)])));
    }
    for (&id, n) in &state.nodes {
        if n.state != NodeState::Left || !members.contains(id) {
            continue;
        }
        // It must know it left (so that it stops) before it stops hearing from us; a node that
        // never says so (it died meanwhile) is removed after a long wait.
        let since = l.left_at.get(&id).copied().unwrap_or(l.takeover_index);
        let knows = l.acked.get(&id).is_some_and(|a| *a >= since);
        let gave_up = l
            .left_seen
            .get(&id)
            .is_some_and(|&t| now >= t.saturating_add(LEFT_GIVE_UP_LEASES * cfg.lease.lease_ms));
        if !knows && !gave_up {
            continue;
        }
        if id == cfg.id {
            let heir = members
                .voters
                .iter()
                .copied()
                .filter(|&v| v != id && members.caught_up(v))
                .max_by_key(|v| members.matched.get(v).copied().unwrap_or(0));
            return heir.map(Admin::TransferLeader);
        }
        let mut changes = vec![(RemoveNode, id)];
        if members.voters.contains(&id) {
            if let Some(learner) = promotable(id) {
                changes.push((AddNode, learner));
            }
        }
        return Some(Admin::ConfChange(conf_change(&changes)));
    }
    if members.voters.len() < MAX_VOTERS {
        if let Some(learner) = promotable(0) {
            return Some(Admin::ConfChange(conf_change(&[(AddNode, learner)])));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClusterConfig {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        ClusterConfig {
            id: 1,
            listen: addr,
            cluster_secret: "s".into(),
            data_dir: PathBuf::new(),
            peers: (1..=3).map(|id| (id, addr)).collect(),
            join: Vec::new(),
            n_shards: 4,
            tick_ms: 20,
            lease: LeaseConfig {
                lease_ms: 1_000,
                max_drift_ppm: 0,
                renew_every_ms: 200,
            },
        }
    }

    fn leader(cfg: &ClusterConfig, live: &[NodeId], now: u64) -> LeaderState {
        let grant = Grant(GrantedLease::new(&cfg.lease, 0).unwrap());
        LeaderState {
            term: 1,
            granted: live.iter().map(|&id| (id, (grant.fresh(now), 0))).collect(),
            acked: BTreeMap::new(),
            outstanding: None,
            handoff: None,
            takeover_index: 0,
            left_at: BTreeMap::new(),
            left_seen: BTreeMap::new(),
        }
    }

    /// Raft membership: `voters`, every one fully caught up.
    fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            matched: voters.iter().chain(learners).map(|&v| (v, 100)).collect(),
            commit: 100,
        }
    }

    /// The next shard-table command with founding voters `voters` (panics on anything else).
    fn next_command(
        cfg: &ClusterConfig,
        state: &ClusterState,
        l: &mut LeaderState,
        now: u64,
        voters: Vec<NodeId>,
    ) -> Option<Command> {
        match next_admin_command(cfg, state, l, now, &members(&voters, &[])) {
            None => None,
            Some(Admin::Command(c)) => Some(c),
            Some(other) => panic!("expected a command, got {other:?}"),
        }
    }

    /// Applies `cmd` at the next index; returns that index.
    fn apply(state: &mut ClusterState, cmd: &Command) -> u64 {
        let index = state.applied_index + 1;
        assert_eq!(state.apply(index, cmd), Outcome::Applied, "{cmd:?}");
        index
    }

    #[test]
    fn a_shard_moves_between_live_nodes_only_after_the_old_owner_applied_its_release() {
        let cfg = cfg();
        let mut state = ClusterState::default();
        let mut l = leader(&cfg, &[1, 2, 3], 0);
        // Init, then the founding voters, then the first allocation (no owner to wait for).
        while let Some(cmd) = next_command(&cfg, &state, &mut l, 0, vec![1, 2]) {
            apply(&mut state, &cmd);
        }
        let owners: Vec<_> = state.shards.iter().map(|s| s.owner).collect();
        assert_eq!(owners, [Some(1), Some(1), Some(2), Some(2)]);

        // Node 3 joins: two shards must leave live owners; first they become unowned.
        let cmd = next_command(&cfg, &state, &mut l, 0, vec![1, 2, 3]).unwrap();
        assert_eq!(
            cmd,
            Command::AddNode {
                id: 3,
                addr: "127.0.0.1:1".into()
            }
        );
        apply(&mut state, &cmd);
        let cmd = next_command(&cfg, &state, &mut l, 0, vec![1, 2, 3]).unwrap();
        let Command::AssignShards { owners } = &cmd else {
            panic!("{cmd:?}")
        };
        assert!(owners.iter().all(|o| *o != Some(3)), "{owners:?}");
        assert_eq!(
            owners.iter().filter(|o| o.is_none()).count(),
            1,
            "{owners:?}"
        );
        // 4 shards over 3: node 1 (lower id) keeps the larger share, node 2 gives one up.
        let from = owners.iter().position(Option::is_none).unwrap();
        assert_eq!(state.shards[from].owner, Some(2));
        let release = apply(&mut state, &cmd);
        // What `lead` records for this proposal.
        l.handoff = Some((release, [2].into()));

        // No acknowledgement yet, or one from before the release: nothing is given out.
        assert!(next_command(&cfg, &state, &mut l, 0, vec![1, 2, 3]).is_none());
        l.acked.insert(2, release - 1);
        assert!(next_command(&cfg, &state, &mut l, 0, vec![1, 2, 3]).is_none());
        // Node 2 applied the release: now the shard goes to node 3.
        l.acked.insert(2, release);
        let cmd = next_command(&cfg, &state, &mut l, 0, vec![1, 2, 3]).unwrap();
        let Command::AssignShards { owners } = &cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(
            owners.iter().filter(|o| **o == Some(3)).count(),
            1,
            "{owners:?}"
        );
        assert!(owners.iter().all(Option::is_some));
    }

    #[test]
    fn a_dead_node_is_revoked_then_its_shards_go_straight_to_the_living() {
        let cfg = cfg();
        let mut state = ClusterState::default();
        let mut l = leader(&cfg, &[1, 2, 3], 0);
        while let Some(cmd) = next_command(&cfg, &state, &mut l, 0, vec![1, 2, 3]) {
            apply(&mut state, &cmd);
        }
        let before = state.shards.clone();
        // Nodes 1 and 2 renewed at 900; node 3 did not. At 1000 its lease has not surely expired.
        for id in [1, 2] {
            l.granted.get_mut(&id).unwrap().0.renewed(900);
        }
        assert!(next_command(&cfg, &state, &mut l, 1_000, vec![1, 2, 3]).is_none());
        let cmd = next_command(&cfg, &state, &mut l, 1_001, vec![1, 2, 3]).unwrap();
        assert_eq!(
            cmd,
            Command::RevokeLease {
                node: 3,
                lease_seq: 0
            }
        );
        apply(&mut state, &cmd);
        let cmd = next_command(&cfg, &state, &mut l, 1_001, vec![1, 2, 3]).unwrap();
        let index = apply(&mut state, &cmd);
        for (old, new) in before.iter().zip(&state.shards) {
            assert_ne!(new.owner, Some(3));
            assert!(new.owner.is_some());
            if old.owner == Some(3) {
                assert_eq!(new.epoch, index);
            } else {
                assert_eq!(new, old, "shards of live nodes stay put");
            }
        }
    }
}
