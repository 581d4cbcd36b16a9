//! Authentication on every documented route, and the role/scope rules.

use axum::http::{Method, StatusCode};
use comodit_store::{Role, Scope};
use serde_json::json;

use crate::common::TestApp;

/// A concrete URI for a documented path, path parameters filled with dummies.
fn fill(path: &str) -> String {
    path.replace("{id}", &uuid::Uuid::new_v4().to_string())
        .replace("{change}", &uuid::Uuid::new_v4().to_string())
        .replace("{org}", "acme")
        .replace("{env}", "prod")
        .replace("{collection}", "files")
        .replace("{resource_id}", "etc/motd")
}

#[tokio::test]
async fn every_documented_route_answers_401_without_or_with_a_wrong_token() {
    let app = TestApp::new().await;
    let revoked = app.token("gone", Role::Admin, Scope::Global).await;
    let id = app
        .store
        .find_api_token(&comodit_api::hash_token(&revoked))
        .await
        .unwrap()
        .unwrap()
        .id;
    app.store.revoke_api_token(id).await.unwrap();

    let doc = serde_json::to_value(comodit_api::openapi()).unwrap();
    let mut secured = 0;
    let mut public = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = Method::from_bytes(method.to_uppercase().as_bytes()) else {
                continue;
            };
            if !matches!(
                m,
                Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
            ) {
                continue;
            }
            let uri = fill(path);
            let body = matches!(m, Method::POST | Method::PUT | Method::PATCH).then(|| json!({}));
            if comodit_api::PUBLIC_PATHS.contains(&path.as_str()) {
                assert_eq!(op["security"], json!([]), "{path} must be marked public");
                let r = app.call(m.clone(), &uri, None, None).await;
                assert_eq!(r.status, StatusCode::OK, "{method} {uri}: {}", r.text);
                public += 1;
                continue;
            }
            assert!(
                op.get("security").is_none(),
                "{path} must inherit the bearer security"
            );
            for token in [None, Some("not-a-token"), Some(revoked.as_str())] {
                let r = app.call(m.clone(), &uri, token, body.clone()).await;
                assert_eq!(
                    r.status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {uri} ({token:?}): {}",
                    r.text
                );
                let p = r.problem();
                assert_eq!(p.r#type, "urn:comodit:problem:unauthenticated");
                assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
            }
            secured += 1;
        }
    }
    assert_eq!(public, 4);
    assert!(
        secured >= 30,
        "only {secured} secured operations documented"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Nothing reached the hosts and nothing was audited: there was no authenticated actor.
    assert!(app.ops.submits().is_empty());
    assert!(app.audit().await.is_empty());
}

