//! The bus's one error type. Every publish error says whether the broker certainly did not take
//! the message or whether the outcome is unknown (STYLE: "certainly failed" vs "outcome unknown").

use std::time::Duration;

use lapin::ErrorKind;

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// No connection to the broker: the message was certainly not sent.
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker answered the publish with a nack: the message was certainly not stored.
    #[error("the broker nacked the message")]
    Nacked,
    /// A mandatory message matched no queue and the broker returned it: certainly not routed.
    #[error("unroutable message: no queue bound to exchange {exchange:?} for routing key {routing_key:?}")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// The broker refused the operation and closed the channel (403 access refused, 404 not
    /// found, 406 precondition failed, ...). For a publish: certainly not routed.
    #[error("the broker refused: {code} {text}")]
    Refused { code: u16, text: String },
    /// The connection was lost after the message was sent and before the broker confirmed it:
    /// it may or may not have been routed.
    #[error("outcome unknown, connection lost before the broker confirmed: {0}")]
    Unknown(String),
    /// The channel a delivery came on is gone: the ack cannot be sent and the broker redelivers
    /// the message to the next consumer.
    #[error("the delivery's channel is closed, the broker will redeliver it")]
    Stale,
    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The bus's shutdown token was cancelled.
    #[error("the bus is shut down")]
    Shutdown,
    /// A value given to the bus cannot be sent (too long for AMQP, too large, malformed url).
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// Any other AMQP or IO failure.
    #[error("amqp error: {0}")]
    Amqp(String),
}

impl BusError {
    /// True only when the operation may have taken effect at the broker without the caller
    /// knowing: the caller must resolve it (e.g. re-send with the same id, the receiver
    /// de-duplicates).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, BusError::Unknown(_))
    }

    /// The AMQP reply code when the broker refused (403, 404, 406, ...).
    pub fn refused_code(&self) -> Option<u16> {
        match self {
            BusError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        BusError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<lapin::Error> for BusError {
    /// Broker refusals keep their code; errors about a closed channel or connection become
    /// [`BusError::NotConnected`]; the rest is [`BusError::Amqp`]. Publishing classifies its own
    /// errors more finely (see `Bus::publish`).
    fn from(error: lapin::Error) -> Self {
        match error.kind() {
            ErrorKind::ProtocolError(amqp) => BusError::Refused {
                code: amqp.get_id(),
                text: amqp.get_message().to_string(),
            },
            ErrorKind::InvalidChannelState(..)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannel(_) => BusError::NotConnected,
            _ => BusError::Amqp(error.to_string()),
        }
    }
}

/// True when lapin refused before anything went on the wire (channel or connection not open).
pub(crate) fn is_not_sent(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidChannelState(..)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannel(_)
    )
}
