//! A host's pending changes as its actor keeps them in memory: ids, send count and deadlines,
//! nothing else (the request itself stays in the store). Plain code over plain data and a given
//! clock (`now_ms`, wall-clock milliseconds), so the schedule is tested without a broker.
//!
//! A change is `queued` until a publish of its command was confirmed, then `dispatched`. The
//! store learns of the dispatch `record_delay` later, and only if no reply came first: a change
//! answered within that delay costs one write less (ARCHITECTURE §14). A dispatched change is
//! re-sent with the same command id after `command_timeout` without a reply (the agent's
//! de-duplication answers a duplicate with its stored reply), at most `max_retries` times, and
//! only while the host is online: while it is offline the first copy waits in its queue. Any
//! pending change expires at its `expires_at`.

use comodit_protocol::CommandId;
use comodit_store::{Change, ChangeId, ChangeStatus};

/// "Nothing due", as a deadline.
pub const NEVER: i64 = i64::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub command_timeout_ms: i64,
    pub max_retries: u32,
    pub publish_retry_ms: i64,
    /// How long after its first send a change still unanswered is recorded `dispatched`.
    pub record_delay_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub change: ChangeId,
    pub command: CommandId,
    pub seq: u64,
    pub dispatched: bool,
    /// When to record the dispatch in the store ([`NEVER`]: nothing sent yet, read from the store
    /// as dispatched, or recorded since). Set by the first send.
    pub record_ms: i64,
    /// Confirmed publishes so far (0 while queued).
    pub sends: u32,
    /// When it was first sent (ms), for the round-trip histogram.
    pub first_sent_ms: Option<i64>,
    /// The first send was this actor's (not read from the store as dispatched): its reply, if
    /// it answers the only send, times a round trip for the re-send timeout (`rto`).
    pub timed: bool,
    /// Queued: when to try to send.
    pub next_ms: i64,
    /// Dispatched: the re-send timeout counts from here (the last send, the host coming back
    /// online, or reading it from the store). The timeout itself is the caller's [`Timing`] of
    /// the moment, so one that grew since the send (the node's round trips grew) postpones it.
    pub resend_from_ms: i64,
    pub expires_ms: i64,
}

/// What is due for one change, in the order to do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    Expire(ChangeId),
    Send(ChangeId),
    Resend(ChangeId),
    /// Sent a while ago and still unanswered: write `dispatched` to the store.
    Record(ChangeId),
}

/// The pending changes of one host, in log (`seq`) order. Empty lists hold no heap memory.
#[derive(Debug, Default)]
pub struct PendingList(Vec<Pending>);

