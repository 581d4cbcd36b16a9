//! The records the store keeps (DESIGN §9–§10). Plain data, serde-serializable; ids are UUIDs
//! (hosts use the protocol's [`HostId`]). Every record that the API updates carries a `version`,
//! bumped on each write, which the API exposes as an `ETag`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use comodit_protocol::{CommandId, DriftReport, Epoch, Facts, HostId, Reply};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = crate::StoreError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::try_parse(s)
                    .map(Self)
                    .map_err(|_| crate::StoreError::Invalid(format!("not a uuid: {s:?}")))
            }
        }
    };
}

id!(
    /// An organization.
    OrgId
);
id!(
    /// An environment inside an organization.
    EnvId
);
id!(
    /// One change in a host's change log.
    ChangeId
);
id!(
    /// An enrollment token or an API token.
    TokenId
);
id!(
    /// A multi-host job.
    JobId
);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Organization {
    pub id: OrgId,
    /// Unique, `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub id: EnvId,
    pub org: OrgId,
    /// Unique inside its organization, same syntax as organization names.
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub version: u64,
}

/// A managed host: who it is and where it belongs. What it reports lives in [`HostRuntime`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostId,
    pub org: OrgId,
    pub env: EnvId,
    /// A label for people (the hostname at enrollment); not unique.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub enrolled_at: DateTime<Utc>,
    /// The shard of the host for the cluster's `n_shards` (kept for per-shard listings).
    pub shard: u32,
    pub version: u64,
}

/// What the owning node has learned of a host. Written only by the owner of the host's shard, with
/// that shard's epoch: a write with an epoch lower than the stored one is refused
/// ([`crate::StoreError::StaleEpoch`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRuntime {
    pub host: HostId,
    pub epoch: Epoch,
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    pub facts: Option<Facts>,
    /// Digest of the agent's local baseline, from its last hello.
    pub desired_digest: Option<String>,
    /// Current drift, per resource.
    pub drift: Vec<DriftReport>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeStatus {
    /// Recorded, not yet sent (the host is offline or the shard is moving).
    Queued,
    /// Sent to the agent with `command_id`; waiting for its reply.
    Dispatched,
    Applied,
    Failed,
    Expired,
    Cancelled,
}

impl ChangeStatus {
    /// Still waiting for an outcome.
    pub fn is_pending(&self) -> bool {
        matches!(self, ChangeStatus::Queued | ChangeStatus::Dispatched)
    }
}

/// One entry of a host's change log: a command the platform wants the host to run, and what came
/// of it (DESIGN §9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub id: ChangeId,
    pub host: HostId,
    /// Position in the host's log, from 1, assigned by the store on append.
    pub seq: u64,
    /// The command body (`comodit_protocol::Body` as JSON): what was asked.
    pub request: serde_json::Value,
    pub status: ChangeStatus,
    /// The command id of the last dispatch (a re-dispatch after a failover keeps it, so the
    /// agent's dedup window recognizes it).
    pub command_id: CommandId,
    /// Epoch of the node that last wrote this change.
    pub epoch: Epoch,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// After this the change is `expired` if not yet applied.
    pub expires_at: DateTime<Utc>,
    /// The agent's reply, once there is one.
    pub reply: Option<Reply>,
    /// The job this change is one host's part of: the store keeps the job's per-host result in
    /// step with the change, in the same transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
}

/// A token an agent presents to enroll into an environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub id: TokenId,
    pub org: OrgId,
    pub env: EnvId,
    pub description: String,
    /// sha256 (hex) of the secret; the secret itself is shown once, at creation.
    pub secret_sha256: String,
    pub expires_at: DateTime<Utc>,
    /// How many enrollments it allows; `None` = unlimited until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked: bool,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, everywhere.
    Admin,
    /// Change hosts of its scope.
    Operator,
    /// Read its scope.
    Viewer,
}

/// Where a role applies: everywhere, one organization, or one environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scope {
    Global,
    Org { org: OrgId },
    Env { org: OrgId, env: EnvId },
}

/// A bearer token for the REST API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: TokenId,
    pub name: String,
    pub secret_sha256: String,
    pub role: Role,
    pub scope: Scope,
    pub revoked: bool,
    pub created_at: DateTime<Utc>,
}

/// One line of the append-only audit log: who did what, when, and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned by the store on append, increasing.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub actor: String,
    /// `POST /api/v1/...` or an internal action name (`enroll`).
    pub action: String,
    pub target: String,
    /// `ok`, `denied`, `failed: ...`.
    pub outcome: String,
}

