//! A sans-IO Raft driver: the `raft` crate's `RawNode` plus the [`ClusterState`] it replicates.
//!
//! [`RaftNode`] does no IO of its own. The caller drives it:
//!
//! 1. feeds it time with [`RaftNode::tick`] and peer messages with [`RaftNode::step`];
//! 2. proposes changes with [`RaftNode::propose`] (shard-table commands) or
//!    [`RaftNode::propose_conf_change`] (membership, `ConfChangeV2`: joint consensus);
//! 3. calls [`RaftNode::ready`] after each of those, and sends the [`Output::messages`] it returns.
//!
//! Inside `ready` the driver follows raft-rs's ready protocol: persist the snapshot, the new log
//! entries and the hard state through the [`LogStore`] (synchronously: messages that depend on them
//! are only handed out afterwards, DESIGN §7), apply committed entries to the state machine, and
//! compact the log into a snapshot every [`RaftNodeConfig::snapshot_interval`] applied entries.
//! Persistence is abstracted by [`LogStore`]; [`MemLogStore`] keeps everything in memory (the
//! simulator's "disk"); [`crate::log_store::FileLogStore`] is the durable one (fsync'd on every write).
//!
//! **Restart.** A node is rebuilt from its store alone: the state machine from the latest snapshot's
//! data, then raft hands out again the committed entries after the snapshot, which are re-applied.
//! So the membership in [`RaftState::conf_state`] is the one *of the snapshot*: configuration
//! changes after it are replayed like any other entry.
//!
//! **Settings.** `pre_vote` and `check_quorum` are on (a partitioned node cannot disrupt the group
//! when it comes back; a leader cut off from the majority steps down), reads are
//! `ReadOnlyOption::Safe` (a read index round-trips to a quorum, no reliance on clocks).
//!
//! **Security.** `raft` 0.7 decodes messages with `protobuf` 2.28, which can exhaust the stack on
//! crafted input (RUSTSEC-2024-0437). Raft messages must be decoded only from authenticated peers:
//! the transport (still to come) authenticates the peer before handing bytes to the decoder, and
//! this module only ever receives decoded [`Message`]s.
//!
//! **Logging.** raft logs through `slog`; [`tracing_logger`] bridges it into `tracing` (target
//! `raft`), so no terminal logger is pulled in.

use std::fmt;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message,
    MessageType, Snapshot,
};
use raft::{Config, RaftState, RawNode, ReadOnlyOption, StateRole, Storage};
use tracing::{debug, error, warn};

use crate::state::{ClusterState, CodecError, Command, Outcome, MAX_COMMAND_BYTES};
use crate::NodeId;

/// Tuning of one Raft node.
#[derive(Debug, Clone)]
pub struct RaftNodeConfig {
    /// This node's Raft id (never 0).
    pub id: NodeId,
    /// Ticks without hearing from a leader before a follower campaigns.
    pub election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// The randomized election timeout is drawn from `[min, max)` ticks; `None`: raft's default
    /// `[election_tick, 2 * election_tick)`. raft-rs draws it from the thread RNG, so the
    /// simulator pins a one-tick range per node (`(e, e + 1)`) to stay deterministic.
    pub election_timeout_range: Option<(usize, usize)>,
    /// Largest append message, in bytes.
    pub max_size_per_msg: u64,
    /// Most append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Compact the log into a snapshot once this many entries were applied since the last one.
    pub snapshot_interval: u64,
}

impl RaftNodeConfig {
    /// Defaults for a node with this id: election after 10 ticks, heartbeat every 2.
    pub fn new(id: NodeId) -> Self {
        RaftNodeConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            election_timeout_range: None,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            snapshot_interval: 1000,
        }
    }

    fn to_raft(&self, applied: u64) -> Config {
        let (min, max) = self.election_timeout_range.unwrap_or((0, 0));
        Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            min_election_tick: min,
            max_election_tick: max,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            pre_vote: true,
            check_quorum: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Config::default()
        }
    }
}

/// The persistent part of a Raft node: log, hard state and latest snapshot.
///
/// Every method returns only once the change is durable; raft's [`Storage`] reads it back.
pub trait LogStore: Storage {
    /// Append entries, replacing any conflicting suffix.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    /// Save term, vote and commit index.
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError>;
    /// Save a newer commit index (term and vote unchanged).
    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError>;
    /// Install a snapshot received from the leader: it replaces the whole log.
    fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError>;
    /// Keep a snapshot of the local state at an applied index and drop the log up to it.
    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError>;
    /// The latest snapshot (index 0 and no data if none was taken yet).
    fn latest_snapshot(&self) -> &Snapshot;
}

