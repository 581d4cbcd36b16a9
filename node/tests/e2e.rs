//! End to end: a real node, real agents and the real broker, driven through the REST API.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::json;

fn put_file(
    node: &Node,
    host: &str,
    path: &std::path::Path,
    content: &str,
    mode: &str,
    query: &str,
) -> (u16, serde_json::Value) {
    node.api(
        "PUT",
        &format!("/hosts/{host}/resources/files{}{query}", path.display()),
        Some(json!({"spec": {"content": content, "mode": mode}})),
    )
}

#[test]
fn enroll_online_put_dry_run_run_offline_and_back() {
    let node = Node::start();
    let token = node.enrollment_token(5);
    let mut agent = Agent::enroll(&node, &token);
    agent.start(&node);
    let host = agent.host.clone();

    // Enrolled and online, with facts.
    node.wait_for("host online", || node.online(&host).then_some(()));
    let detail = node.host(&host);
    assert_eq!(
        detail["runtime"]["facts"]["os_family"], "debian",
        "{detail}"
    );
    let (_, facts) = node.api("GET", &format!("/hosts/{host}/facts"), None);
    assert!(facts["facts"]["cpus"].as_u64().unwrap_or(0) >= 1, "{facts}");

    // A file through the API lands on disk with its mode.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("motd");
    let (status, body) = put_file(&node, &host, &path, "hello from comodit\n", "0640", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "applied", "{body}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "hello from comodit\n"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );

    // Dry run reports and changes nothing.
    let (status, body) = put_file(&node, &host, &path, "changed\n", "0600", "?dry_run=true");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["results"][0]["changed"], true, "{body}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "hello from comodit\n"
    );

    // GET reads it back through the agent.
    let (status, body) = node.api(
        "GET",
        &format!("/hosts/{host}/resources/files{}", path.display()),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["data"]["state"]["mode"], "0640", "{body}");

    // run returns output.
    let (status, body) = node.api(
        "POST",
        &format!("/hosts/{host}/run"),
        Some(json!({"argv": ["echo", "out $(not a shell)"], "timeout_s": 10})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"]["data"]["stdout"], "out $(not a shell)\n",
        "{body}"
    );

    // The agent stops: offline.
    agent.stop();
    node.wait_for("host offline", || (!node.online(&host)).then_some(()));

    // A command sent while offline is accepted (202) and runs once when the agent returns.
    let log = dir.path().join("ran-while-offline");
    let (status, body) = node.api(
        "POST",
        &format!("/hosts/{host}/run?async=true"),
        Some(json!({"argv": ["sh", "-c", format!("echo ran >> {}", log.display())], "timeout_s": 10})),
    );
    assert_eq!(status, 202, "{body}");
    let change = body["id"].as_str().unwrap().to_owned();
    agent.start(&node);
    node.wait_for("offline change applied", || {
        let (_, c) = node.api("GET", &format!("/hosts/{host}/changes/{change}"), None);
        (c["status"] == "applied").then_some(())
    });
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n");
    let (_, changes) = node.api("GET", &format!("/hosts/{host}/changes"), None);
    assert!(changes["items"].as_array().unwrap().len() >= 5, "{changes}");

    // Prometheus text at /metrics, without a token, with real histograms and the actors' counters.
    let metrics = ureq::get(&node.url("/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    for needle in [
        "comodit_api_request_duration_seconds_bucket",
        "comodit_node_commands_dispatched_total",
        "comodit_node_replies_total",
        // Batch sizes in writes, not in the latency buckets.
        "comodit_store_write_batch_size_bucket{le=\"256\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from /metrics:\n{metrics}"
        );
    }
}

#[test]
fn node_restart_keeps_hosts_tokens_changes_and_resumes_queued_work() {
    let mut node = Node::start();
    let token = node.enrollment_token(2);
    let mut agent = Agent::enroll(&node, &token);
    agent.start(&node);
    let host = agent.host.clone();
    node.wait_for("host online", || node.online(&host).then_some(()));
    let (status, _) = node.api(
        "POST",
        &format!("/hosts/{host}/run"),
        Some(json!({"argv": ["true"], "timeout_s": 5})),
    );
    assert_eq!(status, 200);

    // Queue work while the agent is away, then restart the node.
    agent.stop();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("after-restart");
    let (status, body) = put_file(&node, &host, &path, "resumed\n", "0644", "?async=true");
    assert_eq!(status, 202, "{body}");
    let change = body["id"].as_str().unwrap().to_owned();
    node.stop();
    node.spawn();

    let (status, _) = node.api("GET", &format!("/hosts/{host}"), None);
    assert_eq!(status, 200, "host survives the restart");
    let (_, tokens) = node.api("GET", "/orgs/default/enrollment-tokens", None);
    assert_eq!(tokens["items"][0]["uses"], 1, "{tokens}");
    let (_, changes) = node.api("GET", &format!("/hosts/{host}/changes"), None);
    assert!(changes["items"].as_array().unwrap().len() >= 2, "{changes}");

    agent.start(&node);
    node.wait_for("queued change applied after restart", || {
        let (_, c) = node.api("GET", &format!("/hosts/{host}/changes/{change}"), None);
        (c["status"] == "applied").then_some(())
    });
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "resumed\n");
}

