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

pub(crate) async fn run(core: Arc<Core>) {
    let queue = format!(
        "{}.node-events.{}",
        core.names.prefix(),
        uuid::Uuid::new_v4().simple()
    );
    let mut generation = core.bus.generation();
    let mut delay = Duration::from_millis(200);
    loop {
        if core.stopping().is_cancelled() {
            return;
        }
        match follow(&core, &queue).await {
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
async fn follow(core: &Arc<Core>, queue: &str) -> Result<(), comodit_bus::BusError> {
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
        let up = match d.routing_key.as_str() {
            "connection.created" => true,
            "connection.closed" => false,
            _ => continue,
        };
        let Some(host) = user_header(d.properties.headers()) else {
            continue;
        };
        core.presence(host, Presence { up });
    }
}

/// The host named by the event's `user` header (other users — nodes, admins — are ignored).
fn user_header(headers: &Option<FieldTable>) -> Option<HostId> {
    let value = headers.as_ref()?.inner().get("user")?;
    let text = match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        _ => return None,
    };
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use comodit_bus::lapin::types::LongString;

    #[test]
    fn only_host_users_count() {
        let h = HostId::random();
        let mut t = FieldTable::default();
        t.insert(
            "user".into(),
            AMQPValue::LongString(LongString::from(h.to_string())),
        );
        assert_eq!(user_header(&Some(t)), Some(h));
        let mut t = FieldTable::default();
        t.insert(
            "user".into(),
            AMQPValue::LongString(LongString::from("guest")),
        );
        assert_eq!(user_header(&Some(t)), None);
        assert_eq!(user_header(&None), None);
    }
}
