//! The lease safety argument of `comodit_cluster::lease`, checked by simulation: two drifting,
//! offset clocks read in whole milliseconds, renewals with random send gaps, commit delays, learn
//! delays and losses, and at every instant at which anything changes, never "holder valid AND
//! leader considers it expired". Plus the epoch rule: epochs never decrease.

use comodit_cluster::lease::{
    next_epoch, EpochTable, GrantedLease, HeldLease, LeaseConfig, ShardOutOfRange,
};
use comodit_protocol::Epoch;
use proptest::prelude::*;

/// A node's clock against real time (integer microseconds): an offset and a rate error in ppm.
#[derive(Clone, Copy, Debug)]
struct Clock {
    offset_us: i128,
    drift_ppm: i128,
}

impl Clock {
    /// The whole-millisecond reading at real time `t_us`: floor((offset + t·(1 + drift)) / 1000).
    fn read_ms(&self, t_us: i128) -> u64 {
        let scaled = self.offset_us * 1_000_000 + t_us * (1_000_000 + self.drift_ppm);
        u64::try_from(scaled.div_euclid(1_000_000_000)).expect("clock readings stay positive")
    }

    /// The first real microsecond after `t_us` at which the reading changes.
    fn next_tick_us(&self, t_us: i128) -> i128 {
        let next_ms = i128::from(self.read_ms(t_us)) + 1;
        let rate = 1_000_000 + self.drift_ppm;
        let target = next_ms * 1_000_000_000 - self.offset_us * 1_000_000;
        // ceil(target / rate), strictly after t_us.
        let tick = target.div_euclid(rate) + i128::from(target.rem_euclid(rate) != 0);
        debug_assert!(tick > t_us && self.read_ms(tick) == next_ms as u64);
        tick
    }
}

/// One renewal: sent `gap_us` after the previous one (real time), committed `commit_delay_us` later
/// (as the leader sees it) unless lost, learned by the holder `learn_delay_us` after the commit.
#[derive(Clone, Copy, Debug)]
struct Renewal {
    gap_us: i128,
    commit_delay_us: i128,
    learn_delay_us: i128,
    lost: bool,
}

#[derive(Clone, Debug)]
struct Scenario {
    config: LeaseConfig,
    holder: Clock,
    leader: Clock,
    first_send_us: i128,
    renewals: Vec<Renewal>,
}

/// What the simulation saw: the first violating real instant, if any, and whether the holder was
/// ever valid and the leader ever declared expiry (so a pass is not vacuous).
#[derive(Debug, Default)]
struct Outcome {
    violation_at_us: Option<i128>,
    holder_was_valid: bool,
    leader_expired: bool,
}

enum Action {
    /// The leader sees a renewal commit.
    Commit,
    /// The holder learns renewal `i` committed.
    Learn(usize),
}

/// Runs the scenario and checks the safety property at every real instant at which a clock reading
/// changes or an action happens (between those the answer cannot change).
fn simulate(s: &Scenario) -> Outcome {
    let mut actions: Vec<(i128, Action)> = Vec::new();
    let mut sent_us = Vec::new();
    let mut t = s.first_send_us;
    for (i, r) in s.renewals.iter().enumerate() {
        t += r.gap_us;
        sent_us.push(t);
        if !r.lost {
            actions.push((t + r.commit_delay_us, Action::Commit));
            actions.push((t + r.commit_delay_us + r.learn_delay_us, Action::Learn(i)));
        }
    }
    // Stable sort: at equal times the commit comes before the learn, as causality demands.
    actions.sort_by_key(|(at, _)| *at);
    let last_action_us = actions.last().map_or(t, |(at, _)| *at);
    // Well past the leader's expiry even on a clock running 20% slow.
    let end_us = last_action_us + i128::from(s.config.leader_window_ms() + 2) * 1_000 * 2;

    let mut held = HeldLease::new(&s.config).expect("valid config");
    let mut granted: Option<GrantedLease> = None;
    let mut outcome = Outcome::default();
    let mut pending = actions.into_iter().peekable();
    let mut now = s.first_send_us;
    while now <= end_us {
        while let Some((_, action)) = pending.next_if(|(at, _)| *at <= now) {
            match action {
                Action::Commit => {
                    let at = s.leader.read_ms(now);
                    match granted.as_mut() {
                        Some(g) => g.renewed(at),
                        None => granted = Some(GrantedLease::new(&s.config, at).unwrap()),
                    }
                }
                Action::Learn(i) => held.renewed(s.holder.read_ms(sent_us[i])),
            }
        }
        let valid = held.is_valid(s.holder.read_ms(now));
        let expired = granted
            .as_ref()
            .is_some_and(|g| g.surely_expired(s.leader.read_ms(now)));
        outcome.holder_was_valid |= valid;
        outcome.leader_expired |= expired;
        if valid && expired && outcome.violation_at_us.is_none() {
            outcome.violation_at_us = Some(now);
        }

        let mut next = s.holder.next_tick_us(now).min(s.leader.next_tick_us(now));
        if let Some((at, _)) = pending.peek() {
            next = next.min(*at);
        }
        now = next;
    }
    outcome
}