impl PendingList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pending> {
        self.0.iter()
    }

    /// Aligns the list with the store's pending changes (oldest first): known entries keep
    /// their schedule, new ones are added (queued: send now; dispatched by an earlier owner or
    /// run of the node: re-send after a timeout), and entries the store no longer lists as
    /// pending are dropped.
    pub fn sync(&mut self, stored: &[Change], now_ms: i64) {
        let mut next = Vec::with_capacity(stored.len());
        for c in stored.iter().filter(|c| c.status.is_pending()) {
            if let Some(known) = self.0.iter().find(|p| p.change == c.id) {
                next.push(known.clone());
                continue;
            }
            let dispatched = c.status == ChangeStatus::Dispatched;
            next.push(Pending {
                change: c.id,
                command: c.command_id,
                seq: c.seq,
                dispatched,
                record_ms: NEVER,
                sends: u32::from(dispatched),
                first_sent_ms: dispatched.then(|| c.updated_at.timestamp_millis()),
                timed: false,
                next_ms: now_ms,
                resend_from_ms: now_ms,
                expires_ms: c.expires_at.timestamp_millis(),
            });
        }
        next.sort_by_key(|p| p.seq);
        self.0 = next;
    }

    pub fn get(&self, change: ChangeId) -> Option<&Pending> {
        self.0.iter().find(|p| p.change == change)
    }

    pub fn by_command(&self, command: CommandId) -> Option<&Pending> {
        self.0.iter().find(|p| p.command == command)
    }

    pub fn remove(&mut self, change: ChangeId) -> Option<Pending> {
        let i = self.0.iter().position(|p| p.change == change)?;
        let p = self.0.remove(i);
        if self.0.is_empty() {
            // An idle actor keeps no buffer.
            self.0 = Vec::new();
        }
        Some(p)
    }

    /// What is due at `now_ms`, in seq order.
    pub fn due(&self, now_ms: i64, online: bool, t: Timing) -> Vec<Due> {
        self.0
            .iter()
            .filter_map(|p| {
                if p.expires_ms <= now_ms {
                    Some(Due::Expire(p.change))
                } else if !p.dispatched && p.next_ms <= now_ms {
                    Some(Due::Send(p.change))
                } else if p.dispatched && may_resend(p, online, t) && resend_at(p, t) <= now_ms {
                    Some(Due::Resend(p.change))
                } else if p.dispatched && p.record_ms <= now_ms {
                    Some(Due::Record(p.change))
                } else {
                    None
                }
            })
            .collect()
    }

    /// The earliest deadline of any pending change ([`NEVER`] if none).
    pub fn next_due(&self, online: bool, t: Timing) -> i64 {
        self.0
            .iter()
            .map(|p| {
                let send = if !p.dispatched {
                    p.next_ms
                } else if may_resend(p, online, t) {
                    resend_at(p, t)
                } else {
                    NEVER
                };
                let record = if p.dispatched { p.record_ms } else { NEVER };
                send.min(record).min(p.expires_ms)
            })
            .min()
            .unwrap_or(NEVER)
    }

    /// A publish of the change's command was confirmed.
    pub fn sent(&mut self, change: ChangeId, now_ms: i64, t: Timing) {
        if let Some(p) = self.0.iter_mut().find(|p| p.change == change) {
            if p.sends == 0 {
                // The first send of a change the store still has as queued.
                p.record_ms = now_ms.saturating_add(t.record_delay_ms);
                p.timed = p.first_sent_ms.is_none();
            }
            p.dispatched = true;
            p.sends = p.sends.saturating_add(1);
            p.first_sent_ms.get_or_insert(now_ms);
            p.resend_from_ms = now_ms;
        }
    }

    /// The store now holds the change as `dispatched`.
    pub fn recorded(&mut self, change: ChangeId) {
        if let Some(p) = self.0.iter_mut().find(|p| p.change == change) {
            p.record_ms = NEVER;
        }
    }

    /// Writing `dispatched` failed: try again a little later.
    pub fn record_failed(&mut self, change: ChangeId, now_ms: i64, t: Timing) {
        if let Some(p) = self.0.iter_mut().find(|p| p.change == change) {
            p.record_ms = now_ms.saturating_add(t.publish_retry_ms);
        }
    }

    /// A publish failed (or its store write did): try again a little later. The change stays
    /// queued in memory so the retry sends it again, with the same command id.
    pub fn send_failed(&mut self, change: ChangeId, now_ms: i64, t: Timing) {
        if let Some(p) = self.0.iter_mut().find(|p| p.change == change) {
            p.dispatched = false;
            p.next_ms = now_ms.saturating_add(t.publish_retry_ms);
        }
    }

    /// The host came (back) online: give it a full timeout to answer what waited in its queue
    /// before anything is re-sent.
    /// Its reply then no longer times a round trip: the wait included the time offline.
    pub fn host_online(&mut self, now_ms: i64) {
        for p in self.0.iter_mut().filter(|p| p.dispatched) {
            p.resend_from_ms = now_ms;
            p.timed = false;
        }
    }
}

fn may_resend(p: &Pending, online: bool, t: Timing) -> bool {
    online && p.sends <= t.max_retries
}

