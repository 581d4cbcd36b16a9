//! The runtime's metrics (through the `metrics` facade; the node installs the exporter).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `comodit_node_host_actors` | gauge | |
//! | `comodit_node_messages_total` | counter | `kind` (accepted upward messages) |
//! | `comodit_node_rejected_messages_total` | counter | `reason` |
//! | `comodit_node_commands_dispatched_total` | counter | `attempt` = `first` or `resend` |
//! | `comodit_node_replies_total` | counter | `status` (`ok`, `failed`, `rejected`, `expired`, `unknown`) |
//! | `comodit_node_command_round_trip_seconds` | histogram | (first dispatch → reply) |
//! | `comodit_node_resend_timeout_seconds` | gauge | (the re-send timeout now, adapted to the round trips: `rto`) |
//! | `comodit_node_changes_expired_total` | counter | |
//! | `comodit_node_stale_epoch_total` | counter | (fenced writes refused by the store) |
//! | `comodit_node_store_errors_total` | counter | |
//! | `comodit_node_submits_joined_total` | counter | (a change asked for again under its id: answered with the first) |
//! | `comodit_node_pending_rechecks_total` | counter | (actors that read their log because the shard's recheck found pending changes they did not track) |

pub const HOST_ACTORS: &str = "comodit_node_host_actors";
pub const MESSAGES: &str = "comodit_node_messages_total";
pub const REJECTED: &str = "comodit_node_rejected_messages_total";
pub const DISPATCHED: &str = "comodit_node_commands_dispatched_total";
pub const REPLIES: &str = "comodit_node_replies_total";
pub const ROUND_TRIP: &str = "comodit_node_command_round_trip_seconds";
pub const RESEND_TIMEOUT: &str = "comodit_node_resend_timeout_seconds";
pub const EXPIRED: &str = "comodit_node_changes_expired_total";
pub const STALE_EPOCH: &str = "comodit_node_stale_epoch_total";
pub const STORE_ERRORS: &str = "comodit_node_store_errors_total";
pub const SUBMITS_JOINED: &str = "comodit_node_submits_joined_total";
pub const RECHECKS: &str = "comodit_node_pending_rechecks_total";

pub(crate) fn rejected(reason: &'static str) {
    metrics::counter!(REJECTED, "reason" => reason).increment(1);
}

pub(crate) fn message(kind: &'static str) {
    metrics::counter!(MESSAGES, "kind" => kind).increment(1);
}
