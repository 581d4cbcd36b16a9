//! Leases and epochs: when a node may act for its shards, and how a new owner outranks the old one
//! (DESIGN §4, §7).
//!
//! A node acts for its shards only while it holds a valid lease, which it renews by proposing a
//! renewal through the Raft leader. The leader reassigns a dead node's shards only once that node's
//! lease has *surely* expired. Both sides read their own monotonic clock, passed in by the caller as
//! `u64` milliseconds (any origin, any offset: only differences on the same clock are used), so the
//! rules here are plain arithmetic and the tests can drive time.
//!
//! ## Why the holder stops strictly before the leader reassigns
//!
//! The two clocks are different machines' clocks: arbitrary offsets, and rates that may drift from
//! real time by up to `max_drift_ppm` (ρ) each: `d` real milliseconds read as between `d·(1−ρ)` and
//! `d·(1+ρ)` on either clock. A renewal is sent by the holder at real time `t_s` and committed, as
//! seen by the leader, at real time `t_c ≥ t_s` (a commit cannot precede its proposal).
//!
//! * **The holder counts from the send time**, on its own clock. It learns of the commit later than
//!   the leader does, but it does not know when the leader saw it; the send time is the one instant
//!   it knows is not later than the commit. Its window is the lease *shortened* by a padding
//!   `p = ceil(lease·ρ)`: it may act while `now − sent_at < lease − p`, i.e. until real time at most
//!   `t_s + (lease − p)/(1 − ρ)` (its clock runs at least `1 − ρ`).
//! * **The leader counts from the commit time**, on its own clock, with the lease *lengthened* by
//!   `p + 1`: the lease has surely expired once `now − committed_at ≥ lease + p + 1`, which happens
//!   at real time at least `t_c + (lease + p)/(1 + ρ)` (its clock runs at most `1 + ρ`; the `+ 1`
//!   pays for reading the clock in whole milliseconds, which can make a difference of readings up to
//!   one millisecond longer than the real difference on that clock).
//!
//! Both at once would need `t_c + (lease + p)/(1 + ρ) < t_s + (lease − p)/(1 − ρ)`, which with
//! `t_c ≥ t_s` needs `(lease + p)(1 − ρ) < (lease − p)(1 + ρ)`, i.e. `p < lease·ρ`. The padding is at
//! least `lease·ρ`, so there is no instant at which the holder still acts and the leader already
//! reassigns, whatever the message delays and clock offsets. The cost is that a node's shards stay
//! unowned for about `2·p + (commit delay)` longer after a failure than the bare lease.
//!
//! Two things the driver must add, outside this module: a renewal names the lease it renews, and the
//! state machine rejects a renewal applied after that lease was revoked (otherwise a renewal sent
//! before the revocation but committed after it would extend a lease the leader already gave up on);
//! and a new leader starts every [`GrantedLease`] at its own takeover time, which is not earlier
//! than the sending of any renewal already in its log (renewals committed later it sees commit).
//!
//! ## Epochs
//!
//! Every change of a shard's owner is a Raft entry; the shard's new epoch is that entry's log index
//! (DESIGN §4). Agents and the store reject a lower epoch than one they have seen, so an owner that
//! lost the shard is fenced even before it notices. [`next_epoch`] and [`EpochTable`] make the "only
//! grows" rule hold even for inputs that break the log-index assumption.

use comodit_protocol::Epoch;

/// Lease timing, shared by every node (it is part of the cluster settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The nominal lease: how long a renewal keeps a node's shards, before drift padding.
    pub lease_ms: u64,
    /// The most any node's clock rate may differ from real time, in parts per million (100 = 0.01%).
    pub max_drift_ppm: u64,
    /// How often a holder sends a renewal, counted from its last committed one.
    pub renew_every_ms: u64,
}

/// A [`LeaseConfig`] that cannot give a safe and live lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseConfigError {
    #[error(
        "lease max_drift_ppm is {0}, must be below 1000000 (a clock that may stop is no clock)"
    )]
    DriftTooLarge(u64),
    #[error("lease_ms {lease_ms} leaves no holder window after drift padding of {padding_ms} ms")]
    LeaseTooShort { lease_ms: u64, padding_ms: u64 },
    #[error(
        "lease renew_every_ms is {renew_every_ms}, must be between 1 and half the holder window \
         ({holder_window_ms} ms) so a lost renewal can be retried before the lease lapses"
    )]
    RenewInterval {
        renew_every_ms: u64,
        holder_window_ms: u64,
    },
}

