//! REST requests on resources become exactly the commands they should, and the answer follows
//! the agent: 200 with the result, or 202 with a Location to follow.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use comodit_protocol::{
    ApplyMode, Body, Collection, DirectorySpec, FileSpec, Mode, PackageEnsure, PackageSpec, Policy,
    ReplyData, Resource, ResourceRef, RunResult, RunSpec, Spec, Status,
};
use serde_json::json;

use crate::common::{Answer, TestApp};

fn file_ref(path: &str) -> ResourceRef {
    ResourceRef::new(Collection::Files, path).unwrap()
}

#[tokio::test]
async fn put_becomes_an_apply_of_that_one_resource() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);
    let body = json!({
        "spec": {"ensure": "present", "content": "hi\n", "mode": "0644", "owner": "root"},
        "policy": "enforce",
        "notify": [{"collection": "services", "id": "nginx"}]
    });
    let r = app
        .call(Method::PUT, &uri, Some(&app.admin.clone()), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let mut resource = Resource::new(
        Collection::Files,
        "/etc/motd",
        Spec::File(FileSpec {
            content: Some("hi\n".into()),
            mode: Some(Mode(0o644)),
            owner: Some("root".into()),
            ..Default::default()
        }),
    )
    .unwrap();
    resource.policy = Policy::Enforce;
    resource.notify = vec![ResourceRef::new(Collection::Services, "nginx").unwrap()];
    let submits = app.ops.submits();
    assert_eq!(submits.len(), 1);
    assert_eq!(submits[0].host, host.id);
    assert_eq!(
        submits[0].body,
        Body::Apply {
            mode: ApplyMode::Enforce,
            monitor: true,
            resources: vec![resource],
        }
    );
    assert_eq!(submits[0].wait, Some(Duration::from_secs(10)));
    assert_eq!(submits[0].requested_by, "root");

    let v = r.json();
    assert_eq!(v["op"], "apply");
    assert_eq!(v["status"], "applied");
    assert_eq!(v["result"]["status"], "ok");
    assert_eq!(v["result"]["results"][0]["ref"]["id"], "/etc/motd");
    assert_eq!(v["host"], host.id.to_string());
    assert!(v["result"].get("v").is_none() && v["result"].get("host").is_none());
}

