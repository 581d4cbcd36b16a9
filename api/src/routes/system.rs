//! Public routes: liveness, readiness, metrics and the OpenAPI document (no token needed); and the
//! cluster status, which needs a token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::problem::ApiError;
use crate::views::{ClusterView, Health};
use crate::Shared;

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// The node is ready to serve requests (store open, broker connected, shards owned).
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready yet", body = crate::problem::Problem,
            content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(app): State<Arc<Shared>>) -> Result<Json<Health>, ApiError> {
    if (app.state.ready)() {
        Ok(Json(Health {
            status: "ready".into(),
        }))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "the node is not ready yet",
        ))
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", body = String,
        content_type = "text/plain; version=0.0.4")))]
pub async fn metrics(State(app): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.state.metrics.render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
pub async fn openapi_json(State(app): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.openapi_json.clone(),
    )
        .into_response()
}

/// What this node knows of the control-plane cluster: members and their state, the leader, term
/// and commit index, whether this node's lease is valid, and who owns which shard at which epoch.
/// Any token may read it. A single node answers as a cluster of one owning every shard.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, description = "This node's view of the cluster", body = ClusterView)))]
pub async fn get_cluster(State(app): State<Arc<Shared>>) -> Json<ClusterView> {
    Json(match &app.state.cluster {
        Some(provider) => provider(),
        None => ClusterView::single_node(app.state.n_shards),
    })
}
