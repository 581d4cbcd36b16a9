//! Hosts: listing with filters, one host with its runtime, renaming and labelling (with
//! `If-Match`), revocation, facts and compliance.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use comodit_store::{EnvId, Environment, Host, HostFilter, Scope, Store};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{find_env, find_org, Caller, Resolved};
use crate::problem::{etag, no_content, ApiError};
use crate::routes::page_of;
use crate::views::{
    ComplianceView, FactsView, HostDetail, HostView, PageView, PatchHost, RuntimeView,
};
use crate::Shared;

/// Most labels on one host.
pub const MAX_LABELS: usize = 64;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HostsQuery {
    /// Organization id or name.
    pub org: Option<String>,
    /// Environment id, or name together with `org`.
    pub env: Option<String>,
    /// `key=value`: hosts with this label.
    pub label: Option<String>,
    /// Hosts connected (or not) right now.
    pub online: Option<bool>,
    /// `fact=value` on the last reported facts (top-level facts, compared as strings), e.g.
    /// `os_family=debian`.
    pub fact: Option<String>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    /// Items per page (default 100, at most 1000).
    pub limit: Option<u32>,
}

pub(crate) fn key_value(field: &str, s: &str) -> Result<(String, String), ApiError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(
            ApiError::bad_request("invalid-query", format!("{field} must be key=value"))
                .field(field),
        ),
    }
}

/// A 404 from looking up a filter's organization or environment is the query's fault: 400.
fn as_query_error(field: &str, e: ApiError) -> ApiError {
    if e.status == StatusCode::NOT_FOUND || e.status == StatusCode::BAD_REQUEST {
        ApiError::bad_request("invalid-query", e.detail).field(field)
    } else {
        e
    }
}

async fn env_filter(
    store: &dyn Store,
    org: Option<&comodit_store::Organization>,
    key: &str,
) -> Result<Environment, ApiError> {
    match (uuid::Uuid::try_parse(key), org) {
        (_, Some(org)) => find_env(store, org, key).await,
        (Ok(u), None) => store
            .get_env(EnvId(u))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no such environment: {key:?}"))),
        (Err(_), None) => Err(ApiError::bad_request(
            "invalid-query",
            "an environment by name needs org as well",
        )),
    }
    .map_err(|e| as_query_error("env", e))
}

/// Hosts by id, filtered (filters combine with AND). Tokens scoped to an organization or
/// environment see only the hosts inside it; filtering outside it is refused (403).
#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts", params(HostsQuery),
    responses((status = 200, description = "A page of hosts", body = PageView<HostView>)))]
pub async fn list_hosts(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HostsQuery>,
) -> Result<Json<PageView<HostView>>, ApiError> {
    let page = page_of(&app.state.limits, q.cursor.clone(), q.limit)?;
    let store = app.state.store.as_ref();
    let org = match &q.org {
        Some(o) => Some(
            find_org(store, o)
                .await
                .map_err(|e| as_query_error("org", e))?,
        ),
        None => None,
    };
    let env = match &q.env {
        Some(e) => Some(env_filter(store, org.as_ref(), e).await?),
        None => None,
    };
    let outside = || ApiError::forbidden("this token's scope does not cover that filter");
    let mut filter = HostFilter {
        org: org.as_ref().map(|o| o.id),
        env: env.as_ref().map(|e| e.id),
        ..Default::default()
    };
    match caller.scope() {
        Scope::Global => {}
        Scope::Org { org: o } => {
            if filter.org.is_some_and(|x| x != o) || env.as_ref().is_some_and(|e| e.org != o) {
                return Err(outside());
            }
            filter.org = Some(o);
        }
        Scope::Env { org: o, env: e } => {
            if filter.org.is_some_and(|x| x != o) || filter.env.is_some_and(|x| x != e) {
                return Err(outside());
            }
            filter.org = Some(o);
            filter.env = Some(e);
        }
    }
    if let (Some(o), Some(e)) = (&org, &env) {
        if e.org != o.id {
            return Err(ApiError::bad_request(
                "invalid-query",
                "that environment is not in that organization",
            )
            .field("env"));
        }
    }
    filter.label = q
        .label
        .as_deref()
        .map(|s| key_value("label", s))
        .transpose()?;
    filter.fact = q
        .fact
        .as_deref()
        .map(|s| key_value("fact", s))
        .transpose()?;
    filter.online = q.online;
    let paged = store.list_hosts(&filter, &page).await?;
    Ok(Json(PageView {
        items: paged.items.into_iter().map(HostView::from).collect(),
        next: paged.next,
    }))
}

/// One host and what its node knows of it now (online, last seen, a facts summary, drift
/// count). The `ETag` is the host's version, for `If-Match` on `PATCH`.
#[utoipa::path(get, path = "/api/v1/hosts/{id}", tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "Host id")),
    responses((status = 200, description = "The host", body = HostDetail,
        headers(("ETag" = String, description = "\"v<version>\"")))))]
pub async fn get_host(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Response, ApiError> {
    let host = res.host()?.clone();
    let runtime = app.state.store.get_runtime(host.id).await?;
    let tag = etag(host.version);
    let body = HostDetail {
        host: HostView::from(host),
        runtime: RuntimeView::of(runtime),
    };
    Ok(([(header::ETAG, tag)], Json(body)).into_response())
}

/// The versions an `If-Match` header lists (`"v3"`, `"v3", "v4"`). `*` is refused: the point of
/// requiring the header is that the client says which version it changes.
fn if_match(headers: &HeaderMap) -> Result<Vec<u64>, ApiError> {
    let required = |detail: &str| {
        ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition-required",
            detail.to_owned(),
        )
        .field("If-Match")
    };
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Err(required(
            "send If-Match with the ETag of GET /api/v1/hosts/{id}",
        ));
    };
    let v = v
        .to_str()
        .map_err(|_| required("If-Match is not ASCII"))?
        .trim();
    if v == "*" {
        return Err(required("If-Match must name the version you change, not *"));
    }
    Ok(v.split(',')
        .filter_map(|t| {
            t.trim()
                .strip_prefix("\"v")
                .and_then(|t| t.strip_suffix('"'))
                .and_then(|n| n.parse().ok())
        })
        .collect())
}

fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(
            ApiError::unprocessable(format!("at most {MAX_LABELS} labels")).field("labels"),
        );
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.starts_with(|c: char| c.is_ascii_alphanumeric())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
        if !key_ok {
            return Err(ApiError::unprocessable(format!(
                "label key must match [A-Za-z0-9][A-Za-z0-9._/-]{{0,62}}: {k:?}"
            ))
            .field("labels"));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(ApiError::unprocessable(format!(
                "label {k:?}: value longer than 255 bytes or with control characters"
            ))
            .field("labels"));
        }
    }
    Ok(())
}

/// Renames a host and sets or removes labels (a merge patch: `"labels": {"a": "1", "b": null}`
/// sets `a`, removes `b`, keeps the others). Requires `If-Match` with the host's `ETag` (428
/// without it, 412 when the host changed since).
#[utoipa::path(patch, path = "/api/v1/hosts/{id}", tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("If-Match" = String, Header, description = "The ETag of GET /api/v1/hosts/{id}")),
    request_body(content = PatchHost, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, description = "The updated host", body = HostView,
            headers(("ETag" = String, description = "\"v<version>\""))),
        (status = 412, description = "The host changed since that ETag", body = crate::problem::Problem, content_type = "application/problem+json"),
        (status = 428, description = "If-Match missing", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn patch_host(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
    headers: HeaderMap,
    Json(patch): Json<PatchHost>,
) -> Result<Response, ApiError> {
    let current = res.host()?;
    let versions = if_match(&headers)?;
    if !versions.contains(&current.version) {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            format!(
                "the host is at version {}; read it again and retry",
                current.version
            ),
        )
        .header(header::ETAG, etag(current.version)));
    }
    let mut host: Host = current.clone();
    if let Some(name) = patch.name {
        if name.is_empty() || name.len() > 253 || name.chars().any(char::is_control) {
            return Err(ApiError::unprocessable(
                "name must be 1 to 253 bytes without control characters",
            )
            .field("name"));
        }
        host.name = name;
    }
    if let Some(labels) = patch.labels {
        for (k, v) in labels {
            match v {
                Some(v) => host.labels.insert(k, v),
                None => host.labels.remove(&k),
            };
        }
        check_labels(&host.labels)?;
    }
    let updated = app.state.store.update_host(&host, current.version).await?;
    let tag = etag(updated.version);
    Ok(([(header::ETAG, tag)], Json(HostView::from(updated))).into_response())
}

/// Revokes a host: deletes its broker user (which closes its connections), its queue and its
/// records. The agent can no longer connect; enrolling again makes a new host.
#[utoipa::path(delete, path = "/api/v1/hosts/{id}", tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "Host id")),
    responses((status = 204, description = "Revoked")))]
pub async fn delete_host(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Response, ApiError> {
    let host = res.host()?.id;
    app.state.lifecycle.revoke(host).await?;
    app.state.ops.forget(host).await;
    Ok(no_content())
}

/// The facts the agent last reported.
#[utoipa::path(get, path = "/api/v1/hosts/{id}/facts", tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "Host id")),
    responses((status = 200, description = "The host's facts", body = FactsView)))]
pub async fn get_facts(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Json<FactsView>, ApiError> {
    let host = res.host()?.id;
    let rt = app.state.store.get_runtime(host).await?;
    let (facts, updated_at) = match rt {
        Some(rt) => (
            rt.facts
                .map(|f| serde_json::to_value(f).unwrap_or_default()),
            Some(rt.updated_at),
        ),
        None => (None, None),
    };
    Ok(Json(FactsView {
        host: host.0,
        facts,
        updated_at,
    }))
}

/// The host's compliance: which monitored resources drift from their baseline, and how.
#[utoipa::path(get, path = "/api/v1/hosts/{id}/compliance", tag = "hosts",
    params(("id" = uuid::Uuid, Path, description = "Host id")),
    responses((status = 200, description = "The drift list", body = ComplianceView)))]
pub async fn get_compliance(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Json<ComplianceView>, ApiError> {
    let host = res.host()?.id;
    let rt = app.state.store.get_runtime(host).await?;
    let (drift, updated_at) = match rt {
        Some(rt) => (rt.drift, Some(rt.updated_at)),
        None => (Vec::new(), None),
    };
    let mut drift: Vec<serde_json::Value> = drift
        .iter()
        .map(|d| serde_json::to_value(d).unwrap_or_default())
        .collect();
    drift.iter_mut().for_each(crate::views::redact);
    Ok(Json(ComplianceView {
        host: host.0,
        compliant: drift.is_empty(),
        drift_count: drift.len(),
        drift,
        updated_at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn if_match_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(
            if_match(&h).unwrap_err().status,
            StatusCode::PRECONDITION_REQUIRED
        );
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(
            if_match(&h).unwrap_err().status,
            StatusCode::PRECONDITION_REQUIRED
        );
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"v3\", \"v4\""));
        assert_eq!(if_match(&h).unwrap(), vec![3, 4]);
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"v3\""));
        assert!(if_match(&h).unwrap().is_empty());
    }
}
