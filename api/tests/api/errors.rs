//! Bad input gets a problem document naming what is wrong, and changes nothing: nothing is
//! submitted to the host.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use comodit_api::ApiLimits;
use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn unknown_and_invalid_fields_are_named() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let admin = app.admin.clone();
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);

    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&admin),
            Some(json!({"spec": {}, "extra": 1})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let p = r.problem();
    assert_eq!(p.field.as_deref(), Some("extra"), "{p:?}");

    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&admin),
            Some(json!({"spec": {"contnet": "typo"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let p = r.problem();
    assert!(p.detail.contains("contnet"), "{p:?}");
    assert_eq!(p.field.as_deref(), Some("spec"));

    for spec in [
        json!({"mode": "0999"}),
        json!({"content": "a", "source": {"url": "https://x/", "sha256": "0".repeat(64)}}),
        json!({"owner": "Not A User"}),
    ] {
        let r = app
            .call(Method::PUT, &uri, Some(&admin), Some(json!({"spec": spec})))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{spec}: {}",
            r.text
        );
        r.problem();
    }
    // notify may only name services, with valid ids.
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&admin),
            Some(json!({"spec": {}, "notify": [{"collection": "files", "id": "/etc/x"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert_eq!(r.problem().field.as_deref(), Some("notify"));
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&admin),
            Some(json!({"spec": {}, "notify": [{"collection": "services", "id": "../sh"}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);

    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/hosts/{}/run", host.id),
            Some(&admin),
            Some(json!({"argv": [], "timeout_s": 5})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert_eq!(r.problem().field.as_deref(), Some("argv"));
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/hosts/{}/run", host.id),
            Some(&admin),
            Some(json!({"argv": ["ls"], "cwd": "relative"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert_eq!(r.problem().field.as_deref(), Some("cwd"));

    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs",
            Some(&admin),
            Some(json!({"nmae": "x"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert_eq!(r.problem().field.as_deref(), Some("nmae"));

    assert!(app.ops.submits().is_empty(), "bad input reached the host");
    // Failed mutations are audited as such.
    let audit = app.audit().await;
    assert!(
        audit.iter().any(|a| a.outcome.starts_with("failed: 422")),
        "{audit:?}"
    );
}

#[tokio::test]
async fn malformed_bodies_and_queries() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);

    let req = Request::builder()
        .method(Method::PUT)
        .uri(&uri)
        .header(header::AUTHORIZATION, format!("Bearer {}", app.admin))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"spec\": "))
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    r.problem();

    let req = Request::builder()
        .method(Method::PUT)
        .uri(&uri)
        .header(header::AUTHORIZATION, format!("Bearer {}", app.admin))
        .body(Body::from("{\"spec\": {}}"))
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", r.text);
    r.problem();

    for q in ["dryrun=true", "dry_run=maybe", "wait_s=61", "wait_s=-1"] {
        let r = app
            .call(
                Method::PUT,
                &format!("{uri}?{q}"),
                Some(&app.admin.clone()),
                Some(json!({"spec": {}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text);
        r.problem();
    }
    for q in [
        "limit=0",
        "limit=1001",
        "label=novalue",
        "env=prod",
        "org=nope",
        "online=perhaps",
    ] {
        let r = app.get(&format!("/api/v1/hosts?{q}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text);
        r.problem();
    }
    // Listing a path collection needs a valid `under`; other collections take none.
    let list = format!("/api/v1/hosts/{}/resources/files", host.id);
    for q in ["", "?under=etc", "?under=/etc/../root"] {
        let r = app.get(&format!("{list}{q}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text);
        assert_eq!(r.problem().field.as_deref(), Some("under"));
    }
    let r = app
        .get(&format!(
            "/api/v1/hosts/{}/resources/packages?under=/x",
            host.id
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(app.ops.submits().is_empty());
}

#[tokio::test]
async fn invalid_ids_and_paths_are_400_and_submit_nothing() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;

    for uri in [
        "/api/v1/hosts/not-a-uuid".to_owned(),
        format!("/api/v1/hosts/{}", host.id.to_string().to_uppercase()),
        "/api/v1/hosts/not-a-uuid/resources/files/etc/motd".to_owned(),
        format!("/api/v1/hosts/{}/changes/not-a-uuid", host.id),
        "/api/v1/orgs/Not_A_Name".to_owned(),
    ] {
        let r = app.get(&uri).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.text);
        assert_eq!(r.problem().r#type, "urn:comodit:problem:invalid-id");
    }

    let base = format!("/api/v1/hosts/{}/resources", host.id);
    for tail in [
        "files/etc/../shadow",
        "files/etc/%2E%2E/shadow",
        "files//etc/motd",
        "files/etc/motd/",
        "directories/a/./b",
        "packages/a;rm",
        "packages/-rf",
        "users/Root",
        "bogus/x",
    ] {
        let uri = format!("{base}/{tail}");
        for (m, body) in [
            (Method::GET, None),
            (Method::PUT, Some(json!({"spec": {}}))),
            (Method::DELETE, None),
        ] {
            let r = app
                .call(m.clone(), &uri, Some(&app.admin.clone()), body)
                .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{m} {uri}: {}", r.text);
            let p = r.problem();
            assert_eq!(p.r#type, "urn:comodit:problem:invalid-id");
            assert!(
                matches!(p.field.as_deref(), Some("resource_id" | "collection")),
                "{p:?}"
            );
        }
    }
    assert!(
        app.ops.submits().is_empty(),
        "an invalid id reached the host"
    );

    let r = app
        .get(&format!("/api/v1/hosts/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem().r#type, "urn:comodit:problem:not-found");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let limits = ApiLimits {
        max_body_bytes: 4096,
        ..ApiLimits::default()
    };
    let app = TestApp::with_limits(limits, 16).await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);
    let big = json!({"spec": {"content": "x".repeat(5000)}});
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(big.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert_eq!(r.problem().r#type, "urn:comodit:problem:too-large");
    // Also when the body is read by the idempotency layer.
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/api/v1/hosts/{}/run", host.id))
        .header(header::AUTHORIZATION, format!("Bearer {}", app.admin))
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", "k")
        .body(Body::from(
            serde_json::to_vec(&json!({"argv": ["echo", "x".repeat(5000)]})).unwrap(),
        ))
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    r.problem();
    assert!(app.ops.submits().is_empty());
    // Just under the limit goes through.
    let ok = json!({"spec": {"content": "x".repeat(3000)}});
    let r = app
        .call(Method::PUT, &uri, Some(&app.admin.clone()), Some(ok))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = TestApp::new().await;
    for token in [None, Some(app.admin.clone())] {
        let r = app
            .call(Method::GET, "/api/v1/nope", token.as_deref(), None)
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        r.problem();
        let r = app.call(Method::GET, "/", token.as_deref(), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        r.problem();
    }
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/orgs",
            Some(&app.admin.clone()),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.text);
    assert_eq!(r.problem().r#type, "urn:comodit:problem:method-not-allowed");
    let allow = r.header("allow").unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}
