//! The handlers, one module per family of routes. Each handler carries its `#[utoipa::path]`
//! description; the router is built from the OpenAPI document (see `crate::doc`), so a handler is
//! reachable only if it is documented.

pub mod changes;
pub mod events;
pub mod hosts;
pub mod jobs;
pub mod orgs;
pub mod resources;
pub mod system;
pub mod tokens;

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use comodit_actors::{SubmitOptions, Submitted};
use comodit_protocol::{Body, HostId};
use comodit_store::Page;
use serde::Serialize;

use crate::auth::Caller;
use crate::idempotency::IdempotencyKey;
use crate::problem::ApiError;
use crate::views::{ChangeView, PageQuery};
use crate::{ApiLimits, Shared};

/// The page a listing asks for, checked against the limits.
pub(crate) fn page(limits: &ApiLimits, q: &PageQuery) -> Result<Page, ApiError> {
    page_of(limits, q.cursor.clone(), q.limit)
}

pub(crate) fn page_of(
    limits: &ApiLimits,
    cursor: Option<String>,
    limit: Option<u32>,
) -> Result<Page, ApiError> {
    let limit = limit.unwrap_or(limits.default_page_size);
    if limit == 0 || limit > limits.max_page_size {
        return Err(ApiError::bad_request(
            "invalid-query",
            format!("limit must be 1..={}", limits.max_page_size),
        )
        .field("limit"));
    }
    if cursor.as_ref().is_some_and(|c| c.len() > 1024) {
        return Err(ApiError::bad_request("invalid-query", "cursor too long").field("cursor"));
    }
    Ok(Page { cursor, limit })
}

/// How long to wait for the agent: `async=true` → not at all; else `wait_s` (default and maximum
/// from the limits).
pub(crate) fn wait_of(
    limits: &ApiLimits,
    asynchronous: bool,
    wait_s: Option<u64>,
) -> Result<Option<Duration>, ApiError> {
    if asynchronous {
        return Ok(None);
    }
    let s = wait_s.unwrap_or(limits.default_wait_s);
    if s > limits.max_wait_s {
        return Err(ApiError::bad_request(
            "invalid-query",
            format!("wait_s must be at most {}", limits.max_wait_s),
        )
        .field("wait_s"));
    }
    Ok(Some(Duration::from_secs(s)))
}

/// Hands a validated command body to the host's actor and answers with the change: 200 when the
/// agent answered within the wait (whatever the agent's status: it is in `result.status`), 202 with
/// a `Location` to follow otherwise.
/// `key`: the request's `Idempotency-Key`, on routes that record their change under it
/// (`idempotency::JOINED_ROUTES`).
pub(crate) async fn submit(
    app: &Shared,
    caller: &Caller,
    host: HostId,
    body: Body,
    wait: Option<Duration>,
    key: Option<&IdempotencyKey>,
) -> Result<Response, ApiError> {
    let opts = SubmitOptions {
        wait,
        requested_by: caller.name().to_owned(),
        ttl: Duration::from_secs(app.state.limits.change_ttl_s),
        change_id: key.map(|k| k.change_id(host)),
        job: None,
    };
    let op = body.op();
    // The actors bound their own waits; this is the API's guard against one that never answers,
    // so that no request hangs forever.
    let bound = wait.unwrap_or_default() + Duration::from_secs(app.state.limits.submit_grace_s);
    let submitted = match tokio::time::timeout(bound, app.state.ops.submit(host, body, opts)).await
    {
        Ok(r) => r?,
        Err(_) => {
            tracing::warn!(op, "host actor did not answer a submit in time");
            return Err(comodit_actors::OpsError::Timeout.into());
        }
    };
    Ok(match submitted {
        Submitted::Completed(change) => {
            tracing::debug!(op, change = %change.id, "change completed");
            (StatusCode::OK, Json(ChangeView::from(change))).into_response()
        }
        Submitted::Pending(change) => {
            tracing::debug!(op, change = %change.id, "change pending");
            let location = change_location(host, &change.id.to_string());
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(ChangeView::from(change)),
            )
                .into_response()
        }
    })
}

pub(crate) fn change_location(host: HostId, change: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("/api/v1/hosts/{host}/changes/{change}"))
        .expect("uuids make a valid header")
}

/// 201 with a `Location` and the created record.
pub(crate) fn created<T: Serialize>(location: String, body: T) -> Response {
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}