/// The store refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Entries would leave a gap after the last index.
    #[error("log gap: last index {last}, append from {first}")]
    Gap {
        /// Last index in the store.
        last: u64,
        /// First index appended.
        first: u64,
    },
    /// Entries or a snapshot reach below what was already compacted.
    #[error("index {index} is compacted (first index {first})")]
    Compacted {
        /// Index asked for.
        index: u64,
        /// First index still in the log.
        first: u64,
    },
    /// Compaction beyond the last entry.
    #[error("compaction to {index} beyond last index {last}")]
    BeyondLast {
        /// Index asked for.
        index: u64,
        /// Last index in the store.
        last: u64,
    },
}

/// An in-memory [`LogStore`]: the simulator's disk, and the reference the file store will match.
///
/// `Clone` copies the contents: the simulator clones a node's store when it "crashes" the node, so
/// what was persisted survives and what raft held only in memory is lost.
#[derive(Debug, Clone, Default)]
pub struct MemLogStore {
    hard_state: HardState,
    /// Latest snapshot; its metadata's conf state is the membership the node restarts with.
    snapshot: Snapshot,
    /// `entries[i]` has index `snapshot.index + 1 + i`.
    entries: Vec<Entry>,
}

impl MemLogStore {
    /// An empty store: a node that joins and will receive a snapshot from the leader.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store for one of the founding voters: every founder starts with the same membership.
    pub fn bootstrap(voters: &[NodeId]) -> Self {
        let mut store = Self::new();
        store.snapshot.mut_metadata().mut_conf_state().voters = voters.to_vec();
        store
    }

    /// The saved hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The entries still in the log (after the snapshot).
    pub fn log_entries(&self) -> &[Entry] {
        &self.entries
    }

    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snap_index() + 1
    }

    fn last(&self) -> u64 {
        self.snap_index() + self.entries.len() as u64
    }
}

impl Storage for MemLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snap_index() < request_index {
            // A newer one comes with the next compaction; raft asks again.
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

impl LogStore for MemLogStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        if head.index < self.first() {
            return Err(StoreError::Compacted {
                index: head.index,
                first: self.first(),
            });
        }
        if head.index > self.last() + 1 {
            return Err(StoreError::Gap {
                last: self.last(),
                first: head.index,
            });
        }
        self.entries.truncate((head.index - self.first()) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.hard_state = hs.clone();
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        self.hard_state.commit = commit;
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata();
        if meta.index < self.snap_index() {
            return Err(StoreError::Compacted {
                index: meta.index,
                first: self.first(),
            });
        }
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.entries.clear();
        self.snapshot = snapshot;
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let index = snapshot.get_metadata().index;
        if index < self.snap_index() {
            return Err(StoreError::Compacted {
                index,
                first: self.first(),
            });
        }
        if index > self.last() {
            return Err(StoreError::BeyondLast {
                index,
                last: self.last(),
            });
        }
        self.entries.drain(..(index - self.snap_index()) as usize);
        self.snapshot = snapshot;
        Ok(())
    }

    fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum RaftNodeError {
    /// Proposals go to the leader; this node is not it.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// The encoded command is larger than [`MAX_COMMAND_BYTES`].
    #[error("command of {0} bytes exceeds the limit")]
    CommandTooLarge(usize),
    /// raft refused the call (e.g. a proposal dropped during a leader transfer, a message for
    /// another node, a conf change while one is pending).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Persisting failed; the node must stop (raft cannot go on from a lost write).
    #[error("log store: {0}")]
    Store(#[from] StoreError),
    /// Encoding a command or a snapshot failed, or a snapshot from the leader did not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// One entry the state machine applied.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedEntry {
    /// Log index.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// What it was.
    pub kind: AppliedKind,
}

/// What an applied entry carried.
#[derive(Debug, Clone, PartialEq)]
pub enum AppliedKind {
    /// The empty entry a new leader appends.
    Noop,
    /// A state-machine command and its outcome.
    Command(Command, Outcome),
    /// A membership change; the membership after it.
    ConfChange(ConfState),
    /// Data that did not decode (every node skips it the same way).
    Undecodable,
}

/// What one [`RaftNode::ready`] produced. The messages must be sent; everything else is a report.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send to peers (their `to` field says where), in order.
    pub messages: Vec<Message>,
    /// Entries applied to the state machine, in log order.
    pub applied: Vec<AppliedEntry>,
    /// Hard state saved, if it changed.
    pub hard_state: Option<HardState>,
    /// Number of log entries persisted.
    pub entries_persisted: usize,
    /// Index of a snapshot received from the leader and restored.
    pub snapshot_restored: Option<u64>,
    /// Index of a local snapshot taken (log compacted up to it).
    pub snapshot_taken: Option<u64>,
}

/// Most ready rounds one [`RaftNode::ready`] runs (each round may make the next one necessary).
const MAX_READY_ROUNDS: usize = 16;

/// One member of the Raft group with its state machine. See the module doc.
pub struct RaftNode<S: LogStore = MemLogStore> {
    raw: RawNode<S>,
    state: ClusterState,
    snapshot_interval: u64,
    /// A node was added: compact at the next opportunity (see `apply_entries`).
    compact_now: bool,
}

impl<S: LogStore> fmt::Debug for RaftNode<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.id())
            .field("term", &self.term())
            .field("role", &self.raw.raft.state)
            .field("applied", &self.state.applied_index)
            .finish()
    }
}

