//! A deterministic simulator of whole members: the runtime's own [`Driver`] (leases, renewals, the
//! leader's revocations, two-step handoffs, joins and decommissions) on each node, over a seeded,
//! hostile network, with each node reading its own drifting clock. Where [`crate::sim`] checks Raft
//! itself, this one checks what the shard table is for:
//!
//! - **no shard has two acting owners**: at every instant (after every delivery and every tick), at
//!   most one node considers itself the owner of a shard *with a valid lease*, each node judging on
//!   its own clock at the same real time;
//! - **epochs only grow** in every node's view of the table;
//! - **liveness**: after the hostile phase (network healed, crashed nodes restarted), every shard
//!   ends up acted for by exactly one active node.
//!
//! Everything random comes from one RNG seeded by [`LeaseSimConfig::seed`], and Raft's election
//! timeouts are pinned per node as in [`crate::sim`], so a failing seed replays exactly.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::rc::Rc;

use raft::eraftpb::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::lease::{HeldLease, LeaseConfig};
use crate::raft_node::{discard_logger, MemLogStore, RaftNode, RaftNodeConfig};
use crate::runtime::{ClusterConfig, Driver, Outbox, Shared};
use crate::state::NodeState;
use crate::transport::JoinRequest;
use crate::NodeId;

/// Knobs of one schedule. Probabilities are per mille, per round.
#[derive(Debug, Clone)]
pub struct LeaseSimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Founding voters (ids `1..=founders`).
    pub founders: u64,
    /// Shards.
    pub n_shards: u32,
    /// Real milliseconds per round (every node ticks once per round).
    pub tick_ms: u64,
    /// Rounds of the hostile phase.
    pub rounds: u64,
    /// Rounds of the quiet phase that follows (healed network, everyone up).
    pub quiet_rounds: u64,
    /// Lease timing (the clocks drift by up to its `max_drift_ppm`).
    pub lease: LeaseConfig,
    /// Delivery delay drawn from `0..=max_delay_rounds` rounds.
    pub max_delay_rounds: u64,
    /// Chance a message is dropped.
    pub drop_per_mille: u32,
    /// Chance a new one-way link cut appears.
    pub cut_per_mille: u32,
    /// Chance every cut heals.
    pub heal_per_mille: u32,
    /// Chance a running node crashes (its memory is lost, its log kept).
    pub crash_per_mille: u32,
    /// Chance a crashed node restarts.
    pub restart_per_mille: u32,
    /// Whether one node joins and one is decommissioned during the hostile phase.
    pub membership: bool,
}

impl LeaseSimConfig {
    /// The schedule the test suite runs for `seed`: 3 to 5 founders, a lossy network.
    pub fn for_seed(seed: u64) -> Self {
        LeaseSimConfig {
            seed,
            founders: 3 + seed % 3,
            n_shards: 8,
            tick_ms: 20,
            rounds: 600,
            quiet_rounds: 600,
            lease: LeaseConfig {
                lease_ms: 1_000,
                max_drift_ppm: 1_000,
                renew_every_ms: 200,
            },
            max_delay_rounds: 3,
            drop_per_mille: 50,
            cut_per_mille: 10,
            heal_per_mille: 15,
            crash_per_mille: 3,
            restart_per_mille: 30,
            membership: seed.is_multiple_of(2),
        }
    }
}

/// A broken invariant, with what is needed to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The schedule's seed.
    pub seed: u64,
    /// Round at which it was seen.
    pub round: u64,
    /// What broke.
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} round {}: {} (replay: LeaseSimConfig::for_seed({}))",
            self.seed, self.round, self.what, self.seed
        )
    }
}

/// What a schedule went through (to see that it was hostile enough).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSimReport {
    /// Grants seen: times some node's view of a shard reached a new highest epoch.
    pub grants: u64,
    /// Crashes.
    pub crashes: u64,
    /// Messages dropped (loss, cuts, crashed recipients).
    pub dropped: u64,
    /// Whether the join happened and the decommissioned node left.
    pub joined: bool,
    /// Whether a decommissioned node reached `Left`.
    pub left: bool,
}

#[derive(Default)]
struct Mailbox {
    out: Vec<Message>,
    /// Peers the driver removed from its transport: what it sends them is lost.
    removed: BTreeSet<NodeId>,
}

#[derive(Clone, Default)]
struct SimOutbox(Rc<RefCell<Mailbox>>);

impl Outbox for SimOutbox {
    fn send(&self, msg: Message) {
        let mut mb = self.0.borrow_mut();
        if !mb.removed.contains(&msg.to) {
            mb.out.push(msg);
        }
    }
    fn set_peer(&self, id: NodeId, _addr: SocketAddr) {
        self.0.borrow_mut().removed.remove(&id);
    }
    fn remove_peer(&self, id: NodeId) {
        self.0.borrow_mut().removed.insert(id);
    }
}

