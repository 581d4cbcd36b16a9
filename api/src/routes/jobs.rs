//! Jobs: one command to many hosts in one request (DESIGN §1, command & control) — what AWS
//! Systems Manager's `SendCommand` with targets or Salt's `salt -G ... cmd.run` do.
//!
//! `POST /orgs/{org}/jobs` (or `/orgs/{org}/envs/{env}/jobs` for a token scoped to one
//! environment) names a target — the organization's hosts, narrowed by environment, label and/or
//! an explicit list of host ids — and a command (`run`, `ping`, `facts`, `check`). The node
//! resolves the target once, records the job, and records one change per host in that host's log,
//! each under an id derived from the job and the host and marked with the job. The store keeps the
//! job's per-host result and its counts in step with those changes, in the same transactions, so
//! `GET .../jobs/{job}` and `GET .../jobs/{job}/hosts` read where every host is without asking any
//! actor. Each host's actor then sends its change like any other; offline hosts keep it queued
//! until they come back or it expires.
//!
//! The request answers `202` once every host's change is recorded (about 10 s for 50,000 hosts
//! on the embedded store). With an `Idempotency-Key` the job id is derived from the key, so a retry
//! — also one sent to another node after the first died mid-request — finds the same job and
//! records only the changes still missing: no host gets the command twice (ARCHITECTURE §27).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;
use comodit_actors::{OpsError, SubmitOptions};
use comodit_protocol::{Body, HostId, RunSpec};
use comodit_store::{
    ChangeId, ChangeStatus, EnvId, Host, HostFilter, Job, JobCounts, JobId, JobStatus, OrgId, Page,
    Scope, StoreError,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{find_env, parse_uuid, Caller, Resolved};
use crate::idempotency::{derived_uuid, IdempotencyKey};
use crate::problem::ApiError;
use crate::routes::hosts::key_value;
use crate::routes::page;
use crate::routes::resources::DEFAULT_RUN_TIMEOUT_S;
use crate::views::{PageQuery, PageView, RunBody};
use crate::Shared;

/// Most host ids a job's `target.hosts` may list.
pub const MAX_LISTED_HOSTS: usize = 10_000;
/// Longest `ttl_s` of a job's changes (a day).
pub const MAX_JOB_TTL_S: u64 = 24 * 3600;
/// Changes recorded at once while a job is released (the embedded store commits them in groups).
const RELEASE_CONCURRENCY: usize = 256;
/// Hosts whose change could not be recorded, named in the answer (the count has them all).
const MAX_SKIPPED_SHOWN: usize = 100;

/// What a job sends to each host.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobCommand {
    /// Run a program (`{"run": {"argv": ["uptime"]}}`).
    Run(RunBody),
    /// Ask the agent to answer (`"ping"`).
    Ping,
    /// Collect the host's facts again (`"facts"`).
    Facts,
    /// Run compliance now (`"check"`).
    Check,
}

impl JobCommand {
    fn body(&self) -> Result<Body, ApiError> {
        Ok(match self {
            JobCommand::Run(r) => {
                let spec = RunSpec {
                    argv: r.argv.clone(),
                    env: r.env.clone(),
                    cwd: r.cwd.clone(),
                    timeout_s: r.timeout_s.unwrap_or(DEFAULT_RUN_TIMEOUT_S),
                    stream: r.stream,
                };
                spec.validate().map_err(|e| {
                    ApiError::from_protocol(StatusCode::UNPROCESSABLE_ENTITY, &e).field("command")
                })?;
                Body::Run(spec)
            }
            JobCommand::Ping => Body::Ping {},
            JobCommand::Facts => Body::Facts {},
            JobCommand::Check => Body::Check {},
        })
    }
}

/// Which hosts of the organization a job goes to: every filter given must match (AND); none
/// given means every host of the organization.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobTarget {
    /// Only hosts of this environment (id or name). Set by the route under `/envs/{env}`.
    pub env: Option<String>,
    /// `key=value`: only hosts with this label.
    pub label: Option<String>,
    /// Only these hosts (at most 10,000 ids). Each must exist in the organization and match the
    /// other filters, or nothing is recorded (422).
    pub hosts: Option<Vec<Uuid>>,
}