impl<S: LogStore> RaftNode<S> {
    /// Start (or restart) a node from its store. The state machine is restored from the store's
    /// latest snapshot; the committed entries after it are applied again by the next `ready`s.
    pub fn new(
        config: &RaftNodeConfig,
        store: S,
        logger: &slog::Logger,
    ) -> Result<Self, RaftNodeError> {
        let snap = store.latest_snapshot();
        let snap_index = snap.get_metadata().index;
        let state = if snap.get_data().is_empty() {
            ClusterState {
                applied_index: snap_index,
                ..ClusterState::default()
            }
        } else {
            ClusterState::decode(snap.get_data())?
        };
        let raft_config = config.to_raft(snap_index);
        let raw = RawNode::new(&raft_config, store, logger)?;
        Ok(RaftNode {
            raw,
            state,
            snapshot_interval: config.snapshot_interval.max(1),
            compact_now: false,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.raw.raft.id
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Whether this node is the leader (of [`Self::term`]).
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        match self.raw.raft.leader_id {
            0 => None,
            id => Some(id),
        }
    }

    /// Highest log index known committed.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Last index in the log (persisted or not).
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Term of the entry at `index`, if this node still has it (in the store or in memory).
    pub fn term_at(&self, index: u64) -> Option<u64> {
        let log = &self.raw.raft.raft_log;
        // raft answers 0 (not an error) below the snapshot and past the end.
        if index + 1 < log.first_index() || index > log.last_index() {
            return None;
        }
        log.term(index).ok()
    }

    /// Entry at `index`, if this node still has it.
    pub fn entry_at(&self, index: u64) -> Option<Entry> {
        let log = &self.raw.raft.raft_log;
        if index < log.first_index() || index > log.last_index() {
            return None;
        }
        self.raw
            .raft
            .raft_log
            .slice(
                index,
                index + 1,
                None,
                raft::GetEntriesContext::empty(false),
            )
            .ok()
            .and_then(|mut v| v.pop())
    }

    /// The replicated state as applied on this node.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Current membership (as applied).
    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    /// On the leader: the highest log index known to be replicated on each member (voters and
    /// learners). Meaningless on a follower.
    pub fn matched(&self) -> std::collections::BTreeMap<NodeId, u64> {
        self.raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect()
    }

    /// Ask raft to hand leadership to `to` (a voter); it gives up once `to` caught up.
    pub fn transfer_leader(&mut self, to: NodeId) {
        self.raw.transfer_leader(to);
    }

    /// The persistent store.
    pub fn store(&self) -> &S {
        self.raw.store()
    }

    /// Advance the logical clock one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Hand over a message from a peer (already decoded from an authenticated connection).
    pub fn step(&mut self, msg: Message) -> Result<(), RaftNodeError> {
        Ok(self.raw.step(msg)?)
    }

    /// Start an election now (tests, leader transfer tooling).
    pub fn campaign(&mut self) -> Result<(), RaftNodeError> {
        Ok(self.raw.campaign()?)
    }

    /// Propose a state-machine command. Only the leader accepts; the command is applied once
    /// committed (watch [`Output::applied`]).
    pub fn propose(&mut self, cmd: &Command) -> Result<(), RaftNodeError> {
        self.ensure_leader()?;
        let data = cmd.encode()?;
        if data.len() as u64 > MAX_COMMAND_BYTES {
            return Err(RaftNodeError::CommandTooLarge(data.len()));
        }
        Ok(self.raw.propose(Vec::new(), data)?)
    }

    /// Propose a membership change. Several changes in one `ConfChangeV2` go through joint
    /// consensus; raft leaves the joint configuration by itself unless `transition` says otherwise.
    pub fn propose_conf_change(&mut self, cc: ConfChangeV2) -> Result<(), RaftNodeError> {
        self.ensure_leader()?;
        Ok(self.raw.propose_conf_change(Vec::new(), cc)?)
    }

    fn ensure_leader(&self) -> Result<(), RaftNodeError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(RaftNodeError::NotLeader {
                leader: self.leader(),
            })
        }
    }

