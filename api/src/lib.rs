//! # comodit-api
//!
//! The REST API of a comodit node (DESIGN §11): axum routes under `/api/v1`, JSON in and out,
//! described by an OpenAPI document generated from the code and served at
//! `/api/v1/openapi.json`.
//!
//! The node builds an [`ApiState`] (the store, the host actors behind [`HostOps`], host
//! lifecycle, the Prometheus handle, a readiness probe, limits) and mounts [`router`].
//!
//! ## How a request flows
//!
//! ```text
//! observe (metrics, span) → problemize (errors as problem+json) → body limit
//!   → gate: authenticate → resolve path ids → authorize → idempotency → handler → audit
//! ```
//!
//! - [`observe`](observe) labels metrics with route templates and opens a span with `method`,
//!   `route` and `host_id`.
//! - [`problem`] turns every error — ours and axum's own rejections — into RFC 9457 problems.
//! - [`gate`] is the one authorization layer (token → role and scope → target of the route) and
//!   writes the audit log for every mutation; [`idempotency`] replays POSTs by `Idempotency-Key`.
//! - The handlers in [`routes`] validate everything first (ids with
//!   [`ResourceId::parse`](comodit_protocol::ResourceId::parse), specs with
//!   [`Spec::from_json`](comodit_protocol::Spec::from_json)) and only then call the store or
//!   [`HostOps::submit`], so a bad request changes nothing.
//! - [`doc`] generates the OpenAPI document and builds the router *from* it, so every reachable
//!   route is documented.
//!
//! Public routes (no token): `/healthz`, `/readyz`, `/metrics`, `/api/v1/openapi.json`.
//! Everything else needs `Authorization: Bearer <secret>`; the store knows tokens only by the
//! sha256 of their secret ([`hash_token`]).

pub mod auth;
mod doc;
mod gate;
mod idempotency;
mod observe;
pub mod problem;
mod routes;
pub mod views;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::routing::MethodRouter;
use axum::Router;
use comodit_actors::{HostLifecycle, HostOps};
use comodit_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

pub use auth::{hash_token, Caller};
pub use gate::{IDEMPOTENT_JOINED, IDEMPOTENT_REPLAYED};
pub use problem::{ApiError, Problem};

/// Routes that need no token. They are marked with an empty `security` in the document.
pub const PUBLIC_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"];

/// Bounds of the API. Every default is documented on its field.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Largest request body (default 8 MiB, the protocol's message limit): 413 beyond.
    pub max_body_bytes: usize,
    /// How long a request waits for the agent's reply by default (10 s).
    pub default_wait_s: u64,
    /// Longest `wait_s` a client may ask for (60 s).
    pub max_wait_s: u64,
    /// Items per page when `limit` is not given (100).
    pub default_page_size: u32,
    /// Largest `limit` (1000).
    pub max_page_size: u32,
    /// A change expires if not applied within this time (600 s).
    pub change_ttl_s: u64,
    /// How much longer than its wait a submit to the host actors may take before the API gives
    /// up on it with 504 "outcome unknown" (15 s).
    pub submit_grace_s: u64,
    /// Largest response kept for an `Idempotency-Key` (1 MiB); a larger one is not replayed.
    pub idempotency_max_bytes: usize,
    /// How long a key is replayed (24 h).
    pub idempotency_ttl_s: u64,
    /// How long a key stays claimed by a request that has not answered (300 s: longer than the
    /// longest wait plus its grace). A node that dies mid-request leaves its claim to lapse.
    pub idempotency_lease_s: u64,
    /// Most concurrent `GET /events` streams (256).
    pub max_sse_clients: usize,
    /// Keep-alive comment interval on an idle event stream (15 s).
    pub sse_keep_alive_s: u64,
    /// Most hosts one job may target (100,000).
    pub max_job_hosts: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_body_bytes: 8 * 1024 * 1024,
            default_wait_s: 10,
            max_wait_s: 60,
            default_page_size: 100,
            max_page_size: comodit_store::Page::MAX_LIMIT,
            change_ttl_s: 600,
            submit_grace_s: 15,
            idempotency_max_bytes: 1024 * 1024,
            idempotency_ttl_s: 24 * 3600,
            idempotency_lease_s: 300,
            max_sse_clients: 256,
            sse_keep_alive_s: 15,
            max_job_hosts: 100_000,
        }
    }
}

