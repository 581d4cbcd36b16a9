//! Hosts: detail with runtime and ETag, If-Match on PATCH, pagination and filters, revocation,
//! facts, compliance and the change log.

use std::collections::HashSet;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use chrono::Utc;
use comodit_protocol::{Collection, DriftReport, Epoch, Facts, FieldDiff, ResourceRef};
use comodit_store::{HostRuntime, Page};
use serde_json::json;

use crate::common::{Answer, TestApp};

fn runtime(host: comodit_protocol::HostId, online: bool, os_family: &str) -> HostRuntime {
    HostRuntime {
        host,
        epoch: Epoch(1),
        online,
        last_seen: Some(Utc::now()),
        facts: Some(Facts {
            hostname: "web-1".into(),
            os_family: os_family.into(),
            os_distribution: "debian".into(),
            os_version: "12".into(),
            kernel: "6.1.0".into(),
            architecture: "x86_64".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            addresses: vec!["10.0.0.5".into()],
            uptime_s: 100,
            package_manager: Some("apt".into()),
            init_system: Some("systemd".into()),
            agent_version: "0.1.0".into(),
            capabilities: vec!["files".into()],
        }),
        desired_digest: Some("abc".into()),
        drift: vec![DriftReport {
            r#ref: ResourceRef::new(Collection::Files, "/etc/motd").unwrap(),
            diff: vec![FieldDiff {
                field: "content".into(),
                from: json!("local edit\n"),
                to: json!("hi\n"),
            }],
            since: Utc::now(),
            repaired: false,
            repair_error: None,
        }],
        updated_at: Utc::now(),
    }
}

#[tokio::test]
async fn host_detail_with_runtime_facts_and_compliance() {
    let app = TestApp::new().await;
    let (org, env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}", host.id);

    let r = app.get(&uri).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("etag").as_deref(), Some("\"v1\""));
    let v = r.json();
    assert_eq!(v["id"], host.id.to_string());
    assert_eq!(v["org"], org.id.to_string());
    assert_eq!(v["env"], env.id.to_string());
    assert_eq!(v["runtime"]["online"], false);
    assert!(v["runtime"]["facts"].is_null());
    let r = app.get(&format!("{uri}/compliance")).await;
    assert_eq!(r.json()["compliant"], true);

    app.store
        .put_runtime(&runtime(host.id, true, "debian"))
        .await
        .unwrap();
    let v = app.get(&uri).await.json();
    assert_eq!(v["runtime"]["online"], true);
    assert_eq!(v["runtime"]["drift_count"], 1);
    assert_eq!(v["runtime"]["facts"]["os_family"], "debian");
    assert!(
        v["runtime"]["facts"].get("addresses").is_none(),
        "summary only"
    );

    let facts = app.get(&format!("{uri}/facts")).await.json();
    assert_eq!(facts["facts"]["addresses"], json!(["10.0.0.5"]));
    assert_eq!(facts["facts"]["memory_bytes"], 1u64 << 30);

    let c = app.get(&format!("{uri}/compliance")).await.json();
    assert_eq!(c["compliant"], false);
    assert_eq!(c["drift_count"], 1);
    assert_eq!(c["drift"][0]["ref"]["id"], "/etc/motd");
    assert_eq!(c["drift"][0]["diff"][0]["from"], "local edit\n");
}

fn patch(uri: &str, token: &str, if_match: Option<&str>, body: serde_json::Value) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::PATCH)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/merge-patch+json");
    if let Some(m) = if_match {
        b = b.header(header::IF_MATCH, m);
    }
    b.body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

#[tokio::test]
async fn patch_needs_if_match_and_refuses_stale_versions() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}", host.id);
    let admin = app.admin.clone();
    let body = json!({"name": "web-one", "labels": {"role": "web", "tier": "front"}});

    let r = app.send(patch(&uri, &admin, None, body.clone())).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_REQUIRED, "{}", r.text);
    assert_eq!(
        r.problem().r#type,
        "urn:comodit:problem:precondition-required"
    );
    let r = app.send(patch(&uri, &admin, Some("*"), body.clone())).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_REQUIRED);
    let r = app
        .send(patch(&uri, &admin, Some("\"v7\""), body.clone()))
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.text);
    assert_eq!(r.header("etag").as_deref(), Some("\"v1\""));
    r.problem();
    assert_eq!(
        app.store.get_host(host.id).await.unwrap().unwrap().version,
        1
    );

    let etag = app.get(&uri).await.header("etag").unwrap();
    let r = app
        .send(patch(&uri, &admin, Some(&etag), body.clone()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("etag").as_deref(), Some("\"v2\""));
    assert_eq!(r.json()["name"], "web-one");
    assert_eq!(r.json()["labels"], json!({"role": "web", "tier": "front"}));

    // The old ETag is stale now.
    let r = app
        .send(patch(&uri, &admin, Some(&etag), json!({"name": "x"})))
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    // A merge patch: null removes one label, the others stay.
    let r = app
        .send(patch(
            &uri,
            &admin,
            Some("\"v2\""),
            json!({"labels": {"tier": null, "dc": "par1"}}),
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["labels"], json!({"role": "web", "dc": "par1"}));
    assert_eq!(r.json()["name"], "web-one");

    // Invalid labels and unknown fields change nothing.
    for bad in [
        json!({"labels": {"bad key": "x"}}),
        json!({"name": ""}),
        json!({"shard": 3}),
    ] {
        let r = app
            .send(patch(&uri, &admin, Some("\"v3\""), bad.clone()))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.text
        );
        r.problem();
    }
    assert_eq!(
        app.store.get_host(host.id).await.unwrap().unwrap().version,
        3
    );
    let audit = app.audit().await;
    assert!(audit
        .iter()
        .any(|a| a.action == "PATCH /api/v1/hosts/{id}" && a.outcome == "ok"));
    assert!(
        audit.iter().any(|a| a.outcome.starts_with("failed: 428")),
        "{audit:?}"
    );
    assert!(
        audit.iter().any(|a| a.outcome.starts_with("failed: 412")),
        "{audit:?}"
    );
}