    /// Do the work raft has pending: persist, apply, compact, and return the messages to send.
    /// Call it after every `tick`, `step`, `propose`.
    pub fn ready(&mut self) -> Result<Output, RaftNodeError> {
        let mut out = Output::default();
        for _ in 0..MAX_READY_ROUNDS {
            if !self.raw.has_ready() {
                break;
            }
            self.ready_round(&mut out)?;
        }
        // The network may lose a snapshot, and raft waits for a report before sending another:
        // report it sent. If it was lost, the follower rejects the next append and raft sends a
        // new one; without the report, that follower would stay behind for good.
        let snapshots_to: Vec<NodeId> = out
            .messages
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        for to in snapshots_to {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
        self.maybe_compact(&mut out)?;
        Ok(out)
    }

    fn ready_round(&mut self, out: &mut Output) -> Result<(), RaftNodeError> {
        let mut rd = self.raw.ready();
        // A leader may send before persisting (raft thesis 10.2.1); these are those messages.
        out.messages.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let index = snap.get_metadata().index;
            let state = ClusterState::decode(snap.get_data())?;
            self.raw.mut_store().apply_snapshot(snap)?;
            debug!(node = self.id(), index, "restored snapshot from the leader");
            self.state = state;
            out.snapshot_restored = Some(index);
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, out)?;
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries())?;
            out.entries_persisted += rd.entries().len();
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
            out.hard_state = Some(hs.clone());
        }
        // Votes and acks: only once what they promise is durable.
        out.messages.extend(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
            if let Some(hs) = out.hard_state.as_mut() {
                hs.commit = commit;
            }
        }
        out.messages.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed, out)?;
        self.raw.advance_apply();
        Ok(())
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        out: &mut Output,
    ) -> Result<(), RaftNodeError> {
        for entry in entries {
            let (index, term) = (entry.index, entry.term);
            if index <= self.state.applied_index {
                // Already inside the restored snapshot.
                continue;
            }
            let kind = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    self.state.advance_to(index);
                    AppliedKind::Noop
                }
                EntryType::EntryNormal => match Command::decode(&entry.data) {
                    Ok(cmd) => {
                        let outcome = self.state.apply(index, &cmd);
                        if let Outcome::Rejected(why) = &outcome {
                            debug!(node = self.id(), index, %why, "command rejected");
                        }
                        AppliedKind::Command(cmd, outcome)
                    }
                    Err(e) => {
                        error!(node = self.id(), index, error = %e, "undecodable committed entry skipped");
                        self.state.advance_to(index);
                        AppliedKind::Undecodable
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let parsed = if entry.get_entry_type() == EntryType::EntryConfChange {
                        ConfChange::parse_from_bytes(&entry.data).map(v1_to_v2)
                    } else {
                        ConfChangeV2::parse_from_bytes(&entry.data)
                    };
                    self.state.advance_to(index);
                    match parsed {
                        Ok(cc) => match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => {
                                // A node added now starts from an empty log; the entries before
                                // this one do not hold the founding membership (that is in the
                                // bootstrap snapshot), so it must start from a snapshot: compact
                                // here, on every node, so that any later leader sends one.
                                if cc
                                    .get_changes()
                                    .iter()
                                    .any(|c| c.get_change_type() != ConfChangeType::RemoveNode)
                                {
                                    self.compact_now = true;
                                }
                                AppliedKind::ConfChange(cs)
                            }
                            Err(e) => {
                                // Deterministic on every node: raft validates against the same
                                // configuration everywhere.
                                warn!(node = self.id(), index, error = %e, "conf change refused");
                                AppliedKind::Undecodable
                            }
                        },
                        Err(e) => {
                            error!(node = self.id(), index, error = %e, "undecodable conf change skipped");
                            AppliedKind::Undecodable
                        }
                    }
                }
            };
            out.applied.push(AppliedEntry { index, term, kind });
        }
        Ok(())
    }

    fn maybe_compact(&mut self, out: &mut Output) -> Result<(), RaftNodeError> {
        let applied = self.state.applied_index;
        let snap_index = self.raw.store().latest_snapshot().get_metadata().index;
        let due = applied >= snap_index + self.snapshot_interval
            || (self.compact_now && applied > snap_index);
        if !due {
            return Ok(());
        }
        self.compact_now = false;
        let Ok(term) = self.raw.raft.raft_log.term(applied) else {
            return Ok(());
        };
        let mut snap = Snapshot {
            data: self.state.encode()?.into(),
            ..Snapshot::default()
        };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf_state());
        self.raw.mut_store().compact(snap)?;
        debug!(
            node = self.id(),
            index = applied,
            "log compacted into a snapshot"
        );
        out.snapshot_taken = Some(applied);
        Ok(())
    }
}

