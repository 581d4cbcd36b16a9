//! The one layer every non-public route goes through, in this order:
//!
//! 1. **authenticate** the bearer token (401 problem);
//! 2. **resolve** what the path names — organization, environment, host, enrollment token — (400
//!    for an invalid id, 404 for a missing record) and hand it to the handler;
//! 3. **authorize** the route's [`Rule`] against the caller's role and scope (403 problem);
//! 4. on POST with an `Idempotency-Key`, **replay** the first response or run the handler once;
//! 5. for every mutation (any method but GET/HEAD), **audit**: actor, `METHOD route`, path and
//!    outcome (`ok`, `denied`, `failed: ...`). Requests that fail authentication are not audited
//!    (there is no actor, and an unauthenticated client must not be able to grow the log); they
//!    are counted in the request metrics like any other.

use std::sync::Arc;

use axum::body::{Body, HttpBody};
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use comodit_store::{AuditEntry, IdempotencyClaim};

use crate::auth::{allowed, authenticate, resolve, rule, Caller};
use crate::idempotency::{self, Claim, IdempotencyKey, JOINED_ROUTES, MAX_KEY_BYTES};
use crate::problem::{ApiError, ProblemSummary};
use crate::Shared;

/// Set on a response that replays the first response to the same `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Set on a response to a request whose `Idempotency-Key` was still in progress, answered with the
/// first request's change (a route of `idempotency::JOINED_ROUTES`).
pub const IDEMPOTENT_JOINED: &str = "idempotent-joined";

pub(crate) async fn gate(
    State(app): State<Arc<Shared>>,
    matched: MatchedPath,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.as_str().to_owned();
    let method = req.method().clone();
    let write = !matches!(method, Method::GET | Method::HEAD);

    let caller = match authenticate(app.state.store.as_ref(), req.headers()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(route = %route, "unauthenticated request refused");
            return e.into_response();
        }
    };
    let target = req.uri().path().to_owned();
    let resp = match admit(&app, &caller, &route, write, params, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if write {
        // Computed before awaiting: a response body is not `Sync`, so no borrow of it may live
        // across the store call.
        let outcome = outcome(&resp);
        audit(&app, &caller, &method, &route, target, outcome).await;
    }
    resp
}

async fn admit(
    app: &Arc<Shared>,
    caller: &Caller,
    route: &str,
    write: bool,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let params: Vec<(String, String)> = match params {
        Ok(p) => p
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        Err(e) => return Err(ApiError::bad_request("invalid-id", e.body_text())),
    };
    let resolved = resolve(app.state.store.as_ref(), route, &params).await?;
    let rule = rule(req.method(), route);
    if !allowed(caller, rule, write, resolved.target()) {
        tracing::info!(actor = %caller.name(), route = %route, "request denied");
        return Err(ApiError::forbidden(format!(
            "token {:?} ({:?} role) may not {} here",
            caller.name(),
            caller.token.role,
            if write { "make changes" } else { "read" }
        )));
    }
    req.extensions_mut().insert(caller.clone());
    req.extensions_mut().insert(resolved);

    let key = req.headers().get("idempotency-key").cloned();
    match (req.method() == Method::POST, key) {
        (true, Some(key)) => idempotent(app, caller, route, key, req, next).await,
        _ => Ok(next.run(req).await),
    }
}