fn scenario() -> impl Strategy<Value = Scenario> {
    // No drift and zero delays are edge cases (no padding slack at all), so they get weight.
    (20u64..=1_000, prop_oneof![Just(0u64), 0u64..=200_000])
        .prop_flat_map(|(lease_ms, max_drift_ppm)| {
            let probe = LeaseConfig {
                lease_ms,
                max_drift_ppm,
                renew_every_ms: 1,
            };
            let renew = 1..=probe.holder_window_ms() / 2;
            let drift = -(max_drift_ppm as i128)..=max_drift_ppm as i128;
            let lease_us = i128::from(lease_ms) * 1_000;
            let renewal = (
                0..=lease_us * 3 / 2,
                prop_oneof![Just(0), 0..=lease_us],
                prop_oneof![Just(0), 0..=lease_us / 2],
                prop::bool::weighted(0.25),
            )
                .prop_map(|(gap_us, commit_delay_us, learn_delay_us, lost)| Renewal {
                    gap_us,
                    commit_delay_us,
                    learn_delay_us,
                    lost,
                });
            (
                Just((lease_ms, max_drift_ppm)),
                renew,
                (0i128..1_000_000_000_000, drift.clone()),
                (0i128..1_000_000_000_000, drift),
                0i128..1_000_000,
                prop::collection::vec(renewal, 1..=6),
            )
        })
        .prop_map(
            |(
                (lease_ms, max_drift_ppm),
                renew_every_ms,
                holder,
                leader,
                first_send_us,
                renewals,
            )| {
                Scenario {
                    config: LeaseConfig {
                        lease_ms,
                        max_drift_ppm,
                        renew_every_ms,
                    },
                    holder: Clock {
                        offset_us: holder.0,
                        drift_ppm: holder.1,
                    },
                    leader: Clock {
                        offset_us: leader.0,
                        drift_ppm: leader.1,
                    },
                    first_send_us,
                    renewals,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The key safety property: within the drift bound, the holder never acts while the leader
    /// already considers its lease expired.
    #[test]
    fn holder_stops_before_leader_reassigns(s in scenario()) {
        let outcome = simulate(&s);
        prop_assert!(outcome.violation_at_us.is_none(), "{:?}", outcome);
        // Every scenario ends with the leader expiring the lease (the simulation runs past it).
        prop_assert_eq!(outcome.leader_expired, s.renewals.iter().any(|r| !r.lost));
    }

    /// Epochs only grow: across any sequence of reassignments (even with log indices out of order),
    /// a reassigned shard's epoch strictly increases, the others do not change.
    #[test]
    fn epochs_never_decrease(
        n_shards in 1u32..=16,
        steps in prop::collection::vec(
            (0u64..=50, prop::collection::vec(0u32..=20, 0..=8)),
            0..=30,
        ),
    ) {
        let mut table = EpochTable::new(n_shards);
        for (log_index, shards) in steps {
            let before: Vec<Epoch> = (0..n_shards).map(|s| table.epoch(s).unwrap()).collect();
            let result = table.reassign(log_index, &shards);
            for shard in 0..n_shards {
                let (old, new) = (before[shard as usize], table.epoch(shard).unwrap());
                if result.is_ok() && shards.contains(&shard) {
                    prop_assert!(new > old, "shard {} went {} -> {}", shard, old, new);
                    prop_assert!(new.0 >= log_index);
                } else {
                    prop_assert_eq!(new, old, "shard {} changed without a reassignment", shard);
                }
            }
            prop_assert_eq!(result.is_err(), shards.iter().any(|&s| s >= n_shards));
        }
    }

    /// With Raft's growing log indices, the epoch is the log index of the assignment (DESIGN §4).
    #[test]
    fn epoch_is_the_log_index_when_indices_grow(previous in 0u64..1_000, step in 1u64..1_000) {
        prop_assert_eq!(next_epoch(previous + step, previous), previous + step);
    }
}

fn config(lease_ms: u64, max_drift_ppm: u64) -> LeaseConfig {
    LeaseConfig {
        lease_ms,
        max_drift_ppm,
        renew_every_ms: lease_ms / 4,
    }
}

fn clock(drift_ppm: i128) -> Clock {
    Clock {
        offset_us: 5_000_000,
        drift_ppm,
    }
}

fn one_renewal() -> Vec<Renewal> {
    vec![Renewal {
        gap_us: 0,
        commit_delay_us: 0,
        learn_delay_us: 0,
        lost: false,
    }]
}

/// The checker has teeth: with clocks drifting three times the configured bound, apart in
/// opposite directions, the holder still acts after the leader expired its lease.
#[test]
fn drift_beyond_the_bound_is_caught() {
    let s = Scenario {
        config: config(1_000, 1_000),
        holder: clock(-3_000),
        leader: clock(3_000),
        first_send_us: 0,
        renewals: one_renewal(),
    };
    assert!(simulate(&s).violation_at_us.is_some());

    // The same clocks within the bound are safe.
    let s = Scenario {
        holder: clock(-1_000),
        leader: clock(1_000),
        ..s
    };
    let outcome = simulate(&s);
    assert!(outcome.violation_at_us.is_none(), "{outcome:?}");
    assert!(outcome.holder_was_valid && outcome.leader_expired);
}

/// Whole-millisecond readings: the holder's send reading taken just after its clock ticked, the
/// leader's commit reading just before its clock ticks, no drift, no delay. The leader's extra
/// millisecond is what keeps the two apart here.
#[test]
fn whole_millisecond_readings_are_paid_for() {
    let s = Scenario {
        config: config(1_000, 0),
        holder: Clock {
            offset_us: 0,
            drift_ppm: 0,
        },
        leader: Clock {
            offset_us: 999,
            drift_ppm: 0,
        },
        first_send_us: 1_000,
        renewals: one_renewal(),
    };
    let outcome = simulate(&s);
    assert!(outcome.violation_at_us.is_none(), "{outcome:?}");
    assert!(outcome.holder_was_valid && outcome.leader_expired);
}

/// Without drift padding (a bound of 0 while the clocks do drift) the checker finds the overlap.
#[test]
fn unpadded_lease_is_caught() {
    let s = Scenario {
        config: config(1_000, 0),
        holder: clock(-500),
        leader: clock(500),
        first_send_us: 0,
        renewals: one_renewal(),
    };
    assert!(simulate(&s).violation_at_us.is_some());
}

#[test]
fn held_lease_windows() {
    let c = LeaseConfig {
        lease_ms: 10_000,
        max_drift_ppm: 1_000,
        renew_every_ms: 3_000,
    };
    let mut held = HeldLease::new(&c).unwrap();
    assert!(!held.is_valid(0), "no lease before the first renewal");
    assert!(held.must_renew(0));
    assert_eq!(held.valid_until_ms(), None);

    held.renewed(1_000);
    assert!(held.is_valid(1_000));
    assert!(held.is_valid(1_000 + 9_989));
    assert!(
        !held.is_valid(1_000 + 9_990),
        "shortened by the 10 ms padding"
    );
    assert_eq!(held.valid_until_ms(), Some(10_990));
    assert!(!held.must_renew(3_999));
    assert!(held.must_renew(4_000));

    // A renewal learned late but sent earlier does not shorten the lease.
    held.renewed(500);
    assert_eq!(held.valid_until_ms(), Some(10_990));
    held.renewed(4_000);
    assert_eq!(held.valid_until_ms(), Some(13_990));
}

#[test]
fn granted_lease_windows() {
    let c = LeaseConfig {
        lease_ms: 10_000,
        max_drift_ppm: 1_000,
        renew_every_ms: 3_000,
    };
    let mut granted = GrantedLease::new(&c, 2_000).unwrap();
    assert!(!granted.surely_expired(2_000 + 10_010));
    assert!(
        granted.surely_expired(2_000 + 10_011),
        "lengthened by padding + 1 ms"
    );
    granted.renewed(5_000);
    assert_eq!(granted.expires_at_ms(), 15_011);
    granted.renewed(4_000);
    assert_eq!(
        granted.expires_at_ms(),
        15_011,
        "an older commit never shortens it"
    );
}

#[test]
fn out_of_range_reassignment_changes_nothing() {
    let mut table = EpochTable::new(4);
    table.reassign(7, &[0, 1]).unwrap();
    assert_eq!(
        table.reassign(9, &[2, 4]),
        Err(ShardOutOfRange {
            shard: 4,
            n_shards: 4
        })
    );
    assert_eq!(
        (0..4)
            .map(|s| table.epoch(s).unwrap().0)
            .collect::<Vec<_>>(),
        vec![7, 7, 0, 0]
    );
    assert_eq!(table.epoch(4), None);
    // A stale log index still moves the epoch forward.
    table.reassign(3, &[0]).unwrap();
    assert_eq!(table.epoch(0), Some(Epoch(8)));
}