/// Why a membership request of the cluster routes was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterOpError {
    /// It contradicts the node table (unknown node, id taken, last active node, ...): 409.
    #[error("{0}")]
    Invalid(String),
    /// The cluster cannot take it now (no leader yet, busy): 503, retry.
    #[error("{0}")]
    Unavailable(String),
}

/// The control plane as the API sees it (a member of a Raft cluster).
#[async_trait::async_trait]
pub trait ClusterControl: Send + Sync {
    /// What this node knows of the cluster, read fresh on every call.
    fn view(&self) -> views::ClusterView;
    /// Admit node `id` whose Raft transport listens at `addr`; answers the members' addresses.
    async fn add_node(&self, id: u64, addr: String) -> Result<Vec<(u64, String)>, ClusterOpError>;
    /// Start the graceful removal of node `id` (its shards are handed off first).
    async fn decommission(&self, id: u64) -> Result<(), ClusterOpError>;
}

/// The cluster handle the node gives the API.
pub type ClusterProvider = Arc<dyn ClusterControl>;

/// What the API needs from the node.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub ops: Arc<dyn HostOps>,
    /// Revokes hosts on `DELETE /hosts/{id}`.
    pub lifecycle: Arc<dyn HostLifecycle>,
    /// Rendered at `/metrics`.
    pub metrics: PrometheusHandle,
    /// Answers `/readyz`.
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The cluster's shard count (fixed for its life).
    pub n_shards: u32,
    /// Answers `GET /api/v1/cluster` on a member of a Raft cluster; `None` on a single node,
    /// which answers as the cluster of one ([`views::ClusterView::single_node`]).
    pub cluster: Option<ClusterProvider>,
    pub limits: ApiLimits,
}

/// Everything the handlers share.
pub(crate) struct Shared {
    pub state: ApiState,
    pub sse_slots: Arc<Semaphore>,
    /// The OpenAPI document, serialized once.
    pub openapi_json: Bytes,
}

/// The OpenAPI document of the API (served at `/api/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    doc::build()
}

/// The API's router, ready to serve (`axum::serve(listener, router(state))`).
///
/// # Panics
///
/// If a documented operation has no handler — a programming error that every test catches.
pub fn router(state: ApiState) -> Router {
    let document = openapi();
    let openapi_json =
        Bytes::from(serde_json::to_vec(&document).expect("the OpenAPI document always serializes"));
    let limits = state.limits.clone();
    let app = Arc::new(Shared {
        sse_slots: Arc::new(Semaphore::new(limits.max_sse_clients)),
        openapi_json,
        state,
    });

    let mut by_path: std::collections::BTreeMap<String, MethodRouter<Arc<Shared>>> =
        Default::default();
    for (path, method, id) in doc::operations(&document) {
        let endpoint = doc::endpoint(&id, method)
            .unwrap_or_else(|| panic!("{method} {path}: no handler for operation {id:?}"));
        let merged = match by_path.remove(&path) {
            None => endpoint,
            Some(m) => m.merge(endpoint),
        };
        by_path.insert(path, merged);
    }
    let mut public: Router<Arc<Shared>> = Router::new();
    let mut private: Router<Arc<Shared>> = Router::new();
    for (path, methods) in by_path {
        if PUBLIC_PATHS.contains(&path.as_str()) {
            public = public.route(&path, methods);
        } else {
            private = private.route(&doc::axum_path(&path), methods);
        }
    }
    let private = private.route_layer(axum::middleware::from_fn_with_state(
        app.clone(),
        gate::gate,
    ));
    public
        .merge(private)
        .fallback(problem::no_route)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn(problem::problemize))
        .layer(axum::middleware::from_fn(observe::observe))
        .with_state(app)
}