fn resend_at(p: &Pending, t: Timing) -> i64 {
    p.resend_from_ms.saturating_add(t.command_timeout_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use comodit_protocol::{Epoch, HostId};

    const T: Timing = Timing {
        command_timeout_ms: 1_000,
        max_retries: 2,
        publish_retry_ms: 100,
        record_delay_ms: 300,
    };

    fn change(seq: u64, status: ChangeStatus, expires_ms: i64) -> Change {
        let at = Utc.timestamp_millis_opt(500).unwrap();
        Change {
            id: ChangeId::random(),
            host: HostId(uuid::Uuid::nil()),
            seq,
            request: serde_json::json!({"op": "ping"}),
            status,
            command_id: CommandId::random(),
            epoch: Epoch(1),
            requested_by: "t".into(),
            created_at: at,
            updated_at: at,
            expires_at: Utc.timestamp_millis_opt(expires_ms).unwrap(),
            reply: None,
            job: None,
        }
    }

    #[test]
    fn queued_changes_are_sent_in_seq_order() {
        let (a, b) = (
            change(2, ChangeStatus::Queued, 10_000),
            change(1, ChangeStatus::Queued, 10_000),
        );
        let mut l = PendingList::default();
        l.sync(&[a.clone(), b.clone()], 0);
        assert_eq!(l.due(0, false, T), vec![Due::Send(b.id), Due::Send(a.id)]);
        assert_eq!(l.next_due(false, T), 0);
    }

    #[test]
    fn resends_wait_for_timeout_and_online_and_stop_at_max() {
        let c = change(1, ChangeStatus::Queued, 100_000);
        let mut l = PendingList::default();
        l.sync(std::slice::from_ref(&c), 0);
        l.sent(c.id, 0, T);
        assert_eq!(l.due(300, true, T), vec![Due::Record(c.id)]);
        l.recorded(c.id);
        assert!(l.due(999, true, T).is_empty());
        // Offline: the command waits in the host's queue, nothing is re-sent.
        assert!(l.due(5_000, false, T).is_empty());
        assert_eq!(
            l.next_due(false, T),
            100_000,
            "only the expiry is due offline"
        );
        assert_eq!(l.due(1_000, true, T), vec![Due::Resend(c.id)]);
        l.sent(c.id, 1_000, T);
        l.sent(c.id, 2_000, T);
        // Three sends = the first and max_retries (2) re-sends: only expiry remains.
        assert_eq!(l.get(c.id).unwrap().sends, 3);
        assert!(l.due(50_000, true, T).is_empty());
        assert_eq!(l.next_due(true, T), 100_000);
        assert_eq!(l.due(100_000, true, T), vec![Due::Expire(c.id)]);
        assert_eq!(l.get(c.id).unwrap().first_sent_ms, Some(0));
    }

    #[test]
    fn a_timeout_that_grew_since_the_send_postpones_the_resend() {
        let c = change(1, ChangeStatus::Queued, 100_000);
        let mut l = PendingList::default();
        l.sync(std::slice::from_ref(&c), 0);
        l.sent(c.id, 0, T);
        l.recorded(c.id);
        // Round trips grew to 5 s meanwhile: the reply may well be on its way.
        let slow = Timing {
            command_timeout_ms: 5_000,
            ..T
        };
        assert!(l.due(1_000, true, slow).is_empty());
        assert_eq!(l.next_due(true, slow), 5_000);
        assert_eq!(l.due(5_000, true, slow), vec![Due::Resend(c.id)]);
        // And one that shrank brings it forward again.
        assert_eq!(l.due(1_000, true, T), vec![Due::Resend(c.id)]);
    }

    #[test]
    fn failed_publishes_are_retried_later_and_online_resets_deadlines() {
        let c = change(1, ChangeStatus::Queued, 100_000);
        let mut l = PendingList::default();
        l.sync(std::slice::from_ref(&c), 0);
        l.send_failed(c.id, 0, T);
        assert!(l.due(99, false, T).is_empty());
        assert_eq!(l.due(100, false, T), vec![Due::Send(c.id)]);
        l.sent(c.id, 100, T);
        l.recorded(c.id);
        assert!(l.get(c.id).unwrap().timed, "sent by this actor");
        l.host_online(5_000);
        assert!(
            !l.get(c.id).unwrap().timed,
            "the wait included time offline"
        );
        assert!(l.due(5_999, true, T).is_empty());
        assert_eq!(l.due(6_000, true, T), vec![Due::Resend(c.id)]);
    }

    #[test]
    fn a_dispatch_is_recorded_only_when_no_reply_came_within_the_delay() {
        let c = change(1, ChangeStatus::Queued, 100_000);
        let mut l = PendingList::default();
        l.sync(std::slice::from_ref(&c), 0);
        assert_eq!(l.get(c.id).unwrap().record_ms, NEVER, "nothing sent yet");
        l.sent(c.id, 1_000, T);
        assert!(l.due(1_299, true, T).is_empty());
        assert_eq!(l.next_due(true, T), 1_300);
        assert_eq!(l.due(1_300, true, T), vec![Due::Record(c.id)]);
        // Offline, it is recorded all the same (the command waits in the host's queue).
        assert_eq!(l.due(1_300, false, T), vec![Due::Record(c.id)]);
        l.record_failed(c.id, 1_300, T);
        assert!(l.due(1_399, true, T).is_empty());
        assert_eq!(l.due(1_400, true, T), vec![Due::Record(c.id)]);
        l.recorded(c.id);
        assert!(l.due(1_400, true, T).is_empty());
        // A re-send does not record again.
        assert_eq!(l.due(2_000, true, T), vec![Due::Resend(c.id)]);
        l.sent(c.id, 2_000, T);
        assert!(l.due(2_999, true, T).is_empty());
        assert_eq!(l.next_due(true, T), 3_000);
        // Answered in time: removed, nothing left to record.
        let d = change(2, ChangeStatus::Queued, 100_000);
        l.sync(&[c.clone(), d.clone()], 2_000);
        l.sent(d.id, 2_000, T);
        l.remove(d.id);
        assert!(l.due(2_999, true, T).is_empty());
        // Read from the store as dispatched: already recorded, also after a re-send.
        let e = change(3, ChangeStatus::Dispatched, 100_000);
        l.sync(&[c, e.clone()], 2_000);
        assert_eq!(l.get(e.id).unwrap().record_ms, NEVER);
        assert!(l.due(2_999, true, T).is_empty());
        l.sent(e.id, 3_000, T);
        assert_eq!(l.get(e.id).unwrap().record_ms, NEVER);
    }

    #[test]
    fn sync_keeps_schedules_adds_new_and_drops_finished() {
        let a = change(1, ChangeStatus::Queued, 100_000);
        let b = change(2, ChangeStatus::Dispatched, 100_000);
        let mut l = PendingList::default();
        l.sync(std::slice::from_ref(&a), 0);
        l.sent(a.id, 0, T);
        l.sync(&[a.clone(), b.clone()], 10);
        assert!(l.get(a.id).unwrap().dispatched, "memory knows better");
        let pb = l.get(b.id).unwrap();
        assert!(pb.dispatched);
        assert_eq!(pb.resend_from_ms, 10, "re-sent a timeout after it was read");
        assert_eq!(pb.first_sent_ms, Some(500));
        let mut done = a.clone();
        done.status = ChangeStatus::Applied;
        l.sync(&[done, b.clone()], 20);
        assert!(l.get(a.id).is_none());
        assert_eq!(l.by_command(b.command_id).unwrap().change, b.id);
        assert!(l.remove(b.id).is_some());
        assert!(l.is_empty());
        assert_eq!(l.next_due(true, T), NEVER);
    }
}
