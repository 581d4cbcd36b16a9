//! The agent's collections, RESTfully, through the host's actor.
//!
//! | request | command sent to the agent |
//! |---|---|
//! | `GET /hosts/{id}/resources/{collection}` | `list` (`under` = the directory, for path collections) |
//! | `GET /hosts/{id}/resources/{collection}/{resource_id}` | `read` |
//! | `PUT /hosts/{id}/resources/{collection}/{resource_id}` | `apply` of that one resource |
//! | `DELETE /hosts/{id}/resources/{collection}/{resource_id}` | `remove` of that one resource |
//! | `POST /hosts/{id}/run` | `run` |
//!
//! **Resource ids with slashes.** The route's last segment takes the rest of the path, so a path
//! id is written without its leading slash: `/hosts/{id}/resources/files/etc/motd` is the file
//! `/etc/motd`. Other collections' ids cannot contain slashes (`.../packages/nginx`). Every id is
//! validated for its collection (absolute, normalized paths: no `..`, no `//`) and every spec
//! against its collection's schema *before* anything is submitted: a bad request changes nothing.
//!
//! **Waiting.** The API waits for the agent's reply up to `wait_s` seconds (default 10, at most
//! 60): with the reply, the answer is `200` and the change with its `result`; without it, `202
//! Accepted` with a `Location` to follow the change. `async=true` does not wait at all.
//!
//! **Failures of the agent are 200.** When the agent answered, the HTTP request succeeded: the
//! change was recorded and has an outcome. The agent's verdict is `result.status` (`ok`, `failed`,
//! `rejected`, `expired`) with per-resource errors in `result.results`. A 4xx means the API refused
//! the request and nothing was sent; a failed apply may have changed part of the host (it stops at
//! the first failing resource), which a 4xx would misrepresent.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use comodit_protocol::ids::validate_abs_path;
use comodit_protocol::{ApplyMode, Body, Collection, Resource, ResourceRef, RunSpec, Spec};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{Caller, Resolved};
use crate::idempotency::IdempotencyKey;
use crate::problem::ApiError;
use crate::routes::{submit, wait_of};
use crate::views::{ChangeView, PutResource, RunBody};
use crate::Shared;

/// Default `timeout_s` of a run.
pub const DEFAULT_RUN_TIMEOUT_S: u64 = 60;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The directory to list, for files, directories and symlinks (required for them, refused for
    /// other collections).
    pub under: Option<String>,
    /// Don't wait for the agent: answer 202 as soon as the change is recorded.
    #[serde(default, rename = "async")]
    #[param(rename = "async")]
    pub asynchronous: bool,
    /// Seconds to wait for the agent's reply (default 10, at most 60).
    pub wait_s: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Don't wait for the agent: answer 202 as soon as the change is recorded.
    #[serde(default, rename = "async")]
    #[param(rename = "async")]
    pub asynchronous: bool,
    /// Seconds to wait for the agent's reply (default 10, at most 60).
    pub wait_s: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WriteQuery {
    /// Compute what would change and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Don't wait for the agent: answer 202 as soon as the change is recorded.
    #[serde(default, rename = "async")]
    #[param(rename = "async")]
    pub asynchronous: bool,
    /// Seconds to wait for the agent's reply (default 10, at most 60).
    pub wait_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct CollectionPath {
    collection: String,
}

#[derive(Debug, Deserialize)]
pub struct ResourcePath {
    collection: String,
    resource_id: String,
}

fn collection(s: &str) -> Result<Collection, ApiError> {
    s.parse::<Collection>().map_err(|_| {
        let names: Vec<&str> = Collection::ALL.iter().map(|c| c.as_str()).collect();
        ApiError::invalid_id(
            "collection",
            format!("unknown collection {s:?} (one of {})", names.join(", ")),
        )
    })
}

/// The resource a path names: the tail of the path is the id, with its leading slash given back
/// for path collections.
fn resource_ref(p: &ResourcePath) -> Result<ResourceRef, ApiError> {
    let c = collection(&p.collection)?;
    let id = if c.is_path() {
        format!("/{}", p.resource_id)
    } else {
        p.resource_id.clone()
    };
    ResourceRef::new(c, &id).map_err(|e| {
        let hint = if c.is_path() {
            " (write the path without its leading '/': .../resources/files/etc/motd)"
        } else {
            ""
        };
        ApiError::invalid_id("resource_id", format!("{e}{hint}"))
    })
}

fn mode(dry_run: bool) -> ApplyMode {
    if dry_run {
        ApplyMode::DryRun
    } else {
        ApplyMode::Enforce
    }
}

/// Lists the ids of a collection on the host (`under` = the directory for path collections).
#[utoipa::path(get, path = "/api/v1/hosts/{id}/resources/{collection}", tag = "resources",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("collection" = String, Path, description = "files, directories, symlinks, packages, repos, services, users or groups"),
        ListQuery),
    responses(
        (status = 200, description = "The agent answered; ids in `result.data.ids`", body = ChangeView),
        (status = 202, description = "Recorded, not answered yet: follow the change at Location", body = ChangeView,
            headers(("Location" = String, description = "/api/v1/hosts/{id}/changes/{change}"))),
    ))]