#[tokio::test]
async fn hosts_are_paginated_and_filtered() {
    let app = TestApp::new().await;
    let (org, env, first) = app.fleet().await;
    let staging = app.env(&org, "staging").await;
    let mut ids = HashSet::from([first.id.to_string()]);
    for i in 0..6 {
        ids.insert(app.host(&env, &format!("web-{i}")).await.id.to_string());
    }
    let other = app.host(&staging, "stg-1").await;
    ids.insert(other.id.to_string());

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/api/v1/hosts?limit=3&cursor={c}"),
            None => "/api/v1/hosts?limit=3".to_owned(),
        };
        let v = app.get(&uri).await.json();
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|h| h["id"].as_str().unwrap().to_owned()));
        pages += 1;
        assert!(pages <= 4, "pagination does not end");
        match v["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), ids);

    let v = app.get("/api/v1/hosts?org=acme&env=staging").await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["id"], other.id.to_string());
    let v = app
        .get(&format!("/api/v1/hosts?env={}", staging.id))
        .await
        .json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);

    let mut labelled = app.store.get_host(first.id).await.unwrap().unwrap();
    labelled.labels.insert("role".into(), "db".into());
    app.store.update_host(&labelled, 1).await.unwrap();
    let v = app.get("/api/v1/hosts?label=role=db").await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["id"], first.id.to_string());

    app.store
        .put_runtime(&runtime(other.id, true, "rhel"))
        .await
        .unwrap();
    let v = app.get("/api/v1/hosts?online=true").await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["id"], other.id.to_string());
    let v = app.get("/api/v1/hosts?fact=os_family=rhel").await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let v = app.get("/api/v1/hosts?online=false&org=acme").await.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn delete_revokes_the_host() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}", host.id);
    let r = app
        .call(Method::DELETE, &uri, Some(&app.admin.clone()), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(*app.lifecycle.revoked.lock().unwrap(), vec![host.id]);
    assert_eq!(*app.ops.forgotten.lock().unwrap(), vec![host.id]);
    assert_eq!(app.get(&uri).await.status, StatusCode::NOT_FOUND);
    let audit = app.audit().await;
    assert_eq!(audit[0].action, "DELETE /api/v1/hosts/{id}");
    assert_eq!(audit[0].target, uri);
    assert_eq!(audit[0].outcome, "ok");
    assert_eq!(audit[0].actor, "root");
}

#[tokio::test]
async fn change_log_newest_first_and_cancel() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let admin = app.admin.clone();
    let base = format!("/api/v1/hosts/{}", host.id);
    for i in 0..5 {
        let r = app
            .call(
                Method::PUT,
                &format!("{base}/resources/packages/pkg{i}"),
                Some(&admin),
                Some(json!({"spec": {}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    app.ops.answer(Answer::Pending);
    let r = app
        .call(
            Method::PUT,
            &format!("{base}/resources/packages/late?async=true"),
            Some(&admin),
            Some(json!({"spec": {}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let queued = r.json()["id"].as_str().unwrap().to_owned();

    let page1 = app.get(&format!("{base}/changes?limit=4")).await.json();
    let seqs: Vec<u64> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![6, 5, 4, 3]);
    assert_eq!(page1["items"][0]["id"], queued);
    let next = page1["next"].as_str().unwrap();
    let page2 = app
        .get(&format!("{base}/changes?limit=4&cursor={next}"))
        .await
        .json();
    let seqs: Vec<u64> = page2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![2, 1]);
    assert!(page2["next"].is_null());

    let applied = page1["items"][1]["id"].as_str().unwrap().to_owned();
    let r = app
        .call(
            Method::POST,
            &format!("{base}/changes/{applied}/cancel"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    r.problem();
    let r = app
        .call(
            Method::POST,
            &format!("{base}/changes/{queued}/cancel"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["status"], "cancelled");
    let stored = app
        .store
        .list_changes(host.id, &Page::first(1))
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(stored.status, comodit_store::ChangeStatus::Cancelled);
    let r = app
        .call(
            Method::POST,
            &format!("{base}/changes/{}/cancel", uuid::Uuid::new_v4()),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