async fn idempotent(
    app: &Arc<Shared>,
    caller: &Caller,
    route: &str,
    key: HeaderValue,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_KEY_BYTES => k.to_owned(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid-header",
                format!("Idempotency-Key must be 1 to {MAX_KEY_BYTES} visible ASCII characters"),
            )
            .field("Idempotency-Key"))
        }
    };
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(IdempotencyKey {
        token: caller.token.id,
        key: key.clone(),
    });
    let limit = app.state.limits.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("request body over {limit} bytes"),
        )
    })?;
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let fingerprint = idempotency::fingerprint(parts.method.as_str(), pq, &bytes);
    let limits = &app.state.limits;
    let now = Utc::now();
    let lease_until = now + chrono::Duration::seconds(limits.idempotency_lease_s as i64);
    let store = app.state.store.clone();
    let token = caller.token.id;
    let claimed = store
        .claim_idempotency_key(token, &key, &fingerprint, now, lease_until)
        .await?;
    let claim = match claimed {
        IdempotencyClaim::Claimed => Claim {
            store,
            token,
            key,
            fingerprint,
            done: false,
        },
        IdempotencyClaim::Replay(kept) => {
            let (status, headers) = idempotency::replay_head(&kept);
            let mut resp = Response::new(Body::from(kept.body));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            resp.headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            return Ok(resp);
        }
        // The handler records its change under an id of this key: it finds the first request's
        // change (or records it, if that request never got so far) and answers with it.
        IdempotencyClaim::InProgress if JOINED_ROUTES.contains(&route) => {
            tracing::info!(
                route,
                "Idempotency-Key in progress: joining the first request's change"
            );
            let mut resp = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            resp.headers_mut()
                .insert(IDEMPOTENT_JOINED, HeaderValue::from_static("true"));
            return Ok(resp);
        }
        IdempotencyClaim::InProgress => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency-in-progress",
                "the first request with this Idempotency-Key has not finished; retry later",
            ))
        }
        IdempotencyClaim::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "this Idempotency-Key was used for a different request",
            )
            .field("Idempotency-Key"))
        }
    };
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let keep_until = Utc::now() + chrono::Duration::seconds(limits.idempotency_ttl_s as i64);
    let max = limits.idempotency_max_bytes;
    let keepable = !resp.status().is_server_error()
        && resp
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= max as u64);
    if !keepable {
        claim.finish(None, keep_until).await;
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    match axum::body::to_bytes(body, max).await {
        Ok(bytes) => {
            let kept = idempotency::keep(parts.status, &parts.headers, &bytes);
            claim.finish(kept, keep_until).await;
            Ok(Response::from_parts(parts, Body::from(bytes)))
        }
        Err(_) => {
            claim.finish(None, keep_until).await;
            Err(ApiError::internal("could not read the response body"))
        }
    }
}

/// The audit outcome of a response: `ok`, `ok (idempotent replay)`, `denied` or
/// `failed: <status> <title>`.
fn outcome(resp: &Response) -> String {
    let status = resp.status();
    let replayed = resp.headers().contains_key(IDEMPOTENT_REPLAYED);
    let outcome = if status.is_success() || status.is_redirection() {
        if replayed {
            "ok (idempotent replay)".to_owned()
        } else {
            "ok".to_owned()
        }
    } else if status == StatusCode::FORBIDDEN {
        "denied".to_owned()
    } else {
        // Status and title only: a detail may echo request input, which may be sensitive.
        let summary = resp.extensions().get::<ProblemSummary>();
        let title = summary
            .map(|s| ApiError::new(status, s.kind, "").title())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
        match summary.and_then(|s| s.field.as_deref()) {
            Some(f) => format!("failed: {} {title} (field {f})", status.as_u16()),
            None => format!("failed: {} {title}", status.as_u16()),
        }
    };
    outcome
}

async fn audit(
    app: &Arc<Shared>,
    caller: &Caller,
    method: &Method,
    route: &str,
    target: String,
    outcome: String,
) {
    let entry = AuditEntry {
        seq: 0,
        at: Utc::now(),
        actor: caller.name().to_owned(),
        action: format!("{method} {route}"),
        target,
        outcome,
    };
    if let Err(e) = app.state.store.append_audit(&entry).await {
        metrics::counter!("comodit_api_audit_failures_total").increment(1);
        tracing::error!(error = %e, action = %entry.action, actor = %entry.actor,
            "could not append to the audit log");
    }
}
