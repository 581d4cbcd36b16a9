//! A host's change log: every command the platform asked of the host, newest first, and its
//! outcome.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use comodit_store::{ChangeId, ChangeStatus};
use serde::Deserialize;

use crate::auth::{parse_uuid, Resolved};
use crate::problem::ApiError;
use crate::routes::page;
use crate::views::{ChangeView, PageQuery, PageView};
use crate::Shared;

#[derive(Debug, Deserialize)]
pub struct ChangePath {
    change: String,
}

/// The host's changes, newest first.
#[utoipa::path(get, path = "/api/v1/hosts/{id}/changes", tag = "changes",
    params(("id" = uuid::Uuid, Path, description = "Host id"), PageQuery),
    responses((status = 200, description = "A page of changes, newest first", body = PageView<ChangeView>)))]
pub async fn list_changes(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<ChangeView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let paged = app.state.store.list_changes(res.host()?.id, &page).await?;
    Ok(Json(PageView {
        items: paged.items.into_iter().map(ChangeView::from).collect(),
        next: paged.next,
    }))
}

/// One change, with the agent's result once there is one.
#[utoipa::path(get, path = "/api/v1/hosts/{id}/changes/{change}", tag = "changes",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("change" = uuid::Uuid, Path, description = "Change id")),
    responses((status = 200, description = "The change", body = ChangeView)))]
pub async fn get_change(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<ChangePath>,
) -> Result<Json<ChangeView>, ApiError> {
    let host = res.host()?.id;
    let id = ChangeId(parse_uuid("change", &p.change)?);
    let change = app
        .state
        .store
        .get_change(host, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no such change on this host: {id}")))?;
    Ok(Json(ChangeView::from(change)))
}

/// Cancels a change that is still queued (not yet sent to the agent). A change already
/// dispatched or finished cannot be cancelled (409).
#[utoipa::path(post, path = "/api/v1/hosts/{id}/changes/{change}/cancel", tag = "changes",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("change" = uuid::Uuid, Path, description = "Change id")),
    responses(
        (status = 200, description = "The cancelled change", body = ChangeView),
        (status = 409, description = "Already dispatched or finished", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel_change(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<ChangePath>,
) -> Result<Json<ChangeView>, ApiError> {
    let host = res.host()?.id;
    let id = ChangeId(parse_uuid("change", &p.change)?);
    let change = app
        .state
        .store
        .get_change(host, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no such change on this host: {id}")))?;
    if change.status != ChangeStatus::Queued {
        let status = ChangeView::from(change).status;
        return Err(ApiError::conflict(format!(
            "only a queued change can be cancelled; this one is {status}"
        )));
    }
    let cancelled = app.state.ops.cancel(host, id).await?;
    Ok(Json(ChangeView::from(cancelled)))
}