/// `POST /orgs/{org}/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    #[serde(default)]
    pub target: JobTarget,
    pub command: JobCommand,
    /// Each host's change expires if not applied within this many seconds (default: the API's
    /// change lifetime, 600; at most 86,400). Offline hosts get the command if they come back
    /// in time.
    pub ttl_s: Option<u64>,
    /// At most this many hosts with the job's command pending (sent or waiting to be sent) at
    /// once: the rest are released as hosts answer (or their changes expire). Absent: every
    /// host at once.
    pub max_concurrency: Option<u64>,
    /// Stop once more than this many hosts failed (or let their change expire): the job is
    /// `failed`, its changes still queued are cancelled and no more hosts get the command (SSM's
    /// MaxErrors; 0 stops at the first error). Absent: every host gets it whatever the errors.
    pub max_errors: Option<u64>,
}

/// What is stored as the job's `spec`.
#[derive(Debug, Deserialize, Serialize)]
struct JobSpec {
    env: Option<EnvId>,
    target: JobTarget,
    command: JobCommand,
    ttl_s: u64,
    /// Hosts the target matched when the job was created.
    hosts: u64,
    #[serde(default)]
    max_concurrency: Option<u64>,
    #[serde(default)]
    max_errors: Option<u64>,
}

/// How many of a job's hosts are where.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct JobCountsView {
    pub queued: u64,
    pub dispatched: u64,
    pub applied: u64,
    pub failed: u64,
    pub expired: u64,
    pub cancelled: u64,
}

impl From<JobCounts> for JobCountsView {
    fn from(c: JobCounts) -> Self {
        JobCountsView {
            queued: c.queued,
            dispatched: c.dispatched,
            applied: c.applied,
            failed: c.failed,
            expired: c.expired,
            cancelled: c.cancelled,
        }
    }
}

/// A host the job recorded no change for, and why.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SkippedHost {
    pub host: Uuid,
    pub reason: String,
}

/// A job and where its hosts are.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub org: Uuid,
    /// The environment the job was limited to, if any.
    pub env: Option<Uuid>,
    /// `running` while a host waits for its outcome (or not every host's change is recorded
    /// yet); then `done` (every host applied it), `failed` (at least one failed or expired; at
    /// once when more than `max_errors` did, the job then stopped) or `cancelled`.
    #[schema(example = "running")]
    pub status: String,
    #[schema(value_type = Object)]
    pub target: serde_json::Value,
    #[schema(value_type = Object)]
    pub command: serde_json::Value,
    pub ttl_s: u64,
    /// Hosts the target matched.
    pub hosts: u64,
    /// At most this many hosts pending at once (absent: all at once).
    pub max_concurrency: Option<u64>,
    /// The job stops once more than this many hosts failed (absent: never).
    pub max_errors: Option<u64>,
    /// Hosts with a recorded change, by status (`queued` … `cancelled`; a change answered within
    /// 2 s goes from `queued` straight to its outcome).
    pub counts: JobCountsView,
    pub created_at: chrono::DateTime<Utc>,
    pub created_by: String,
    /// On the answer to the request that created (or retried) the job: hosts for which no
    /// change could be recorded (at most 100 named; `skipped_count` has them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedHost>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_count: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One host of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobHostView {
    pub host: Uuid,
    /// The host's change (follow it at `/api/v1/hosts/{host}/changes/{change}` for the agent's
    /// result).
    pub change: Option<Uuid>,
    #[schema(example = "applied")]
    pub status: String,
    pub updated_at: chrono::DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
pub struct JobPath {
    job: String,
}