struct SimNode {
    driver: Driver<MemLogStore, SimOutbox>,
    shared: std::sync::Arc<Shared>,
    outbox: SimOutbox,
}

struct Clock {
    offset: u64,
    /// Rate deviation from real time, in ppm (within ±max_drift_ppm).
    drift_ppm: i64,
}

impl Clock {
    fn read(&self, real_ms: u64) -> u64 {
        let skew = (real_ms as i128 * self.drift_ppm as i128) / 1_000_000;
        (self.offset as i128 + real_ms as i128 + skew) as u64
    }
}

struct Sim {
    cfg: LeaseSimConfig,
    rng: StdRng,
    round: u64,
    nodes: BTreeMap<NodeId, Option<SimNode>>,
    disks: BTreeMap<NodeId, MemLogStore>,
    clocks: BTreeMap<NodeId, Clock>,
    timeouts: BTreeMap<NodeId, usize>,
    in_flight: Vec<(u64, Message)>,
    cuts: BTreeSet<(NodeId, NodeId)>,
    epochs: BTreeMap<NodeId, Vec<u64>>,
    max_epochs: Vec<u64>,
    report: LeaseSimReport,
}

fn addr(id: NodeId) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16))
}

impl Sim {
    fn cluster_config(&self, id: NodeId, founder: bool) -> ClusterConfig {
        ClusterConfig {
            id,
            listen: addr(id),
            cluster_secret: "sim".into(),
            data_dir: Default::default(),
            peers: if founder {
                (1..=self.cfg.founders).map(|i| (i, addr(i))).collect()
            } else {
                BTreeMap::new()
            },
            join: if founder { Vec::new() } else { vec![addr(1)] },
            n_shards: self.cfg.n_shards,
            tick_ms: self.cfg.tick_ms,
            lease: self.cfg.lease,
        }
    }

    fn start(&mut self, id: NodeId) {
        // A restarted node rebuilds its view from its snapshot: it may start below what it saw.
        self.epochs.remove(&id);
        let founder = id <= self.cfg.founders;
        let cfg = self.cluster_config(id, founder);
        let store = self.disks.get(&id).cloned().unwrap_or_else(|| {
            if founder {
                MemLogStore::bootstrap(&(1..=self.cfg.founders).collect::<Vec<_>>())
            } else {
                MemLogStore::new()
            }
        });
        let timeout = *self
            .timeouts
            .entry(id)
            .or_insert_with(|| self.rng.gen_range(10..20));
        let mut rc = RaftNodeConfig::new(id);
        rc.election_timeout_range = Some((timeout, timeout + 1));
        rc.snapshot_interval = 50;
        let raft = RaftNode::new(&rc, store, &discard_logger()).expect("raft node");
        let (admin, _) = mpsc::channel(1);
        let shared = Shared::new(&cfg, HeldLease::new(&cfg.lease).expect("lease"), admin);
        let outbox = SimOutbox::default();
        let driver = Driver::new(cfg, raft, outbox.clone(), shared.clone()).expect("driver");
        self.nodes.insert(
            id,
            Some(SimNode {
                driver,
                shared,
                outbox,
            }),
        );
    }

