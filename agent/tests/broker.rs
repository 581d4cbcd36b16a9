//! The agent against a real RabbitMQ: commands in, replies and events out, through the topology and
//! the per-host credentials of DESIGN §5.

mod common;

use std::os::unix::fs::PermissionsExt;

use chrono::Utc;
use common::*;
use comodit_protocol::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ping_apply_idempotent_and_dry_run() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let hello = rig.hello().await;
    assert_eq!(hello.host, rig.host);
    assert!(!hello.facts.hostname.is_empty());
    assert_eq!(hello.facts.os_family, "debian");
    assert!(hello.facts.capabilities.iter().any(|c| c == "files"));

    let ping = rig.command(1, Body::Ping {});
    let reply = rig.call(&ping).await;
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.host, rig.host);

    let path = rig.path("motd");
    let apply = |mode| Body::Apply {
        mode,
        monitor: false,
        resources: vec![file_resource(&path, "hi\n", "0640")],
    };
    // Dry run first: reports the change, writes nothing.
    let reply = rig.call(&rig.command(1, apply(ApplyMode::DryRun))).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    assert!(reply.results[0].changed);
    assert!(!path.exists(), "dry run wrote the file");

    let reply = rig.call(&rig.command(1, apply(ApplyMode::Enforce))).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    assert!(reply.results[0].changed);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hi\n");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );

    let reply = rig.call(&rig.command(1, apply(ApplyMode::Enforce))).await;
    assert!(!reply.results[0].changed, "second apply changed: {reply:?}");
    assert!(reply.results[0].diff.is_empty());

    // read and list answer with data.
    let r = ResourceRef::new(Collection::Files, path.to_str().unwrap()).unwrap();
    let reply = rig
        .call(&rig.command(1, Body::Read { r#ref: r.clone() }))
        .await;
    match reply.data {
        Some(ReplyData::Read { state, .. }) => assert_eq!(state["mode"], json!("0640")),
        other => panic!("{other:?}"),
    }
    let list = Body::List {
        collection: Collection::Files,
        under: Some(rig.work.path().to_str().unwrap().to_owned()),
    };
    let reply = rig.call(&rig.command(1, list)).await;
    match reply.data {
        Some(ReplyData::List { ids, .. }) => {
            assert_eq!(ids, vec![path.to_str().unwrap().to_owned()])
        }
        other => panic!("{other:?}"),
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_is_answered_from_the_dedup_window() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let log = rig.path("runs.log");
    let cmd = rig.command(
        1,
        run_body(&["sh", "-c", &format!("echo ran >> {}", log.display())]),
    );
    let first = rig.call(&cmd).await;
    assert_eq!(first.status, Status::Ok, "{first:?}");
    rig.send(&cmd).await;
    let second = rig.reply_to(cmd.id).await;
    assert_eq!(first, second, "the stored reply is sent again, unchanged");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n", "ran once");
    rig.stop_agent().await;
    assert!(
        rig.metrics().contains("comodit_agent_duplicates_total 1"),
        "{}",
        rig.metrics()
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_stale_epoch_commands_are_refused_and_change_nothing() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let path = rig.path("never");
    let apply = Body::Apply {
        mode: ApplyMode::Enforce,
        monitor: false,
        resources: vec![file_resource(&path, "x", "0644")],
    };
    let reply = rig.call(&rig.command(10, Body::Ping {})).await;
    assert_eq!(reply.status, Status::Ok);

    let stale = rig.command(9, apply.clone());
    let reply = rig.call(&stale).await;
    assert_eq!(reply.status, Status::Rejected);
    assert!(reply.reason.unwrap().contains("stale epoch 9 < 10"));

    let mut expired = rig.command(10, apply);
    expired.issued_at = Utc::now() - chrono::Duration::minutes(20);
    expired.expires_at = Utc::now() - chrono::Duration::minutes(10);
    let reply = rig.call(&expired).await;
    assert_eq!(reply.status, Status::Expired);
    assert!(!path.exists());
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_reasoned_refusal_and_never_stops_the_agent() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let _ = rig.hello().await;
    let base = rig.command(1, Body::Ping {});
    let good = serde_json::to_value(&base).unwrap();
    let variant = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let victim = rig.path("victim");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed json", b"{not json".to_vec(), "malformed"),
        (
            "unknown op",
            variant(&|v| v["body"] = json!({"op": "format_disk"})),
            "malformed",
        ),
        (
            "unknown field",
            variant(&|v| v["surprise"] = json!(1)),
            "surprise",
        ),
        ("wrong version", variant(&|v| v["v"] = json!(2)), "version"),
        (
            "another host",
            variant(&|v| v["host"] = json!(HostId::random().to_string())),
            "is for host",
        ),
        (
            "path traversal",
            variant(&|v| {
                v["body"] = json!({"op": "apply", "resources": [
                    {"collection": "files", "id": format!("{}/../victim", victim.parent().unwrap().display()),
                     "spec": {"content": "pwned"}}]})
            }),
            "normalized",
        ),
        (
            "oversized",
            variant(
                &|v| v["body"] = json!({"op": "run", "argv": ["true", "x".repeat(limits::MAX_MESSAGE_BYTES)], "timeout_s": 1}),
            ),
            "too large",
        ),
    ];
    for (what, bytes, expect) in cases {
        let id = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["id"].as_str().map(|s| s.parse::<CommandId>().unwrap()));
        if bytes.len() > limits::MAX_MESSAGE_BYTES {
            rig.send_unchecked(bytes).await;
        } else {
            rig.send_raw(bytes).await;
        }
        let reply = rig
            .wait_for(what, |u| match u {
                Up::Reply(r) if r.re == id || (id.is_some() && r.re.is_none()) => Some(r.clone()),
                _ => None,
            })
            .await;
        assert_eq!(reply.status, Status::Rejected, "{what}: {reply:?}");
        let reason = reply.reason.unwrap_or_default();
        assert!(
            reason.contains(expect),
            "{what}: reason {reason:?} lacks {expect:?}"
        );
    }
    assert!(!victim.exists(), "the traversal wrote a file");

    // Shell metacharacters in an argv run literally.
    let literal = "$(touch /tmp/comodit-pwned); `id` | && ;";
    let reply = rig
        .call(&rig.command(1, run_body(&["echo", literal])))
        .await;
    match reply.data {
        Some(ReplyData::Run(r)) => assert_eq!(r.stdout, format!("{literal}\n")),
        other => panic!("{other:?}"),
    }
    assert!(!std::path::Path::new("/tmp/comodit-pwned").exists());

    // Still alive.
    let reply = rig.call(&rig.command(1, Body::Ping {})).await;
    assert_eq!(reply.status, Status::Ok);
    rig.stop_agent().await;
    let metrics = rig.metrics();
    // Unknown op and field, wrong version and the traversal are all refused by the parser.
    for (label, count) in [("malformed", 5), ("wrong_host", 1), ("too_large", 1)] {
        let line = format!("comodit_agent_rejected_total{{reason=\"{label}\"}} {count}\n");
        assert!(metrics.contains(&line), "{line:?} not in:\n{metrics}");
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_while_offline_run_once_when_it_returns() {
    let mut rig = Rig::new().await;
    let log = rig.path("offline.log");
    // Published before the agent ever connects: it waits in the host's durable queue.
    let queued = rig.command(
        1,
        run_body(&["sh", "-c", &format!("echo ran >> {}", log.display())]),
    );
    rig.send(&queued).await;
    rig.start_agent();
    let reply = rig.reply_to(queued.id).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");

    // Restart the agent: the acked command is not delivered again. A ping is the barrier: the queue is
    // FIFO, so a redelivery would arrive before its reply.
    rig.stop_agent().await;
    rig.start_agent();
    let ping = rig.command(1, Body::Ping {});
    rig.call(&ping).await;
    assert_eq!(rig.backlog_replies_to(queued.id), 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_run_output_arrives_in_order() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let cmd = rig.command(
        1,
        Body::Run(RunSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "for i in 1 2 3; do echo line$i; done".into(),
            ],
            env: Default::default(),
            cwd: None,
            timeout_s: 30,
            stream: true,
        }),
    );
    let reply = rig.call(&cmd).await;
    assert_eq!(reply.status, Status::Ok);
    let mut chunks = Vec::new();
    while chunks.concat() != "line1\nline2\nline3\n" {
        let (seq, data) = rig
            .wait_for("output", |u| match u {
                Up::Output(o) if o.re == cmd.id => Some((o.seq, o.data.clone())),
                _ => None,
            })
            .await;
        assert_eq!(seq as usize, chunks.len(), "chunks in order");
        chunks.push(data);
    }
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitored_file_drift_is_reported_once_and_enforce_repairs() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let watched = rig.path("watched.conf");
    let enforced = rig.path("enforced.conf");
    let mut enforce = file_resource(&enforced, "fixed\n", "0600");
    enforce.policy = Policy::Enforce;
    let apply = Body::Apply {
        mode: ApplyMode::Enforce,
        monitor: true,
        resources: vec![file_resource(&watched, "v1\n", "0644"), enforce],
    };
    let reply = rig.call(&rig.command(1, apply)).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");

    // Edit behind the agent's back: inotify triggers a check; one drift event.
    std::fs::write(&watched, "edited\n").unwrap();
    let w = watched.to_str().unwrap().to_owned();
    let drift = rig
        .wait_for("drift of watched", |u| match u {
            Up::Drift(d) if d.report.r#ref.id.as_str() == w => Some(d.report.clone()),
            _ => None,
        })
        .await;
    assert!(!drift.repaired);
    assert!(drift.diff.iter().any(|d| d.field == "content"), "{drift:?}");

    // A check now reports it without a second event.
    let reply = rig.call(&rig.command(1, Body::Check {})).await;
    match &reply.data {
        Some(ReplyData::Check { drift }) => assert!(drift.iter().any(|d| d.r#ref.id.as_str() == w)),
        other => panic!("{other:?}"),
    }

    // Put it back: cleared once.
    std::fs::write(&watched, "v1\n").unwrap();
    rig.wait_for("drift cleared", |u| match u {
        Up::DriftCleared(c) if c.r#ref.id.as_str() == w => Some(()),
        _ => None,
    })
    .await;

    // Enforced resource: chmod is repaired and reported.
    std::fs::set_permissions(&enforced, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = enforced.to_str().unwrap().to_owned();
    let repaired = rig
        .wait_for("repair", |u| match u {
            Up::Drift(d) if d.report.r#ref.id.as_str() == e => Some(d.report.clone()),
            _ => None,
        })
        .await;
    assert!(repaired.repaired, "{repaired:?}");
    assert_eq!(
        std::fs::metadata(&enforced).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rig_dropped_before_finish_leaves_nothing_on_the_broker() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let reply = rig.call(&rig.command(1, Body::Ping {})).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    let (user, queue) = (rig.host.to_string(), rig.names.agent_queue(rig.host));
    assert!(comodit_testkit::user_exists(&user));
    assert!(comodit_testkit::queue_info(&queue).is_some());
    // As a failed assertion would: the rig goes without `finish`.
    drop(rig);
    assert!(!comodit_testkit::user_exists(&user));
    assert!(comodit_testkit::queue_info(&queue).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_resent_while_it_runs_is_answered_once() {
    let mut rig = Rig::new().await;
    rig.start_agent();
    let log = rig.path("long.log");
    // The node re-sends a command with the same id after its timeout; a long run is still going.
    let cmd = rig.command(
        1,
        run_body(&[
            "sh",
            "-c",
            &format!("echo start >> {0}; sleep 1; echo end >> {0}", log.display()),
        ]),
    );
    rig.send(&cmd).await;
    rig.send(&cmd).await;
    let reply = rig.reply_to(cmd.id).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    // Barrier: a ping sent after the reply is answered after anything the duplicate caused.
    rig.call(&rig.command(1, Body::Ping {})).await;
    assert_eq!(
        rig.backlog_replies_to(cmd.id),
        0,
        "the duplicate got a reply of its own"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "start\nend\n",
        "ran once"
    );
    rig.finish().await;
}
