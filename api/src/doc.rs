//! The OpenAPI document, and the router built from it.
//!
//! The document is generated from the handlers' `#[utoipa::path]` attributes. The router is then
//! built by walking the document: each operation's `operationId` (the handler's name) is looked up
//! in [`endpoint`]. So a handler is reachable only if it is documented, and a documented operation
//! without a handler fails router construction (every test notices).
//!
//! After generation, [`finish`] adds what is the same for every operation rather than repeating
//! it in each attribute: the bearer security scheme (public routes get an empty `security` list),
//! the `Idempotency-Key` header on POSTs, and the problem responses every secured route can give.

use axum::routing::{on, MethodFilter, MethodRouter};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, ResponseBuilder};
use utoipa::OpenApi;

use crate::routes::{changes, events, hosts, jobs, orgs, resources, system, tokens};
use crate::{Shared, PUBLIC_PATHS};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "comodit",
        description = "The REST API of a comodit node: organizations, environments, hosts, their \
            resources through the agents, change logs, tokens, audit and events. Errors are \
            application/problem+json (RFC 9457). Listings use cursor pagination (`cursor`, \
            `limit`; the response's `next`). `{org}` and `{env}` in paths take an id or a name. \
            Requests to a host's resources wait for the agent up to `wait_s`: 200 with the \
            change and its `result` when the agent answered — also when the agent reports \
            `failed` (see `result.status`) — or 202 with a `Location` to follow the change."
    ),
    paths(
        system::healthz, system::readyz, system::metrics, system::openapi_json,
        orgs::list_orgs, orgs::create_org, orgs::get_org, orgs::delete_org,
        orgs::list_envs, orgs::create_env, orgs::get_env, orgs::delete_env,
        hosts::list_hosts, hosts::get_host, hosts::patch_host, hosts::delete_host,
        hosts::get_facts, hosts::get_compliance,
        resources::list_resources, resources::get_resource, resources::put_resource,
        resources::delete_resource, resources::run_command,
        changes::list_changes, changes::get_change, changes::cancel_change,
        jobs::create_job, jobs::create_env_job, jobs::list_jobs, jobs::get_job, jobs::list_job_hosts,
        jobs::cancel_job,
        tokens::create_enrollment_token, tokens::list_enrollment_tokens,
        tokens::revoke_enrollment_token, tokens::create_api_token, tokens::list_api_tokens,
        tokens::revoke_api_token, tokens::list_audit,
        events::events,
        system::get_cluster, system::get_cluster_shards, system::join_node,
        system::decommission_node,
    ),
    components(schemas(crate::problem::Problem)),
    tags(
        (name = "organizations"), (name = "environments"), (name = "hosts"),
        (name = "resources", description = "The agent's collections, through the host's actor"),
        (name = "changes"),
        (name = "jobs", description = "One command to many hosts: a target, and each host's change"),
        (name = "enrollment"), (name = "tokens"), (name = "audit"),
        (name = "events"),
        (name = "cluster", description = "The control plane: members, leader, shard owners"),
        (name = "system", description = "Public: no token needed"),
    )
)]
struct ApiDoc;

const BEARER: &str = "bearer";

/// The document as served at `/api/v1/openapi.json`.
pub(crate) fn build() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    finish(&mut doc);
    doc
}

fn operations_mut(item: &mut PathItem) -> Vec<(&'static str, &mut Operation)> {
    let mut out = Vec::new();
    for (name, op) in [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("patch", &mut item.patch),
        ("head", &mut item.head),
        ("options", &mut item.options),
        ("trace", &mut item.trace),
    ] {
        if let Some(op) = op.as_mut() {
            out.push((name, op));
        }
    }
    out
}

/// `(path, method, operation id)` of every operation in the document.
pub(crate) fn operations(doc: &utoipa::openapi::OpenApi) -> Vec<(String, &'static str, String)> {
    let mut out = Vec::new();
    for (path, item) in doc.paths.paths.iter() {
        let mut item = item.clone();
        for (method, op) in operations_mut(&mut item) {
            out.push((
                path.clone(),
                method,
                op.operation_id.clone().unwrap_or_default(),
            ));
        }
    }
    out
}

fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                crate::problem::PROBLEM_JSON,
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

fn finish(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API token secret: `Authorization: Bearer <secret>`",
                ))
                .build(),
        ),
    );
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);

    for (path, item) in doc.paths.paths.iter_mut() {
        let public = PUBLIC_PATHS.contains(&path.as_str());
        let has_params = path.contains('{');
        for (method, op) in operations_mut(item) {
            let mut add = |status: &str, description: &str| {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem(description));
            };
            if public {
                add("500", "Internal error");
            } else {
                add("400", "Invalid id, query parameter or body");
                add("401", "Missing, unknown or revoked token");
                add("403", "The token's role or scope does not allow this");
                if has_params {
                    add("404", "Not found");
                }
                add("500", "Internal error");
                add(
                    "503",
                    "Unavailable (shutting down, broker down, host served elsewhere); retry",
                );
            }
            if op.request_body.is_some() {
                add("413", "Request body over the limit");
                add("415", "The body is not JSON");
                add(
                    "422",
                    "The body does not fit the schema (unknown or invalid field, named in `field`)",
                );
            }
            if path.starts_with("/api/v1/hosts/{id}/resources") || path == "/api/v1/hosts/{id}/run"
            {
                add(
                    "504",
                    "The host actor did not answer in time: the outcome is unknown",
                );
            }
            if public {
                op.security = Some(Vec::new());
            }
            if method == "post" && !public {
                let params = op.parameters.get_or_insert_with(Vec::new);
                params.push(idempotency_key());
                add(
                    "409",
                    "Conflict, or the first request with this Idempotency-Key is still running",
                );
                add(
                    "422",
                    "Invalid input, or this Idempotency-Key was used for a different request",
                );
            }
        }
    }
}