    fn real_ms(&self) -> u64 {
        self.round * self.cfg.tick_ms
    }

    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.cfg.seed,
            round: self.round,
            what,
        }
    }

    /// Move what `id` sent into the network.
    fn collect(&mut self, id: NodeId) {
        let Some(Some(n)) = self.nodes.get(&id) else {
            return;
        };
        let out = std::mem::take(&mut n.outbox.0.borrow_mut().out);
        for m in out {
            if self.cuts.contains(&(m.from, m.to))
                || self.rng.gen_range(0..1000) < self.cfg.drop_per_mille
            {
                self.report.dropped += 1;
                continue;
            }
            let at = self.round + self.rng.gen_range(0..=self.cfg.max_delay_rounds);
            self.in_flight.push((at, m));
        }
    }

    /// Runs `f` on node `id` at its clock's reading now, then collects its messages.
    fn with_node(&mut self, id: NodeId, f: impl FnOnce(&mut Driver<MemLogStore, SimOutbox>)) {
        let now = self.clocks[&id].read(self.real_ms());
        if let Some(Some(n)) = self.nodes.get_mut(&id) {
            n.driver.set_now(now);
            f(&mut n.driver);
        }
        self.collect(id);
    }

    fn check(&mut self) -> Result<(), Violation> {
        let real = self.real_ms();
        let mut owners: BTreeMap<u32, Vec<NodeId>> = BTreeMap::new();
        for (id, n) in &self.nodes {
            let Some(n) = n else { continue };
            let now = self.clocks[id].read(real);
            for (shard, _) in n.shared.owned_at(now) {
                owners.entry(shard).or_default().push(*id);
            }
            let table: Vec<u64> = n.shared.table_epochs();
            let seen = self.epochs.entry(*id).or_default();
            if seen.len() == table.len() {
                let went_back = seen
                    .iter()
                    .zip(&table)
                    .enumerate()
                    .find(|(_, (old, new))| new < old)
                    .map(|(s, (old, new))| {
                        format!("node {id}: shard {s} epoch went from {old} to {new}")
                    });
                if let Some(what) = went_back {
                    let (seed, round) = (self.cfg.seed, self.round);
                    return Err(Violation { seed, round, what });
                }
            }
            if self.max_epochs.len() != table.len() {
                self.max_epochs = vec![0; table.len()];
            }
            for (max, e) in self.max_epochs.iter_mut().zip(&table) {
                if e > max {
                    *max = *e;
                    self.report.grants += 1;
                }
            }
            *self.epochs.get_mut(id).expect("inserted") = table;
        }
        if let Some((shard, ids)) = owners.iter().find(|(_, ids)| ids.len() > 1) {
            return Err(self.violation(format!("shard {shard} acted for by nodes {ids:?} at once")));
        }
        Ok(())
    }

    fn deliver_due(&mut self) -> Result<(), Violation> {
        let round = self.round;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(at, _)| *at <= round);
        self.in_flight = later;
        for (_, m) in due {
            let to = m.to;
            if !matches!(self.nodes.get(&to), Some(Some(_))) {
                self.report.dropped += 1;
                continue;
            }
            self.with_node(to, |d| {
                let _ = d.raft().step(m);
                let _ = d.round(false);
            });
            self.check()?;
        }
        Ok(())
    }

    fn tick_all(&mut self) -> Result<(), Violation> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if !matches!(self.nodes.get(&id), Some(Some(_))) {
                continue;
            }
            self.with_node(id, |d| {
                d.raft().tick();
                let _ = d.round(true);
            });
            self.check()?;
        }
        Ok(())
    }

    fn chaos(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        if self.rng.gen_range(0..1000) < self.cfg.cut_per_mille {
            let a = ids[self.rng.gen_range(0..ids.len())];
            let b = ids[self.rng.gen_range(0..ids.len())];
            if a != b {
                self.cuts.insert((a, b));
            }
        }
        if self.rng.gen_range(0..1000) < self.cfg.heal_per_mille {
            self.cuts.clear();
        }
        let running: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|id| matches!(self.nodes.get(id), Some(Some(_))))
            .collect();
        // At most one node down at a time: a majority stays, so the table keeps moving.
        if running.len() == ids.len() && self.rng.gen_range(0..1000) < self.cfg.crash_per_mille {
            let victim = running[self.rng.gen_range(0..running.len())];
            self.crash(victim);
        }
        for id in ids {
            if matches!(self.nodes.get(&id), Some(None))
                && self.rng.gen_range(0..1000) < self.cfg.restart_per_mille
            {
                self.start(id);
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        if let Some(Some(mut n)) = self.nodes.insert(id, None) {
            self.disks.insert(id, n.driver.raft().store().clone());
            self.report.crashes += 1;
        }
    }

    /// Admit node `id` through a running founder, and start it.
    fn join(&mut self, id: NodeId) {
        let via = (1..=self.cfg.founders).find(|i| matches!(self.nodes.get(i), Some(Some(_))));
        let Some(via) = via else { return };
        let mut reply = None;
        self.with_node(via, |d| {
            reply = Some(d.admit(&JoinRequest {
                id,
                addr: addr(id).to_string(),
            }));
            let _ = d.round(false);
        });
        if matches!(reply, Some(Ok(_))) {
            self.clocks.insert(
                id,
                Clock {
                    offset: self.rng.gen_range(0..1_000_000),
                    drift_ppm: self.rng.gen_range(
                        -(self.cfg.lease.max_drift_ppm as i64)
                            ..=self.cfg.lease.max_drift_ppm as i64,
                    ),
                },
            );
            self.start(id);
            self.report.joined = true;
        }
    }

    /// The joiner's retry: ask again while its own view does not list it.
    fn ask_again(&mut self, id: NodeId) {
        let member = match self.nodes.get(&id) {
            Some(Some(n)) => n.shared.node_states().contains_key(&id),
            Some(None) => return,
            None => false,
        };
        if member {
            return;
        }
        if self.nodes.contains_key(&id) {
            // Running but not in yet: ask through a founder again.
            let via = (1..=self.cfg.founders).find(|i| matches!(self.nodes.get(i), Some(Some(_))));
            if let Some(via) = via {
                self.with_node(via, |d| {
                    let _ = d.admit(&JoinRequest {
                        id,
                        addr: addr(id).to_string(),
                    });
                    let _ = d.round(false);
                });
            }
        } else {
            self.join(id);
        }
    }

    fn decommission(&mut self, id: NodeId) {
        let via = self
            .nodes
            .keys()
            .copied()
            .find(|i| *i != id && matches!(self.nodes.get(i), Some(Some(_))));
        let Some(via) = via else { return };
        self.with_node(via, |d| {
            let _ = d.decommission(id);
            let _ = d.round(false);
        });
    }
}

