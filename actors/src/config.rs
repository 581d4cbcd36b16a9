//! Settings of the actor runtime, with their defaults.

use std::time::Duration;

/// How the node's host actors behave. Every default is listed in [`ActorsConfig::default`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorsConfig {
    /// Re-send a dispatched change (same command id) when no reply came within this time, while
    /// the host is online; longer when the round trips the node measures call for it (SRTT +
    /// 4·RTTVAR, at most ten times this: `crate::rto`). Default 60 s.
    pub command_timeout: Duration,
    /// How many times a dispatched change is re-sent after the first send; then it waits for its
    /// reply or its expiry. Default 5.
    pub max_retries: u32,
    /// The agents' routed heartbeat period in seconds; 0 = agents send none, so silence never
    /// marks a host offline. Default 300.
    pub heartbeat_s: u64,
    /// A host is offline after `offline_after_missed × heartbeat_s` of silence. Default 3.
    pub offline_after_missed: u32,
    /// Unacked deliveries per shard queue (AMQP prefetch). Default 256.
    pub prefetch: u16,
    /// Messages waiting in one host actor's mailbox before the shard consumer waits for it.
    /// Default 64.
    pub mailbox: usize,
    /// The node's broker user: only it may send `kick`. Default `comodit-node`.
    pub node_user: String,
    /// Heartbeats update `last_seen` in memory; the stored runtime record is rewritten for them at
    /// most this often (online/offline changes are always written at once). Default 60 s.
    pub last_seen_write_s: u64,
    /// How often each shard looks for host actors with something due (silence, re-sends,
    /// expiries). Default 1 s.
    pub sweep_interval: Duration,
    /// How often each shard asks the store which of its hosts have pending changes, so that a
    /// change whose kick never came (the node that recorded it died first, or could not publish
    /// it) is sent anyway. Actors that already track pending work, or read their log or finished
    /// a change since the listing, are not disturbed; the others read their log. Default 60 s.
    pub pending_recheck: Duration,
    /// How long a delivery whose effect could not be made durable (store error, lease lost) is
    /// held before it is put back in its queue. Default 1 s.
    pub requeue_delay: Duration,
    /// How long a change waits before a failed publish is tried again. Default 2 s.
    pub publish_retry: Duration,
    /// A change sent and still unanswered after this long is recorded `dispatched` in the store;
    /// one answered sooner skips that write (until then the store and the API say `queued`).
    /// Default 2 s.
    pub dispatch_record_delay: Duration,
    /// Arbiters (threads) the host actors are spread over. Default 2.
    pub arbiters: usize,
    /// How long API calls wait for a host actor's answer ([`crate::OpsError::Timeout`]) and
    /// `stop` waits for each actor to finish. Default 10 s.
    pub actor_call_timeout: Duration,
    /// Host actors doing work (store calls, publishes) at once, all hosts together. The others
    /// wait with a small future: a node start or a shard gain starts thousands of actors at
    /// once, and each one's work needs a few KiB while it runs. Work on messages from the shard
    /// queues (replies, hellos) has its own bound of the same size, so answers are recorded while
    /// new work waits. Default 256.
    pub max_concurrent_tasks: usize,
    /// Bind a queue to RabbitMQ's `amq.rabbitmq.event` exchange (`connection.closed`) to mark a
    /// host offline as soon as its connection drops. Needs the `rabbitmq_event_exchange` plugin
    /// and configure/write/read rights for the node on `<prefix>.node-events.*`. Default true.
    pub connection_events: bool,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig {
            command_timeout: Duration::from_secs(60),
            max_retries: 5,
            heartbeat_s: 300,
            offline_after_missed: 3,
            prefetch: 256,
            mailbox: 64,
            node_user: "comodit-node".into(),
            last_seen_write_s: 60,
            sweep_interval: Duration::from_secs(1),
            pending_recheck: Duration::from_secs(60),
            requeue_delay: Duration::from_secs(1),
            publish_retry: Duration::from_secs(2),
            dispatch_record_delay: Duration::from_secs(2),
            arbiters: 2,
            actor_call_timeout: Duration::from_secs(10),
            max_concurrent_tasks: 256,
            connection_events: true,
        }
    }
}

impl ActorsConfig {
    /// Silence after which an online host is marked offline, in ms; `None` without heartbeats.
    pub(crate) fn silence_ms(&self) -> Option<i64> {
        (self.heartbeat_s > 0).then(|| {
            let s = self
                .heartbeat_s
                .saturating_mul(u64::from(self.offline_after_missed.max(1)));
            i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
        })
    }
}
