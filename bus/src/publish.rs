//! Confirmed publishing.
//!
//! Every publish waits for the broker's confirm on a channel it holds alone for that time, so
//! each outcome is exact: ack (stored or delivered), nack, returned (mandatory and unroutable),
//! channel closed by the broker because of this very message (refused), or connection lost in
//! between (unknown). At most [`BusConfig::max_publishes_in_flight`](crate::BusConfig)
//! publishes are in flight; more wait for a slot, and none is queued while disconnected.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use comodit_protocol::limits::MAX_MESSAGE_BYTES;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tracing::{debug, warn};

use crate::connection::Live;
use crate::error::is_not_sent;
use crate::{Bus, BusError};

/// Seconds a publish waited for one of the connection's publish slots.
pub const SLOT_WAIT: &str = "comodit_bus_publish_slot_wait_seconds";
/// Seconds a publish waited for a channel (an idle one, or a new one opened).
pub const CHANNEL_WAIT: &str = "comodit_bus_publish_channel_wait_seconds";
/// Seconds from sending a message to its confirm (or other outcome), by exchange.
pub const CONFIRM_WAIT: &str = "comodit_bus_publish_confirm_seconds";

/// A message to publish. `content_type` is always `application/json` and `timestamp` is set to
/// the time of publishing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMessage {
    pub payload: Vec<u8>,
    /// The AMQP `type` property: the message kind (`reply`, `hello`, `command`, ...).
    pub kind: String,
    /// Receivers de-duplicate on it.
    pub message_id: String,
    /// The broker user name. RabbitMQ refuses a message whose `user_id` is not the connection's
    /// user (406), which is what lets a node trust it (DESIGN §5).
    pub user_id: Option<String>,
    /// Delivery mode 2 (to disk) instead of 1. Transient is the default (DESIGN §5).
    pub persistent: bool,
    /// Ask the broker to return the message if no queue matches (→ [`BusError::Unroutable`]).
    pub mandatory: bool,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// Per-message TTL in queues.
    pub expiration_ms: Option<u64>,
}

impl OutMessage {
    /// A transient, non-mandatory JSON message with a fresh random `message_id`.
    pub fn json(kind: impl Into<String>, payload: Vec<u8>) -> OutMessage {
        OutMessage {
            payload,
            kind: kind.into(),
            message_id: uuid::Uuid::new_v4().to_string(),
            user_id: None,
            persistent: false,
            mandatory: false,
            reply_to: None,
            correlation_id: None,
            expiration_ms: None,
        }
    }

    /// Everything that would make the publish fail before sending, checked before taking a slot.
    fn check(&self) -> Result<(), BusError> {
        if self.payload.len() > MAX_MESSAGE_BYTES {
            return Err(BusError::invalid(
                "payload",
                format!("{} bytes > {MAX_MESSAGE_BYTES}", self.payload.len()),
            ));
        }
        self.properties().map(|_| ())
    }

    fn properties(&self) -> Result<BasicProperties, BusError> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(short("kind", &self.kind)?)
            .with_message_id(short("message_id", &self.message_id)?)
            .with_timestamp(timestamp)
            .with_delivery_mode(if self.persistent { 2 } else { 1 });
        if let Some(user) = &self.user_id {
            props = props.with_user_id(short("user_id", user)?);
        }
        if let Some(reply_to) = &self.reply_to {
            props = props.with_reply_to(short("reply_to", reply_to)?);
        }
        if let Some(id) = &self.correlation_id {
            props = props.with_correlation_id(short("correlation_id", id)?);
        }
        if let Some(ms) = self.expiration_ms {
            props = props.with_expiration(ms.to_string().into());
        }
        Ok(props)
    }
}

/// AMQP short strings hold at most 255 bytes; lapin's `From<&str>` panics past that.
pub(crate) fn short(field: &'static str, s: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(s).map_err(|e| BusError::invalid(field, e.to_string()))
}

