//! Jobs: one command to many hosts, over the real embedded store (the job's per-host results and
//! counts are the store's), with the fake host actors answering at once or leaving changes queued.

use axum::http::{HeaderValue, Method, StatusCode};
use comodit_store::{ChangeStatus, Page, Role, Scope};
use serde_json::{json, Value};

use crate::common::{request, Answer, Resp, TestApp};

fn run_uptime() -> Value {
    json!({"run": {"argv": ["uptime"]}})
}

async fn post(app: &TestApp, uri: &str, token: &str, body: Option<Value>) -> Resp {
    app.call(Method::POST, uri, Some(token), body).await
}

/// The admin's job request to the organization.
async fn post_job(app: &TestApp, body: Value) -> Resp {
    post(app, "/api/v1/orgs/acme/jobs", &app.admin, Some(body)).await
}

/// The host of `submit` answers its change with `status` (written to the store as its actor would).
async fn answer(app: &TestApp, submit: &crate::common::Submit, status: ChangeStatus) {
    app.store
        .update_change(
            submit.host,
            submit.change_id.unwrap(),
            status,
            None,
            comodit_protocol::Epoch(1),
        )
        .await
        .unwrap();
}

/// A job request with an `Idempotency-Key`.
fn keyed_job(app: &TestApp, body: Value, key: &str) -> axum::http::Request<axum::body::Body> {
    let mut req = request(
        Method::POST,
        "/api/v1/orgs/acme/jobs",
        Some(&app.admin),
        Some(body),
    );
    req.headers_mut()
        .insert("idempotency-key", HeaderValue::from_str(key).unwrap());
    req
}

