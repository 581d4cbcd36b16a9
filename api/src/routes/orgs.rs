//! Organizations and their environments.
//!
//! `{org}` and `{env}` in paths accept an id (uuid) or a name: a segment that parses as a uuid is
//! looked up as an id, anything else as a name. Names shaped like uuids are refused at creation,
//! so the two readings never collide.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use chrono::Utc;
use comodit_store::{EnvId, Environment, OrgId, Organization, Paged, Scope};

use crate::auth::{check_name, Caller, Resolved};
use crate::problem::{no_content, ApiError};
use crate::routes::{created, page};
use crate::views::{CreateNamed, EnvView, OrgView, PageQuery, PageView};
use crate::Shared;

/// Organizations by name. Tokens scoped to an organization or environment see only theirs.
#[utoipa::path(get, path = "/api/v1/orgs", tag = "organizations", params(PageQuery),
    responses((status = 200, description = "A page of organizations", body = PageView<OrgView>)))]
pub async fn list_orgs(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<OrgView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let store = &app.state.store;
    let paged: Paged<Organization> = match caller.scope() {
        Scope::Global => store.list_orgs(&page).await?,
        Scope::Org { org } | Scope::Env { org, .. } => Paged {
            items: store.get_org(org).await?.into_iter().collect(),
            next: None,
        },
    };
    Ok(Json(PageView {
        items: paged.items.into_iter().map(OrgView::from).collect(),
        next: paged.next,
    }))
}

/// Creates an organization (admin).
#[utoipa::path(post, path = "/api/v1/orgs", tag = "organizations", request_body = CreateNamed,
    responses(
        (status = 201, description = "Created", body = OrgView),
        (status = 409, description = "The name is taken", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_org(
    State(app): State<Arc<Shared>>,
    Json(body): Json<CreateNamed>,
) -> Result<Response, ApiError> {
    check_name("organization", &body.name).map_err(|e| ApiError::unprocessable(e).field("name"))?;
    let org = Organization {
        id: OrgId::random(),
        name: body.name,
        created_at: Utc::now(),
        version: 1,
    };
    app.state.store.create_org(&org).await?;
    Ok(created(
        format!("/api/v1/orgs/{}", org.id),
        OrgView::from(org),
    ))
}

/// One organization, by id or name.
#[utoipa::path(get, path = "/api/v1/orgs/{org}", tag = "organizations",
    params(("org" = String, Path, description = "Organization id or name")),
    responses((status = 200, description = "The organization", body = OrgView)))]
pub async fn get_org(Extension(res): Extension<Resolved>) -> Result<Json<OrgView>, ApiError> {
    Ok(Json(OrgView::from(res.org()?.clone())))
}

/// Deletes an organization that has no environment left (admin).
#[utoipa::path(delete, path = "/api/v1/orgs/{org}", tag = "organizations",
    params(("org" = String, Path, description = "Organization id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "It still has environments", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_org(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Response, ApiError> {
    app.state.store.delete_org(res.org()?.id).await?;
    Ok(no_content())
}

/// The environments of an organization, by name. An environment-scoped token sees only its own.
#[utoipa::path(get, path = "/api/v1/orgs/{org}/envs", tag = "environments",
    params(("org" = String, Path, description = "Organization id or name"), PageQuery),
    responses((status = 200, description = "A page of environments", body = PageView<EnvView>)))]
pub async fn list_envs(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Query(q): Query<PageQuery>,
) -> Result<Json<PageView<EnvView>>, ApiError> {
    let page = page(&app.state.limits, &q)?;
    let org = res.org()?;
    let store = &app.state.store;
    let paged: Paged<Environment> = match caller.scope() {
        Scope::Env { env, .. } => Paged {
            items: store
                .get_env(env)
                .await?
                .into_iter()
                .filter(|e| e.org == org.id)
                .collect(),
            next: None,
        },
        _ => store.list_envs(org.id, &page).await?,
    };
    Ok(Json(PageView {
        items: paged.items.into_iter().map(EnvView::from).collect(),
        next: paged.next,
    }))
}

/// Creates an environment (admin, or an operator of the organization).
#[utoipa::path(post, path = "/api/v1/orgs/{org}/envs", tag = "environments",
    request_body = CreateNamed,
    params(("org" = String, Path, description = "Organization id or name")),
    responses(
        (status = 201, description = "Created", body = EnvView),
        (status = 409, description = "The name is taken in this organization", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_env(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
    Json(body): Json<CreateNamed>,
) -> Result<Response, ApiError> {
    let org = res.org()?;
    check_name("environment", &body.name).map_err(|e| ApiError::unprocessable(e).field("name"))?;
    let env = Environment {
        id: EnvId::random(),
        org: org.id,
        name: body.name,
        created_at: Utc::now(),
        version: 1,
    };
    app.state.store.create_env(&env).await?;
    Ok(created(
        format!("/api/v1/orgs/{}/envs/{}", org.id, env.id),
        EnvView::from(env),
    ))
}

/// One environment, by id or name.
#[utoipa::path(get, path = "/api/v1/orgs/{org}/envs/{env}", tag = "environments",
    params(("org" = String, Path, description = "Organization id or name"),
        ("env" = String, Path, description = "Environment id or name")),
    responses((status = 200, description = "The environment", body = EnvView)))]
pub async fn get_env(Extension(res): Extension<Resolved>) -> Result<Json<EnvView>, ApiError> {
    Ok(Json(EnvView::from(res.env()?.clone())))
}

/// Deletes an environment that has no host left.
#[utoipa::path(delete, path = "/api/v1/orgs/{org}/envs/{env}", tag = "environments",
    params(("org" = String, Path, description = "Organization id or name"),
        ("env" = String, Path, description = "Environment id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "It still has hosts", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_env(
    State(app): State<Arc<Shared>>,
    Extension(res): Extension<Resolved>,
) -> Result<Response, ApiError> {
    app.state.store.delete_env(res.env()?.id).await?;
    Ok(no_content())
}
