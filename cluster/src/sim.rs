//! A deterministic simulator for the Raft group: N [`RaftNode`]s over a seeded, hostile network.
//!
//! Everything random comes from one RNG seeded by [`SimConfig::seed`]: message delays, drops,
//! duplicates (and so reordering), partitions (symmetric and one-way) and heals, crashes and
//! restarts, proposals. Time is a tick counter; every node ticks once per round. raft-rs draws its
//! election timeouts from the thread RNG, so each node gets a one-tick timeout range drawn from the
//! seeded RNG instead (see [`RaftNodeConfig::election_timeout_range`]): a seed replays exactly.
//!
//! A crashed node keeps only its [`MemLogStore`] (the "disk": hard state, log, snapshot); what raft
//! held in memory is lost, and the restarted node rebuilds its state machine from the disk.
//!
//! After every delivery and every round the simulator checks the invariants and stops with an
//! [`InvariantViolation`] naming the seed:
//!
//! - (a) at most one leader per term;
//! - (b) committed entries are never lost or changed: every node's entry at a committed index is the
//!   one first seen committed there, and every leader holds the latest committed entry;
//! - (c) every node applies the same sequence of entries with the same outcomes, and state machines
//!   at equal applied index are equal;
//! - (d) on every node shard epochs only grow, and a shard whose owner changed has a larger epoch.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use raft::eraftpb::{Entry, Message};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::raft_node::{
    discard_logger, AppliedKind, MemLogStore, Output, RaftNode, RaftNodeConfig, RaftNodeError,
};
use crate::state::{ClusterState, Command, ShardEntry};
use crate::NodeId;

/// Most messages in flight; beyond it the network drops (a bounded queue, like a real one).
const MAX_IN_FLIGHT: usize = 20_000;

/// Knobs of one simulation. Probabilities are per mille, per round.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of nodes (all founding voters, ids `1..=nodes`).
    pub nodes: usize,
    /// Shards the schedule initializes the cluster with.
    pub n_shards: u32,
    /// Base election timeout, in ticks.
    pub election_tick: usize,
    /// Heartbeat interval, in ticks.
    pub heartbeat_tick: usize,
    /// Each node's election timeout is `election_tick + rand(0..election_spread_ticks)`, drawn at
    /// start and restart. A narrow spread makes candidates collide (split votes, rival candidates
    /// in one term), which is what tests vote persistence.
    pub election_spread_ticks: usize,
    /// Log compaction interval, in applied entries (small, so snapshots get sent).
    pub snapshot_interval: u64,
    /// Delivery delay is drawn from `1..=max_delay_ticks`.
    pub max_delay_ticks: u64,
    /// Chance a message is dropped.
    pub drop_per_mille: u32,
    /// Chance a message is delivered twice.
    pub dup_per_mille: u32,
    /// Chance per round that a node crashes (at most a minority is down at once).
    pub crash_per_mille: u32,
    /// Chance per round that a crashed node restarts.
    pub restart_per_mille: u32,
    /// Chance per round of a new partition (replacing the current one).
    pub partition_per_mille: u32,
    /// Chance per round that the network heals.
    pub heal_per_mille: u32,
    /// Chance per round of a proposal.
    pub propose_per_mille: u32,
}

impl SimConfig {
    /// The hostile defaults the seeded schedules use.
    pub fn new(seed: u64, nodes: usize) -> Self {
        SimConfig {
            seed,
            nodes,
            n_shards: 16,
            election_tick: 10,
            heartbeat_tick: 2,
            election_spread_ticks: 3,
            snapshot_interval: 8,
            max_delay_ticks: 3,
            drop_per_mille: 50,
            dup_per_mille: 20,
            crash_per_mille: 40,
            restart_per_mille: 150,
            partition_per_mille: 10,
            heal_per_mille: 40,
            propose_per_mille: 300,
        }
    }

    /// A reliable network without random faults or proposals: focused tests script their own.
    pub fn calm(seed: u64, nodes: usize) -> Self {
        SimConfig {
            drop_per_mille: 0,
            dup_per_mille: 0,
            crash_per_mille: 0,
            restart_per_mille: 0,
            partition_per_mille: 0,
            heal_per_mille: 0,
            propose_per_mille: 0,
            ..SimConfig::new(seed, nodes)
        }
    }
}

