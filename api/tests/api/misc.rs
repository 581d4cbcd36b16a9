//! Public routes, the OpenAPI document, metrics, organizations and environments, SSE and
//! idempotency keys.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::http::{header, Method, Request, StatusCode};
use comodit_actors::NodeEvent;
use comodit_store::{ChangeId, ChangeStatus, Page, Role, Scope};
use futures_util::StreamExt;
use serde_json::json;
use tower::ServiceExt;

use crate::common::{request, Answer, TestApp};

#[tokio::test]
async fn public_routes_health_ready_metrics_openapi() {
    let app = TestApp::new().await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");

    assert_eq!(
        app.call(Method::GET, "/readyz", None, None).await.status,
        StatusCode::OK
    );
    app.ready.store(false, Ordering::SeqCst);
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.problem().r#type, "urn:comodit:problem:not-ready");

    // A request with a route template, then the metrics show it by template, never by raw path.
    let (_org, _env, host) = app.fleet().await;
    app.get(&format!("/api/v1/hosts/{}", host.id)).await;
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let line = r
        .text
        .lines()
        .find(|l| {
            l.starts_with("comodit_api_requests_total")
                && l.contains("route=\"/api/v1/hosts/{id}\"")
                && l.contains("method=\"GET\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no request counter for the route template:\n{}", r.text));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
    assert!(r.text.contains("comodit_api_request_duration_seconds"));
    assert!(
        !r.text.contains(&host.id.to_string()),
        "a raw path became a label"
    );

    let r = app
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc, serde_json::to_value(comodit_api::openapi()).unwrap());
    let put = &doc["paths"]["/api/v1/hosts/{id}/resources/{collection}/{resource_id}"]["put"];
    assert!(put["responses"]["202"].is_object());
    assert!(put["responses"]["422"].is_object());
    let post = &doc["paths"]["/api/v1/orgs"]["post"];
    assert!(post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "Idempotency-Key"));
    assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
}