#[tokio::test]
async fn malformed_authorization_headers_are_401() {
    let app = TestApp::new().await;
    for value in ["Basic abc", "Bearer", "Bearer ", &"x".repeat(600), "bearer"] {
        let req = axum::http::Request::builder()
            .uri("/api/v1/orgs")
            .header("authorization", value)
            .body(axum::body::Body::empty())
            .unwrap();
        let r = app.send(req).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{value:?}");
        r.problem();
    }
    // The scheme is case-insensitive.
    let req = axum::http::Request::builder()
        .uri("/api/v1/orgs")
        .header("authorization", format!("bearer {}", app.admin))
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(app.send(req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn viewers_read_and_cannot_change() {
    let app = TestApp::new().await;
    let (org, _env, host) = app.fleet().await;
    let viewer = app
        .token("viewer", Role::Viewer, Scope::Org { org: org.id })
        .await;
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);

    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&viewer),
            Some(json!({"spec": {"content": "hi\n"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(r.problem().r#type, "urn:comodit:problem:forbidden");
    let r = app.call(Method::DELETE, &uri, Some(&viewer), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/hosts/{}/run", host.id),
            Some(&viewer),
            Some(json!({"argv": ["true"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        app.ops.submits().is_empty(),
        "a viewer's change reached the host"
    );

    // Reads are fine: the host, and a resource through the agent.
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/hosts/{}", host.id),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.call(Method::GET, &uri, Some(&viewer), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.ops.submits().len(), 1);

    let audit = app.audit().await;
    let denied: Vec<_> = audit.iter().filter(|a| a.outcome == "denied").collect();
    assert_eq!(denied.len(), 3, "{audit:?}");
    assert!(denied.iter().all(|a| a.actor == "viewer"));
    // Reads are not audited.
    assert!(audit.iter().all(|a| !a.action.starts_with("GET ")));
}

#[tokio::test]
async fn an_operator_of_one_environment_cannot_touch_another() {
    let app = TestApp::new().await;
    let (org, env_a, host_a) = app.fleet().await;
    let env_b = app.env(&org, "staging").await;
    let host_b = app.host(&env_b, "web-2").await;
    let op = app
        .token(
            "op-a",
            Role::Operator,
            Scope::Env {
                org: org.id,
                env: env_a.id,
            },
        )
        .await;
    let put = |h: comodit_protocol::HostId| {
        (
            format!("/api/v1/hosts/{h}/resources/packages/nginx"),
            json!({"spec": {"ensure": "present"}}),
        )
    };

    let (uri, body) = put(host_b.id);
    let r = app.call(Method::PUT, &uri, Some(&op), Some(body)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    for uri in [
        format!("/api/v1/hosts/{}", host_b.id),
        format!("/api/v1/hosts/{}/changes", host_b.id),
        format!("/api/v1/hosts/{}/resources/packages/nginx", host_b.id),
        "/api/v1/orgs/acme/envs/staging".to_owned(),
        "/api/v1/tokens".to_owned(),
        "/api/v1/audit".to_owned(),
    ] {
        let r = app.call(Method::GET, &uri, Some(&op), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "GET {uri}: {}", r.text);
    }
    for (m, uri) in [
        (Method::DELETE, format!("/api/v1/hosts/{}", host_b.id)),
        (Method::DELETE, "/api/v1/orgs/acme/envs/staging".to_owned()),
        (Method::DELETE, "/api/v1/orgs/acme".to_owned()),
    ] {
        let r = app.call(m.clone(), &uri, Some(&op), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {uri}: {}", r.text);
    }
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs",
            Some(&op),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/acme/envs/staging/enrollment-tokens",
            Some(&op),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(app.ops.submits().is_empty());
    assert!(app.lifecycle.revoked.lock().unwrap().is_empty());

    // Its own environment is fine.
    let (uri, body) = put(host_a.id);
    let r = app.call(Method::PUT, &uri, Some(&op), Some(body)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.ops.submits().len(), 1);
    assert_eq!(app.ops.submits()[0].host, host_a.id);
    assert_eq!(app.ops.submits()[0].requested_by, "op-a");
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/acme/envs/prod/enrollment-tokens",
            Some(&op),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // It may read its organization's record, not change it.
    let r = app
        .call(Method::GET, "/api/v1/orgs/acme", Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/acme/envs",
            Some(&op),
            Some(json!({"name": "dev"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Listings are narrowed to its scope; asking outside of it is refused.
    let r = app
        .call(Method::GET, "/api/v1/hosts", Some(&op), None)
        .await;
    let ids: Vec<String> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec![host_a.id.to_string()]);
    let r = app
        .call(
            Method::GET,
            "/api/v1/hosts?org=acme&env=staging",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .call(Method::GET, "/api/v1/orgs/acme/envs", Some(&op), None)
        .await;
    let envs = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(envs.len(), 1);
    assert_eq!(envs[0]["name"], "prod");
}

#[tokio::test]
async fn an_organization_scope_does_not_reach_other_organizations() {
    let app = TestApp::new().await;
    let (org, _env, _host) = app.fleet().await;
    let other = app.org("other").await;
    let other_env = app.env(&other, "prod").await;
    let other_host = app.host(&other_env, "db-1").await;
    let op = app
        .token("op-org", Role::Operator, Scope::Org { org: org.id })
        .await;

    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/hosts/{}", other_host.id),
            Some(&op),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app.call(Method::GET, "/api/v1/orgs", Some(&op), None).await;
    let names: Vec<_> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("acme")]);
    // An organization's operator may create environments in it, not elsewhere.
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/acme/envs",
            Some(&op),
            Some(json!({"name": "dev"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/other/envs",
            Some(&op),
            Some(json!({"name": "dev"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}