#[tokio::test]
async fn dry_run_monitor_and_wait_options() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!(
        "/api/v1/hosts/{}/resources/directories/srv/app?dry_run=true&wait_s=3",
        host.id
    );
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(json!({"spec": {"mode": "0750"}, "monitor": false})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let s = &app.ops.submits()[0];
    assert_eq!(
        s.body,
        Body::Apply {
            mode: ApplyMode::DryRun,
            monitor: false,
            resources: vec![Resource::new(
                Collection::Directories,
                "/srv/app",
                Spec::Directory(DirectorySpec {
                    mode: Some(Mode(0o750)),
                    ..Default::default()
                })
            )
            .unwrap()],
        }
    );
    assert_eq!(s.wait, Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn delete_becomes_remove_and_get_becomes_read_or_list() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let admin = app.admin.clone();
    let base = format!("/api/v1/hosts/{}/resources", host.id);

    let r = app
        .call(
            Method::DELETE,
            &format!("{base}/packages/nginx"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .call(
            Method::DELETE,
            &format!("{base}/files/etc/app.conf?dry_run=true"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    app.ops.answer(Answer::Completed(
        Status::Ok,
        Some(ReplyData::Read {
            r#ref: file_ref("/etc/motd"),
            state: json!({"ensure": "present", "mode": "0644"}),
        }),
    ));
    let r = app
        .call(
            Method::GET,
            &format!("{base}/files/etc/motd"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["result"]["data"]["state"]["mode"], "0644");

    let r = app
        .call(
            Method::GET,
            &format!("{base}/files?under=/etc"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .call(Method::GET, &format!("{base}/packages"), Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let bodies: Vec<Body> = app.ops.submits().into_iter().map(|s| s.body).collect();
    assert_eq!(
        bodies,
        vec![
            Body::Remove {
                mode: ApplyMode::Enforce,
                refs: vec![ResourceRef::new(Collection::Packages, "nginx").unwrap()],
            },
            Body::Remove {
                mode: ApplyMode::DryRun,
                refs: vec![file_ref("/etc/app.conf")],
            },
            Body::Read {
                r#ref: file_ref("/etc/motd")
            },
            Body::List {
                collection: Collection::Files,
                under: Some("/etc".into()),
            },
            Body::List {
                collection: Collection::Packages,
                under: None,
            },
        ]
    );
}

#[tokio::test]
async fn package_specs_are_typed_per_collection() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let uri = format!("/api/v1/hosts/{}/resources/packages/libstdc++6", host.id);
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(json!({"spec": {"ensure": "latest"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    match &app.ops.submits()[0].body {
        Body::Apply { resources, .. } => {
            assert_eq!(resources[0].r#ref.id.as_str(), "libstdc++6");
            assert_eq!(
                resources[0].spec,
                Spec::Package(PackageSpec {
                    ensure: PackageEnsure::Latest,
                    version: None
                })
            );
        }
        other => panic!("{other:?}"),
    }
    // A files spec under packages is refused.
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(json!({"spec": {"content": "x"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.ops.submits().len(), 1);
}

#[tokio::test]
async fn run_returns_the_output() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    app.ops.answer(Answer::Completed(
        Status::Ok,
        Some(ReplyData::Run(RunResult {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout: "hello\n".into(),
            stderr: String::new(),
            truncated: false,
            duration_ms: 3,
        })),
    ));
    let r = app
        .call(
            Method::POST,
            &format!("/api/v1/hosts/{}/run", host.id),
            Some(&app.admin.clone()),
            Some(json!({"argv": ["echo", "hello"], "env": {"LANG": "C"}, "cwd": "/tmp"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["op"], "run");
    assert_eq!(v["result"]["data"]["stdout"], "hello\n");
    assert_eq!(v["result"]["data"]["exit_code"], 0);
    assert_eq!(
        app.ops.submits()[0].body,
        Body::Run(RunSpec {
            argv: vec!["echo".into(), "hello".into()],
            env: [("LANG".to_owned(), "C".to_owned())].into(),
            cwd: Some("/tmp".into()),
            timeout_s: 60,
            stream: false,
        })
    );
}

#[tokio::test]
async fn pending_changes_answer_202_with_a_location_to_follow() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    app.ops.answer(Answer::Pending);
    let uri = format!(
        "/api/v1/hosts/{}/resources/services/nginx?async=true",
        host.id
    );
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(json!({"spec": {"running": true}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(app.ops.submits()[0].wait, None, "async=true must not wait");
    let v = r.json();
    assert_eq!(v["status"], "queued");
    assert!(v["result"].is_null());
    let location = r.header("location").unwrap();
    assert_eq!(
        location,
        format!(
            "/api/v1/hosts/{}/changes/{}",
            host.id,
            v["id"].as_str().unwrap()
        )
    );

    let followed = app.get(&location).await;
    assert_eq!(followed.status, StatusCode::OK, "{}", followed.text);
    assert_eq!(followed.json()["id"], v["id"]);
    assert_eq!(followed.json()["status"], "queued");
}

#[tokio::test]
async fn an_agent_failure_is_200_with_status_failed() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    app.ops.answer(Answer::Completed(Status::Failed, None));
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(json!({"spec": {"content": "x"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["result"]["status"], "failed");
    assert_eq!(v["result"]["results"][0]["error"], "it broke");
}

#[tokio::test]
async fn host_operation_errors_are_problems() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    app.ops.answer(Answer::Fail("connection lost"));
    let uri = format!("/api/v1/hosts/{}/resources/files/etc/motd", host.id);
    let r = app.get(&uri).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    let p = r.problem();
    assert!(
        !p.detail.contains("connection lost"),
        "internal detail leaked: {p:?}"
    );
}

#[tokio::test]
async fn user_password_hashes_never_come_back() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    app.ops.answer(Answer::Pending);
    let uri = format!("/api/v1/hosts/{}/resources/users/alice?async=true", host.id);
    let hash = "$6$salt$0123456789abcdef";
    let r = app
        .call(
            Method::PUT,
            &uri,
            Some(&app.admin.clone()),
            Some(json!({"spec": {"password_hash": hash}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(!r.text.contains(hash), "{}", r.text);
    let list = app.get(&format!("/api/v1/hosts/{}/changes", host.id)).await;
    assert!(!list.text.contains(hash));
    assert!(list.text.contains("<redacted>"));
    // The agent still gets it.
    match &app.ops.submits()[0].body {
        Body::Apply { resources, .. } => match &resources[0].spec {
            Spec::User(u) => assert_eq!(u.password_hash.as_ref().unwrap().expose(), hash),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_stuck_host_actor_is_a_504_not_a_hung_request() {
    let limits = comodit_api::ApiLimits {
        submit_grace_s: 0,
        ..Default::default()
    };
    let app = TestApp::with_limits(limits, 16).await;
    let (_org, _env, host) = app.fleet().await;
    app.ops.answer(Answer::Hang);
    let uri = format!(
        "/api/v1/hosts/{}/resources/packages/nginx?async=true",
        host.id
    );
    let r = tokio::time::timeout(Duration::from_secs(10), app.get(&uri))
        .await
        .expect("the request hung");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text);
    assert_eq!(r.problem().r#type, "urn:comodit:problem:timeout");
}
