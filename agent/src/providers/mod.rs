//! Providers: one per collection (and per platform where the tool differs).
//!
//! A provider reads the actual state of a resource and brings it to its spec. Providers are plain
//! synchronous code (files and short-lived tools); the agent runs them on a blocking thread, one
//! resource at a time. Every provider is idempotent: applying a spec that already holds returns
//! `changed: false` and an empty diff, and a `dry_run` computes the same diff without touching
//! anything. Compliance is a `dry_run` of the baseline, so a provider's diff *is* its drift check.
//!
//! Tools are run through [`cmd::Runner`], so the exact command lines of providers whose tool is
//! missing on the test machine (dnf, zypper, apk, systemctl, rc-service) are unit-tested against a
//! recording fake, and the real runner is used everywhere else.

pub mod cmd;
pub mod files;
pub mod packages;
pub mod repos;
pub mod services;
pub mod users;

use comodit_protocol::{ApplyMode, FieldDiff, ResourceId, Spec};

/// What applying (or dry-running) one resource did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Change {
    pub changed: bool,
    /// Fields that differed: `from` is the actual value, `to` the desired one. Secrets show as
    /// [`comodit_protocol::Secret::REDACTED`].
    pub diff: Vec<FieldDiff>,
}

impl Change {
    pub fn none() -> Self {
        Change::default()
    }

    pub fn from_diff(diff: Vec<FieldDiff>) -> Self {
        Change {
            changed: !diff.is_empty(),
            diff,
        }
    }
}

/// Builds a [`FieldDiff`] entry.
pub fn field_diff(
    field: &str,
    from: impl Into<serde_json::Value>,
    to: impl Into<serde_json::Value>,
) -> FieldDiff {
    FieldDiff {
        field: field.to_owned(),
        from: from.into(),
        to: to.into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The host cannot serve this (no package manager, unknown init system, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The spec cannot be applied as written (e.g. a user's group does not exist).
    #[error("invalid: {0}")]
    Invalid(String),
    /// A tool ran and failed; `detail` holds its (trimmed) stderr.
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ProviderError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ProviderError::Io {
            context: context.into(),
            source,
        }
    }
}

/// One collection on one host.
pub trait Provider: Send + Sync {
    /// The actual state of `id`, in the shape of the collection's spec (`{"ensure": "absent"}`
    /// when it does not exist). Secrets are never returned.
    fn read(&self, id: &ResourceId) -> Result<serde_json::Value, ProviderError>;

    /// Brings `id` to `spec` (`Enforce`) or reports what that would change (`DryRun`, which must
    /// not change anything on the host). Fields the spec leaves out are left as they are.
    fn apply(&self, id: &ResourceId, spec: &Spec, mode: ApplyMode)
        -> Result<Change, ProviderError>;

    /// The ids of the collection on this host, sorted. Path collections list the entries directly
    /// under `under` that belong to the collection.
    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError>;

    /// Restart or reload after a notifying resource changed. Only services implement it.
    fn refresh(
        &self,
        id: &ResourceId,
        how: comodit_protocol::Refresh,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let _ = (how, mode);
        Err(ProviderError::Unsupported(format!(
            "{id} cannot be refreshed"
        )))
    }
}

/// A collection this host cannot serve: every call fails with the same clear reason.
pub struct Unsupported {
    collection: &'static str,
    reason: String,
}

impl Unsupported {
    pub fn new(collection: &'static str, reason: impl Into<String>) -> Self {
        Unsupported {
            collection,
            reason: reason.into(),
        }
    }

    fn err(&self) -> ProviderError {
        ProviderError::Unsupported(format!("{}: {}", self.collection, self.reason))
    }
}

impl Provider for Unsupported {
    fn read(&self, _id: &ResourceId) -> Result<serde_json::Value, ProviderError> {
        Err(self.err())
    }

    fn apply(&self, _: &ResourceId, _: &Spec, _: ApplyMode) -> Result<Change, ProviderError> {
        Err(self.err())
    }

    fn list(&self, _under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        Err(self.err())
    }

    fn refresh(
        &self,
        _: &ResourceId,
        _: comodit_protocol::Refresh,
        _: ApplyMode,
    ) -> Result<Change, ProviderError> {
        Err(self.err())
    }
}

/// Non-path collections refuse `under` in `list`.
pub fn no_under(under: Option<&str>) -> Result<(), ProviderError> {
    match under {
        None => Ok(()),
        Some(_) => Err(ProviderError::Invalid(
            "only path collections take 'under'".into(),
        )),
    }
}
