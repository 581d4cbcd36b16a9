//! Public routes: liveness, readiness, metrics and the OpenAPI document (no token needed); and the
//! cluster status, which needs a token.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::problem::ApiError;
use crate::views::{ClusterView, Health, JoinNode, MemberView, MembershipAccepted, ShardsView};
use crate::Shared;
use crate::{ClusterOpError, ClusterProvider};

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
        Some(provider) => provider.view(),
        None => ClusterView::single_node(app.state.n_shards),
    })
}

/// The shard table: each shard's owner and epoch, as this node applied it.
#[utoipa::path(get, path = "/api/v1/cluster/shards", tag = "cluster",
    responses((status = 200, description = "This node's view of the shard table", body = ShardsView)))]
pub async fn get_cluster_shards(State(app): State<Arc<Shared>>) -> Json<ShardsView> {
    let view = match &app.state.cluster {
        Some(c) => c.view(),
        None => ClusterView::single_node(app.state.n_shards),
    };
    Json(ShardsView {
        id: view.id,
        shards: view.shards,
    })
}

fn member_of_a_cluster(app: &Shared) -> Result<&ClusterProvider, ApiError> {
    app.state.cluster.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not-a-cluster",
            "this node runs alone (no cluster_id): it has no membership to change",
        )
    })
}

fn membership_error(e: ClusterOpError) -> ApiError {
    match e {
        ClusterOpError::Invalid(why) => ApiError::new(StatusCode::CONFLICT, "membership", why),
        ClusterOpError::Unavailable(why) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cluster-unavailable", why)
        }
    }
}

/// Admits a node into the cluster (admin). The node itself runs `comodit-node --join <member>`:
/// it learns the members from the one it contacts and receives the state from the leader. It
/// joins as a learner and is promoted to voter while the cluster has fewer than five; it gets its
/// share of the shards once its lease is live.
#[utoipa::path(post, path = "/api/v1/cluster/nodes", tag = "cluster", request_body = JoinNode,
    responses((status = 202, description = "Admission proposed; follow GET /api/v1/cluster", body = MembershipAccepted)))]
pub async fn join_node(
    State(app): State<Arc<Shared>>,
    Json(body): Json<JoinNode>,
) -> Result<Response, ApiError> {
    let cluster = member_of_a_cluster(&app)?;
    if body.id == 0 {
        return Err(ApiError::unprocessable("id 0 is reserved").field("id"));
    }
    if body.addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::unprocessable("addr must be ip:port").field("addr"));
    }
    let members = cluster
        .add_node(body.id, body.addr)
        .await
        .map_err(membership_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(MembershipAccepted {
            status: "joining".into(),
            node: body.id,
            members: members
                .into_iter()
                .map(|(id, addr)| MemberView { id, addr })
                .collect(),
        }),
    )
        .into_response())
}

/// Decommissions a node (admin): it stops getting shards, hands every shard it owns off to the
/// others (two-step, never two owners at once), leaves the Raft configuration, then its process
/// exits. The last active node cannot be decommissioned.
#[utoipa::path(post, path = "/api/v1/cluster/nodes/{id}/decommission", tag = "cluster",
    params(("id" = u64, Path, description = "The node's Raft id")),
    responses((status = 202, description = "Decommission proposed; follow GET /api/v1/cluster", body = MembershipAccepted)))]
pub async fn decommission_node(
    State(app): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let cluster = member_of_a_cluster(&app)?;
    let id: u64 = id
        .parse()
        .ok()
        .filter(|&id| id > 0)
        .ok_or_else(|| ApiError::unprocessable("the node id must be a positive integer"))?;
    cluster.decommission(id).await.map_err(membership_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(MembershipAccepted {
            status: "leaving".into(),
            node: id,
            members: Vec::new(),
        }),
    )
        .into_response())
}