/// Runs one schedule; `Err` names the first broken invariant.
pub fn run(cfg: LeaseSimConfig) -> Result<LeaseSimReport, Violation> {
    let mut sim = Sim {
        rng: StdRng::seed_from_u64(cfg.seed),
        cfg,
        round: 0,
        nodes: BTreeMap::new(),
        disks: BTreeMap::new(),
        clocks: BTreeMap::new(),
        timeouts: BTreeMap::new(),
        in_flight: Vec::new(),
        cuts: BTreeSet::new(),
        epochs: BTreeMap::new(),
        max_epochs: Vec::new(),
        report: LeaseSimReport::default(),
    };
    let drift = sim.cfg.lease.max_drift_ppm as i64;
    for id in 1..=sim.cfg.founders {
        let clock = Clock {
            offset: sim.rng.gen_range(0..1_000_000),
            drift_ppm: sim.rng.gen_range(-drift..=drift),
        };
        sim.clocks.insert(id, clock);
        sim.start(id);
    }
    let joiner = sim.cfg.founders + 1;
    let join_at = sim.rng.gen_range(sim.cfg.rounds / 4..sim.cfg.rounds / 2);
    let leave_at = sim
        .rng
        .gen_range(sim.cfg.rounds / 2..sim.cfg.rounds * 3 / 4);
    let leaver = sim.rng.gen_range(1..=sim.cfg.founders);
    for _ in 0..sim.cfg.rounds {
        sim.round += 1;
        sim.chaos();
        // The joiner asks again until it is in (as its runtime does every second).
        if sim.cfg.membership && sim.round >= join_at && (sim.round - join_at).is_multiple_of(50) {
            sim.ask_again(joiner);
        }
        if sim.cfg.membership && sim.round == leave_at {
            sim.decommission(leaver);
        }
        sim.deliver_due()?;
        sim.tick_all()?;
    }
    // Quiet phase: heal, restart, no loss; everything must settle.
    sim.cuts.clear();
    sim.cfg.drop_per_mille = 0;
    let down: Vec<NodeId> = sim
        .nodes
        .iter()
        .filter(|(_, n)| n.is_none())
        .map(|(id, _)| *id)
        .collect();
    for id in down {
        sim.start(id);
    }
    for _ in 0..sim.cfg.quiet_rounds {
        sim.round += 1;
        if sim.cfg.membership && sim.round.is_multiple_of(50) {
            sim.ask_again(joiner);
        }
        sim.deliver_due()?;
        sim.tick_all()?;
    }
    // Liveness: every shard acted for by exactly one active node, all views agreeing.
    let real = sim.real_ms();
    let mut acting: BTreeMap<u32, NodeId> = BTreeMap::new();
    let mut tables = BTreeSet::new();
    for (id, n) in &sim.nodes {
        let n = n.as_ref().expect("all running");
        let state = n.shared.node_states();
        if state.get(id) == Some(&NodeState::Left) {
            sim.report.left = true;
            continue;
        }
        tables.insert(n.shared.table_epochs());
        for (shard, _) in n.shared.owned_at(sim.clocks[id].read(real)) {
            acting.insert(shard, *id);
        }
    }
    if acting.len() != sim.cfg.n_shards as usize {
        return Err(sim.violation(format!(
            "after the quiet phase only shards {:?} are acted for",
            acting.keys().collect::<Vec<_>>()
        )));
    }
    if tables.len() != 1 {
        let views: Vec<String> = sim
            .nodes
            .iter()
            .filter_map(|(id, n)| n.as_ref().map(|n| (id, n)))
            .map(|(id, n)| {
                format!(
                    "node {id}: {:?} {:?}",
                    n.shared.node_states(),
                    n.shared.table_epochs()
                )
            })
            .collect();
        return Err(sim.violation(format!("the members disagree on the table: {views:?}")));
    }
    Ok(sim.report)
}