impl LeaseConfig {
    /// Checks the settings: drift below 100%, a holder window left after padding, and at least two
    /// renewal attempts per holder window.
    pub fn validate(&self) -> Result<(), LeaseConfigError> {
        if self.max_drift_ppm >= 1_000_000 {
            return Err(LeaseConfigError::DriftTooLarge(self.max_drift_ppm));
        }
        let holder_window_ms = self.holder_window_ms();
        if holder_window_ms == 0 {
            return Err(LeaseConfigError::LeaseTooShort {
                lease_ms: self.lease_ms,
                padding_ms: self.padding_ms(),
            });
        }
        if self.renew_every_ms == 0 || self.renew_every_ms > holder_window_ms / 2 {
            return Err(LeaseConfigError::RenewInterval {
                renew_every_ms: self.renew_every_ms,
                holder_window_ms,
            });
        }
        Ok(())
    }

    /// `ceil(lease_ms · ρ)`: the most the two clocks can disagree about the length of a lease.
    pub fn padding_ms(&self) -> u64 {
        let product = u128::from(self.lease_ms) * u128::from(self.max_drift_ppm);
        // lease_ms · ppm / 10⁶ ≤ lease_ms, so it fits back in a u64.
        u64::try_from(product.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    /// How long after sending a committed renewal the holder may act, on its own clock.
    pub fn holder_window_ms(&self) -> u64 {
        self.lease_ms.saturating_sub(self.padding_ms())
    }

    /// How long after seeing a renewal commit the leader waits, on its own clock, before the lease
    /// has surely expired. One extra millisecond covers whole-millisecond clock readings.
    pub fn leader_window_ms(&self) -> u64 {
        self.lease_ms
            .saturating_add(self.padding_ms())
            .saturating_add(1)
    }
}

/// Holder side: the lease this node holds on its shards, measured on its own clock.
#[derive(Clone, Debug)]
pub struct HeldLease {
    holder_window_ms: u64,
    renew_every_ms: u64,
    /// Send time (own clock) of the latest renewal known to have committed; `None` before the first.
    sent_at_ms: Option<u64>,
}

impl HeldLease {
    /// A node that holds no lease yet (it must renew before acting).
    pub fn new(config: &LeaseConfig) -> Result<Self, LeaseConfigError> {
        config.validate()?;
        Ok(HeldLease {
            holder_window_ms: config.holder_window_ms(),
            renew_every_ms: config.renew_every_ms,
            sent_at_ms: None,
        })
    }

    /// A renewal this node proposed at `sent_at_ms` (its own clock) has committed. Renewals may be
    /// learned out of order; an older one never shortens the lease.
    pub fn renewed(&mut self, sent_at_ms: u64) {
        self.sent_at_ms = Some(self.sent_at_ms.map_or(sent_at_ms, |s| s.max(sent_at_ms)));
    }

    /// Whether the node may act for its shards at `now_ms` (its own clock).
    pub fn is_valid(&self, now_ms: u64) -> bool {
        self.sent_at_ms
            .is_some_and(|sent| now_ms < sent.saturating_add(self.holder_window_ms))
    }

    /// Whether it is time to send a renewal at `now_ms` (its own clock): no lease yet, or
    /// `renew_every_ms` since the send time of the last committed renewal. The driver keeps at most
    /// one renewal in flight.
    pub fn must_renew(&self, now_ms: u64) -> bool {
        self.sent_at_ms
            .is_none_or(|sent| now_ms >= sent.saturating_add(self.renew_every_ms))
    }

    /// The first instant (own clock) at which the lease is no longer valid, if one is held.
    pub fn valid_until_ms(&self) -> Option<u64> {
        self.sent_at_ms
            .map(|sent| sent.saturating_add(self.holder_window_ms))
    }
}

/// Leader side: a node's lease as the leader sees it, measured on the leader's clock.
#[derive(Clone, Debug)]
pub struct GrantedLease {
    leader_window_ms: u64,
    /// When (leader's clock) the leader last saw a renewal of this lease commit, or took over.
    committed_at_ms: u64,
}

impl GrantedLease {
    /// A lease the leader counts from `committed_at_ms`: the commit of the grant, or the leader's
    /// takeover time for leases granted under a previous leader (not earlier than the sending of
    /// any renewal in its log, so never shorter than the holder's view).
    pub fn new(config: &LeaseConfig, committed_at_ms: u64) -> Result<Self, LeaseConfigError> {
        config.validate()?;
        Ok(GrantedLease {
            leader_window_ms: config.leader_window_ms(),
            committed_at_ms,
        })
    }

    /// The leader saw a renewal commit at `committed_at_ms` (its own clock). Never moves backwards.
    pub fn renewed(&mut self, committed_at_ms: u64) {
        self.committed_at_ms = self.committed_at_ms.max(committed_at_ms);
    }

    /// Whether the holder has surely stopped acting at `now_ms` (leader's clock), so its shards may
    /// be reassigned.
    pub fn surely_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms()
    }

    /// The first instant (leader's clock) at which the lease has surely expired.
    pub fn expires_at_ms(&self) -> u64 {
        self.committed_at_ms.saturating_add(self.leader_window_ms)
    }
}

/// The epoch of an assignment committed at `assignment_log_index`, for a shard whose epoch was
/// `previous` (0 = never assigned). Normally the log index itself (DESIGN §4); if the index is not
/// above `previous` (which Raft's growing log never produces), the epoch still grows by one, so a
/// fenced owner can never be un-fenced.
pub fn next_epoch(assignment_log_index: u64, previous: u64) -> u64 {
    assignment_log_index.max(previous.saturating_add(1))
}

/// A shard number past the end of an [`EpochTable`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shard {shard} is out of range (the cluster has {n_shards} shards)")]
pub struct ShardOutOfRange {
    pub shard: u32,
    pub n_shards: u32,
}

/// The epoch of every shard (index = shard number); epochs only grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochTable {
    epochs: Vec<Epoch>,
}