pub async fn list_resources(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<CollectionPath>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let host = res.host()?.id;
    let c = collection(&p.collection)?;
    match (c.is_path(), &q.under) {
        (true, Some(u)) => validate_abs_path("under", u)
            .map_err(|e| ApiError::from_protocol(StatusCode::BAD_REQUEST, &e))?,
        (true, None) => {
            return Err(ApiError::bad_request(
                "invalid-query",
                format!("listing {c} needs under=<absolute directory>"),
            )
            .field("under"))
        }
        (false, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid-query",
                format!("{c} is not a path collection: drop under"),
            )
            .field("under"))
        }
        (false, None) => {}
    }
    let wait = wait_of(&app.state.limits, q.asynchronous, q.wait_s)?;
    let body = Body::List {
        collection: c,
        under: q.under,
    };
    submit(&app, &caller, host, body, wait, None).await
}

/// Reads the actual state of one resource, in its spec's shape (`ensure: absent` when it does
/// not exist). For files, directories and symlinks `resource_id` is the path without its leading
/// slash and may contain slashes: `.../resources/files/etc/motd` reads `/etc/motd`.
#[utoipa::path(get, path = "/api/v1/hosts/{id}/resources/{collection}/{resource_id}", tag = "resources",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("collection" = String, Path, description = "files, directories, symlinks, packages, repos, services, users or groups"),
        ("resource_id" = String, Path, description = "The resource id. For path collections, the absolute path without its leading '/'; the route takes the rest of the URL path, slashes included"),
        WaitQuery),
    responses(
        (status = 200, description = "The agent answered; the state in `result.data.state`", body = ChangeView),
        (status = 202, description = "Recorded, not answered yet: follow the change at Location", body = ChangeView,
            headers(("Location" = String, description = "/api/v1/hosts/{id}/changes/{change}"))),
    ))]
pub async fn get_resource(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<ResourcePath>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let host = res.host()?.id;
    let r#ref = resource_ref(&p)?;
    let wait = wait_of(&app.state.limits, q.asynchronous, q.wait_s)?;
    submit(&app, &caller, host, Body::Read { r#ref }, wait, None).await
}

/// Applies the desired state of one resource (an `apply` of that resource alone). The body is
/// the spec plus optional `policy`, `notify` and `monitor`. `dry_run=true` reports the diff and
/// changes nothing.
#[utoipa::path(put, path = "/api/v1/hosts/{id}/resources/{collection}/{resource_id}", tag = "resources",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("collection" = String, Path, description = "files, directories, symlinks, packages, repos, services, users or groups"),
        ("resource_id" = String, Path, description = "The resource id. For path collections, the absolute path without its leading '/'; the route takes the rest of the URL path, slashes included"),
        WriteQuery),
    request_body = PutResource,
    responses(
        (status = 200, description = "The agent answered: `result.status` is ok or failed, `result.results[0].diff` what changed", body = ChangeView),
        (status = 202, description = "Recorded, not answered yet: follow the change at Location", body = ChangeView,
            headers(("Location" = String, description = "/api/v1/hosts/{id}/changes/{change}"))),
    ))]