/// What a schedule did (to check that it exercised something).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Rounds run.
    pub rounds: u64,
    /// Highest term reached.
    pub max_term: u64,
    /// Terms that had a leader.
    pub leaders_elected: usize,
    /// Highest committed index.
    pub commit_index: u64,
    /// Committed state-machine commands applied.
    pub commands_committed: usize,
    /// Proposals a leader accepted into its log.
    pub proposals_accepted: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages dropped (random loss, partitions, down nodes, full network).
    pub dropped: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Crashes.
    pub crashes: u64,
    /// Restarts.
    pub restarts: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Snapshots from a leader restored by a follower.
    pub snapshots_restored: u64,
    /// Local log compactions.
    pub snapshots_taken: u64,
}

/// Which invariant broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// (a) at most one leader per term.
    OneLeaderPerTerm,
    /// (b) committed entries are never lost or changed.
    CommittedEntriesStable,
    /// (c) every node applies the same sequence; equal applied index, equal state.
    SameApplySequence,
    /// (d) shard epochs only grow.
    EpochsGrow,
    /// The driver itself failed (a store error, an undecodable snapshot).
    Driver,
}

/// An invariant broke; `seed` replays the schedule.
#[derive(Debug, Clone)]
pub struct InvariantViolation {
    /// Seed of the schedule.
    pub seed: u64,
    /// Round at which it broke.
    pub round: u64,
    /// Which invariant.
    pub invariant: Invariant,
    /// What was seen.
    pub detail: String,
}

impl fmt::Display for InvariantViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} violated at round {} (seed {}; replay with COMODIT_SIM_SEED={}): {}",
            self.invariant, self.round, self.seed, self.seed, self.detail
        )
    }
}

impl std::error::Error for InvariantViolation {}

/// Run `steps` rounds of a random schedule over `nodes` nodes.
pub fn run_schedule(
    seed: u64,
    steps: usize,
    nodes: usize,
) -> Result<SimReport, InvariantViolation> {
    let mut sim = Sim::new(SimConfig::new(seed, nodes));
    for _ in 0..steps {
        sim.random_round()?;
    }
    Ok(sim.report())
}

struct InFlight {
    deliver_at: u64,
    /// Random tie-break: messages due in the same round arrive in random order.
    order: u64,
    msg: Message,
}

struct Up {
    node: RaftNode,
    /// Commit index up to which (b) was checked on this node.
    checked_commit: u64,
    /// Last applied index seen (consecutive application is checked against it).
    last_applied: u64,
    /// Shard table last seen, for (d).
    shards: Vec<ShardEntry>,
}

enum Slot {
    Up(Box<Up>),
    Down(MemLogStore),
}

/// The simulated cluster. [`Sim::random_round`] plays the seeded schedule; the other methods let
/// tests script faults by hand.
pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    now: u64,
    slots: Vec<Slot>,
    net: Vec<InFlight>,
    /// Directed links that drop everything (from, to).
    blocked: BTreeSet<(NodeId, NodeId)>,
    leader_of_term: BTreeMap<u64, NodeId>,
    /// Committed entries as first seen: index → (term, type, data).
    committed: BTreeMap<u64, (u64, i32, Vec<u8>)>,
    /// What applying each index did, as first seen.
    applied_kinds: BTreeMap<u64, AppliedKind>,
    /// State machine at each applied index, as first seen.
    states_at: BTreeMap<u64, ClusterState>,
    report: SimReport,
}