fn status_text<T: Serialize>(s: T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The id a job's change to `host` is recorded under: the same for every retry of the job's
/// creation, so the store refuses a second one (sha256 of job and host, shaped as a UUID).
pub fn job_change_id(job: JobId, host: HostId) -> ChangeId {
    ChangeId(derived_uuid(&[
        b"comodit job change\0",
        job.0.as_bytes(),
        host.0.as_bytes(),
    ]))
}

fn job_location(org: OrgId, job: JobId) -> String {
    format!("/api/v1/orgs/{org}/jobs/{job}")
}

/// Sends one command to every host the target matches. Answers `202` with the job once every
/// host's change is recorded; follow it at the `Location`.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/jobs", tag = "jobs", request_body = CreateJob,
    params(("org" = String, Path, description = "Organization id or name")),
    responses(
        (status = 202, description = "Recorded for every host; the agents answer later", body = JobView,
            headers(("Location" = String, description = "The job"))),
        (status = 422, description = "Invalid command, unknown hosts in `target.hosts`, or a target that matches no host (or more than the node allows)", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_job(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    key: Option<Extension<IdempotencyKey>>,
    Json(body): Json<CreateJob>,
) -> Result<Response, ApiError> {
    let key = key.as_ref().map(|Extension(k)| k);
    release(&app, &caller, &res, None, body, key).await
}

/// The same, limited to one environment (for tokens scoped to it).
#[utoipa::path(post, path = "/api/v1/orgs/{org}/envs/{env}/jobs", tag = "jobs", request_body = CreateJob,
    params(("org" = String, Path, description = "Organization id or name"),
        ("env" = String, Path, description = "Environment id or name")),
    responses(
        (status = 202, description = "Recorded for every host; the agents answer later", body = JobView,
            headers(("Location" = String, description = "The job"))),
        (status = 422, description = "Invalid command, unknown hosts in `target.hosts`, a target environment other than the path's, or a target that matches no host", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_env_job(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    key: Option<Extension<IdempotencyKey>>,
    Json(body): Json<CreateJob>,
) -> Result<Response, ApiError> {
    let key = key.as_ref().map(|Extension(k)| k);
    let env = res.env()?.id;
    release(&app, &caller, &res, Some(env), body, key).await
}

async fn release(
    app: &Arc<Shared>,
    caller: &Caller,
    res: &Resolved,
    route_env: Option<EnvId>,
    body: CreateJob,
    key: Option<&IdempotencyKey>,
) -> Result<Response, ApiError> {
    let org = res.org()?.clone();
    let store = &app.state.store;
    let limits = &app.state.limits;
    let command = body.command.body()?;
    let ttl_s = body.ttl_s.unwrap_or(limits.change_ttl_s);
    if ttl_s == 0 || ttl_s > MAX_JOB_TTL_S {
        return Err(
            ApiError::unprocessable(format!("ttl_s must be 1..={MAX_JOB_TTL_S}")).field("ttl_s"),
        );
    }
    if body
        .max_concurrency
        .is_some_and(|n| n == 0 || n > limits.max_job_hosts as u64)
    {
        return Err(ApiError::unprocessable(format!(
            "max_concurrency must be 1..={}",
            limits.max_job_hosts
        ))
        .field("max_concurrency"));
    }
    if body
        .max_errors
        .is_some_and(|n| n > limits.max_job_hosts as u64)
    {
        return Err(ApiError::unprocessable(format!(
            "max_errors must be 0..={}",
            limits.max_job_hosts
        ))
        .field("max_errors"));
    }
    let env = match (&body.target.env, route_env) {
        (Some(e), route) => {
            let found = find_env(store.as_ref(), &org, e)
                .await
                .map_err(|e| ApiError::unprocessable(e.detail).field("target.env"))?;
            if route.is_some_and(|r| r != found.id) {
                return Err(ApiError::unprocessable(
                    "target.env names another environment than the path",
                )
                .field("target.env"));
            }
            Some(found.id)
        }
        (None, route) => route,
    };
    let label = body
        .target
        .label
        .as_deref()
        .map(|s| key_value("target.label", s))
        .transpose()
        .map_err(|e| ApiError::unprocessable(e.detail).field("target.label"))?;
    let filter = HostFilter {
        org: Some(org.id),
        env,
        label,
        ..Default::default()
    };
    let hosts = match &body.target.hosts {
        Some(listed) => listed_hosts(app, &filter, listed).await?,
        None => matching_hosts(app, &filter).await?,
    };
    if hosts.is_empty() {
        return Err(ApiError::unprocessable("the target matches no host").field("target"));
    }

    let now = Utc::now();
    let spec = JobSpec {
        env,
        target: body.target,
        command: body.command,
        ttl_s,
        hosts: hosts.len() as u64,
        max_concurrency: body.max_concurrency,
        max_errors: body.max_errors,
    };
    let spec =
        serde_json::to_value(&spec).map_err(|e| ApiError::internal(format!("job spec: {e}")))?;
    let id = key.map_or_else(JobId::random, IdempotencyKey::job_id);
    let job = Job {
        id,
        org: org.id,
        spec,
        status: JobStatus::Running,
        created_at: now,
        created_by: caller.name().to_owned(),
        version: 0,
    };
    let job = match store.create_job(&job).await {
        Ok(()) => job,
        // A retry under the same key: finish what the first request started.
        Err(StoreError::Conflict(_)) if key.is_some() => store
            .get_job(id)
            .await?
            .ok_or_else(|| ApiError::conflict(format!("job {id} is being created")))?,
        Err(e) => return Err(e.into()),
    };
    if is_stopped(&job) {
        // A retry of a job cancelled or stopped since: nothing more is recorded.
        return Ok(accepted(org.id, view(app, job).await?));
    }

    let started = std::time::Instant::now();
    let opts = SubmitOptions {
        wait: None,
        requested_by: caller.name().to_owned(),
        ttl: Duration::from_secs(ttl_s),
        change_id: None,
        job: Some(job.id),
    };
    let mut ids: Vec<HostId> = hosts.iter().map(|h| h.id).collect();
    // A paced job records its first `max_concurrency` hosts now, the rest as they answer.
    let spec = spec_of(&job);
    let pacing = Pacing {
        max_concurrency: spec
            .max_concurrency
            .filter(|&max| (max as usize) < ids.len()),
        max_errors: spec.max_errors,
    };
    let rest = pacing
        .max_concurrency
        .map_or_else(Vec::new, |max| ids.split_off(max as usize));
    let recorded = ids.len() as u64;
    let (skipped, skipped_count) = record_changes(app, job.id, &command, &opts, ids).await?;
    if pacing.max_concurrency.is_some() || pacing.max_errors.is_some() {
        tokio::spawn(pace(app.clone(), job.id, command, opts, rest, pacing));
    }
    tracing::info!(job = %job.id, hosts = hosts.len(), recorded, skipped = skipped_count,
        elapsed_ms = started.elapsed().as_millis() as u64, "job released");
    let mut view = view(app, job).await?;
    view.skipped = skipped;
    view.skipped_count = skipped_count;
    Ok(accepted(org.id, view))
}

/// `202 Accepted` with the job and its `Location`.
fn accepted(org: OrgId, view: JobView) -> Response {
    let location = job_location(org, JobId(view.id));
    let mut resp = (StatusCode::ACCEPTED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Cancelled, or stopped after `max_errors`: no more of its hosts get the command.
fn is_stopped(job: &Job) -> bool {
    matches!(job.status, JobStatus::Cancelled | JobStatus::Failed)
}

/// Records the job's change for each of `hosts`, 256 at a time; answers with the hosts for which
/// none could be recorded (at most 100 named) and their count.
async fn record_changes(
    app: &Shared,
    job: JobId,
    command: &Body,
    opts: &SubmitOptions,
    hosts: Vec<HostId>,
) -> Result<(Vec<SkippedHost>, u64), ApiError> {
    let n = hosts.len() as u64;
    let mut submitted = futures_util::stream::iter(hosts.into_iter().map(|host| {
        let opts = SubmitOptions {
            change_id: Some(job_change_id(job, host)),
            ..opts.clone()
        };
        let (ops, body) = (app.state.ops.clone(), command.clone());
        async move { (host, ops.submit(host, body, opts).await) }
    }))
    .buffer_unordered(RELEASE_CONCURRENCY);
    let mut skipped = Vec::new();
    let mut skipped_count = 0u64;
    while let Some((host, outcome)) = submitted.next().await {
        let reason = match outcome {
            Ok(_) => continue,
            Err(OpsError::UnknownHost(_)) => "the host was deleted".to_owned(),
            Err(OpsError::ShuttingDown) => return Err(ApiError::unavailable(
                "the node is shutting down: retry with the same Idempotency-Key on another node",
            )),
            Err(e) => e.to_string(),
        };
        skipped_count += 1;
        if skipped.len() < MAX_SKIPPED_SHOWN {
            skipped.push(SkippedHost {
                host: host.0,
                reason,
            });
        }
    }
    metrics::counter!("comodit_api_job_changes_recorded_total").increment(n - skipped_count);
    Ok((skipped, skipped_count))
}

/// How often a paced job looks at its counts to release more hosts.
const PACE_POLL: Duration = Duration::from_millis(200);
/// How often a job with `max_errors` and no host left to release looks at its errors.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// What the task following a job enforces.
struct Pacing {
    /// At most this many of its changes pending at once (hosts beyond it are released later).
    max_concurrency: Option<u64>,
    /// Stop the job once more hosts than this failed or expired.
    max_errors: Option<u64>,
}

/// Follows a job that is paced or has `max_errors`: releases the rest of its hosts as others
/// finish (at most `max_concurrency` of its changes pending at once), and stops it once more than
/// `max_errors` hosts failed. Runs on the node that created the job, until every host has its
/// change (and, with `max_errors`, every change its outcome), the job is cancelled or stopped,
/// or the node stops. If the node dies first, a paced job shows fewer changes than hosts
/// (`running`); the request retried with its `Idempotency-Key` picks up where it stopped.
async fn pace(
    app: Arc<Shared>,
    job: JobId,
    command: Body,
    opts: SubmitOptions,
    rest: Vec<HostId>,
    pacing: Pacing,
) {
    let store = app.state.store.clone();
    let stopped = |j: &Option<Job>| j.as_ref().is_none_or(is_stopped);
    let mut rest = rest.into_iter().peekable();
    loop {
        let releasing = rest.peek().is_some();
        if !releasing && pacing.max_errors.is_none() {
            tracing::info!(job = %job, "paced job: every host released");
            return;
        }
        tokio::time::sleep(if releasing { PACE_POLL } else { WATCH_POLL }).await;
        // Counts first: a cancel between the two reads is then seen here.
        let counts = store.job_counts(job).await;
        let (now, counts) = match (store.get_job(job).await, counts) {
            (Ok(now), Ok(counts)) => (now, counts),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(job = %job, error = %e, "job: cannot read its state");
                continue;
            }
        };
        if stopped(&now) {
            tracing::info!(job = %job, left = rest.len(), "job cancelled or stopped: releasing no more");
            return;
        }
        let errors = counts.failed + counts.expired;
        if let (Some(max), Some(current)) = (pacing.max_errors, &now) {
            if errors > max && stop_failed(&app, current, errors, rest.len()).await {
                return;
            }
        }
        if !releasing {
            if counts.pending() == 0 {
                return;
            }
            continue;
        }
        let room = pacing
            .max_concurrency
            .map_or(u64::MAX, |max| max.saturating_sub(counts.pending()));
        if room == 0 {
            continue;
        }
        let next: Vec<HostId> = rest.by_ref().take(room as usize).collect();
        let released = next.clone();
        match record_changes(&app, job, &command, &opts, next).await {
            Ok((_, 0)) => {}
            Ok((skipped, n)) => {
                tracing::warn!(job = %job, skipped = n, first = ?skipped.first().map(|s| &s.reason), "paced job: hosts skipped")
            }
            Err(e) => {
                tracing::warn!(job = %job, error = %e.detail, left = rest.len(), "paced job stopped");
                return;
            }
        }
        // A cancel or stop that ran while this batch was recorded did not see it: cancel it too.
        if store.get_job(job).await.is_ok_and(|j| stopped(&j)) {
            for host in released {
                let _ = app.state.ops.cancel(host, job_change_id(job, host)).await;
            }
            return;
        }
    }
}

/// Marks a job `failed` for having more than `max_errors` errors and cancels its queued changes.
/// False if that could not be stored (tried again at the next look); true once the job is
/// stopped, by this or by a cancel that came first.
async fn stop_failed(app: &Shared, job: &Job, errors: u64, left: usize) -> bool {
    match app
        .state
        .store
        .update_job_status(job.id, JobStatus::Failed, job.version)
        .await
    {
        Ok(_) => {}
        // Changed meanwhile (cancelled): the next look sees it stopped.
        Err(StoreError::VersionMismatch { .. }) => return false,
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "job over max_errors: cannot stop it yet");
            return false;
        }
    }
    tracing::info!(job = %job.id, errors, left, "job stopped: more errors than max_errors");
    metrics::counter!("comodit_api_jobs_stopped_total", "reason" => "max_errors").increment(1);
    if let Err(e) = cancel_queued(app, job.id).await {
        tracing::warn!(job = %job.id, error = %e.detail, "stopped job: queued changes not all cancelled");
    }
    true
}

/// Every host the filter matches, up to the node's limit.
async fn matching_hosts(app: &Shared, filter: &HostFilter) -> Result<Vec<Host>, ApiError> {
    let max = app.state.limits.max_job_hosts;
    let mut out = Vec::new();
    let mut page = Page::first(Page::MAX_LIMIT);
    loop {
        let paged = app.state.store.list_hosts(filter, &page).await?;
        out.extend(paged.items);
        if out.len() > max {
            return Err(ApiError::unprocessable(format!(
                "the target matches more than {max} hosts: narrow it (target.env, target.label)"
            ))
            .field("target"));
        }
        match paged.next {
            Some(next) => page.cursor = Some(next),
            None => return Ok(out),
        }
    }
}

/// The listed hosts, each checked against the filter; any that is unknown or outside it refuses
/// the whole request.
async fn listed_hosts(
    app: &Shared,
    filter: &HostFilter,
    listed: &[Uuid],
) -> Result<Vec<Host>, ApiError> {
    if listed.is_empty() || listed.len() > MAX_LISTED_HOSTS {
        return Err(ApiError::unprocessable(format!(
            "target.hosts must list 1..={MAX_LISTED_HOSTS} host ids"
        ))
        .field("target.hosts"));
    }
    let mut ids: Vec<Uuid> = listed.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let store = &app.state.store;
    let found: Vec<(Uuid, Option<Host>)> = futures_util::stream::iter(
        ids.into_iter()
            .map(|id| async move { (id, store.get_host(HostId(id)).await) }),
    )
    .buffered(64)
    .map(|(id, r)| r.map(|h| (id, h)))
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(found.len());
    let mut outside = Vec::new();
    for (id, host) in found {
        match host {
            Some(h)
                if filter.org.is_none_or(|o| h.org == o)
                    && filter.env.is_none_or(|e| h.env == e)
                    && filter
                        .label
                        .as_ref()
                        .is_none_or(|(k, v)| h.labels.get(k) == Some(v)) =>
            {
                out.push(h)
            }
            _ => outside.push(id),
        }
    }
    if !outside.is_empty() {
        let shown: Vec<String> = outside.iter().take(5).map(Uuid::to_string).collect();
        return Err(ApiError::unprocessable(format!(
            "{} listed host(s) do not exist in this organization or do not match the target: {}{}",
            outside.len(),
            shown.join(", "),
            if outside.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ))
        .field("target.hosts"));
    }
    Ok(out)
}

/// The job named by the path, if it is the organization's and the caller's scope covers it.
async fn find_job(
    app: &Shared,
    caller: &Caller,
    res: &Resolved,
    p: &JobPath,
) -> Result<Job, ApiError> {
    let org = res.org()?.id;
    let id = JobId(parse_uuid("job", &p.job)?);
    let missing = || ApiError::not_found(format!("no such job in this organization: {id}"));
    let job = app.state.store.get_job(id).await?.ok_or_else(missing)?;
    if job.org != org {
        return Err(missing());
    }
    // A token scoped to one environment sees that environment's jobs only.
    if let Scope::Env { env, .. } = caller.scope() {
        if spec_of(&job).env != Some(env) {
            return Err(missing());
        }
    }
    Ok(job)
}

fn spec_of(job: &Job) -> JobSpec {
    serde_json::from_value(job.spec.clone()).unwrap_or(JobSpec {
        env: None,
        target: JobTarget::default(),
        command: JobCommand::Ping,
        ttl_s: 0,
        hosts: 0,
        max_concurrency: None,
        max_errors: None,
    })
}

async fn view(app: &Shared, job: Job) -> Result<JobView, ApiError> {
    let counts = app.state.store.job_counts(job.id).await?;
    let spec = spec_of(&job);
    let status = if job.status == JobStatus::Cancelled {
        "cancelled"
    } else if job.status == JobStatus::Failed {
        // Stopped after `max_errors`.
        "failed"
    } else if counts.pending() > 0 || counts.total() < spec.hosts {
        "running"
    } else if counts.failed + counts.expired > 0 {
        "failed"
    } else if counts.cancelled > 0 {
        "cancelled"
    } else {
        "done"
    };
    Ok(JobView {
        id: job.id.0,
        org: job.org.0,
        env: spec.env.map(|e| e.0),
        status: status.to_owned(),
        target: serde_json::to_value(&spec.target).unwrap_or_default(),
        command: serde_json::to_value(&spec.command).unwrap_or_default(),
        ttl_s: spec.ttl_s,
        hosts: spec.hosts,
        max_concurrency: spec.max_concurrency,
        max_errors: spec.max_errors,
        counts: counts.into(),
        created_at: job.created_at,
        created_by: job.created_by,
        skipped: Vec::new(),
        skipped_count: 0,
    })
}

/// The organization's jobs, newest first, each with its counts. A token scoped to one
/// environment sees that environment's jobs only (a page may then hold fewer than `limit`).
#[utoipa::path(get, path = "/api/v1/orgs/{org}/jobs", tag = "jobs",
    params(("org" = String, Path, description = "Organization id or name"), PageQuery),
    responses((status = 200, description = "A page of jobs, newest first", body = PageView<JobView>)))]
pub async fn list_jobs(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<JobView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let org = res.org()?.id;
    let paged = app.state.store.list_jobs(org, &page).await?;
    let only_env = match caller.scope() {
        Scope::Env { env, .. } => Some(env),
        _ => None,
    };
    let mut items = Vec::with_capacity(paged.items.len());
    for job in paged.items {
        if only_env.is_some_and(|e| spec_of(&job).env != Some(e)) {
            continue;
        }
        items.push(view(&app, job).await?);
    }
    Ok(Json(PageView {
        items,
        next: paged.next,
    }))
}

/// One job and how many of its hosts are where.
#[utoipa::path(get, path = "/api/v1/orgs/{org}/jobs/{job}", tag = "jobs",
    params(("org" = String, Path, description = "Organization id or name"),
        ("job" = uuid::Uuid, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = JobView)))]
