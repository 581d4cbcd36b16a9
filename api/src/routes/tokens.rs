//! Enrollment tokens (what an agent presents to join an environment), API tokens (what clients
//! present to this API) and the audit log.
//!
//! A token's secret is returned once, in the response that creates it; the store keeps only its
//! sha256, so a lost secret cannot be recovered, only replaced.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use chrono::{Duration as ChronoDuration, Utc};
use comodit_store::{ApiToken, EnrollmentToken, EnvId, OrgId, Role, Scope, TokenId};
use serde::Deserialize;

use crate::auth::{hash_token, new_secret, parse_uuid, Caller, Resolved};
use crate::problem::{no_content, ApiError};
use crate::routes::{created, page};
use crate::views::{
    ApiTokenView, AuditView, CreateApiToken, CreateEnrollmentToken, CreatedApiToken,
    CreatedEnrollmentToken, EnrollmentTokenView, PageQuery, PageView, ScopeView,
};
use crate::Shared;

/// Default lifetime of an enrollment token.
pub const DEFAULT_ENROLLMENT_TTL_S: u64 = 3600;
/// Longest lifetime of an enrollment token (30 days).
pub const MAX_ENROLLMENT_TTL_S: u64 = 30 * 24 * 3600;
/// Longest enrollment token description.
pub const MAX_DESCRIPTION_BYTES: usize = 256;

/// Prefix of enrollment token secrets.
pub const ENROLLMENT_SECRET_PREFIX: &str = "cme_";
/// Prefix of API token secrets.
pub const API_SECRET_PREFIX: &str = "cma_";

#[derive(Debug, Deserialize)]
pub struct IdPath {
    id: String,
}

/// Creates an enrollment token for an environment. The secret is in this response only.
#[utoipa::path(post, path = "/api/v1/orgs/{org}/envs/{env}/enrollment-tokens", tag = "enrollment",
    params(("org" = String, Path, description = "Organization id or name"),
        ("env" = String, Path, description = "Environment id or name")),
    request_body = CreateEnrollmentToken,
    responses((status = 201, description = "The token and its secret (shown once)", body = CreatedEnrollmentToken)))]
pub async fn create_enrollment_token(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Json(body): Json<CreateEnrollmentToken>,
) -> Result<Response, ApiError> {
    let env = res.env()?;
    let ttl = body.expires_in_s.unwrap_or(DEFAULT_ENROLLMENT_TTL_S);
    if ttl == 0 || ttl > MAX_ENROLLMENT_TTL_S {
        return Err(ApiError::unprocessable(format!(
            "expires_in_s must be 1..={MAX_ENROLLMENT_TTL_S}"
        ))
        .field("expires_in_s"));
    }
    if body.max_uses == Some(0) {
        return Err(ApiError::unprocessable("max_uses must be at least 1").field("max_uses"));
    }
    let description = body.description.unwrap_or_default();
    if description.len() > MAX_DESCRIPTION_BYTES || description.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(format!(
            "description: at most {MAX_DESCRIPTION_BYTES} bytes, no control characters"
        ))
        .field("description"));
    }
    let secret = new_secret(ENROLLMENT_SECRET_PREFIX);
    let now = Utc::now();
    let token = EnrollmentToken {
        id: TokenId::random(),
        org: env.org,
        env: env.id,
        description,
        secret_sha256: hash_token(&secret),
        expires_at: now + ChronoDuration::seconds(ttl as i64),
        max_uses: body.max_uses,
        uses: 0,
        revoked: false,
        created_at: now,
        created_by: caller.name().to_owned(),
    };
    app.state.store.create_enrollment_token(&token).await?;
    let location = format!("/api/v1/orgs/{}/enrollment-tokens", env.org);
    Ok(created(
        location,
        CreatedEnrollmentToken {
            token: EnrollmentTokenView::from(token),
            secret,
        },
    ))
}

/// The enrollment tokens of an organization, newest first (no secrets). An environment-scoped
/// token sees only its environment's tokens (so a page may hold fewer than `limit`).
#[utoipa::path(get, path = "/api/v1/orgs/{org}/enrollment-tokens", tag = "enrollment",
    params(("org" = String, Path, description = "Organization id or name"), PageQuery),
    responses((status = 200, description = "A page of enrollment tokens", body = PageView<EnrollmentTokenView>)))]