impl EpochTable {
    /// A table where no shard was ever assigned (epoch 0; the first assignment's epoch is ≥ 1).
    pub fn new(n_shards: u32) -> Self {
        EpochTable {
            epochs: vec![Epoch(0); n_shards as usize],
        }
    }

    pub fn n_shards(&self) -> u32 {
        // Built from a u32 count and never resized.
        self.epochs.len() as u32
    }

    pub fn epoch(&self, shard: u32) -> Option<Epoch> {
        self.epochs.get(shard as usize).copied()
    }

    /// The shards in `shards` changed owner in the entry at `log_index`: each gets a new epoch.
    /// All or nothing: an out-of-range shard rejects the whole reassignment.
    pub fn reassign(&mut self, log_index: u64, shards: &[u32]) -> Result<(), ShardOutOfRange> {
        if let Some(&shard) = shards.iter().find(|&&s| s >= self.n_shards()) {
            return Err(ShardOutOfRange {
                shard,
                n_shards: self.n_shards(),
            });
        }
        for &shard in shards {
            let epoch = &mut self.epochs[shard as usize];
            *epoch = Epoch(next_epoch(log_index, epoch.0));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease_ms: u64, max_drift_ppm: u64, renew_every_ms: u64) -> LeaseConfig {
        LeaseConfig {
            lease_ms,
            max_drift_ppm,
            renew_every_ms,
        }
    }

    #[test]
    fn windows_are_padded_by_the_drift_bound() {
        let c = config(10_000, 1_000, 3_000);
        assert_eq!(c.padding_ms(), 10);
        assert_eq!(c.holder_window_ms(), 9_990);
        assert_eq!(c.leader_window_ms(), 10_011);
        // The padding rounds up: 1 ms · 1 ppm still pads by a whole millisecond.
        assert_eq!(config(1, 1, 1).padding_ms(), 1);
        assert_eq!(config(1_000, 0, 100).padding_ms(), 0);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        assert_eq!(
            config(1_000, 1_000_000, 100).validate(),
            Err(LeaseConfigError::DriftTooLarge(1_000_000))
        );
        assert!(matches!(
            config(1, 1, 1).validate(),
            Err(LeaseConfigError::LeaseTooShort { .. })
        ));
        assert!(matches!(
            config(1_000, 0, 0).validate(),
            Err(LeaseConfigError::RenewInterval { .. })
        ));
        assert!(matches!(
            config(1_000, 0, 501).validate(),
            Err(LeaseConfigError::RenewInterval { .. })
        ));
        assert_eq!(config(1_000, 0, 500).validate(), Ok(()));
        assert!(HeldLease::new(&config(1_000, 0, 0)).is_err());
        assert!(GrantedLease::new(&config(1_000, 0, 0), 0).is_err());
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let c = config(u64::MAX, 999_999, 1);
        assert!(c.padding_ms() <= c.lease_ms);
        let mut held = HeldLease::new(&config(1_000, 100, 300)).unwrap();
        held.renewed(u64::MAX - 1);
        assert!(held.is_valid(u64::MAX - 1));
        let granted = GrantedLease::new(&config(1_000, 100, 300), u64::MAX - 1).unwrap();
        assert!(!granted.surely_expired(u64::MAX - 1));
    }
}