// A legacy single change as the equivalent V2 change (what raft does internally too).
fn v1_to_v2(mut cc: ConfChange) -> ConfChangeV2 {
    let mut single = raft::eraftpb::ConfChangeSingle::default();
    single.set_change_type(cc.get_change_type());
    single.node_id = cc.node_id;
    let mut v2 = ConfChangeV2::default();
    v2.mut_changes().push(single);
    v2.context = cc.take_context();
    v2
}

/// A `slog` logger for raft that forwards every record to `tracing` (target `raft`).
pub fn tracing_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// A `slog` logger that drops everything.
pub fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        use slog::KV;
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::Level::ERROR,
            slog::Level::Warning => tracing::Level::WARN,
            slog::Level::Info => tracing::Level::INFO,
            slog::Level::Debug => tracing::Level::DEBUG,
            slog::Level::Trace => tracing::Level::TRACE,
        };
        // Formatting raft's debug chatter is not free: skip it unless someone listens.
        let enabled = match level {
            tracing::Level::ERROR => tracing::enabled!(target: "raft", tracing::Level::ERROR),
            tracing::Level::WARN => tracing::enabled!(target: "raft", tracing::Level::WARN),
            tracing::Level::INFO => tracing::enabled!(target: "raft", tracing::Level::INFO),
            tracing::Level::DEBUG => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        let kv = kv.0;
        match level {
            tracing::Level::ERROR => tracing::error!(target: "raft", "{msg}{kv}"),
            tracing::Level::WARN => tracing::warn!(target: "raft", "{msg}{kv}"),
            tracing::Level::INFO => tracing::info!(target: "raft", "{msg}{kv}"),
            tracing::Level::DEBUG => tracing::debug!(target: "raft", "{msg}{kv}"),
            _ => tracing::trace!(target: "raft", "{msg}{kv}"),
        }
        Ok(())
    }
}

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        use fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    #[test]
    fn mem_store_append_truncates_conflicts_and_refuses_gaps() {
        let mut s = MemLogStore::bootstrap(&[1]);
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        s.append(&[entry(2, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert_eq!(
            s.append(&[entry(5, 2)]),
            Err(StoreError::Gap { last: 2, first: 5 })
        );
    }

    #[test]
    fn mem_store_compact_keeps_term_of_snapshot_index() {
        let mut s = MemLogStore::bootstrap(&[1]);
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 2)]).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 1;
        s.compact(snap.clone()).unwrap();
        assert_eq!(s.first_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 1);
        assert!(s.term(1).is_err());
        assert_eq!(
            s.entries(3, 4, None, raft::GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
        assert!(matches!(
            s.append(&[entry(1, 3)]),
            Err(StoreError::Compacted { index: 1, first: 3 })
        ));
        snap.mut_metadata().index = 9;
        assert!(matches!(
            s.compact(snap),
            Err(StoreError::BeyondLast { .. })
        ));
        assert!(
            s.snapshot(5, 2).is_err(),
            "no snapshot at or above the requested index yet"
        );
    }

    #[test]
    fn single_node_elects_itself_and_applies_a_command() {
        let config = RaftNodeConfig::new(1);
        let mut node =
            RaftNode::new(&config, MemLogStore::bootstrap(&[1]), &discard_logger()).unwrap();
        node.campaign().unwrap();
        node.ready().unwrap();
        assert!(node.is_leader());
        node.propose(&Command::Init { n_shards: 8 }).unwrap();
        let out = node.ready().unwrap();
        let applied: Vec<_> = out.applied.iter().map(|a| &a.kind).collect();
        assert!(
            applied.contains(&&AppliedKind::Command(
                Command::Init { n_shards: 8 },
                Outcome::Applied
            )),
            "{applied:?}"
        );
        assert_eq!(node.state().n_shards, 8);
    }

    #[test]
    fn follower_refuses_proposals_with_a_hint() {
        let config = RaftNodeConfig::new(2);
        let mut node = RaftNode::new(
            &config,
            MemLogStore::bootstrap(&[1, 2, 3]),
            &discard_logger(),
        )
        .unwrap();
        let err = node.propose(&Command::Init { n_shards: 1 }).unwrap_err();
        assert!(
            matches!(err, RaftNodeError::NotLeader { leader: None }),
            "{err}"
        );
    }
}