pub async fn list_enrollment_tokens(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<EnrollmentTokenView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let org = res.org()?;
    let paged = app
        .state
        .store
        .list_enrollment_tokens(org.id, &page)
        .await?;
    let only_env = match caller.scope() {
        Scope::Env { env, .. } => Some(env),
        _ => None,
    };
    Ok(Json(PageView {
        items: paged
            .items
            .into_iter()
            .filter(|t| only_env.is_none_or(|e| t.env == e))
            .map(EnrollmentTokenView::from)
            .collect(),
        next: paged.next,
    }))
}

/// Revokes an enrollment token: it can no longer enroll hosts (enrolled hosts stay).
#[utoipa::path(delete, path = "/api/v1/enrollment-tokens/{id}", tag = "enrollment",
    params(("id" = uuid::Uuid, Path, description = "Enrollment token id")),
    responses((status = 204, description = "Revoked")))]
pub async fn revoke_enrollment_token(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Response, ApiError> {
    let token = res
        .enrollment_token
        .as_ref()
        .ok_or_else(|| ApiError::internal("route without a resolved enrollment token"))?;
    app.state.store.revoke_enrollment_token(token.id).await?;
    Ok(no_content())
}

fn check_token_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable("name must match [A-Za-z0-9._@-]{1,64}").field("name"))
    }
}

/// Creates an API token (admin). The secret is in this response only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateApiToken,
    responses((status = 201, description = "The token and its secret (shown once)", body = CreatedApiToken)))]
pub async fn create_api_token(
    State(app): State<Arc<Shared>>,
    Json(body): Json<CreateApiToken>,
) -> Result<Response, ApiError> {
    check_token_name(&body.name)?;
    let store = &app.state.store;
    let role: Role = body.role.into();
    let scope = match body.scope {
        ScopeView::Global {} => Scope::Global,
        ScopeView::Org { org } => {
            let org = OrgId(org);
            store.get_org(org).await?.ok_or_else(|| {
                ApiError::unprocessable(format!("no such organization: {org}")).field("scope.org")
            })?;
            Scope::Org { org }
        }
        ScopeView::Env { org, env } => {
            let (org, env) = (OrgId(org), EnvId(env));
            match store.get_env(env).await? {
                Some(e) if e.org == org => Scope::Env { org, env },
                _ => {
                    return Err(ApiError::unprocessable(format!(
                        "no environment {env} in organization {org}"
                    ))
                    .field("scope.env"))
                }
            }
        }
    };
    if role == Role::Admin && scope != Scope::Global {
        return Err(
            ApiError::unprocessable("an admin token's scope must be global").field("scope"),
        );
    }
    let secret = new_secret(API_SECRET_PREFIX);
    let token = ApiToken {
        id: TokenId::random(),
        name: body.name,
        secret_sha256: hash_token(&secret),
        role,
        scope,
        revoked: false,
        created_at: Utc::now(),
    };
    store.create_api_token(&token).await?;
    Ok(created(
        "/api/v1/tokens".to_owned(),
        CreatedApiToken {
            token: ApiTokenView::from(token),
            secret,
        },
    ))
}

/// The API tokens (admin; no secrets).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", params(PageQuery),
    responses((status = 200, description = "A page of API tokens", body = PageView<ApiTokenView>)))]
pub async fn list_api_tokens(
    State(app): State<Arc<Shared>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<ApiTokenView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let paged = app.state.store.list_api_tokens(&page).await?;
    Ok(Json(PageView {
        items: paged.items.into_iter().map(ApiTokenView::from).collect(),
        next: paged.next,
    }))
}

/// Revokes an API token (admin). Requests with it are refused from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = uuid::Uuid, Path, description = "API token id")),
    responses((status = 204, description = "Revoked")))]
pub async fn revoke_api_token(
    State(app): State<Arc<Shared>>,
    Path(p): Path<IdPath>,
) -> Result<Response, ApiError> {
    let id = TokenId(parse_uuid("id", &p.id)?);
    app.state.store.revoke_api_token(id).await?;
    Ok(no_content())
}

/// The audit log, newest first (admin): every mutation through this API, who asked, and how it
/// ended.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(PageQuery),
    responses((status = 200, description = "A page of audit entries", body = PageView<AuditView>)))]
pub async fn list_audit(
    State(app): State<Arc<Shared>>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<AuditView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let paged = app.state.store.list_audit(&page).await?;
    Ok(Json(PageView {
        items: paged.items.into_iter().map(AuditView::from).collect(),
        next: paged.next,
    }))
}