impl Sim {
    /// A cluster of `cfg.nodes` founding voters, all up, no leader yet.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let voters: Vec<NodeId> = (1..=cfg.nodes as NodeId).collect();
        let mut slots = Vec::with_capacity(cfg.nodes);
        for id in &voters {
            let node = start_node(&cfg, &mut rng, *id, MemLogStore::bootstrap(&voters));
            slots.push(Slot::Up(Box::new(up(node))));
        }
        let report = SimReport {
            seed: cfg.seed,
            ..SimReport::default()
        };
        Sim {
            cfg,
            rng,
            now: 0,
            slots,
            net: Vec::new(),
            blocked: BTreeSet::new(),
            leader_of_term: BTreeMap::new(),
            committed: BTreeMap::new(),
            applied_kinds: BTreeMap::new(),
            states_at: BTreeMap::new(),
            report,
        }
    }

    /// What happened so far.
    pub fn report(&self) -> SimReport {
        let mut r = self.report.clone();
        r.rounds = self.now;
        r.max_term = self
            .leader_of_term
            .keys()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.up_nodes().map(|n| n.term()).max().unwrap_or(0));
        r.leaders_elected = self.leader_of_term.len();
        r.commit_index = self.committed.keys().copied().max().unwrap_or(0);
        r.commands_committed = self
            .applied_kinds
            .values()
            .filter(|k| matches!(k, AppliedKind::Command(..)))
            .count();
        r
    }

    /// Current tick.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The node with this id, if it is up.
    pub fn node(&self, id: NodeId) -> Option<&RaftNode> {
        match self.slots.get(slot_of(id)?)? {
            Slot::Up(u) => Some(&u.node),
            Slot::Down(_) => None,
        }
    }

    fn up_nodes(&self) -> impl Iterator<Item = &RaftNode> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Up(u) => Some(&u.node),
            Slot::Down(_) => None,
        })
    }

    /// Nodes that are up and believe they lead, with their terms.
    pub fn leaders(&self) -> Vec<(NodeId, u64)> {
        self.up_nodes()
            .filter(|n| n.is_leader())
            .map(|n| (n.id(), n.term()))
            .collect()
    }

    /// The leader of the highest term among the up nodes that believe they lead.
    pub fn leader(&self) -> Option<NodeId> {
        self.leaders()
            .into_iter()
            .max_by_key(|(_, t)| *t)
            .map(|(id, _)| id)
    }

    /// Cut `group` off from the other nodes, both ways.
    pub fn partition(&mut self, group: &[NodeId]) {
        self.blocked.clear();
        for a in 1..=self.cfg.nodes as NodeId {
            for b in 1..=self.cfg.nodes as NodeId {
                if group.contains(&a) != group.contains(&b) {
                    self.blocked.insert((a, b));
                }
            }
        }
        self.report.partitions += 1;
    }

    /// Drop everything `from` sends to `to` (the other direction still works).
    pub fn block_one_way(&mut self, from: NodeId, to: NodeId) {
        self.blocked.insert((from, to));
        self.report.partitions += 1;
    }

    /// Heal every partition.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Crash a node: it keeps only its disk. No-op if it is down.
    pub fn crash(&mut self, id: NodeId) {
        let Some(i) = slot_of(id) else { return };
        if let Slot::Up(u) = &self.slots[i] {
            let disk = u.node.store().clone();
            self.slots[i] = Slot::Down(disk);
            self.report.crashes += 1;
        }
    }

    /// Restart a crashed node from its disk. No-op if it is up.
    pub fn restart(&mut self, id: NodeId) -> Result<(), InvariantViolation> {
        let Some(i) = slot_of(id) else { return Ok(()) };
        if let Slot::Down(disk) = &self.slots[i] {
            let disk = disk.clone();
            let node = start_node(&self.cfg, &mut self.rng, id, disk);
            self.slots[i] = Slot::Up(Box::new(up(node)));
            self.report.restarts += 1;
            // The restored state must be one every other node had at that index.
            self.observe(i, Output::default())?;
        }
        Ok(())
    }

    /// Propose a command to the node `id` (which refuses unless it leads).
    pub fn propose_to(&mut self, id: NodeId, cmd: &Command) -> Result<(), RaftNodeError> {
        let i = slot_of(id).ok_or(RaftNodeError::NotLeader { leader: None })?;
        let Slot::Up(u) = &mut self.slots[i] else {
            return Err(RaftNodeError::NotLeader { leader: None });
        };
        u.node.propose(cmd)?;
        self.report.proposals_accepted += 1;
        Ok(())
    }

    /// Propose to the current leader, if any; then process the leader's output.
    pub fn propose(&mut self, cmd: &Command) -> Result<bool, InvariantViolation> {
        let Some(leader) = self.leader() else {
            return Ok(false);
        };
        let accepted = self.propose_to(leader, cmd).is_ok();
        self.process(slot_of(leader).unwrap_or(0))?;
        Ok(accepted)
    }

    /// Run rounds until `done` holds or `max_rounds` passed; whether it held.
    pub fn run_until(
        &mut self,
        max_rounds: u64,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Result<bool, InvariantViolation> {
        for _ in 0..max_rounds {
            if done(self) {
                return Ok(true);
            }
            self.round()?;
        }
        Ok(done(self))
    }

    /// One round of the seeded schedule: maybe a fault, maybe a proposal, then a tick.
    pub fn random_round(&mut self) -> Result<(), InvariantViolation> {
        let n = self.cfg.nodes as NodeId;
        if self.chance(self.cfg.crash_per_mille) {
            let down = self
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Down(_)))
                .count();
            // Keep a majority up, so schedules make progress as well as stay safe.
            if down < (self.cfg.nodes - 1) / 2 {
                let id = self.rng.gen_range(1..=n);
                self.crash(id);
            }
        }
        if self.chance(self.cfg.restart_per_mille) {
            let id = self.rng.gen_range(1..=n);
            self.restart(id)?;
        }
        if self.chance(self.cfg.partition_per_mille) {
            if self.rng.gen_bool(0.5) {
                let group: Vec<NodeId> = (1..=n).filter(|_| self.rng.gen_bool(0.4)).collect();
                self.partition(&group);
            } else {
                let from = self.rng.gen_range(1..=n);
                let to = self.rng.gen_range(1..=n);
                self.block_one_way(from, to);
            }
        }
        if self.chance(self.cfg.heal_per_mille) {
            self.heal();
        }
        if self.chance(self.cfg.propose_per_mille) {
            self.random_proposal()?;
        }
        self.round()
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.rng.gen_range(0..1000) < per_mille
    }

    fn random_proposal(&mut self) -> Result<(), InvariantViolation> {
        // Mostly to the leader of the highest term; sometimes to anyone (a stale leader's entries
        // must never commit).
        let target = if self.rng.gen_bool(0.8) {
            self.leader()
        } else {
            Some(self.rng.gen_range(1..=self.cfg.nodes as NodeId))
        };
        let Some(target) = target else { return Ok(()) };
        let Some(state) = self.node(target).map(|n| n.state().clone()) else {
            return Ok(());
        };
        let max_id = self.cfg.nodes as NodeId + 2;
        let cmd = if state.n_shards == 0 {
            Command::Init {
                n_shards: self.cfg.n_shards,
            }
        } else {
            match self.rng.gen_range(0..10) {
                0..=2 => {
                    let id = self.rng.gen_range(1..=max_id);
                    Command::AddNode {
                        id,
                        addr: format!("node-{id}:7000"),
                    }
                }
                3..=5 => Command::AssignShards {
                    owners: state.plan_allocation(),
                },
                6 | 7 => {
                    let shard = self.rng.gen_range(0..state.n_shards);
                    let from = match state.shards[shard as usize].owner {
                        Some(o) if self.rng.gen_bool(0.8) => o,
                        _ => self.rng.gen_range(1..=max_id),
                    };
                    Command::ReleaseShard { shard, from }
                }
                8 => {
                    let id = self.rng.gen_range(1..=max_id);
                    if self.rng.gen_bool(0.7) {
                        Command::NodeLeaving { id }
                    } else {
                        Command::RemoveNode { id }
                    }
                }
                _ => Command::SetSetting {
                    key: format!("k{}", self.rng.gen_range(0..4)),
                    value: format!("v{}", self.rng.gen_range(0..100)),
                },
            }
        };
        let _ = self.propose_to(target, &cmd);
        if let Some(i) = slot_of(target) {
            self.process(i)?;
        }
        Ok(())
    }

    /// One tick: every up node ticks, then every message due is delivered.
    pub fn round(&mut self) -> Result<(), InvariantViolation> {
        self.now += 1;
        for i in 0..self.slots.len() {
            if let Slot::Up(u) = &mut self.slots[i] {
                u.node.tick();
                self.process(i)?;
            }
        }
        self.deliver_due()?;
        self.check_global()
    }

    fn deliver_due(&mut self) -> Result<(), InvariantViolation> {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        let mut rest = Vec::with_capacity(self.net.len());
        for m in self.net.drain(..) {
            if m.deliver_at <= now {
                due.push(m);
            } else {
                rest.push(m);
            }
        }
        self.net = rest;
        due.sort_by_key(|m| (m.deliver_at, m.order));
        for m in due {
            let (from, to) = (m.msg.from, m.msg.to);
            let Some(i) = slot_of(to) else {
                self.report.dropped += 1;
                continue;
            };
            if self.blocked.contains(&(from, to)) {
                self.report.dropped += 1;
                continue;
            }
            let Slot::Up(u) = &mut self.slots[i] else {
                self.report.dropped += 1;
                continue;
            };
            self.report.delivered += 1;
            // raft refuses some messages (e.g. from a peer it does not know): that is the
            // network's problem, not an invariant.
            let _ = u.node.step(m.msg);
            self.process(i)?;
        }
        Ok(())
    }

    /// Drive node `i`'s ready, send what it produced, observe what it applied.
    fn process(&mut self, i: usize) -> Result<(), InvariantViolation> {
        let Slot::Up(u) = &mut self.slots[i] else {
            return Ok(());
        };
        let id = u.node.id();
        match u.node.ready() {
            Ok(out) => self.observe(i, out),
            Err(e) => {
                Err(self.violation(Invariant::Driver, format!("node {id}: ready failed: {e}")))
            }
        }
    }

    fn send(&mut self, msg: Message) {
        if self.chance(self.cfg.drop_per_mille) || self.net.len() >= MAX_IN_FLIGHT {
            self.report.dropped += 1;
            return;
        }
        let copies = if self.chance(self.cfg.dup_per_mille) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.gen_range(1..=self.cfg.max_delay_ticks.max(1));
            let order = self.rng.gen();
            self.net.push(InFlight {
                deliver_at: self.now + delay,
                order,
                msg: msg.clone(),
            });
        }
    }

    fn violation(&self, invariant: Invariant, detail: String) -> InvariantViolation {
        InvariantViolation {
            seed: self.cfg.seed,
            round: self.now,
            invariant,
            detail,
        }
    }

    /// Checks (c) and (d) on what node `i` just did, and sends its messages.
    fn observe(&mut self, i: usize, out: Output) -> Result<(), InvariantViolation> {
        for msg in out.messages {
            self.send(msg);
        }
        if out.snapshot_restored.is_some() {
            self.report.snapshots_restored += 1;
        }
        if out.snapshot_taken.is_some() {
            self.report.snapshots_taken += 1;
        }
        let Slot::Up(u) = &mut self.slots[i] else {
            return Ok(());
        };
        let id = u.node.id();
        let mut err: Option<(Invariant, String)> = None;
        if let Some(snap) = out.snapshot_restored {
            if snap < u.last_applied {
                err = Some((
                    Invariant::SameApplySequence,
                    format!(
                        "node {id} restored snapshot {snap} below applied {}",
                        u.last_applied
                    ),
                ));
            }
            u.last_applied = snap;
        }
        for a in &out.applied {
            if err.is_some() {
                break;
            }
            if a.index != u.last_applied + 1 {
                err = Some((
                    Invariant::SameApplySequence,
                    format!("node {id} applied {} after {}", a.index, u.last_applied),
                ));
                break;
            }
            u.last_applied = a.index;
            match self.applied_kinds.get(&a.index) {
                Some(k) if *k != a.kind => {
                    err = Some((
                        Invariant::SameApplySequence,
                        format!(
                            "node {id} applied {:?} at {}, another node {k:?}",
                            a.kind, a.index
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    self.applied_kinds.insert(a.index, a.kind.clone());
                }
            }
            if let Some((term, _, _)) = self.committed.get(&a.index) {
                if *term != a.term {
                    err = Some((
                        Invariant::CommittedEntriesStable,
                        format!(
                            "node {id} applied index {} of term {}, committed term {term}",
                            a.index, a.term
                        ),
                    ));
                }
            }
        }
        let state = u.node.state();
        if err.is_none() && state.applied_index != u.last_applied {
            err = Some((
                Invariant::SameApplySequence,
                format!(
                    "node {id} state at {} but applied {}",
                    state.applied_index, u.last_applied
                ),
            ));
        }
        if err.is_none() {
            match self.states_at.get(&state.applied_index) {
                Some(s) if s != state => {
                    err = Some((
                        Invariant::SameApplySequence,
                        format!(
                            "node {id} state at index {} differs: {state:?} vs {s:?}",
                            state.applied_index
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    self.states_at.insert(state.applied_index, state.clone());
                }
            }
        }
        if err.is_none() {
            for (shard, now) in state.shards.iter().enumerate() {
                let before = u.shards.get(shard).copied().unwrap_or_default();
                if now.epoch < before.epoch
                    || (now.owner != before.owner && now.epoch <= before.epoch)
                    || now.epoch > state.applied_index
                {
                    err = Some((
                        Invariant::EpochsGrow,
                        format!("node {id} shard {shard}: {before:?} then {now:?}"),
                    ));
                    break;
                }
            }
            u.shards = state.shards.clone();
        }
        match err {
            Some((inv, detail)) => Err(self.violation(inv, detail)),
            None => Ok(()),
        }
    }

    /// Checks (a) and (b) across the up nodes.
    fn check_global(&mut self) -> Result<(), InvariantViolation> {
        for i in 0..self.slots.len() {
            let Slot::Up(u) = &mut self.slots[i] else {
                continue;
            };
            let id = u.node.id();
            if u.node.is_leader() {
                let term = u.node.term();
                match self.leader_of_term.get(&term) {
                    Some(other) if *other != id => {
                        let detail = format!("nodes {other} and {id} both led term {term}");
                        return Err(self.violation(Invariant::OneLeaderPerTerm, detail));
                    }
                    Some(_) => {}
                    None => {
                        self.leader_of_term.insert(term, id);
                    }
                }
            }
            let commit = u.node.commit_index();
            for index in u.checked_commit + 1..=commit {
                let Some(e) = u.node.entry_at(index) else {
                    continue; // compacted into a snapshot
                };
                let seen = entry_key(&e);
                match self.committed.get(&index) {
                    Some(c) if *c != seen => {
                        let detail = format!(
                            "node {id} has term {} at committed index {index}, first seen term {}",
                            seen.0, c.0
                        );
                        return Err(self.violation(Invariant::CommittedEntriesStable, detail));
                    }
                    Some(_) => {}
                    None => {
                        self.committed.insert(index, seen);
                    }
                }
            }
            u.checked_commit = u.checked_commit.max(commit);
        }
        // Leader completeness: every leader holds the latest committed entry (and by log matching
        // everything before it).
        if let Some((&index, &(term, _, _))) = self.committed.iter().next_back() {
            for n in self.up_nodes().filter(|n| n.is_leader()) {
                if n.last_index() < index || n.term_at(index).is_some_and(|t| t != term) {
                    let detail = format!(
                        "leader {} of term {} lacks committed index {index} (term {term}): last {}, term there {:?}",
                        n.id(),
                        n.term(),
                        n.last_index(),
                        n.term_at(index)
                    );
                    return Err(self.violation(Invariant::CommittedEntriesStable, detail));
                }
            }
        }
        Ok(())
    }
}

fn entry_key(e: &Entry) -> (u64, i32, Vec<u8>) {
    (e.term, e.get_entry_type() as i32, e.data.to_vec())
}

fn slot_of(id: NodeId) -> Option<usize> {
    (id as usize).checked_sub(1)
}

fn up(node: RaftNode) -> Up {
    let state = node.state();
    Up {
        checked_commit: 0,
        last_applied: state.applied_index,
        shards: state.shards.clone(),
        node,
    }
}

fn start_node(cfg: &SimConfig, rng: &mut StdRng, id: NodeId, disk: MemLogStore) -> RaftNode {
    let timeout = cfg.election_tick + rng.gen_range(0..cfg.election_spread_ticks.max(1));
    let config = RaftNodeConfig {
        election_tick: cfg.election_tick,
        heartbeat_tick: cfg.heartbeat_tick,
        election_timeout_range: Some((timeout, timeout + 1)),
        snapshot_interval: cfg.snapshot_interval,
        ..RaftNodeConfig::new(id)
    };
    // The config is valid by construction and the disk was written by the same code: a failure
    // here is a bug of the simulator, not a schedule outcome.
    RaftNode::new(&config, disk, &discard_logger()).expect("simulated node starts")
}