#[test]
fn a_revoked_host_cannot_reconnect() {
    let node = Node::start();
    let token = node.enrollment_token(1);
    let mut agent = Agent::enroll(&node, &token);
    agent.start(&node);
    let host = agent.host.clone();
    node.wait_for("host online", || node.online(&host).then_some(()));

    let (status, body) = node.api("DELETE", &format!("/hosts/{host}"), None);
    assert!(status == 200 || status == 204, "{status} {body}");
    let (status, _) = node.api("GET", &format!("/hosts/{host}"), None);
    assert_eq!(status, 404);
    // Its broker user is gone: the broker refuses the stored credentials.
    let creds: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.state.path().join("credentials.json")).unwrap(),
    )
    .unwrap();
    let url = comodit_testkit::amqp_url_for(&host, creds["password"].as_str().unwrap());
    let refused = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let stop = tokio_util::sync::CancellationToken::new();
            let bus = comodit_bus::Bus::start(
                comodit_bus::BusConfig {
                    url,
                    ..Default::default()
                },
                stop.clone(),
            );
            let r = bus.wait_connected(std::time::Duration::from_secs(3)).await;
            stop.cancel();
            r.is_err()
        });
    assert!(refused, "the revoked host's credentials still work");
    // A used-up token enrolls nobody.
    let out = std::process::Command::new(bin("comodit-agent"))
        .env("COMODIT_STATE_DIR", tempfile::tempdir().unwrap().path())
        .env("COMODIT_PREFIX", &node.prefix)
        .env("COMODIT_ENROLL_USER", node.enroll_user())
        .env("COMODIT_ENROLL_PASSWORD", "enroll-secret")
        .args(["enroll", "--token", &token])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn the_cli_drives_the_api() {
    let node = Node::start();
    let token = node.enrollment_token(1);
    let mut agent = Agent::enroll(&node, &token);
    agent.start(&node);
    let host = agent.host.clone();
    node.wait_for("host online", || node.online(&host).then_some(()));
    let token_file = node.dir.path().join("data/admin-token");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin("comodit"))
            .env("COMODIT_URL", node.url(""))
            .env("COMODIT_TOKEN_FILE", &token_file)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, hosts, err) = cli(&["hosts", "list", "--online", "true"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(hosts["items"][0]["id"], host.as_str(), "{hosts}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("via-cli");
    let (code, change, err) = cli(&[
        "resources",
        "put",
        &host,
        "files",
        path.to_str().unwrap(),
        "--spec",
        r#"{"content": "from the cli\n", "mode": "0600"}"#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(change["status"], "applied", "{change}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "from the cli\n");

    let (code, run, err) = cli(&["run", &host, "--", "echo", "hi"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(run["result"]["data"]["stdout"], "hi\n", "{run}");

    // The same run again with the same key: the first outcome, not a second run.
    let keyed = |n: &str| {
        cli(&[
            "--idempotency-key",
            "cli-run-1",
            "run",
            &host,
            "--",
            "sh",
            "-c",
            &format!("echo {n} >> {}", dir.path().join("runs").display()),
        ])
    };
    let (code, first, err) = keyed("once");
    assert_eq!(code, Some(0), "{err}");
    let (code, again, err) = keyed("once");
    assert_eq!(code, Some(0), "{err}");
    assert!(first["id"].is_string(), "{first}");
    assert_eq!(again["id"], first["id"], "{first} / {again}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("runs")).unwrap(),
        "once\n"
    );
    // The key with another command is refused.
    let (code, _, err) = keyed("twice");
    assert_eq!(code, Some(1));
    assert!(err.contains("422"), "{err}");

    let (code, labelled, err) = cli(&["hosts", "label", &host, "rack=r12"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(labelled["labels"]["rack"], "r12", "{labelled}");

    // A job to every host with that label: the real agent runs it once; the job says so.
    let jobs_file = dir.path().join("jobs");
    let (code, job, err) = cli(&[
        "jobs",
        "run",
        "default",
        "--label",
        "rack=r12",
        "--max-concurrency",
        "1",
        "--max-errors",
        "0",
        "--",
        "sh",
        "-c",
        &format!("echo job >> {}", jobs_file.display()),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(job["hosts"], 1, "{job}");
    assert_eq!(
        (&job["max_concurrency"], &job["max_errors"]),
        (&json!(1), &json!(0)),
        "{job}"
    );
    let id = job["id"].as_str().unwrap().to_owned();
    let done = node.wait_for("the job done", || {
        let (_, now, _) = cli(&["jobs", "get", "default", &id]);
        (now["status"] != "running").then_some(now)
    });
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["counts"]["applied"], 1, "{done}");
    assert_eq!(std::fs::read_to_string(&jobs_file).unwrap(), "job\n");
    let (code, listed, err) = cli(&["jobs", "list", "default"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(listed["items"][0]["id"], id.as_str(), "{listed}");
    let (code, hosts, err) = cli(&["jobs", "hosts", "default", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(hosts["items"][0]["host"], host.as_str(), "{hosts}");
    assert_eq!(hosts["items"][0]["status"], "applied", "{hosts}");
    // A label no host has is refused, and runs nothing.
    let (code, _, err) = cli(&["jobs", "send", "default", "ping", "--label", "rack=none"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("422"), "{err}");

    // A problem from the API is an error exit with its detail.
    let (code, _, err) = cli(&["hosts", "get", "not-a-uuid"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("400"), "{err}");
}