pub async fn get_job(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<JobPath>,
) -> Result<Json<JobView>, ApiError> {
    let job = find_job(&app, &caller, &res, &p).await?;
    Ok(Json(view(&app, job).await?))
}

/// The job's hosts, by host id, each with its change and status.
#[utoipa::path(get, path = "/api/v1/orgs/{org}/jobs/{job}/hosts", tag = "jobs",
    params(("org" = String, Path, description = "Organization id or name"),
        ("job" = uuid::Uuid, Path, description = "Job id"), PageQuery),
    responses((status = 200, description = "A page of the job's hosts", body = PageView<JobHostView>)))]
pub async fn list_job_hosts(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<JobPath>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<JobHostView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let job = find_job(&app, &caller, &res, &p).await?;
    let paged = app.state.store.list_job_results(job.id, &page).await?;
    Ok(Json(PageView {
        items: paged
            .items
            .into_iter()
            .map(|r| JobHostView {
                host: r.host.0,
                change: r.change.map(|c| c.0),
                status: status_text(r.status),
                updated_at: r.updated_at,
            })
            .collect(),
        next: paged.next,
    }))
}

/// Cancels the job: every host's change still queued (not yet sent) is cancelled; hosts that
/// already have the command finish it. Answers with the job.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/jobs/{job}/cancel", tag = "jobs",
    params(("org" = String, Path, description = "Organization id or name"),
        ("job" = uuid::Uuid, Path, description = "Job id")),
    responses((status = 200, description = "The job, its queued changes cancelled", body = JobView)))]
