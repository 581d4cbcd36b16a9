//! What happened underneath a wave, beside its figures: the fleet's counts since the previous
//! wave ended (commands, duplicates, reconnects), the node's dispatches over the wave (first
//! sends, re-sends after its command timeout, stale replies, log re-reads) and, at its end, the
//! broker's memory by category. (The messages left in queues are not read: with the management
//! statistics off, ARCHITECTURE §22, the broker's totals are absent.)
//!
//! Best effort: a part that cannot be read is left out of the wave's `underneath` object (and
//! said so there), never made up. These are what tell a slow wave's cause apart: re-sends mean
//! replies waited longer than the node's command timeout, duplicates without re-sends mean the
//! broker delivered a command twice, a growing broker heap means the broker itself slowed down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::fleet::{Counters, FleetCounts};
use crate::rig::{parse_metric, Api, Broker};

/// The node's counters a wave is read by, as `(key in the report, metric with its labels)`.
const NODE_COUNTERS: &[(&str, &str)] = &[
    (
        "dispatched_first",
        "comodit_node_commands_dispatched_total{attempt=\"first\"}",
    ),
    (
        "dispatched_resend",
        "comodit_node_commands_dispatched_total{attempt=\"resend\"}",
    ),
    ("replies_ok", "comodit_node_replies_total{status=\"ok\"}"),
    (
        "replies_unknown",
        "comodit_node_replies_total{status=\"unknown\"}",
    ),
    ("expired", "comodit_node_changes_expired_total"),
    ("store_errors", "comodit_node_store_errors_total"),
    ("pending_rechecks", "comodit_node_pending_rechecks_total"),
];

/// Broker memory categories reported per wave (MiB), besides the total.
const BROKER_MEMORY_TOP: usize = 6;
/// How long a wave's end waits for the fleet to count the replies it is still publishing.
const SETTLE_FOR: Duration = Duration::from_secs(2);

/// Follows one fleet from wave to wave.
pub struct Probe {
    counters: Arc<Counters>,
    last: FleetCounts,
}

/// The node's counters at a wave's start.
pub struct NodeMark(Option<String>);

impl Probe {
    pub fn new(counters: Arc<Counters>) -> Probe {
        Probe {
            last: counters.snapshot(),
            counters,
        }
    }

    /// The node's counters now (at a wave's start), if its `/metrics` answers.
    pub async fn mark_node(api: &Api) -> NodeMark {
        let api = api.clone();
        NodeMark(
            tokio::task::spawn_blocking(move || api.metrics_text())
                .await
                .ok()
                .and_then(Result::ok),
        )
    }

    /// The `underneath` object of the wave that just ended: the fleet since the previous wave
    /// ended, the node since `node` was marked (none for a bare wave), the broker now.
    pub async fn wave_ended(&mut self, node: Option<(&Api, NodeMark)>, broker: &Broker) -> Value {
        // A host counts its reply once the broker confirmed it, which can be after the driver or
        // the node already had it: without this wait the wave's last replies were counted in the
        // next wave's window (199 of 200 in one test run). Bounded: a reply given up on never
        // comes.
        let until = Instant::now() + SETTLE_FOR;
        let mut now = self.counters.snapshot();
        while !now.settled() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
            now = self.counters.snapshot();
        }
        let mut out = Map::new();
        out.insert("fleet".into(), json!(now.since(&self.last)));
        self.last = now;
        if let Some((api, NodeMark(before))) = node {
            let after = Probe::mark_node(api).await.0;
            out.insert(
                "node".into(),
                match (before, after) {
                    (Some(b), Some(a)) => node_delta(&b, &a),
                    _ => json!({"unread": "the node's /metrics did not answer"}),
                },
            );
        }
        let broker = broker.clone();
        let b = tokio::task::spawn_blocking(move || broker_now(&broker))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        out.insert(
            "broker".into(),
            b.unwrap_or_else(|e| json!({"unread": format!("{e:#}")})),
        );
        Value::Object(out)
    }
}

/// Each of [`NODE_COUNTERS`] as counted between two expositions of the same node process.
fn node_delta(before: &str, after: &str) -> Value {
    let mut m = Map::new();
    for (key, metric) in NODE_COUNTERS {
        let d = parse_metric(after, metric) - parse_metric(before, metric);
        m.insert((*key).into(), json!(d.max(0.0) as u64));
    }
    Value::Object(m)
}

/// The broker's memory now (total and largest categories, MiB).
fn broker_now(broker: &Broker) -> anyhow::Result<Value> {
    let overview = broker.mgmt_get("/api/overview")?;
    let node = overview["node"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("/api/overview without a node"))?
        .to_owned();
    let memory = broker.mgmt_get(&format!("/api/nodes/{node}/memory"))?;
    Ok(json!({ "memory_mib": memory_top(&memory["memory"], BROKER_MEMORY_TOP) }))
}

/// `total` (RSS as the broker counts it) and the `n` largest categories of a
/// `/api/nodes/<node>/memory` breakdown, in MiB.
fn memory_top(breakdown: &Value, n: usize) -> Value {
    const SKIP: &[&str] = &[
        "total",
        "strategy",
        "reserved_unallocated",
        "allocated_unused",
    ];
    let mib = |b: f64| (b / 1048576.0 * 10.0).round() / 10.0;
    let mut parts: Vec<(&str, f64)> = breakdown
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !SKIP.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str(), v.as_f64()?)))
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut m = Map::new();
    if let Some(rss) = breakdown["total"]["rss"].as_f64() {
        m.insert("total_rss".into(), json!(mib(rss)));
    }
    for (k, v) in parts.into_iter().take(n) {
        m.insert(k.into(), json!(mib(v)));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_counters_are_read_by_label_and_as_a_difference() {
        let before = "# TYPE comodit_node_commands_dispatched_total counter\n\
            comodit_node_commands_dispatched_total{attempt=\"first\"} 10\n\
            comodit_node_replies_total{status=\"ok\"} 4\n";
        let after = "comodit_node_commands_dispatched_total{attempt=\"first\"} 25\n\
            comodit_node_commands_dispatched_total{attempt=\"resend\"} 3\n\
            comodit_node_replies_total{status=\"ok\"} 20\n\
            comodit_node_replies_total{status=\"unknown\"} 2\n";
        let d = node_delta(before, after);
        assert_eq!(d["dispatched_first"], 15);
        assert_eq!(d["dispatched_resend"], 3);
        assert_eq!(d["replies_ok"], 16);
        assert_eq!(d["replies_unknown"], 2);
        assert_eq!(d["expired"], 0);
    }

    #[test]
    fn broker_memory_keeps_the_total_and_the_largest_parts() {
        let b = json!({
            "binary": 3.0 * 1048576.0, "code": 1048576.0, "quorum_ets": 2.0 * 1048576.0,
            "strategy": "rss", "reserved_unallocated": 9e9,
            "total": {"rss": 10.0 * 1048576.0, "erlang": 1.0}
        });
        let m = memory_top(&b, 2);
        assert_eq!(
            m,
            json!({"total_rss": 10.0, "binary": 3.0, "quorum_ets": 2.0})
        );
    }
}