/// Every change the store holds for `host`.
async fn changes_of(app: &TestApp, host: comodit_protocol::HostId) -> Vec<comodit_store::Change> {
    app.store
        .list_changes(host, &Page::first(100))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn a_job_records_one_change_per_matching_host_and_counts_them() {
    let app = TestApp::new().await;
    let (org, prod, web1) = app.fleet().await;
    let web2 = app.host(&prod, "web-2").await;
    let staging = app.env(&org, "staging").await;
    let other = app.host(&staging, "stg-1").await;

    let r = post_job(
        &app,
        json!({"target": {"env": "prod"}, "command": run_uptime()}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let job = r.json();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(
        r.header("location").unwrap(),
        format!("/api/v1/orgs/{}/jobs/{id}", org.id)
    );
    assert_eq!(job["hosts"], 2);
    assert_eq!(job["env"], prod.id.to_string());
    // The fake actors answer at once: both applied, the job done.
    assert_eq!(job["counts"]["applied"], 2, "{job}");
    assert_eq!(job["status"], "done");

    let submits = app.ops.submits();
    let mut hosts: Vec<_> = submits.iter().map(|s| s.host).collect();
    hosts.sort();
    let mut want = vec![web1.id, web2.id];
    want.sort();
    assert_eq!(hosts, want, "one submit per host of prod, none elsewhere");
    assert!(submits
        .iter()
        .all(|s| s.wait.is_none() && s.change_id.is_some()));
    assert!(changes_of(&app, other.id).await.is_empty());
    for h in [web1.id, web2.id] {
        let changes = changes_of(&app, h).await;
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].job.map(|j| j.0.to_string()), Some(id.clone()));
    }

    let r = app.get(&format!("/api/v1/orgs/acme/jobs/{id}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["counts"]["applied"], 2);
    assert_eq!(r.json()["command"]["run"]["argv"], json!(["uptime"]));
    let r = app
        .get(&format!("/api/v1/orgs/acme/jobs/{id}/hosts?limit=1"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let page = r.json();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["status"], "applied");
    let next = page["next"].as_str().unwrap();
    let r = app
        .get(&format!(
            "/api/v1/orgs/acme/jobs/{id}/hosts?limit=1&cursor={next}"
        ))
        .await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 1);
    assert!(r.json()["next"].is_null());

    // A label narrows the whole organization; a listed host must match the rest of the target.
    let mut labelled = app.store.get_host(web2.id).await.unwrap().unwrap();
    labelled.labels.insert("role".into(), "web".into());
    app.store
        .update_host(&labelled, labelled.version)
        .await
        .unwrap();
    let r = post_job(
        &app,
        json!({"target": {"label": "role=web"}, "command": "ping"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["hosts"], 1);
    let r = post_job(
        &app,
        json!({"target": {"hosts": [other.id, web1.id]}, "command": "facts"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["hosts"], 2);

    // Unknown job, and a job of another organization, are 404.
    let r = app
        .get(&format!("/api/v1/orgs/acme/jobs/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    app.org("umbrella").await;
    let r = app.get(&format!("/api/v1/orgs/umbrella/jobs/{id}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/api/v1/orgs/acme/jobs/not-a-uuid").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_bad_job_is_refused_and_records_nothing() {
    let app = TestApp::new().await;
    let (org, prod, web1) = app.fleet().await;
    let empty = app.env(&org, "empty").await;
    let post_job = |body: Value| {
        let app = &app;
        async move { post_job(app, body).await }
    };
    let cases = [
        (
            json!({"command": {"run": {"argv": []}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "reboot"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "max_errors": 100_001}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "surprise": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "target": {"env": "nope"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "target": {"env": empty.id}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "target": {"label": "novalue"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "target": {"hosts": []}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "target": {"hosts": [web1.id, uuid::Uuid::new_v4()]}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "target": {"hosts": ["not-a-uuid"]}}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "ttl_s": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"command": "ping", "ttl_s": 86_401}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (body, want) in cases {
        let r = post_job(body.clone()).await;
        let got = r.status;
        // serde's refusals of the body are 400 or 422 depending on where they fail; both refuse.
        assert!(
            got == want || got == StatusCode::BAD_REQUEST,
            "{body}: {got} {}",
            r.text
        );
        assert!(
            r.header("content-type").unwrap().contains("problem+json"),
            "{body}"
        );
    }
    assert!(app.ops.submits().is_empty(), "a refused job sent nothing");
    assert!(changes_of(&app, web1.id).await.is_empty());
    let _ = prod;

    // A host listed from another organization is as unknown as a missing one.
    let umbrella = app.org("umbrella").await;
    let theirs = app.env(&umbrella, "prod").await;
    let their_host = app.host(&theirs, "u-1").await;
    let r = post_job(json!({"command": "ping", "target": {"hosts": [their_host.id]}})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(changes_of(&app, their_host.id).await.is_empty());
}

#[tokio::test]
async fn job_scopes_follow_the_organization_and_environment() {
    let app = TestApp::new().await;
    let (org, prod, _web1) = app.fleet().await;
    let staging = app.env(&org, "staging").await;
    app.host(&staging, "stg-1").await;
    let prod_operator = app
        .token(
            "prod-op",
            Role::Operator,
            Scope::Env {
                org: org.id,
                env: prod.id,
            },
        )
        .await;
    let prod_reader = app
        .token(
            "prod-ro",
            Role::Viewer,
            Scope::Env {
                org: org.id,
                env: prod.id,
            },
        )
        .await;
    let body = json!({"command": "ping"});
    // The organization-wide route needs the organization's scope.
    let r = post(
        &app,
        "/api/v1/orgs/acme/jobs",
        &prod_operator,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = post(
        &app,
        "/api/v1/orgs/acme/envs/staging/jobs",
        &prod_operator,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = post(
        &app,
        "/api/v1/orgs/acme/envs/prod/jobs",
        &prod_reader,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(app.ops.submits().is_empty());
    // Its own environment's route works, and the path's environment wins over none in the body.
    let r = post(
        &app,
        "/api/v1/orgs/acme/envs/prod/jobs",
        &prod_operator,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["hosts"], 1);
    let prod_job = r.json()["id"].as_str().unwrap().to_owned();
    let r = post(
        &app,
        "/api/v1/orgs/acme/envs/prod/jobs",
        &prod_operator,
        Some(json!({"command": "ping", "target": {"env": "staging"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // An organization-wide job is not visible to the environment's tokens; theirs is.
    let r = post_job(&app, body).await;
    assert_eq!(r.json()["hosts"], 2);
    let org_job = r.json()["id"].as_str().unwrap().to_owned();
    let get = |token: String, job: String| {
        let app = &app;
        async move {
            app.call(
                Method::GET,
                &format!("/api/v1/orgs/acme/jobs/{job}"),
                Some(&token),
                None,
            )
            .await
            .status
        }
    };
    assert_eq!(
        get(prod_reader.clone(), org_job.clone()).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(prod_reader.clone(), prod_job.clone()).await,
        StatusCode::OK
    );
    // The listing: newest first for the organization's tokens, the environment's own for theirs.
    let ids = |r: &Resp| -> Vec<String> {
        r.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = app.get("/api/v1/orgs/acme/jobs").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text);
    assert_eq!(ids(&all), vec![org_job.clone(), prod_job.clone()]);
    assert_eq!(all.json()["items"][0]["hosts"], 2);
    let theirs = app
        .call(
            Method::GET,
            "/api/v1/orgs/acme/jobs",
            Some(&prod_reader),
            None,
        )
        .await;
    assert_eq!(theirs.status, StatusCode::OK, "{}", theirs.text);
    assert_eq!(ids(&theirs), vec![prod_job]);
    let first = app.get("/api/v1/orgs/acme/jobs?limit=1").await;
    assert_eq!(ids(&first), vec![org_job]);
    assert!(first.json()["next"].is_string());
    // Every job creation is in the audit log.
    let audited = app
        .audit()
        .await
        .into_iter()
        .filter(|e| e.action.ends_with("/jobs") && e.outcome == "ok")
        .count();
    assert!(audited >= 2, "job creations audited: {audited}");
}

#[tokio::test]
async fn a_retried_job_finds_the_first_and_records_nothing_twice() {
    let app = TestApp::new().await;
    let (_org, prod, web1) = app.fleet().await;
    let web2 = app.host(&prod, "web-2").await;
    let keyed = |key: &str| keyed_job(&app, json!({"command": run_uptime()}), key);
    let first = app.send(keyed("job-1")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let second = app.send(keyed("job-1")).await;
    assert_eq!(second.json()["id"], first.json()["id"]);
    // Through the other router too (another node, the first one's answer not replayed there if
    // it were lost): the same job, still one change per host.
    let third = TestApp::send_to(&app.peer, keyed("job-1")).await;
    assert_eq!(third.json()["id"], first.json()["id"]);
    for h in [web1.id, web2.id] {
        assert_eq!(changes_of(&app, h).await.len(), 1, "one change for {h}");
    }
    let other = app.send(keyed("job-2")).await;
    assert_ne!(other.json()["id"], first.json()["id"]);
    assert_eq!(changes_of(&app, web1.id).await.len(), 2);
}

#[tokio::test]
async fn cancelling_a_job_cancels_its_queued_changes() {
    let app = TestApp::new().await;
    let (_org, prod, web1) = app.fleet().await;
    let web2 = app.host(&prod, "web-2").await;
    // One host's agent answers, the other's change stays queued (an offline host).
    app.ops
        .answer(Answer::Completed(comodit_protocol::Status::Ok, None));
    app.ops.answer(Answer::Pending);
    let r = post_job(
        &app,
        json!({"command": "ping", "target": {"hosts": [web1.id, web2.id]}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let job = r.json();
    assert_eq!(job["status"], "running");
    assert_eq!(job["counts"]["queued"], 1);
    assert_eq!(job["counts"]["applied"], 1);
    let id = job["id"].as_str().unwrap();
    let r = post(
        &app,
        &format!("/api/v1/orgs/acme/jobs/{id}/cancel"),
        &app.admin,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["status"], "cancelled");
    assert_eq!(r.json()["counts"]["cancelled"], 1);
    assert_eq!(r.json()["counts"]["applied"], 1);
    // (Which host answered depends on the order the job released them in.)
    let mut statuses = vec![
        changes_of(&app, web1.id).await[0].status,
        changes_of(&app, web2.id).await[0].status,
    ];
    statuses.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(statuses, [ChangeStatus::Applied, ChangeStatus::Cancelled]);
    // Cancelling again changes nothing.
    let r = post(
        &app,
        &format!("/api/v1/orgs/acme/jobs/{id}/cancel"),
        &app.admin,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["counts"]["cancelled"], 1);
}

#[tokio::test]
async fn a_paced_job_releases_hosts_as_others_answer_and_stops_when_cancelled() {
    let app = TestApp::new().await;
    let (_org, prod, web1) = app.fleet().await;
    let web2 = app.host(&prod, "web-2").await;
    let web3 = app.host(&prod, "web-3").await;
    // Every host's change stays pending until the test says it answered.
    for _ in 0..3 {
        app.ops.answer(Answer::Pending);
    }
    let r = post_job(&app, json!({"command": "ping", "max_concurrency": 1})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let job = r.json();
    assert_eq!(job["hosts"], 3);
    assert_eq!(job["max_concurrency"], 1);
    assert_eq!(job["counts"]["queued"], 1, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let submits = || app.ops.submits();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        submits().len(),
        1,
        "nothing more while the first is pending"
    );

    // The first host answers: the next one is released.
    answer(&app, &submits()[0], ChangeStatus::Applied).await;
    // (The fake actors count a submit before its change is in the store: wait for the store.)
    let job = wait_job(&app, &id, "the second host was not released", |j| {
        j["counts"]["queued"] == 1
    })
    .await;
    assert_eq!(submits().len(), 2);
    assert_eq!(job["counts"]["applied"], 1, "{job}");
    assert_eq!(job["status"], "running");

    // Cancelled: the queued one is cancelled and the last host never gets the command.
    let r = post(
        &app,
        &format!("/api/v1/orgs/acme/jobs/{id}/cancel"),
        &app.admin,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["counts"]["cancelled"], 1, "{}", r.text);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    // The third host never runs it: no change, or (when the release raced the cancel) a change
    // cancelled right after it was recorded.
    let released: Vec<_> = submits().iter().take(2).map(|s| s.host).collect();
    let third = [web1.id, web2.id, web3.id]
        .into_iter()
        .find(|h| !released.contains(h))
        .unwrap();
    let third_changes = changes_of(&app, third).await;
    assert!(
        third_changes
            .iter()
            .all(|c| c.status == ChangeStatus::Cancelled),
        "{third_changes:?}"
    );
    // Out of range: refused.
    let r = post_job(&app, json!({"command": "ping", "max_concurrency": 0})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Polls the job until `done` says so, for at most 10 s.
async fn wait_job(app: &TestApp, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = app.get(&format!("/api/v1/orgs/acme/jobs/{id}")).await;
        if done(&r.json()) {
            return r.json();
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {}", r.text);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_job_stops_once_more_hosts_failed_than_max_errors() {
    let app = TestApp::new().await;
    let (_org, prod, _web1) = app.fleet().await;
    app.host(&prod, "web-2").await;
    app.host(&prod, "web-3").await;
    for _ in 0..6 {
        app.ops.answer(Answer::Pending);
    }
    let keyed = || {
        keyed_job(
            &app,
            json!({"command": "ping", "max_concurrency": 1, "max_errors": 0}),
            "stop-1",
        )
    };

    // Paced, one at a time: the first host fails, so the other two never get the command.
    let r = app.send(keyed()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["max_errors"], 0, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    answer(&app, &app.ops.submits()[0], ChangeStatus::Failed).await;
    let job = wait_job(&app, &id, "the job stopped", |j| j["status"] == "failed").await;
    assert_eq!(job["counts"]["failed"], 1, "{job}");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        app.ops.submits().len(),
        1,
        "no host released after the stop"
    );
    // Retried with its key after its answer was forgotten (as on a node that died mid-request):
    // the stopped job is answered, and nothing more is recorded.
    let later = chrono::Utc::now() + chrono::Duration::days(2);
    app.store.purge_idempotency_keys(later).await.unwrap();
    let r = app.send(keyed()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["id"], id.as_str());
    assert_eq!(r.json()["status"], "failed", "{}", r.text);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(app.ops.submits().len(), 1, "the retry released nothing");

    // Not paced: all three are queued at once; once one fails, the two still queued are
    // cancelled.
    let r = post_job(&app, json!({"command": "ping", "max_errors": 0})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let queued = wait_job(&app, &id, "three queued", |j| j["counts"]["queued"] == 3).await;
    assert_eq!(queued["status"], "running", "{queued}");
    answer(&app, &app.ops.submits()[1], ChangeStatus::Failed).await;
    let job = wait_job(&app, &id, "the queued ones cancelled", |j| {
        j["counts"]["cancelled"] == 2
    })
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["counts"]["failed"], 1, "{job}");
    assert_eq!(job["counts"]["queued"], 0, "{job}");
}