pub async fn cancel_job(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<JobPath>,
) -> Result<Json<JobView>, ApiError> {
    let job = find_job(&app, &caller, &res, &p).await?;
    let store = &app.state.store;
    let job = if job.status == JobStatus::Cancelled {
        job
    } else {
        match store
            .update_job_status(job.id, JobStatus::Cancelled, job.version)
            .await
        {
            Ok(j) => j,
            // Cancelled by a concurrent request meanwhile: carry on with the changes.
            Err(StoreError::VersionMismatch { .. }) => store
                .get_job(job.id)
                .await?
                .ok_or_else(|| ApiError::not_found("the job is gone"))?,
            Err(e) => return Err(e.into()),
        }
    };
    cancel_queued(&app, job.id).await?;
    Ok(Json(view(&app, job).await?))
}

/// Cancels every change of the job still queued (not yet sent); those sent finish.
async fn cancel_queued(app: &Shared, job: JobId) -> Result<(), ApiError> {
    let mut page = Page::first(Page::MAX_LIMIT);
    loop {
        let paged = app.state.store.list_job_results(job, &page).await?;
        let queued: Vec<(HostId, ChangeId)> = paged
            .items
            .iter()
            .filter(|r| r.status == ChangeStatus::Queued)
            .filter_map(|r| r.change.map(|c| (r.host, c)))
            .collect();
        futures_util::stream::iter(queued.into_iter().map(|(host, change)| {
            let ops = app.state.ops.clone();
            async move {
                // A change dispatched meanwhile is the agent's now: not an error of the cancel.
                if let Err(e) = ops.cancel(host, change).await {
                    tracing::debug!(host_id = %host, change = %change, error = %e, "job change not cancelled");
                }
            }
        }))
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
        match paged.next {
            Some(next) => page.cursor = Some(next),
            None => break,
        }
    }
    Ok(())
}