#[tokio::test]
async fn organizations_and_environments_by_id_or_name() {
    let app = TestApp::new().await;
    let admin = app.admin.clone();
    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs",
            Some(&admin),
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let org = r.json();
    let id = org["id"].as_str().unwrap().to_owned();
    assert_eq!(r.header("location").unwrap(), format!("/api/v1/orgs/{id}"));
    assert_eq!(app.get("/api/v1/orgs/acme").await.json()["id"], id);
    assert_eq!(
        app.get(&format!("/api/v1/orgs/{id}")).await.json()["name"],
        "acme"
    );
    assert_eq!(
        app.get("/api/v1/orgs/nope").await.status,
        StatusCode::NOT_FOUND
    );

    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs",
            Some(&admin),
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    r.problem();
    for bad in ["Acme", "", "0f8fad5b-d9cb-469f-a165-70867728950e", "a b"] {
        let r = app
            .call(
                Method::POST,
                "/api/v1/orgs",
                Some(&admin),
                Some(json!({"name": bad})),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
        assert_eq!(r.problem().field.as_deref(), Some("name"));
    }

    let r = app
        .call(
            Method::POST,
            "/api/v1/orgs/acme/envs",
            Some(&admin),
            Some(json!({"name": "prod"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let env_id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get("/api/v1/orgs/acme/envs/prod").await.json()["id"],
        env_id
    );
    assert_eq!(
        app.get(&format!("/api/v1/orgs/{id}/envs/{env_id}"))
            .await
            .json()["name"],
        "prod"
    );
    assert_eq!(
        app.get("/api/v1/orgs/acme/envs").await.json()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // An environment id from another organization is not found through this one.
    let other = app.org("other").await;
    assert_eq!(
        app.get(&format!("/api/v1/orgs/{}/envs/{env_id}", other.id))
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Deleting in the wrong order is a conflict; in the right order it works.
    let r = app
        .call(Method::DELETE, "/api/v1/orgs/acme", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/orgs/acme/envs/prod",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app
        .call(Method::DELETE, "/api/v1/orgs/acme", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(
        app.get("/api/v1/orgs/acme").await.status,
        StatusCode::NOT_FOUND
    );
}

/// Reads the SSE body until `needle` shows up, with a deadline.
async fn read_until(body: &mut BodyDataStream, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in time; got {seen:?}"))
            .expect("stream ended")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test]
async fn events_are_streamed_and_scoped() {
    let app = TestApp::new().await;
    let (org, env, host) = app.fleet().await;
    let staging = app.env(&org, "staging").await;
    let hidden = app.host(&staging, "stg-1").await;
    let viewer = app
        .token(
            "prod-viewer",
            Role::Viewer,
            Scope::Env {
                org: org.id,
                env: env.id,
            },
        )
        .await;

    let resp = app
        .router
        .clone()
        .oneshot(request(
            Method::GET,
            "/api/v1/events",
            Some(&app.admin.clone()),
            None,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut all = resp.into_body().into_data_stream();
    let resp = app
        .router
        .clone()
        .oneshot(request(Method::GET, "/api/v1/events", Some(&viewer), None))
        .await
        .unwrap();
    let mut scoped = resp.into_body().into_data_stream();

    app.ops
        .events
        .send(NodeEvent::HostOnline { host: hidden.id })
        .unwrap();
    let change = ChangeId::random();
    app.ops
        .events
        .send(NodeEvent::Change {
            host: host.id,
            change,
            seq: 1,
            status: ChangeStatus::Applied,
        })
        .unwrap();

    let text = read_until(&mut all, &change.to_string()).await;
    assert!(text.contains("event: host_online"), "{text}");
    assert!(text.contains(&hidden.id.to_string()));
    assert!(text.contains("event: change"), "{text}");
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|d| d.contains(&change.to_string()))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["type"], "change");
    assert_eq!(v["status"], "applied");

    let text = read_until(&mut scoped, &change.to_string()).await;
    assert!(
        !text.contains(&hidden.id.to_string()),
        "a scoped token saw another environment: {text}"
    );
}

#[tokio::test]
async fn a_lagging_client_is_told_what_it_missed() {
    let app = TestApp::with_limits(Default::default(), 4).await;
    let (_org, _env, host) = app.fleet().await;
    let resp = app
        .router
        .clone()
        .oneshot(request(
            Method::GET,
            &format!("/api/v1/events?host={}", host.id),
            Some(&app.admin.clone()),
            None,
        ))
        .await
        .unwrap();
    let mut body = resp.into_body().into_data_stream();
    for _ in 0..10 {
        app.ops
            .events
            .send(NodeEvent::HostOnline { host: host.id })
            .unwrap();
    }
    let text = read_until(&mut body, "event: lagged").await;
    let data = text
        .lines()
        .skip_while(|l| *l != "event: lagged")
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(data).unwrap()["missed"],
        6
    );
    // The stream goes on after the notice.
    app.ops
        .events
        .send(NodeEvent::HostOffline { host: host.id })
        .unwrap();
    read_until(&mut body, "event: host_offline").await;
}

#[tokio::test]
async fn event_streams_are_bounded() {
    let limits = comodit_api::ApiLimits {
        max_sse_clients: 1,
        ..Default::default()
    };
    let app = TestApp::with_limits(limits, 4).await;
    let first = app
        .router
        .clone()
        .oneshot(request(
            Method::GET,
            "/api/v1/events",
            Some(&app.admin.clone()),
            None,
        ))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let r = app.get("/api/v1/events").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    r.problem();
    drop(first);
    let again = app
        .router
        .clone()
        .oneshot(request(
            Method::GET,
            "/api/v1/events",
            Some(&app.admin.clone()),
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        StatusCode::OK,
        "a closed stream must free its slot"
    );
}

fn keyed(uri: &str, token: &str, key: &str, body: serde_json::Value) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_response() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let admin = app.admin.clone();

    let first = app
        .send(keyed("/api/v1/orgs", &admin, "k-1", json!({"name": "one"})))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    let again = app
        .send(keyed("/api/v1/orgs", &admin, "k-1", json!({"name": "one"})))
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.text);
    assert_eq!(again.text, first.text);
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    let orgs = app.store.list_orgs(&Page::first(100)).await.unwrap().items;
    assert_eq!(orgs.iter().filter(|o| o.name == "one").count(), 1);

    // The same key for a different request is refused.
    let r = app
        .send(keyed("/api/v1/orgs", &admin, "k-1", json!({"name": "two"})))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.problem().r#type,
        "urn:comodit:problem:idempotency-key-reused"
    );

    // Another token's key space is its own.
    let other = app.token("other-admin", Role::Admin, Scope::Global).await;
    let r = app
        .send(keyed("/api/v1/orgs", &other, "k-1", json!({"name": "one"})))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);

    // A run is submitted once, however many times it is retried.
    let run = format!("/api/v1/hosts/{}/run", host.id);
    let a = app
        .send(keyed(&run, &admin, "run-1", json!({"argv": ["reboot"]})))
        .await;
    let b = app
        .send(keyed(&run, &admin, "run-1", json!({"argv": ["reboot"]})))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(b.text, a.text);
    assert_eq!(app.ops.submits().len(), 1);

    // Without a key, POSTs are not de-duplicated.
    let c = app
        .call(
            Method::POST,
            &run,
            Some(&admin),
            Some(json!({"argv": ["reboot"]})),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(app.ops.submits().len(), 2);

    let audit = app.audit().await;
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.outcome == "ok (idempotent replay)")
            .count(),
        2,
        "{audit:#?}"
    );
}

#[tokio::test]
async fn idempotency_keys_hold_across_nodes_sharing_the_store() {
    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let admin = app.admin.clone();
    let run = format!("/api/v1/hosts/{}/run", host.id);
    let req = || keyed(&run, &admin, "across-1", json!({"argv": ["reboot"]}));

    let first = app.send(req()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    // The retry reaches another node (or this one after a restart): answered, not run again.
    let again = TestApp::send_to(&app.peer, req()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.text, first.text);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(app.ops.submits().len(), 1);
    // And a different request under the key is refused there too.
    let other = keyed(&run, &admin, "across-1", json!({"argv": ["halt"]}));
    let r = TestApp::send_to(&app.peer, other).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);

    // A key whose first request still runs on one node: on the other, a run joins the first
    // request's change (its id is derived from the key, so the store finds it there and nothing is
    // recorded or sent twice; the actors' tests check that part); other routes refuse it (409).
    app.ops.answer(Answer::Hang);
    let (first_node, busy) = (
        app.router.clone(),
        keyed(&run, &admin, "busy-1", json!({"argv": ["reboot"]})),
    );
    let running = tokio::spawn(async move { TestApp::send_to(&first_node, busy).await });
    // Its submit is recorded after its key was claimed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.ops.submits().len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first request never reached its handler"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = TestApp::send_to(
        &app.peer,
        keyed(&run, &admin, "busy-1", json!({"argv": ["reboot"]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.header("idempotent-replayed").is_none());
    assert_eq!(r.header("idempotent-joined").as_deref(), Some("true"));
    let submits = app.ops.submits();
    assert_eq!(submits.len(), 3);
    let joined = submits[2].change_id.expect("a keyed run names its change");
    assert_eq!(
        Some(joined),
        submits[1].change_id,
        "the same change as the first request"
    );
    assert_eq!(r.json()["id"], joined.to_string());
    assert_ne!(
        submits[0].change_id, submits[1].change_id,
        "another key, another change"
    );
    // The client gives up on the first request: its claim is released in the background, and a
    // retry then runs (under the same change id, so it would find the first change, if any).
    running.abort();
    let retry = loop {
        let r = TestApp::send_to(
            &app.peer,
            keyed(&run, &admin, "busy-1", json!({"argv": ["reboot"]})),
        )
        .await;
        if r.header("idempotent-joined").is_none() {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned claim was never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text);
    let submits = app.ops.submits();
    assert_eq!(submits.last().unwrap().change_id, Some(joined));

    // A failed request (5xx) frees its key: the retry runs.
    app.ops.answer(Answer::Fail("broker down"));
    let failed = app
        .send(keyed(&run, &admin, "fails-1", json!({"argv": ["reboot"]})))
        .await;
    assert!(failed.status.is_server_error(), "{}", failed.text);
    let retried = TestApp::send_to(
        &app.peer,
        keyed(&run, &admin, "fails-1", json!({"argv": ["reboot"]})),
    )
    .await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.text);
    assert!(retried.header("idempotent-replayed").is_none());
}

/// The router serves over a real socket too (`axum::serve`), events included.
#[tokio::test]
async fn serves_over_a_real_listener() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::new().await;
    let (_org, _env, host) = app.fleet().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router.clone();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut reply))
        .await
        .expect("no reply in time")
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    let mut events = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /api/v1/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
        app.admin
    );
    events.write_all(req.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Events sent before the handler subscribed are not delivered: keep sending until one is seen.
    while !seen.contains("event: host_online") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event in time: {seen}"
        );
        if seen.contains("text/event-stream") {
            let _ = app.ops.events.send(NodeEvent::HostOnline { host: host.id });
        }
        let n = match tokio::time::timeout(Duration::from_millis(200), events.read(&mut buf)).await
        {
            Ok(r) => r.unwrap(),
            Err(_) => continue,
        };
        assert!(n > 0, "connection closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    server.abort();
}

#[tokio::test]
async fn a_single_node_reports_a_cluster_of_one_to_any_reader() {
    let app = TestApp::new().await;
    let (org, _env, _host) = app.fleet().await;
    let viewer = app
        .token("cluster-viewer", Role::Viewer, Scope::Org { org: org.id })
        .await;
    for token in [app.admin.clone(), viewer] {
        let r = app
            .call(Method::GET, "/api/v1/cluster", Some(&token), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        assert_eq!((v["id"].clone(), v["leader"].clone()), (json!(1), json!(1)));
        assert_eq!(v["lease_valid"], true);
        let shards = v["shards"].as_array().unwrap();
        assert_eq!(shards.len(), crate::common::N_SHARDS as usize);
        assert!(shards.iter().all(|s| s["owner"] == 1 && s["epoch"] == 1));
        let nodes = v["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            nodes[0]["shards"].as_array().unwrap().len(),
            crate::common::N_SHARDS as usize
        );
    }
}

#[tokio::test]
async fn cluster_shards_are_readable_and_membership_changes_are_for_admins_of_a_cluster() {
    let app = TestApp::new().await;
    let (org, _env, _host) = app.fleet().await;
    let viewer = app
        .token("shards-viewer", Role::Viewer, Scope::Org { org: org.id })
        .await;
    let r = app
        .call(Method::GET, "/api/v1/cluster/shards", Some(&viewer), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let shards = r.json()["shards"].as_array().unwrap().clone();
    assert_eq!(shards.len(), crate::common::N_SHARDS as usize);
    assert!(shards.iter().all(|s| s["owner"] == 1));

    let join = json!({"id": 4, "addr": "127.0.0.1:7004"});
    // Not an admin: refused before anything else.
    for (path, body) in [
        ("/api/v1/cluster/nodes", Some(join.clone())),
        ("/api/v1/cluster/nodes/2/decommission", None),
    ] {
        let r = app.call(Method::POST, path, Some(&viewer), body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text);
    }
    // An admin of a single node: there is no membership to change.
    let r = app
        .call(
            Method::POST,
            "/api/v1/cluster/nodes",
            Some(&app.admin),
            Some(join),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert!(r.problem().detail.contains("no cluster_id"), "{}", r.text);
    let r = app
        .call(
            Method::POST,
            "/api/v1/cluster/nodes/2/decommission",
            Some(&app.admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    // Unknown fields are refused.
    let r = app
        .call(
            Method::POST,
            "/api/v1/cluster/nodes",
            Some(&app.admin),
            Some(json!({"id": 4, "addr": "127.0.0.1:7004", "voter": true})),
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    assert_ne!(r.status, StatusCode::CONFLICT, "{}", r.text);
}
