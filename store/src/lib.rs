//! # comodit-store
//!
//! Where the centralized state lives (DESIGN §10): organizations, environments, hosts, host runtime
//! state (fenced by epoch), change logs, enrollment and API tokens, the audit log, applications,
//! settings and jobs.
//!
//! [`Store`] is one async trait with a backend per deployment size: [`embedded`] (one redb file, no
//! server; the single-node default), and PostgreSQL / ScyllaDB with the cluster issue. Every method
//! maps to single-partition work — one host, one token, one organization — or to a listing by cursor,
//! so that a ScyllaDB backend needs no joins and no scans on hot paths.
//!
//! [`conformance`] holds the one test suite every backend must pass (`conformance::run_all`).
//!
//! Fencing: host runtime writes and change updates carry the writer's shard epoch; a write whose
//! epoch is lower than the stored one fails with [`StoreError::StaleEpoch`], so a node that lost a
//! shard cannot overwrite what the new owner wrote, even before it notices.

pub mod conformance;
pub mod embedded;
pub mod model;
pub mod postgres;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use comodit_protocol::{Epoch, HostId, Reply};

pub use model::*;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    /// A unique name or id is taken.
    #[error("conflict: {0}")]
    Conflict(String),
    /// An `If-Match` style version check failed: the record changed since it was read.
    #[error("version mismatch: expected {expected}, found {found}")]
    VersionMismatch { expected: u64, found: u64 },
    /// A fenced write with an epoch lower than the stored one.
    #[error("stale epoch {given} < {stored}")]
    StaleEpoch { given: Epoch, stored: Epoch },
    /// An enrollment token that is expired, used up or revoked.
    #[error("token unusable: {0}")]
    TokenUnusable(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The backend failed (IO, corruption, connection). The operation's outcome may be unknown.
    #[error("backend: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The whole centralized state. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- organizations and environments -------------------------------------------------------
    /// Conflict if the name is taken. The stored record has `version` 1.
    async fn create_org(&self, org: &Organization) -> Result<()>;
    async fn get_org(&self, id: OrgId) -> Result<Option<Organization>>;
    async fn get_org_by_name(&self, name: &str) -> Result<Option<Organization>>;
    /// By name.
    async fn list_orgs(&self, page: &Page) -> Result<Paged<Organization>>;
    /// Conflict if it still has environments.
    async fn delete_org(&self, id: OrgId) -> Result<()>;

    /// Conflict if the name is taken in the organization; NotFound if the organization is missing.
    async fn create_env(&self, env: &Environment) -> Result<()>;
    async fn get_env(&self, id: EnvId) -> Result<Option<Environment>>;
    async fn get_env_by_name(&self, org: OrgId, name: &str) -> Result<Option<Environment>>;
    /// By name, inside one organization.
    async fn list_envs(&self, org: OrgId, page: &Page) -> Result<Paged<Environment>>;
    /// Conflict if it still has hosts.
    async fn delete_env(&self, id: EnvId) -> Result<()>;

    // --- hosts --------------------------------------------------------------------------------
    /// Creates the host (Conflict if the id exists). `version` is set to 1.
    async fn create_host(&self, host: &Host) -> Result<Host>;
    async fn get_host(&self, id: HostId) -> Result<Option<Host>>;
    /// Replaces name and labels if the stored version is `expected_version`; returns the new record.
    async fn update_host(&self, host: &Host, expected_version: u64) -> Result<Host>;
    /// Deletes the host, its runtime record, change log and job results.
    async fn delete_host(&self, id: HostId) -> Result<()>;
    /// By host id; filters combine with AND.
    async fn list_hosts(&self, filter: &HostFilter, page: &Page) -> Result<Paged<Host>>;

    // --- host runtime (fenced) ----------------------------------------------------------------
    /// Writes the runtime record unless the stored one has a higher epoch (StaleEpoch).
    async fn put_runtime(&self, rt: &HostRuntime) -> Result<()>;
    async fn get_runtime(&self, host: HostId) -> Result<Option<HostRuntime>>;

    // --- change log ---------------------------------------------------------------------------
    /// Appends to the host's log, assigning `seq` (1, 2, ...); returns the stored change. Fenced
    /// like runtime writes (against the host's runtime epoch). A change with a `job` also records
    /// the job's result for the host (the job must exist), and `update_change` keeps that result's
    /// status in step, in the same transaction.
    async fn append_change(&self, change: &Change) -> Result<Change>;
    async fn get_change(&self, host: HostId, id: ChangeId) -> Result<Option<Change>>;
    /// Sets status (and reply, if given) of a change, fenced by `epoch`: refused if the stored
    /// change or the host's runtime has a higher epoch. Returns the updated change.
    async fn update_change(
        &self,
        host: HostId,
        id: ChangeId,
        status: ChangeStatus,
        reply: Option<Reply>,
        epoch: Epoch,
    ) -> Result<Change>;
    /// Newest first.
    async fn list_changes(&self, host: HostId, page: &Page) -> Result<Paged<Change>>;
    /// The host's queued and dispatched changes, oldest first (what a new owner resumes).
    async fn pending_changes(&self, host: HostId) -> Result<Vec<Change>>;
    /// Hosts of `shard` that have pending changes (so a node taking a shard can resume them
    /// without scanning every host).
    async fn hosts_with_pending_changes(&self, shard: u32) -> Result<Vec<HostId>>;

    // --- enrollment tokens --------------------------------------------------------------------
    async fn create_enrollment_token(&self, token: &EnrollmentToken) -> Result<()>;
    async fn get_enrollment_token(&self, id: TokenId) -> Result<Option<EnrollmentToken>>;
    /// Newest first, one organization.
    async fn list_enrollment_tokens(
        &self,
        org: OrgId,
        page: &Page,
    ) -> Result<Paged<EnrollmentToken>>;
    /// Atomically: finds the token by the sha256 of its secret, checks it is not revoked, expired
    /// (at `now`) or used up (TokenUnusable; NotFound if no such token), and counts one use.
    async fn use_enrollment_token(
        &self,
        secret_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<EnrollmentToken>;
    /// Gives back one use counted by [`Store::use_enrollment_token`] for an enrollment that then
    /// failed on the node's side (the agent retries, and a retry must not find the token used
    /// up by failures). Never below zero; NotFound if no such token.
    async fn release_enrollment_token_use(&self, id: TokenId) -> Result<()>;
    async fn revoke_enrollment_token(&self, id: TokenId) -> Result<()>;

    // --- API tokens ---------------------------------------------------------------------------
    async fn create_api_token(&self, token: &ApiToken) -> Result<()>;
    /// Only tokens that are not revoked.
    async fn find_api_token(&self, secret_sha256: &str) -> Result<Option<ApiToken>>;
    async fn list_api_tokens(&self, page: &Page) -> Result<Paged<ApiToken>>;
    async fn revoke_api_token(&self, id: TokenId) -> Result<()>;

    // --- idempotency keys of API requests ------------------------------------------------------
    /// Claims `key` of `token` for a request with `fingerprint` (sha256 hex): `Claimed` (and kept
    /// as in progress until `lease_until`) if the key is new or its record has lapsed; otherwise
    /// what the record says (see [`IdempotencyRecord::verdict`]). Atomic: of two claims racing,
    /// one is `Claimed`. Invalid for an empty key or one over [`MAX_IDEMPOTENCY_KEY_BYTES`].
    async fn claim_idempotency_key(
        &self,
        token: TokenId,
        key: &str,
        fingerprint: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<IdempotencyClaim>;
    /// Ends a claim: keeps `response` for replays until `keep_until`, or with `None` forgets the
    /// key (a retry then runs again). Does nothing unless the key is still claimed for
    /// `fingerprint` (its claim may have lapsed and been taken by another request).
    async fn finish_idempotency_key(
        &self,
        token: TokenId,
        key: &str,
        fingerprint: &str,
        response: Option<KeptResponse>,
        keep_until: DateTime<Utc>,
    ) -> Result<()>;
    /// Deletes the records that lapsed before `now`; returns how many.
    async fn purge_idempotency_keys(&self, now: DateTime<Utc>) -> Result<u64>;

    // --- audit log ----------------------------------------------------------------------------
    /// Appends, assigning `seq`; returns it.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64>;
    /// Newest first.
    async fn list_audit(&self, page: &Page) -> Result<Paged<AuditEntry>>;

    // --- applications, settings, jobs ---------------------------------------------------------
    /// Conflict if (org, name, version) exists: versions are immutable.
    async fn put_application(&self, app: &Application) -> Result<()>;
    async fn get_application(
        &self,
        org: OrgId,
        name: &str,
        version: &str,
    ) -> Result<Option<Application>>;
    async fn list_applications(&self, org: OrgId, page: &Page) -> Result<Paged<Application>>;

    async fn put_setting(&self, setting: &Setting) -> Result<()>;
    async fn get_setting(&self, scope: &SettingScope, key: &str) -> Result<Option<Setting>>;
    async fn list_settings(&self, scope: &SettingScope) -> Result<Vec<Setting>>;
    async fn delete_setting(&self, scope: &SettingScope, key: &str) -> Result<()>;

    async fn create_job(&self, job: &Job) -> Result<()>;
    async fn get_job(&self, id: JobId) -> Result<Option<Job>>;
    /// The organization's jobs, newest first.
    async fn list_jobs(&self, org: OrgId, page: &Page) -> Result<Paged<Job>>;
    async fn update_job_status(
        &self,
        id: JobId,
        status: JobStatus,
        expected_version: u64,
    ) -> Result<Job>;
    async fn put_job_result(&self, result: &JobResult) -> Result<()>;
    async fn list_job_results(&self, job: JobId, page: &Page) -> Result<Paged<JobResult>>;
    /// How many of the job's results are in each status (all zero for an unknown job).
    async fn job_counts(&self, job: JobId) -> Result<JobCounts>;
}