impl Bus {
    /// Publishes and waits for the broker's publisher confirm.
    ///
    /// Errors: [`BusError::NotConnected`] (certainly not sent), [`BusError::Nacked`],
    /// [`BusError::Unroutable`] (mandatory and returned), [`BusError::Refused`] (the broker
    /// closed the channel over this message: 403 on another host's routing key, 406 on a forged
    /// `user_id`, 404 on a missing exchange) — all certainly not routed —, and
    /// [`BusError::Unknown`] (connection lost after sending, before the confirm).
    /// [`BusError::Invalid`] and [`BusError::Amqp`] are failures before anything was sent.
    ///
    /// Dropping the future before it resolves leaves the outcome unknown; the publish itself goes
    /// on until its confirm comes, keeping its slot and its channel (so callers that give up do
    /// not open channel after channel while the broker is slow). While the broker blocks the
    /// connection (memory or disk alarm) the confirm waits for it to unblock: wrap the call in a
    /// timeout where that cannot wait.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: OutMessage,
    ) -> Result<(), BusError> {
        msg.check()?;
        short("exchange", exchange)?;
        short("routing_key", routing_key)?;
        if self.shared.shutdown.is_cancelled() {
            return Err(BusError::Shutdown);
        }
        let asked = Instant::now();
        let slot = tokio::select! {
            _ = self.shared.shutdown.cancelled() => return Err(BusError::Shutdown),
            slot = self.shared.publish_slots.clone().acquire_owned() => slot.map_err(|_| BusError::Shutdown)?,
        };
        metrics::histogram!(SLOT_WAIT).record(asked.elapsed().as_secs_f64());
        let live = self.current().ok_or(BusError::NotConnected)?;
        let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
        // On a task of its own: a caller that stops waiting (a timeout) must neither free the
        // slot nor drop the channel while the confirm is outstanding. Otherwise, with the broker
        // slow, every timed-out publish left a channel open and the next one opened another, up
        // to the connection's channel_max (seen in a failover: "the maximum number of channels
        // for this connection has been reached", and no command could be sent).
        let publish = tokio::spawn(async move {
            let _slot = slot;
            let started = Instant::now();
            let channel = live.take_publish_channel().await?;
            metrics::histogram!(CHANNEL_WAIT).record(started.elapsed().as_secs_f64());
            let sent = Instant::now();
            let outcome = send_confirmed(&channel, &exchange, &routing_key, &msg).await;
            metrics::histogram!(CONFIRM_WAIT, "exchange" => exchange)
                .record(sent.elapsed().as_secs_f64());
            live.return_publish_channel(channel);
            outcome
        });
        publish
            .await
            .unwrap_or_else(|e| Err(BusError::Unknown(format!("the publish task ended: {e}"))))
    }

    /// Sends a request with `reply_to` set to RabbitMQ's direct reply-to and waits up to
    /// `timeout` for its reply (enrollment, DESIGN §5). The reply is the first delivery whose
    /// `correlation_id` is the request's (set to its `message_id` when the caller left it empty;
    /// repliers echo it, as the node does), so a late or duplicated answer to an earlier request
    /// is skipped. The request is published with a confirm on a channel that carries the reply
    /// consumer, as direct reply-to requires; such channels are kept for the next request after
    /// a reply, and closed after anything else. Publish errors are those of [`Bus::publish`];
    /// then [`BusError::Timeout`] if no reply came (the request was routed; retry with the same
    /// `message_id`), or [`BusError::Unknown`] if the connection dropped while waiting.
    pub async fn request(
        &self,
        exchange: &str,
        routing_key: &str,
        mut msg: OutMessage,
        timeout: Duration,
    ) -> Result<RpcReply, BusError> {
        msg.reply_to = Some(DIRECT_REPLY_TO.to_owned());
        let correlation = msg
            .correlation_id
            .clone()
            .unwrap_or_else(|| msg.message_id.clone());
        msg.correlation_id = Some(correlation.clone());
        msg.check()?;
        if self.shared.shutdown.is_cancelled() {
            return Err(BusError::Shutdown);
        }
        let _slot = tokio::select! {
            _ = self.shared.shutdown.cancelled() => return Err(BusError::Shutdown),
            slot = self.shared.publish_slots.acquire() => slot.map_err(|_| BusError::Shutdown)?,
        };
        let live = self.current().ok_or(BusError::NotConnected)?;
        let mut rc = RequestChannel::take(&live).await?;
        if let Err(e) = send_confirmed(&rc.channel, exchange, routing_key, &msg).await {
            rc.close().await;
            return Err(e);
        }
        let reply = tokio::select! {
            _ = self.shared.shutdown.cancelled() => Err(BusError::Shutdown),
            r = tokio::time::timeout(timeout, rc.reply_to(&correlation)) => {
                r.unwrap_or(Err(BusError::Timeout(timeout)))
            }
        };
        match reply {
            Ok(_) => live.idle_request_channels.give_back(rc),
            Err(_) => rc.close().await,
        }
        reply
    }
}

/// A confirm-mode channel with a consumer on direct reply-to: what one [`Bus::request`] needs.
/// Opening one costs the broker a channel (three processes) and two more round trips, so they
/// are kept between requests instead of opened and closed for each (one per enrolling host).
pub(crate) struct RequestChannel {
    channel: Channel,
    replies: lapin::Consumer,
}

