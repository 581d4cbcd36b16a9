//! The Raft group under the deterministic simulator: hundreds of seeded hostile schedules, then
//! focused scenarios (election, check_quorum, restart from disk, snapshot catch-up).
//!
//! A failing schedule prints its seed; replay it alone with `COMODIT_SIM_SEED=<seed>`
//! (and `COMODIT_SIM_STEPS=<n>` to change its length).

use comodit_cluster::sim::{run_schedule, Sim, SimConfig, SimReport};
use comodit_cluster::state::Command;
use comodit_cluster::NodeId;

const SEEDS: u64 = 300;
const STEPS: usize = 300;

fn nodes_for(seed: u64) -> usize {
    // One schedule in three runs 5 nodes, the others 3.
    [5, 3, 3][(seed % 3) as usize]
}

#[test]
fn seeded_schedules_keep_the_invariants() {
    let steps = std::env::var("COMODIT_SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS);
    if let Some(seed) = std::env::var("COMODIT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        let report = run_schedule(seed, steps, nodes_for(seed)).unwrap_or_else(|v| panic!("{v}"));
        eprintln!("{report:?}");
        return;
    }
    let mut reports: Vec<SimReport> = Vec::new();
    for seed in 0..SEEDS {
        match run_schedule(seed, steps, nodes_for(seed)) {
            Ok(r) => reports.push(r),
            Err(v) => panic!("{v}"),
        }
    }
    // The schedules must have exercised something, or passing means nothing.
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    let progressed = reports.iter().filter(|r| r.commands_committed > 0).count();
    assert!(
        progressed * 10 >= reports.len() * 8,
        "only {progressed} of {} schedules committed a command",
        reports.len()
    );
    assert!(
        sum(|r| r.leaders_elected as u64) > SEEDS,
        "too few elections"
    );
    assert!(
        sum(|r| r.crashes) > 0 && sum(|r| r.restarts) > 0,
        "no crash/restart"
    );
    assert!(sum(|r| r.partitions) > 0, "no partition");
    assert!(
        sum(|r| r.snapshots_restored) > 0,
        "no snapshot was ever sent"
    );
    assert!(
        sum(|r| r.dropped) > 0 && sum(|r| r.duplicated) > 0,
        "network too kind"
    );
    eprintln!(
        "{} schedules: {progressed} committed commands; elections {}, commands {}, crashes {}, \
         restarts {}, partitions {}, snapshots restored {}, delivered {}, dropped {}, duplicated {}",
        reports.len(),
        sum(|r| r.leaders_elected as u64),
        sum(|r| r.commands_committed as u64),
        sum(|r| r.crashes),
        sum(|r| r.restarts),
        sum(|r| r.partitions),
        sum(|r| r.snapshots_restored),
        sum(|r| r.delivered),
        sum(|r| r.dropped),
        sum(|r| r.duplicated),
    );
    // Same seed, same schedule.
    let again = run_schedule(7, steps, nodes_for(7)).unwrap();
    assert_eq!(again, reports[7]);
}

fn elect(sim: &mut Sim) -> NodeId {
    assert!(
        sim.run_until(200, |s| s.leader().is_some()).unwrap(),
        "no leader after 200 rounds"
    );
    sim.leader().unwrap()
}

/// Propose through the leader and wait until every up node applied it.
fn commit(sim: &mut Sim, cmd: Command) {
    assert!(sim.propose(&cmd).unwrap(), "leader refused {cmd:?}");
    let leader = sim.leader().unwrap();
    let target = sim.node(leader).unwrap().last_index();
    let done = sim
        .run_until(200, |s| {
            (1..=5)
                .filter_map(|id| s.node(id))
                .all(|n| n.state().applied_index >= target)
        })
        .unwrap();
    assert!(done, "{cmd:?} not applied everywhere");
}

#[test]
fn three_nodes_elect_one_leader_all_follow() {
    let mut sim = Sim::new(SimConfig::calm(1, 3));
    let leader = elect(&mut sim);
    let term = sim.node(leader).unwrap().term();
    let followed = sim
        .run_until(50, |s| {
            (1..=3).all(|id| s.node(id).unwrap().leader() == Some(leader))
        })
        .unwrap();
    assert!(followed, "followers do not know the leader");
    assert_eq!(sim.leaders(), vec![(leader, term)]);
    commit(&mut sim, Command::Init { n_shards: 4 });
    for id in 1..=3 {
        assert_eq!(sim.node(id).unwrap().state().n_shards, 4);
    }
}

#[test]
fn partitioned_leader_steps_down_and_majority_elects_a_higher_term() {
    let mut sim = Sim::new(SimConfig::calm(2, 3));
    let old = elect(&mut sim);
    commit(&mut sim, Command::Init { n_shards: 4 });
    let old_term = sim.node(old).unwrap().term();
    sim.partition(&[old]);
    // The cut-off leader still accepts a proposal into its log; it must never commit.
    sim.propose_to(
        old,
        &Command::SetSetting {
            key: "stale".into(),
            value: "x".into(),
        },
    )
    .unwrap();
    let replaced = sim
        .run_until(300, |s| {
            let old_leads = s.node(old).unwrap().is_leader();
            let new = s
                .leaders()
                .into_iter()
                .any(|(id, t)| id != old && t > old_term);
            !old_leads && new
        })
        .unwrap();
    assert!(replaced, "leaders after partition: {:?}", sim.leaders());
    let (new, new_term) = sim.leaders()[0];
    assert_ne!(new, old);
    assert!(new_term > old_term);
    sim.heal();
    commit(
        &mut sim,
        Command::SetSetting {
            key: "fresh".into(),
            value: "y".into(),
        },
    );
    let rejoined = sim
        .run_until(100, |s| s.node(old).unwrap().leader() == Some(new))
        .unwrap();
    assert!(rejoined, "old leader does not follow the new one");
    for id in 1..=3 {
        let settings = &sim.node(id).unwrap().state().settings;
        assert!(
            !settings.contains_key("stale"),
            "node {id}: uncommitted entry applied"
        );
        assert_eq!(settings.get("fresh").map(String::as_str), Some("y"));
    }
}

#[test]
fn leader_that_hears_no_follower_steps_down() {
    let mut sim = Sim::new(SimConfig::calm(3, 3));
    let leader = elect(&mut sim);
    let term = sim.node(leader).unwrap().term();
    for id in (1..=3).filter(|id| *id != leader) {
        sim.block_one_way(id, leader);
    }
    let stepped_down = sim
        .run_until(100, |s| !s.node(leader).unwrap().is_leader())
        .unwrap();
    assert!(
        stepped_down,
        "leader kept leading without acks (check_quorum)"
    );
    assert!(sim.node(leader).unwrap().term() >= term);
}

#[test]
fn restarted_node_rebuilds_its_state_from_its_own_log() {
    let mut cfg = SimConfig::calm(4, 3);
    cfg.snapshot_interval = 1_000; // no compaction: replay from the log alone
    let mut sim = Sim::new(cfg);
    let leader = elect(&mut sim);
    commit(&mut sim, Command::Init { n_shards: 4 });
    for id in 1..=3u64 {
        commit(
            &mut sim,
            Command::AddNode {
                id,
                addr: format!("n{id}"),
            },
        );
    }
    let owners = sim.node(leader).unwrap().state().plan_allocation();
    commit(&mut sim, Command::AssignShards { owners });
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let before = sim.node(follower).unwrap().state().clone();
    assert!(before.shards.iter().all(|s| s.epoch > 0));
    sim.crash(follower);
    assert!(sim.node(follower).is_none());
    // Nobody can talk to it: whatever it has after restart comes from its disk.
    sim.partition(&[follower]);
    sim.restart(follower).unwrap();
    sim.round().unwrap();
    assert_eq!(sim.node(follower).unwrap().state(), &before);
}

#[test]
fn restarted_node_catches_up_through_a_snapshot() {
    let mut cfg = SimConfig::calm(5, 3);
    cfg.snapshot_interval = 4;
    let mut sim = Sim::new(cfg);
    let leader = elect(&mut sim);
    commit(&mut sim, Command::Init { n_shards: 8 });
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    sim.crash(follower);
    for i in 0..20 {
        commit(
            &mut sim,
            Command::SetSetting {
                key: format!("k{}", i % 5),
                value: format!("v{i}"),
            },
        );
    }
    let restored_before = sim.report().snapshots_restored;
    sim.restart(follower).unwrap();
    let target = sim.node(leader).unwrap().state().applied_index;
    let caught_up = sim
        .run_until(200, |s| {
            s.node(follower).unwrap().state().applied_index >= target
        })
        .unwrap();
    assert!(caught_up, "restarted node did not catch up");
    assert!(
        sim.report().snapshots_restored > restored_before,
        "the leader's log was compacted, catch-up must go through a snapshot"
    );
    let leader_state = sim.node(leader).unwrap().state().clone();
    let follower_state = sim.node(follower).unwrap().state().clone();
    assert_eq!(follower_state.settings, leader_state.settings);
    assert_eq!(
        follower_state.settings.get("k4").map(String::as_str),
        Some("v19")
    );
}