fn idempotency_key() -> Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "The same key from the same token within 24 hours gets the first response again \
             (header `idempotent-replayed: true`) instead of running the request twice, from \
             any node of a cluster and after a restart (keys are kept in the store). The same \
             key with a different request is refused (422); while the first request runs, a \
             retry gets 409, except on `POST /api/v1/hosts/{id}/run`: there the change is \
             recorded under an id derived from the token, the key and the host, so a retry \
             while the first request runs (or after its node died) answers with that same \
             change (header `idempotent-joined: true`) and the host gets one command. \
             Responses with a 5xx status are not kept.",
        ))
        .schema(Some(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .max_length(Some(crate::idempotency::MAX_KEY_BYTES)),
        ))
        .build()
}

/// Route path parameters that take the rest of the URL path (slashes included).
const TAIL_PARAMS: [&str; 1] = ["resource_id"];

/// The axum route of a documented path: a tail parameter `{p}` becomes the wildcard `{*p}`.
pub(crate) fn axum_path(path: &str) -> String {
    let mut p = path.to_owned();
    for tail in TAIL_PARAMS {
        let doc = format!("{{{tail}}}");
        if p.ends_with(&doc) {
            p.truncate(p.len() - doc.len());
            p.push_str(&format!("{{*{tail}}}"));
        }
    }
    p
}

fn filter(method: &str) -> MethodFilter {
    match method {
        "get" => MethodFilter::GET,
        "put" => MethodFilter::PUT,
        "post" => MethodFilter::POST,
        "delete" => MethodFilter::DELETE,
        "patch" => MethodFilter::PATCH,
        "head" => MethodFilter::HEAD,
        "options" => MethodFilter::OPTIONS,
        _ => MethodFilter::TRACE,
    }
}

/// The handler of an operation, by operation id.
pub(crate) fn endpoint(
    operation_id: &str,
    method: &str,
) -> Option<MethodRouter<std::sync::Arc<Shared>>> {
    let f = filter(method);
    let r = match operation_id {
        "healthz" => on(f, system::healthz),
        "readyz" => on(f, system::readyz),
        "metrics" => on(f, system::metrics),
        "openapi_json" => on(f, system::openapi_json),
        "list_orgs" => on(f, orgs::list_orgs),
        "create_org" => on(f, orgs::create_org),
        "get_org" => on(f, orgs::get_org),
        "delete_org" => on(f, orgs::delete_org),
        "list_envs" => on(f, orgs::list_envs),
        "create_env" => on(f, orgs::create_env),
        "get_env" => on(f, orgs::get_env),
        "delete_env" => on(f, orgs::delete_env),
        "list_hosts" => on(f, hosts::list_hosts),
        "get_host" => on(f, hosts::get_host),
        "patch_host" => on(f, hosts::patch_host),
        "delete_host" => on(f, hosts::delete_host),
        "get_facts" => on(f, hosts::get_facts),
        "get_compliance" => on(f, hosts::get_compliance),
        "list_resources" => on(f, resources::list_resources),
        "get_resource" => on(f, resources::get_resource),
        "put_resource" => on(f, resources::put_resource),
        "delete_resource" => on(f, resources::delete_resource),
        "run_command" => on(f, resources::run_command),
        "list_changes" => on(f, changes::list_changes),
        "get_change" => on(f, changes::get_change),
        "cancel_change" => on(f, changes::cancel_change),
        "create_job" => on(f, jobs::create_job),
        "create_env_job" => on(f, jobs::create_env_job),
        "list_jobs" => on(f, jobs::list_jobs),
        "get_job" => on(f, jobs::get_job),
        "list_job_hosts" => on(f, jobs::list_job_hosts),
        "cancel_job" => on(f, jobs::cancel_job),
        "create_enrollment_token" => on(f, tokens::create_enrollment_token),
        "list_enrollment_tokens" => on(f, tokens::list_enrollment_tokens),
        "revoke_enrollment_token" => on(f, tokens::revoke_enrollment_token),
        "create_api_token" => on(f, tokens::create_api_token),
        "list_api_tokens" => on(f, tokens::list_api_tokens),
        "revoke_api_token" => on(f, tokens::revoke_api_token),
        "list_audit" => on(f, tokens::list_audit),
        "events" => on(f, events::events),
        "get_cluster" => on(f, system::get_cluster),
        "get_cluster_shards" => on(f, system::get_cluster_shards),
        "join_node" => on(f, system::join_node),
        "decommission_node" => on(f, system::decommission_node),
        _ => return None,
    };
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_parameters_become_wildcards() {
        assert_eq!(
            axum_path("/api/v1/hosts/{id}/resources/{collection}/{resource_id}"),
            "/api/v1/hosts/{id}/resources/{collection}/{*resource_id}"
        );
        assert_eq!(axum_path("/api/v1/hosts/{id}"), "/api/v1/hosts/{id}");
    }

    #[test]
    fn every_operation_has_a_handler_and_public_ones_no_security() {
        let doc = build();
        let ops = operations(&doc);
        assert!(ops.len() >= 30, "{} operations", ops.len());
        for (path, method, id) in &ops {
            assert!(
                endpoint(id, method).is_some(),
                "{method} {path}: no handler for {id:?}"
            );
        }
        for p in PUBLIC_PATHS {
            let item = doc
                .paths
                .paths
                .get(p)
                .unwrap_or_else(|| panic!("{p} undocumented"));
            let op = item.get.as_ref().unwrap();
            assert!(op.security.as_ref().is_some_and(|s| s.is_empty()), "{p}");
        }
    }
}
