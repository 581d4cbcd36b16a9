//! The DESIGN §5 declarations. Every one is idempotent: declaring the same thing twice with the
//! same arguments is a no-op at the broker, so nodes run these on every (re)connect.
//!
//! | name | what |
//! |---|---|
//! | `<p>.up` | topic exchange, durable |
//! | `<p>.shard.<n>` | quorum queue, single active consumer, bound to `<p>.up` with `up.<n>.#` |
//! | `<p>.down` | direct exchange, durable |
//! | `<p>.agent.<host>` | durable classic queue, bound to `<p>.down` with the host id |
//! | `<p>.enroll` | direct exchange + durable queue, bound with [`ENROLL_ROUTING_KEY`] |

use comodit_protocol::{HostId, Names, Shard};
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use tracing::debug;

use crate::BusError;

/// The routing key enrollment requests are published with on `<p>.enroll`.
pub const ENROLL_ROUTING_KEY: &str = "enroll";

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// The arguments of a shard queue: quorum, single active consumer (a second guard, after the
/// shard lease, against two nodes consuming one shard).
pub fn shard_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

/// Declares the exchanges, the enrollment queue and the `n_shards` shard queues with their
/// bindings.
pub async fn declare_core(ch: &Channel, names: &Names, n_shards: u32) -> Result<(), BusError> {
    if n_shards == 0 {
        return Err(BusError::invalid("n_shards", "must be positive"));
    }
    let up = names.up_exchange();
    ch.exchange_declare(
        up.as_str().into(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        names.down_exchange().into(),
        ExchangeKind::Direct,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    let enroll = names.enroll();
    ch.exchange_declare(
        enroll.as_str().into(),
        ExchangeKind::Direct,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        enroll.as_str().into(),
        durable_queue(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        enroll.as_str().into(),
        enroll.as_str().into(),
        ENROLL_ROUTING_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for n in 0..n_shards {
        let shard = Shard(n);
        let queue = names.shard_queue(shard);
        ch.queue_declare(
            queue.as_str().into(),
            durable_queue(),
            shard_queue_arguments(),
        )
        .await?;
        ch.queue_bind(
            queue.as_str().into(),
            up.as_str().into(),
            Names::shard_binding(shard).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    debug!(prefix = names.prefix(), n_shards, "core topology declared");
    Ok(())
}

/// Declares a host's durable classic queue `<p>.agent.<host>`, bound to `<p>.down` with the
/// host id, where commands wait while the host is offline.
pub async fn declare_agent_queue(
    ch: &Channel,
    names: &Names,
    host: HostId,
) -> Result<(), BusError> {
    let queue = names.agent_queue(host);
    ch.queue_declare(
        queue.as_str().into(),
        durable_queue(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        names.down_exchange().into(),
        host.to_string().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    debug!(%host, "agent queue declared");
    Ok(())
}

/// Deletes a host's queue (and with it its binding and any waiting commands).
pub async fn delete_agent_queue(ch: &Channel, names: &Names, host: HostId) -> Result<(), BusError> {
    ch.queue_delete(
        names.agent_queue(host).into(),
        QueueDeleteOptions::default(),
    )
    .await?;
    debug!(%host, "agent queue deleted");
    Ok(())
}