pub async fn put_resource(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<ResourcePath>,
    Query(q): Query<WriteQuery>,
    Json(body): Json<PutResource>,
) -> Result<Response, ApiError> {
    let host = res.host()?.id;
    let r#ref = resource_ref(&p)?;
    let c = r#ref.collection;
    let spec = Spec::from_json(c, body.spec)
        .map_err(|e| ApiError::from_protocol(StatusCode::UNPROCESSABLE_ENTITY, &e))?;
    let mut resource = Resource::new(c, r#ref.id.as_str(), spec)
        .map_err(|e| ApiError::from_protocol(StatusCode::UNPROCESSABLE_ENTITY, &e))?;
    comodit_protocol::validate_notify(&body.notify)
        .map_err(|e| ApiError::from_protocol(StatusCode::UNPROCESSABLE_ENTITY, &e))?;
    resource.policy = body.policy.unwrap_or_default();
    resource.notify = body.notify;
    let wait = wait_of(&app.state.limits, q.asynchronous, q.wait_s)?;
    let cmd = Body::Apply {
        mode: mode(q.dry_run),
        monitor: body.monitor.unwrap_or(true),
        resources: vec![resource],
    };
    submit(&app, &caller, host, cmd, wait, None).await
}

/// Makes one resource absent (deletes the file, uninstalls the package, ...) and drops it from
/// the monitored baseline. `dry_run=true` reports what would change and changes nothing.
#[utoipa::path(delete, path = "/api/v1/hosts/{id}/resources/{collection}/{resource_id}", tag = "resources",
    params(("id" = uuid::Uuid, Path, description = "Host id"),
        ("collection" = String, Path, description = "files, directories, symlinks, packages, repos, services, users or groups"),
        ("resource_id" = String, Path, description = "The resource id. For path collections, the absolute path without its leading '/'; the route takes the rest of the URL path, slashes included"),
        WriteQuery),
    responses(
        (status = 200, description = "The agent answered", body = ChangeView),
        (status = 202, description = "Recorded, not answered yet: follow the change at Location", body = ChangeView,
            headers(("Location" = String, description = "/api/v1/hosts/{id}/changes/{change}"))),
    ))]
pub async fn delete_resource(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    Path(p): Path<ResourcePath>,
    Query(q): Query<WriteQuery>,
) -> Result<Response, ApiError> {
    let host = res.host()?.id;
    let r#ref = resource_ref(&p)?;
    let wait = wait_of(&app.state.limits, q.asynchronous, q.wait_s)?;
    let cmd = Body::Remove {
        mode: mode(q.dry_run),
        refs: vec![r#ref],
    };
    submit(&app, &caller, host, cmd, wait, None).await
}

/// Runs a program on the host (argv, never a shell unless argv names one). The output is in
/// `result.data` (`exit_code`, `stdout`, `stderr`, `timed_out`, `truncated`, `duration_ms`).
#[utoipa::path(post, path = "/api/v1/hosts/{id}/run", tag = "resources",
    params(("id" = uuid::Uuid, Path, description = "Host id"), WaitQuery),
    request_body = RunBody,
    responses(
        (status = 200, description = "The agent answered; the output in `result.data`", body = ChangeView),
        (status = 202, description = "Recorded, not answered yet: follow the change at Location", body = ChangeView,
            headers(("Location" = String, description = "/api/v1/hosts/{id}/changes/{change}"))),
    ))]
pub async fn run_command(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Extension(res): Extension<Resolved>,
    key: Option<Extension<IdempotencyKey>>,
    Query(q): Query<WaitQuery>,
    Json(body): Json<RunBody>,
) -> Result<Response, ApiError> {
    let host = res.host()?.id;
    let spec = RunSpec {
        argv: body.argv,
        env: body.env,
        cwd: body.cwd,
        timeout_s: body.timeout_s.unwrap_or(DEFAULT_RUN_TIMEOUT_S),
        stream: body.stream,
    };
    spec.validate()
        .map_err(|e| ApiError::from_protocol(StatusCode::UNPROCESSABLE_ENTITY, &e))?;
    let wait = wait_of(&app.state.limits, q.asynchronous, q.wait_s)?;
    let key = key.as_ref().map(|Extension(k)| k);
    submit(&app, &caller, host, Body::Run(spec), wait, key).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(c: &str, id: &str) -> ResourcePath {
        ResourcePath {
            collection: c.into(),
            resource_id: id.into(),
        }
    }

    #[test]
    fn path_tails_become_ids() {
        let r = resource_ref(&rp("files", "etc/motd")).unwrap();
        assert_eq!(r.id.as_str(), "/etc/motd");
        let r = resource_ref(&rp("packages", "nginx")).unwrap();
        assert_eq!(r.id.as_str(), "nginx");
        for (c, id) in [
            ("files", "etc/../shadow"),
            ("files", "/etc/motd"),
            ("files", "etc/"),
            ("packages", "a/b"),
            ("bogus", "x"),
        ] {
            let e = resource_ref(&rp(c, id)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{c} {id}");
        }
    }
}