/// A named, versioned bundle of resources with parameters (DESIGN §9). Stored as given; rendering
/// comes with the desired-state issue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Application {
    pub org: OrgId,
    pub name: String,
    pub version: String,
    /// Resource templates (JSON, Jinja-style strings inside).
    pub resources: serde_json::Value,
    pub parameters: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Where a setting applies; host overrides environment overrides organization.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SettingScope {
    Org { org: OrgId },
    Env { env: EnvId },
    Host { host: HostId },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    pub scope: SettingScope,
    pub key: String,
    pub value: serde_json::Value,
    /// Encrypted at rest and redacted in every output (encryption comes with the settings issue).
    pub secret: bool,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

/// An ad-hoc multi-host scenario (DESIGN §1, command & control).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub org: OrgId,
    pub spec: serde_json::Value,
    pub status: JobStatus,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: JobId,
    pub host: HostId,
    pub change: Option<ChangeId>,
    pub status: ChangeStatus,
    pub updated_at: DateTime<Utc>,
}

impl JobResult {
    /// What a change of a job says about the job's host.
    pub fn of(change: &Change, job: JobId) -> JobResult {
        JobResult {
            job,
            host: change.host,
            change: Some(change.id),
            status: change.status,
            updated_at: change.updated_at,
        }
    }
}

/// How many of a job's hosts are in each state: what `Store::job_counts` answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    pub queued: u64,
    pub dispatched: u64,
    pub applied: u64,
    pub failed: u64,
    pub expired: u64,
    pub cancelled: u64,
}

impl JobCounts {
    pub fn slot(&mut self, status: ChangeStatus) -> &mut u64 {
        match status {
            ChangeStatus::Queued => &mut self.queued,
            ChangeStatus::Dispatched => &mut self.dispatched,
            ChangeStatus::Applied => &mut self.applied,
            ChangeStatus::Failed => &mut self.failed,
            ChangeStatus::Expired => &mut self.expired,
            ChangeStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// Every host counted.
    pub fn total(&self) -> u64 {
        self.queued + self.dispatched + self.applied + self.failed + self.expired + self.cancelled
    }

    /// Hosts still waiting for an outcome.
    pub fn pending(&self) -> u64 {
        self.queued + self.dispatched
    }
}

/// Which hosts a listing returns. Every filter is optional; they combine with AND.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFilter {
    pub org: Option<OrgId>,
    pub env: Option<EnvId>,
    /// `key=value` label match.
    pub label: Option<(String, String)>,
    /// Needs the runtime record.
    pub online: Option<bool>,
    /// `fact=value` on the last facts (top-level fields of `Facts`, compared as strings).
    pub fact: Option<(String, String)>,
    pub shard: Option<u32>,
}

/// A page request: at most `limit` items after the opaque `cursor` of the previous page.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub cursor: Option<String>,
    pub limit: u32,
}

impl Page {
    pub const MAX_LIMIT: u32 = 1000;

    pub fn first(limit: u32) -> Self {
        Page {
            cursor: None,
            limit,
        }
    }
}

/// One page of results; `next` is the cursor of the following page, absent on the last.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Paged<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// A response kept for an API request's `Idempotency-Key`, replayed to its retries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeptResponse {
    pub status: u16,
    /// Header names and values, in the order the response had them.
    pub headers: Vec<(String, String)>,
    /// The body (responses with a body that is not UTF-8 are not kept).
    pub body: String,
}

/// What the store holds for one `Idempotency-Key` of one API token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub token: TokenId,
    pub key: String,
    /// sha256 (hex) of the request (method, path and query, body): a key sent again with another
    /// request is refused instead of answered with an unrelated response.
    pub fingerprint: String,
    /// Without a response: when the claim lapses (its node may have died mid-request). With one:
    /// when it stops being replayed.
    pub expires_at: DateTime<Utc>,
    /// None while the first request runs.
    pub response: Option<KeptResponse>,
}

/// The outcome of [`crate::Store::claim_idempotency_key`].
#[derive(Clone, Debug, PartialEq)]
pub enum IdempotencyClaim {
    /// The key is new (or its record lapsed): run the request, then finish the key.
    Claimed,
    /// The first request with this key ended with this response.
    Replay(KeptResponse),
    /// The first request with this key is still running (on this node or another).
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

/// Longest `Idempotency-Key` the store accepts.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

impl IdempotencyRecord {
    /// The verdict on a claim for `fingerprint` at `now` when this record exists: `None` when it
    /// has lapsed (the claim takes its place). Shared by every backend.
    pub fn verdict(&self, fingerprint: &str, now: DateTime<Utc>) -> Option<IdempotencyClaim> {
        if self.expires_at <= now {
            return None;
        }
        if self.fingerprint != fingerprint {
            return Some(IdempotencyClaim::Mismatch);
        }
        Some(match &self.response {
            None => IdempotencyClaim::InProgress,
            Some(r) => IdempotencyClaim::Replay(r.clone()),
        })
    }
}
