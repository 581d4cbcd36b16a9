//! # comodit-protocol
//!
//! The wire types that the node and the agent agree on (DESIGN §4–§6), and nothing that does IO.
//!
//! - [`ids`]: strict newtypes — [`HostId`], [`CommandId`], [`Epoch`], [`Shard`] and the shard
//!   function, [`Collection`] and per-collection validated [`ResourceId`]s.
//! - [`resource`]: the platform-agnostic resource model, one typed spec per collection.
//! - [`envelope`]: [`Command`] (node → agent) and the upward messages ([`Up`]: replies and events),
//!   parsed by `decode` functions that check size, version, unknown fields and limits, and never panic.
//! - [`routing`]: exchange and queue names under a prefix, routing keys, per-agent permissions.
//! - [`limits`]: every size limit, as constants.
//!
//! Data flows one way through this crate: bytes from the broker → `decode` → typed, valid values.

pub mod envelope;
pub mod ids;
pub mod limits;
pub mod resource;
pub mod routing;

pub use envelope::*;
pub use ids::{Collection, CommandId, Epoch, HostId, ResourceId, ResourceRef, Shard};
pub use resource::*;
pub use routing::{AgentPermissions, Names, UpKey};

/// Why a message or value was refused. The text is meant for the sender: it names the field and
/// the rule, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{what} too large: {size} > {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
}

impl ProtocolError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ProtocolError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// A short, stable label for metrics (`malformed`, `invalid`, `too_large`).
    pub fn label(&self) -> &'static str {
        match self {
            ProtocolError::Malformed(_) => "malformed",
            ProtocolError::Invalid { .. } => "invalid",
            ProtocolError::TooLarge { .. } => "too_large",
        }
    }
}
