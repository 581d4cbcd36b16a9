//! Connection-level presence (DESIGN §6: "prefer connection-level liveness"): RabbitMQ's
//! `rabbitmq_event_exchange` plugin publishes `connection.created` and `connection.closed` on
//! `amq.rabbitmq.event`, with the connection's broker user in the `user` header. An agent's
//! user is its host id, so a closed connection marks the host offline at once instead of after
//! `offline_after_missed` heartbeats.
//!
//! The events travel on their own queue, so they are not ordered with the host's messages: an
//! old connection's `closed` can arrive after the agent reconnected and said hello. The host
//! actor therefore counts the connections it heard of (created +1, closed −1) and marks the host
//! offline only when that count drops to zero or below. Presence is best effort (no acks): a lost
//! event leaves the heartbeat sweep to notice.
//!
//! The node's user needs configure, write and read on `<prefix>.node-events.*` and read on
//! `amq.rabbitmq.event`. The queue expires a minute after its node is gone (`x-expires`).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use comodit_bus::lapin::options::{
    BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use comodit_bus::lapin::types::{AMQPValue, FieldTable};
use comodit_protocol::HostId;
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::host::Presence;
use crate::runtime::Core;

const EVENT_EXCHANGE: &str = "amq.rabbitmq.event";
const QUEUE_EXPIRES_MS: i32 = 60_000;
/// Connections followed at once (about 32 bytes each).
const MAX_TRACKED: usize = 1 << 20;

/// Which host each open connection belongs to, by a hash of the connection's name.
#[derive(Default)]
struct Connections(HashMap<u64, HostId>);

impl Connections {
    fn created(&mut self, name: &str, host: HostId) {
        if self.0.len() < MAX_TRACKED {
            self.0.insert(key(name), host);
        } else {
            debug!(%host, "too many connections followed; this one is left to the sweep");
        }
    }

    fn closed(&mut self, name: &str) -> Option<HostId> {
        let host = self.0.remove(&key(name));
        if self.0.is_empty() {
            self.0 = HashMap::new();
        }
        host
    }
}

fn key(name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

pub(crate) async fn run(core: Arc<Core>) {
    let queue = format!(
        "{}.node-events.{}",
        core.names.prefix(),
        uuid::Uuid::new_v4().simple()
    );
    let mut generation = core.bus.generation();
    let mut delay = Duration::from_millis(200);
    let mut conns = Connections::default();
    loop {
        if core.stopping().is_cancelled() {
            return;
        }
        match follow(&core, &queue, &mut conns).await {
            Ok(()) => delay = Duration::from_millis(200),
            Err(e) => {
                warn!(error = %e, "cannot follow the broker's connection events, retrying");
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        // Wait for a new connection, or retry after a delay on the same one.
        tokio::select! {
            _ = core.stopping().cancelled() => return,
            _ = generation.changed() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Subscribes on the current connection and routes events until the subscription ends.
async fn follow(
    core: &Arc<Core>,
    queue: &str,
    conns: &mut Connections,
) -> Result<(), comodit_bus::BusError> {
    let ch = core.bus.channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
    ch.queue_declare(queue.into(), QueueDeclareOptions::default(), args)
        .await?;
    for key in ["connection.created", "connection.closed"] {
        ch.queue_bind(
            queue.into(),
            EVENT_EXCHANGE.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.basic_qos(256, BasicQosOptions::default()).await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut events = ch
        .basic_consume(queue.into(), "".into(), no_ack, FieldTable::default())
        .await?;
    info!(%queue, "following the broker's connection events");
    loop {
        let next = tokio::select! {
            _ = core.stopping().cancelled() => return Ok(()),
            d = events.next() => d,
        };
        let Some(Ok(d)) = next else {
            debug!("connection events subscription ended");
            return Ok(());
        };
        let headers = d.properties.headers();
        let Some(name) = text_header(headers, "name") else {
            continue;
        };
        match d.routing_key.as_str() {
            "connection.created" => {
                // Other users (nodes, admins) are not hosts.
                if let Some(host) = text_header(headers, "user").and_then(|u| u.parse().ok()) {
                    conns.created(&name, host);
                    debug!(host_id = %host, "host connection opened");
                    core.presence(host, Presence { up: true });
                }
            }
            "connection.closed" => {
                if let Some(host) = conns.closed(&name) {
                    debug!(host_id = %host, "host connection closed");
                    core.presence(host, Presence { up: false });
                }
            }
            _ => {}
        }
    }
}

fn text_header(headers: &Option<FieldTable>, name: &str) -> Option<String> {
    match headers.as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comodit_bus::lapin::types::LongString;

    #[test]
    fn headers_and_connections() {
        let h = HostId::random();
        let mut t = FieldTable::default();
        t.insert(
            "user".into(),
            AMQPValue::LongString(LongString::from(h.to_string())),
        );
        t.insert("n".into(), AMQPValue::LongLongInt(3));
        let t = Some(t);
        assert_eq!(text_header(&t, "user"), Some(h.to_string()));
        assert_eq!(text_header(&t, "n"), None);
        assert_eq!(text_header(&None, "user"), None);

        let mut c = Connections::default();
        c.created("a -> b", h);
        assert_eq!(c.closed("x -> y"), None);
        assert_eq!(c.closed("a -> b"), Some(h));
        assert_eq!(c.closed("a -> b"), None);
    }
}
