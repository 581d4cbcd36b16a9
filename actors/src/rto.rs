//! The re-send timeout, adapted to the round trips the node measures.
//!
//! A dispatched change is re-sent (same command id) when no reply came within the command
//! timeout. With a fleet of 50,000 hosts a wave's replies wait behind each other in the shard
//! queues for most of a minute, so a fixed timeout re-sends commands whose replies are already
//! queued, each one more command and one more reply for a broker that is already the limit (one
//! 50,000-host run whose slowest wave took 84 s counted 1,434 duplicated commands; ARCHITECTURE
//! §30).
//!
//! As TCP does (RFC 6298), the node keeps a smoothed round trip (SRTT) and its variation
//! (RTTVAR) over the replies it records, and waits SRTT + 4·RTTVAR before a re-send — never less
//! than the configured command timeout, never more than ten times it. Only a change sent once by
//! this node is a sample (Karn's rule: the reply to a re-sent command may answer either copy,
//! and one read from the store as dispatched was sent by an earlier owner).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use crate::metrics as m;

/// The longest re-send timeout, as a multiple of the configured one.
const CEILING_FACTOR: i64 = 10;

pub(crate) struct RoundTrips {
    /// (SRTT, RTTVAR) in ms; none before the first sample.
    estimate: Mutex<Option<(f64, f64)>>,
    /// The current timeout (ms), read by every actor without the lock.
    timeout_ms: AtomicI64,
    floor_ms: i64,
}

impl RoundTrips {
    /// `command_timeout_ms`: the configured timeout, the floor.
    pub fn new(command_timeout_ms: i64) -> RoundTrips {
        RoundTrips {
            estimate: Mutex::new(None),
            timeout_ms: AtomicI64::new(command_timeout_ms),
            floor_ms: command_timeout_ms,
        }
    }

    /// The re-send timeout now, in ms.
    pub fn timeout_ms(&self) -> i64 {
        self.timeout_ms.load(Ordering::Relaxed)
    }

    /// One round trip, from a command's only send to its reply being recorded.
    pub fn sample(&self, rtt_ms: i64) {
        let r = rtt_ms.max(0) as f64;
        let mut est = self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        let (srtt, rttvar) = match *est {
            None => (r, r / 2.0),
            Some((srtt, rttvar)) => (
                0.875 * srtt + 0.125 * r,
                0.75 * rttvar + 0.25 * (srtt - r).abs(),
            ),
        };
        *est = Some((srtt, rttvar));
        drop(est);
        let ceiling = self.floor_ms.saturating_mul(CEILING_FACTOR);
        let timeout =
            ((srtt + 4.0 * rttvar) as i64).clamp(self.floor_ms, ceiling.max(self.floor_ms));
        if self.timeout_ms.swap(timeout, Ordering::Relaxed) != timeout {
            metrics::gauge!(m::RESEND_TIMEOUT).set(timeout as f64 / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_round_trips_keep_the_configured_timeout() {
        let r = RoundTrips::new(60_000);
        for _ in 0..1000 {
            r.sample(200);
        }
        assert_eq!(r.timeout_ms(), 60_000);
    }

    #[test]
    fn round_trips_growing_past_it_stretch_it_and_shrinking_ones_bring_it_back() {
        let r = RoundTrips::new(60_000);
        // A 50,000-host wave: the replies recorded later and later after their sends.
        for i in 0..50_000 {
            r.sample(i * 80_000 / 50_000);
        }
        let stretched = r.timeout_ms();
        assert!(stretched > 80_000, "{stretched}");
        // Never past ten times the configured timeout.
        for _ in 0..100 {
            r.sample(3_600_000);
        }
        assert_eq!(r.timeout_ms(), 600_000);
        // Quick answers again: back to the floor.
        for _ in 0..200 {
            r.sample(100);
        }
        assert_eq!(r.timeout_ms(), 60_000);
    }
}
