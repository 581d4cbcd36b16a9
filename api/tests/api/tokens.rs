//! API and enrollment tokens: secrets shown once and stored hashed; the audit log.

use axum::http::{Method, StatusCode};
use chrono::Utc;
use comodit_api::hash_token;
use comodit_store::{Page, Role, Scope};
use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn api_token_secret_is_returned_once_and_stored_hashed() {
    let app = TestApp::new().await;
    let (org, env, _host) = app.fleet().await;
    let admin = app.admin.clone();
    let body = json!({"name": "ci-bot", "role": "operator",
        "scope": {"kind": "env", "org": org.id.to_string(), "env": env.id.to_string()}});
    let r = app
        .call(Method::POST, "/api/v1/tokens", Some(&admin), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let v = r.json();
    let secret = v["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("cma_") && secret.len() == 68, "{secret}");
    assert_eq!(v["role"], "operator");
    assert_eq!(v["scope"]["kind"], "env");
    assert!(v.get("secret_sha256").is_none());

    let stored = app
        .store
        .find_api_token(&hash_token(&secret))
        .await
        .unwrap()
        .expect("stored under the sha256 of its secret");
    assert_eq!(stored.name, "ci-bot");
    assert_eq!(stored.secret_sha256, hash_token(&secret));
    assert_eq!(stored.role, Role::Operator);
    assert!(
        !format!("{stored:?}").contains(&secret),
        "the secret itself is stored"
    );

    let list = app.get("/api/v1/tokens").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.text.contains(&secret));
    assert!(
        !list.text.contains(&stored.secret_sha256),
        "the hash is shown"
    );
    let names: Vec<_> = list.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert!(names.contains(&json!("ci-bot")));

    // The new token works, within its scope.
    let r = app
        .call(Method::GET, "/api/v1/hosts", Some(&secret), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Revoked, it does not.
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/tokens/{}", stored.id),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app
        .call(Method::GET, "/api/v1/hosts", Some(&secret), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Invalid requests.
    for bad in [
        json!({"name": "x", "role": "admin", "scope": {"kind": "org", "org": org.id.to_string()}}),
        json!({"name": "x", "role": "viewer", "scope": {"kind": "org", "org": uuid::Uuid::new_v4().to_string()}}),
        json!({"name": "x", "role": "viewer", "scope": {"kind": "env", "org": uuid::Uuid::new_v4().to_string(), "env": env.id.to_string()}}),
        json!({"name": "bad name", "role": "viewer", "scope": {"kind": "global"}}),
        json!({"name": "x", "role": "root", "scope": {"kind": "global"}}),
        json!({"name": "x", "role": "viewer", "scope": {"kind": "global", "org": "y"}}),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(&admin),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.text
        );
        r.problem();
    }
}

#[tokio::test]
async fn enrollment_tokens_secret_once_list_and_revoke() {
    let app = TestApp::new().await;
    let (org, env, _host) = app.fleet().await;
    let admin = app.admin.clone();
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/acme/envs/prod/enrollment-tokens",
            Some(&admin),
            Some(json!({"expires_in_s": 600, "max_uses": 2, "description": "rack 4"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let v = r.json();
    let secret = v["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("cme_"));
    assert_eq!(v["env"], env.id.to_string());
    assert_eq!(v["max_uses"], 2);
    assert_eq!(v["created_by"], "root");

    // Stored by hash: the enrollment path finds it that way.
    let used = app
        .store
        .use_enrollment_token(&hash_token(&secret), Utc::now())
        .await
        .unwrap();
    assert_eq!(used.env, env.id);
    assert_eq!(used.uses, 1);

    let list = app
        .get(&format!("/api/v1/orgs/{}/enrollment-tokens", org.id))
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert!(!list.text.contains(&secret));
    assert!(!list.text.contains(&hash_token(&secret)));
    let items = list.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["uses"], 1);
    assert_eq!(items[0]["description"], "rack 4");

    let id = items[0]["id"].as_str().unwrap();
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert!(app
        .store
        .use_enrollment_token(&hash_token(&secret), Utc::now())
        .await
        .is_err());
    let r = app
        .call(
            Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{}", uuid::Uuid::new_v4()),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    for bad in [
        json!({"expires_in_s": 0}),
        json!({"expires_in_s": 99_999_999}),
        json!({"max_uses": 0}),
        json!({"description": "x".repeat(300)}),
        json!({"uses": 3}),
    ] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/orgs/acme/envs/prod/enrollment-tokens",
                Some(&admin),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.text
        );
    }
}

#[tokio::test]
async fn mutations_are_audited_with_actor_route_target_and_outcome() {
    let app = TestApp::new().await;
    let (org, _env, host) = app.fleet().await;
    let viewer = app
        .token("watcher", Role::Viewer, Scope::Org { org: org.id })
        .await;
    let admin = app.admin.clone();
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);

    app.call(
        Method::PUT,
        &uri,
        Some(&admin),
        Some(json!({"spec": {"content": "x"}})),
    )
    .await;
    app.call(
        Method::PUT,
        &uri,
        Some(&viewer),
        Some(json!({"spec": {"content": "x"}})),
    )
    .await;
    app.call(
        Method::PUT,
        &uri,
        Some(&admin),
        Some(json!({"spec": {"mode": "9"}})),
    )
    .await;
    app.call(
        Method::POST,
        "/api/v1/orgs",
        Some(&admin),
        Some(json!({"name": "acme"})),
    )
    .await;
    app.call(Method::GET, &uri, Some(&admin), None).await;

    let audit = app.audit().await;
    assert_eq!(audit.len(), 4, "{audit:#?}");
    // Newest first.
    assert_eq!(audit[0].action, "POST /api/v1/orgs");
    assert_eq!(
        audit[0].outcome,
        "failed: 409 Conflict with the current state"
    );
    let put = "PUT /api/v1/hosts/{id}/resources/{collection}/{*resource_id}";
    assert_eq!(audit[1].action, put);
    assert!(
        audit[1].outcome.starts_with("failed: 422"),
        "{}",
        audit[1].outcome
    );
    assert_eq!(audit[2].actor, "watcher");
    assert_eq!(audit[2].outcome, "denied");
    assert_eq!(audit[3].actor, "root");
    assert_eq!(audit[3].action, put);
    assert_eq!(audit[3].target, uri);
    assert_eq!(audit[3].outcome, "ok");
    assert!(audit[0].seq > audit[3].seq);

    // Served at /audit, to admins only.
    let r = app.get("/api/v1/audit?limit=2").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    assert_eq!(v["items"][0]["action"], "POST /api/v1/orgs");
    assert!(v["next"].is_string());
    let r = app
        .call(Method::GET, "/api/v1/audit", Some(&viewer), None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.store
            .list_audit(&Page::first(100))
            .await
            .unwrap()
            .items
            .len(),
        4
    );
}