impl RequestChannel {
    /// A free one of the connection's, or a new one.
    async fn take(live: &Live) -> Result<RequestChannel, BusError> {
        if let Some(rc) = live.idle_request_channels.take() {
            return Ok(rc);
        }
        let channel = live.conn.create_channel().await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(RequestChannel { channel, replies })
    }

    /// The next reply that answers `correlation`; others (answers to requests this channel
    /// gave up on, or duplicates) are dropped.
    async fn reply_to(&mut self, correlation: &str) -> Result<RpcReply, BusError> {
        loop {
            match self.replies.next().await {
                Some(Ok(d)) => {
                    let reply = RpcReply::from_lapin(d);
                    if reply.correlation_id.as_deref() == Some(correlation) {
                        return Ok(reply);
                    }
                    debug!(
                        expected = correlation,
                        got = ?reply.correlation_id,
                        "dropped a reply to another request"
                    );
                }
                Some(Err(e)) => return Err(BusError::Unknown(e.to_string())),
                None => return Err(BusError::Unknown("reply consumer cancelled".into())),
            }
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    async fn close(self) {
        if self.is_open() {
            let _ = self.channel.close(200, "request done".into()).await;
        }
    }
}

/// The queue name RabbitMQ gives to direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The answer to [`Bus::request`]. Direct reply-to deliveries need no ack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcReply {
    pub payload: Vec<u8>,
    pub kind: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// Validated by the broker: the replier's user.
    pub user_id: Option<String>,
}

impl RpcReply {
    fn from_lapin(d: lapin::message::Delivery) -> RpcReply {
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.to_string());
        let p = &d.properties;
        RpcReply {
            kind: text(p.kind()),
            message_id: text(p.message_id()),
            correlation_id: text(p.correlation_id()),
            user_id: text(p.user_id()),
            payload: d.data,
        }
    }
}

/// Publishes on a confirm-mode channel that carries nothing else meanwhile, and classifies the
/// outcome exactly (see [`Bus::publish`]).
async fn send_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    msg: &OutMessage,
) -> Result<(), BusError> {
    let props = msg.properties()?;
    let options = BasicPublishOptions {
        mandatory: msg.mandatory,
        immediate: false,
    };
    let confirm = match channel
        .basic_publish(
            short("exchange", exchange)?,
            short("routing_key", routing_key)?,
            options,
            &msg.payload,
            props,
        )
        .await
    {
        Ok(confirm) => confirm,
        Err(e) if is_not_sent(&e) => return Err(BusError::NotConnected),
        Err(e) => return Err(BusError::Unknown(e.to_string())),
    };
    let outcome = match confirm.await {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_returned))) => Err(BusError::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Ok(Confirmation::Nack(_)) => Err(BusError::Nacked),
        Ok(Confirmation::NotRequested) => {
            // Cannot happen: every publish channel is put in confirm mode first.
            Err(BusError::Amqp("publisher confirms not enabled".into()))
        }
        // A channel-level (soft) error closes only this channel, which carried only this
        // message: the broker refused it. Anything else lost the connection: unknown.
        Err(e) if e.is_amqp_soft_error() => Err(BusError::from(e)),
        Err(e) => Err(BusError::Unknown(e.to_string())),
    };
    match &outcome {
        Ok(()) => debug!(exchange, routing_key, kind = %msg.kind, "published"),
        Err(e) => warn!(exchange, routing_key, kind = %msg.kind, error = %e, "publish failed"),
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_follow_the_message() {
        let mut m = OutMessage::json("reply", b"{}".to_vec());
        m.user_id = Some("u".into());
        m.persistent = true;
        m.expiration_ms = Some(1500);
        m.correlation_id = Some("c".into());
        let p = m.properties().unwrap();
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "reply");
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.expiration().as_ref().unwrap().as_str(), "1500");
        assert_eq!(p.user_id().as_ref().unwrap().as_str(), "u");
        assert!(p.timestamp().unwrap() > 1_600_000_000);
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            m.message_id.as_str()
        );
        assert!(
            OutMessage::json("x", vec![])
                .properties()
                .unwrap()
                .delivery_mode()
                == &Some(1)
        );
    }

    #[test]
    fn overlong_strings_are_errors_not_panics() {
        let mut m = OutMessage::json("reply", vec![]);
        m.message_id = "x".repeat(256);
        assert!(matches!(
            m.properties(),
            Err(BusError::Invalid {
                field: "message_id",
                ..
            })
        ));
    }
}
