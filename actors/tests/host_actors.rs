//! The actor runtime against the real broker and the embedded store, with simulated agents.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::*;
use comodit_actors::ownership::Ownership;
use comodit_actors::{HostOps, NodeEvent, OpsError, SubmitOptions, Submitted};
use comodit_protocol::*;
use comodit_store::{Change, ChangeId, ChangeStatus, HostRuntime, StoreError};

/// A ping submitted without waiting: the change recorded for it, pending.
async fn submit_ping(node: &Node, host: HostId) -> Change {
    match node.orch().submit(host, ping(), opts(None)).await.unwrap() {
        Submitted::Pending(change) => change,
        other => panic!("a ping submitted without waiting is pending: {other:?}"),
    }
}

fn opts(wait: Option<Duration>) -> SubmitOptions {
    SubmitOptions {
        wait,
        requested_by: "test".into(),
        ttl: Duration::from_secs(600),
        change_id: None,
        job: None,
    }
}

fn rejected(reason: &str) -> u64 {
    recorder().counter(&format!(
        "comodit_node_rejected_messages_total{{reason={reason}}}"
    ))
}

/// Answers every command with `ok` until the test ends; returns the ids it saw.
fn auto_reply(mut agent: Agent) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(cmd) = agent.next_command(Duration::from_secs(3600)).await {
            agent.reply_ok(&cmd).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_is_dispatched_and_completed_with_the_reply() {
    init_logs();
    recorder();
    // Answered long before its dispatch would be recorded: one write for the answer.
    let mut node = Node::new(|c| c.dispatch_record_delay = Duration::from_secs(60)).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    agent.hello().await;
    let replier = auto_reply(agent);

    let done = node
        .orch()
        .submit(host, ping(), opts(Some(Duration::from_secs(20))))
        .await
        .expect("submit");
    let Submitted::Completed(change) = done else {
        panic!("expected the reply within the wait: {done:?}");
    };
    assert_eq!(change.status, ChangeStatus::Applied);
    let reply = change.reply.as_ref().expect("reply stored");
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.re, Some(change.command_id));
    assert_eq!(change.seq, 1);
    let stored = node
        .store()
        .get_change(host, change.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, ChangeStatus::Applied);
    assert_eq!(stored.reply, change.reply);

    // The event stream told the story: queued, then applied, with no `dispatched` write between.
    let mut seen = Vec::new();
    while seen.last() != Some(&ChangeStatus::Applied) {
        let e = events
            .wait_for(
                "the change's events",
                |e| matches!(e, NodeEvent::Change { change: c, .. } if *c == change.id),
            )
            .await;
        if let NodeEvent::Change { status, .. } = e {
            seen.push(status);
        }
    }
    assert_eq!(seen, [ChangeStatus::Queued, ChangeStatus::Applied]);
    replier.abort();
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_reach_the_agent_in_log_order() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut agent = node.agent(host, &pw).await;
    agent.hello().await;
    // The actor takes a submitted change from its kick when it is the next of the log, and reads
    // the store when the kick of an earlier one has not come yet: either way, log order.
    const N: usize = 40;
    let submits = (0..N).map(|_| {
        let orch = node.orch().clone();
        tokio::spawn(async move { orch.submit(host, ping(), opts(None)).await })
    });
    let mut seq_of = std::collections::HashMap::new();
    for s in submits {
        let Submitted::Pending(c) = s.await.unwrap().expect("submit") else {
            panic!("no wait asked: pending expected");
        };
        seq_of.insert(c.command_id, c.seq);
    }
    let mut got = Vec::new();
    while got.len() < N {
        let cmd = agent.command().await;
        agent.reply_ok(&cmd).await;
        got.push(*seq_of.get(&cmd.id).expect("a command of this test"));
    }
    let want: Vec<u64> = (1..=N as u64).collect();
    assert_eq!(got, want, "commands in log order, each once");
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_and_other_owners_are_refused() {
    init_logs();
    let node = Node::new(|_| {}).await;
    let err = node
        .orch()
        .submit(HostId::random(), ping(), opts(None))
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::UnknownHost(_)), "{err}");
    node.finish().await;

    // A node that owns no shard.
    struct NoShards(tokio::sync::watch::Sender<u64>);
    impl Ownership for NoShards {
        fn n_shards(&self) -> u32 {
            4
        }
        fn owned(&self) -> Vec<(Shard, Epoch)> {
            Vec::new()
        }
        fn epoch(&self, _: Shard) -> Option<Epoch> {
            None
        }
        fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
            self.0.subscribe()
        }
    }
    let mut node = Node::new(|_| {}).await;
    let (host, _) = node.add_host().await;
    node.stop_orchestrator().await;
    node.start_with(Arc::new(NoShards(tokio::sync::watch::channel(0).0)))
        .await;
    let err = node
        .orch()
        .submit(host, ping(), opts(None))
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::NotOwner(h) if h == host), "{err}");
    assert!(node.store().pending_changes(host).await.unwrap().is_empty());
    node.finish().await;
}

/// An idempotent retry: submits under one change id (the API derives it from an
/// `Idempotency-Key`), racing or one after the other, record one change and send one command;
/// each is answered with that change, pending or final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_under_one_change_id_record_and_send_it_once() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut agent = node.agent(host, &pw).await;
    agent.hello().await;
    let id = ChangeId::random();
    let keyed = |wait| SubmitOptions {
        change_id: Some(id),
        ..opts(wait)
    };
    let racing: Vec<_> = (0..4)
        .map(|_| {
            let (orch, o) = (node.orch().clone(), keyed(None));
            tokio::spawn(async move { orch.submit(host, ping(), o).await })
        })
        .collect();
    let mut seen = Vec::new();
    for r in racing {
        let Submitted::Pending(c) = r.await.unwrap().expect("submit") else {
            panic!("no wait asked: pending expected");
        };
        seen.push((c.id, c.seq, c.command_id));
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "one change: {seen:?}");
    assert_eq!(seen[0].0, id);

    // Asked again while it waits for the agent: the same change, still pending.
    let r = node
        .orch()
        .submit(host, ping(), keyed(Some(Duration::from_millis(300))))
        .await
        .unwrap();
    let Submitted::Pending(again) = r else {
        panic!("nobody answered yet: {r:?}");
    };
    assert_eq!((again.id, again.seq), (id, 1));

    let cmd = agent.command().await;
    assert_eq!(cmd.id, seen[0].2);
    agent.reply_ok(&cmd).await;
    node.wait_for_status(host, id, ChangeStatus::Applied).await;
    // Asked again once answered: the answer, at once.
    let r = node
        .orch()
        .submit(host, ping(), keyed(Some(Duration::from_secs(20))))
        .await
        .unwrap();
    let Submitted::Completed(done) = r else {
        panic!("answered: {r:?}");
    };
    assert_eq!((done.id, done.status), (id, ChangeStatus::Applied));
    assert!(
        agent.next_command(Duration::from_secs(2)).await.is_none(),
        "one command for the host"
    );
    let log = node
        .store()
        .list_changes(host, &comodit_store::Page::first(10))
        .await
        .unwrap();
    assert_eq!(log.items.len(), 1, "one change recorded: {:?}", log.items);

    // Another id is another change.
    let r = node.orch().submit(host, ping(), opts(None)).await.unwrap();
    let Submitted::Pending(other) = r else {
        panic!("no wait asked: {r:?}");
    };
    assert_ne!(other.id, id);
    assert_eq!(other.seq, 2);
    agent.disconnect().await;
    node.finish().await;
}

/// Once the host's actor has loaded its log (a first change answered), a change recorded in the
/// store the way a node that died before its kick leaves it: the actor, which learns of new work
/// from kicks only, does not know it.
async fn unsent_change_behind_a_loaded_actor(
    node: &Node,
    host: HostId,
    agent: &mut Agent,
) -> Change {
    let first = {
        let orch = node.orch().clone();
        tokio::spawn(async move {
            orch.submit(host, ping(), opts(Some(Duration::from_secs(20))))
                .await
        })
    };
    let cmd = agent.command().await;
    agent.reply_ok(&cmd).await;
    assert!(matches!(first.await.unwrap(), Ok(Submitted::Completed(_))));
    let now = Utc::now();
    node.store()
        .append_change(&Change {
            id: ChangeId::random(),
            host,
            seq: 0,
            request: serde_json::to_value(ping()).unwrap(),
            status: ChangeStatus::Queued,
            command_id: CommandId::random(),
            epoch: Epoch(1),
            requested_by: "a node that died".into(),
            created_at: now,
            updated_at: now,
            expires_at: now + chrono::Duration::minutes(10),
            reply: None,
            job: None,
        })
        .await
        .unwrap()
}

/// A change recorded by a node that died before telling the owner (no kick): the retry that joins
/// it tells the owner, and the change is sent with its own command id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_an_unsent_change_gets_it_sent() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut agent = node.agent(host, &pw).await;
    agent.hello().await;
    let orphan = unsent_change_behind_a_loaded_actor(&node, host, &mut agent).await;
    assert!(
        agent.next_command(Duration::from_secs(1)).await.is_none(),
        "nobody told the owner"
    );
    let orch = node.orch().clone();
    let retry = tokio::spawn(async move {
        let o = SubmitOptions {
            change_id: Some(orphan.id),
            ..opts(Some(Duration::from_secs(20)))
        };
        orch.submit(host, ping(), o).await
    });
    let cmd = agent.command().await;
    assert_eq!(
        cmd.id, orphan.command_id,
        "the recorded change, not a new one"
    );
    agent.reply_ok(&cmd).await;
    let Submitted::Completed(done) = retry.await.unwrap().unwrap() else {
        panic!("answered within the wait");
    };
    assert_eq!((done.id, done.status), (orphan.id, ChangeStatus::Applied));
    agent.disconnect().await;
    node.finish().await;
}

/// A change recorded by a node that died before telling the owner, and never asked for again:
/// the shard's periodic look at the store finds it, and it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_recheck_sends_a_change_nobody_kicked() {
    init_logs();
    let rechecks = || recorder().counter("comodit_node_pending_rechecks_total{}");
    let before = rechecks();
    let mut node = Node::new(|c| c.pending_recheck = Duration::from_secs(2)).await;
    let (host, pw) = node.add_host().await;
    let mut agent = node.agent(host, &pw).await;
    agent.hello().await;
    let orphan = unsent_change_behind_a_loaded_actor(&node, host, &mut agent).await;
    let cmd = agent.command().await;
    assert_eq!(cmd.id, orphan.command_id);
    agent.reply_ok(&cmd).await;
    node.wait_for_status(host, orphan.id, ChangeStatus::Applied)
        .await;
    assert!(rechecks() > before, "found by a recheck");
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_host_gets_its_command_once_when_it_comes_back() {
    init_logs();
    // A short timeout: a wrong re-send would show within the test.
    let mut node = Node::new(|c| c.command_timeout = Duration::from_secs(2)).await;
    let (host, pw) = node.add_host().await;

    let r = node
        .orch()
        .submit(host, ping(), opts(Some(Duration::from_millis(500))))
        .await
        .unwrap();
    let Submitted::Pending(change) = r else {
        panic!("no agent, no reply: {r:?}");
    };
    // It waits in the host's queue: dispatched even though the host is offline.
    let queue = node.names.agent_queue(host);
    wait_until("the command in the host's queue", || {
        comodit_testkit::queue_counts(&queue) == Some((1, 0))
    })
    .await;
    // Unanswered after `dispatch_record_delay`: recorded as dispatched.
    node.wait_for_status(host, change.id, ChangeStatus::Dispatched)
        .await;

    // The agent comes back: hello, then its queue.
    let mut agent = node.agent(host, &pw).await;
    agent.hello().await;
    let cmd = agent.command().await;
    assert_eq!(cmd.id, change.command_id);
    assert_eq!(cmd.epoch, Epoch(1));
    assert_eq!(cmd.body, ping());
    agent.reply_ok(&cmd).await;
    node.wait_for_status(host, change.id, ChangeStatus::Applied)
        .await;
    // Delivered once: nothing more within two command timeouts.
    assert!(agent.next_command(Duration::from_secs(4)).await.is_none());
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_round_trips_stretch_the_resend_timeout() {
    init_logs();
    // Configured: re-send after 1 s without a reply.
    let mut node = Node::new(|c| c.command_timeout = Duration::from_secs(1)).await;
    let (host, pw) = node.add_host().await;
    // No hello yet: the node has the host offline, so it does not re-send the first command
    // while it waits (a re-sent command's reply times no round trip).
    let mut agent = node.agent(host, &pw).await;
    // The first command is answered after 3 s: a round trip of 3 s, so the node now waits
    // SRTT + 4 RTTVAR = 3 + 4 × 1.5 = 9 s before a re-send. The reply brings the host online.
    let first = submit_ping(&node, host).await;
    let cmd = agent.command().await;
    assert_eq!(cmd.id, first.command_id);
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.reply_ok(&cmd).await;
    node.wait_for_status(host, first.id, ChangeStatus::Applied)
        .await;
    // The second one is not answered: with the configured 1 s it would come again within 2 s
    // (the sweep runs every second); stretched, it does not within 5 s...
    let second = submit_ping(&node, host).await;
    let cmd = agent.command().await;
    assert_eq!(cmd.id, second.command_id);
    let sent = std::time::Instant::now();
    assert!(
        agent.next_command(Duration::from_secs(5)).await.is_none(),
        "re-sent within 5 s of the first send"
    );
    // ... but it still does, with the same command id, once the stretched timeout passed.
    let again = agent
        .next_command(Duration::from_secs(10))
        .await
        .expect("a re-send after the stretched timeout");
    assert_eq!(again.id, second.command_id);
    assert!(
        sent.elapsed() >= Duration::from_secs(8),
        "{:?}",
        sent.elapsed()
    );
    agent.reply_ok(&again).await;
    node.wait_for_status(host, second.id, ChangeStatus::Applied)
        .await;
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_marks_online_and_stores_facts_and_bye_marks_offline() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    agent.send(agent.hello_msg("db-7")).await;
    events
        .wait_for("host online", |e| *e == NodeEvent::HostOnline { host })
        .await;
    let rt = node
        .store()
        .get_runtime(host)
        .await
        .unwrap()
        .expect("runtime");
    assert!(rt.online);
    assert_eq!(rt.epoch, Epoch(1));
    assert_eq!(rt.facts.as_ref().unwrap().hostname, "db-7");
    assert_eq!(rt.facts.as_ref().unwrap().cpus, 2);
    assert_eq!(rt.desired_digest.as_deref(), Some("d1g3st"));
    assert!(rt.last_seen.is_some());

    agent.bye().await;
    events
        .wait_for("host offline", |e| *e == NodeEvent::HostOffline { host })
        .await;
    let rt = node.store().get_runtime(host).await.unwrap().unwrap();
    assert!(!rt.online);
    assert_eq!(rt.facts.unwrap().hostname, "db-7", "facts are kept");
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_recorded_and_cleared() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    let r = ResourceRef::new(Collection::Files, "/etc/motd").unwrap();
    agent
        .send(Up::Drift(Drift {
            v: V1,
            host,
            report: DriftReport {
                r#ref: r.clone(),
                diff: vec![FieldDiff {
                    field: "content".into(),
                    from: "x".into(),
                    to: "hi".into(),
                }],
                since: Utc::now(),
                repaired: false,
                repair_error: None,
            },
        }))
        .await;
    events
        .wait_for(
            "drift",
            |e| matches!(e, NodeEvent::Drift { host: h, .. } if *h == host),
        )
        .await;
    let rt = node.store().get_runtime(host).await.unwrap().unwrap();
    assert_eq!(rt.drift.len(), 1);
    assert_eq!(rt.drift[0].r#ref, r);
    assert!(rt.online, "any message from the agent means online");

    agent
        .send(Up::DriftCleared(DriftCleared {
            v: V1,
            host,
            r#ref: r.clone(),
            at: Utc::now(),
        }))
        .await;
    events
        .wait_for("drift cleared", |e| {
            matches!(e, NodeEvent::DriftCleared { host: h, r#ref } if *h == host && *r#ref == r)
        })
        .await;
    assert!(node
        .store()
        .get_runtime(host)
        .await
        .unwrap()
        .unwrap()
        .drift
        .is_empty());
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_marks_a_host_offline() {
    init_logs();
    let mut node = Node::new(|c| {
        c.heartbeat_s = 1;
        c.offline_after_missed = 2;
    })
    .await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    agent.hello().await;
    events
        .wait_for("host online", |e| *e == NodeEvent::HostOnline { host })
        .await;
    let online_at = tokio::time::Instant::now();
    events
        .wait_for("host offline", |e| *e == NodeEvent::HostOffline { host })
        .await;
    let silent = online_at.elapsed();
    assert!(
        silent >= Duration::from_millis(1_800),
        "offline too early: {silent:?}"
    );
    assert!(
        !node
            .store()
            .get_runtime(host)
            .await
            .unwrap()
            .unwrap()
            .online
    );

    // A heartbeat brings it back.
    agent.heartbeat().await;
    events
        .wait_for("host online again", |e| {
            *e == NodeEvent::HostOnline { host }
        })
        .await;
    assert!(
        node.store()
            .get_runtime(host)
            .await
            .unwrap()
            .unwrap()
            .online
    );
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_commands_are_resent_with_the_same_id_up_to_max_retries() {
    init_logs();
    let mut node = Node::new(|c| {
        c.command_timeout = Duration::from_millis(700);
        c.max_retries = 2;
    })
    .await;
    let (host, pw) = node.add_host().await;
    let mut agent = node.agent(host, &pw).await;
    // Online, so re-sends are allowed.
    agent.hello().await;
    let r = node.orch().submit(host, ping(), opts(None)).await.unwrap();
    let change = match r {
        Submitted::Pending(c) => c,
        other => panic!("{other:?}"),
    };
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(agent.command().await.id);
    }
    assert!(seen.iter().all(|id| *id == change.command_id), "{seen:?}");
    // First send + max_retries: nothing more.
    assert!(agent.next_command(Duration::from_secs(3)).await.is_none());
    let cmd_id = change.command_id;
    agent
        .send(Up::Reply(Reply {
            v: V1,
            re: Some(cmd_id),
            host,
            status: Status::Failed,
            reason: Some("disk full".into()),
            results: Vec::new(),
            data: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
        }))
        .await;
    node.wait_for_status(host, change.id, ChangeStatus::Failed)
        .await;
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_expire_and_complete_their_waiter() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, _pw) = node.add_host().await;
    let started = tokio::time::Instant::now();
    let r = node
        .orch()
        .submit(
            host,
            ping(),
            SubmitOptions {
                wait: Some(Duration::from_secs(20)),
                requested_by: "test".into(),
                ttl: Duration::from_secs(1),
                change_id: None,
                job: None,
            },
        )
        .await
        .unwrap();
    let Submitted::Completed(change) = r else {
        panic!("the expiry completes the wait: {r:?}");
    };
    assert_eq!(change.status, ChangeStatus::Expired);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(change.reply.is_none());
    assert!(node.store().pending_changes(host).await.unwrap().is_empty());
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_queued_and_dispatched_changes() {
    init_logs();
    let mut node = Node::new(|c| c.command_timeout = Duration::from_secs(1)).await;
    let (host, pw) = node.add_host().await;
    // Dispatched by the first run, never answered (the agent is away).
    let sent = submit_ping(&node, host).await;
    let queue = node.names.agent_queue(host);
    wait_until("the first command queued at the broker", || {
        comodit_testkit::queue_counts(&queue) == Some((1, 0))
    })
    .await;
    node.wait_for_status(host, sent.id, ChangeStatus::Dispatched)
        .await;
    node.stop_orchestrator().await;
    // Recorded but never dispatched: the node died between the record and the kick.
    let now = Utc::now();
    let queued = node
        .store()
        .append_change(&Change {
            id: ChangeId::random(),
            host,
            seq: 0,
            request: serde_json::to_value(Body::Facts {}).unwrap(),
            status: ChangeStatus::Queued,
            command_id: CommandId::random(),
            epoch: Epoch(1),
            requested_by: "test".into(),
            created_at: now,
            updated_at: now,
            expires_at: now + chrono::Duration::minutes(10),
            reply: None,
            job: None,
        })
        .await
        .unwrap();
    // The broker lost the first command too (as after a broker restart).
    let ch = node.admin.channel().await.unwrap();
    ch.queue_purge(
        queue.as_str().into(),
        comodit_bus::lapin::options::QueuePurgeOptions::default(),
    )
    .await
    .unwrap();

    node.restart().await;
    let mut agent = node.agent(host, &pw).await;
    // The queued change goes out at start-up, without any message from the host.
    let first = agent.command().await;
    assert_eq!(first.id, queued.command_id);
    assert_eq!(first.body, Body::Facts {});
    agent.hello().await;
    // The dispatched one is re-sent, same id, after a timeout without reply.
    let second = agent.command().await;
    assert_eq!(second.id, sent.command_id);
    agent.reply_ok(&first).await;
    agent.reply_ok(&second).await;
    for id in [queued.id, sent.id] {
        node.wait_for_status(host, id, ChangeStatus::Applied).await;
    }
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_rejected_counted_and_acked_and_good_traffic_flows() {
    init_logs();
    recorder();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let agent = node.agent(host, &pw).await;
    let shard = host.shard(node.n_shards).0;
    let before = |r: &str| rejected(r);
    let (rk, forged, malformed, invalid, unknown) = (
        before("routing_key"),
        before("forged"),
        before("malformed"),
        before("invalid"),
        before("unknown_host"),
    );

    // Straight into the shard queue with the admin user: the key is the queue's name.
    node.publish_to_shard_queue(shard, b"\x00\xff not json".to_vec())
        .await;
    // A key that is not up.<shard>.<host>.<kind> (still bound: up.<n>.#).
    node.publish_up(
        &format!("up.{shard}.garbage.hello"),
        "hello",
        b"{}".to_vec(),
        None,
    )
    .await;
    // The admin user posing as the host.
    let hello = agent.hello_msg("x").encode();
    let key = UpKey::new(host, node.n_shards, UpKind::Hello).to_string();
    node.publish_up(&key, "hello", hello, Some(NODE_USER)).await;
    // The host itself sending garbage and a wrong protocol version.
    agent.send_raw(UpKind::Hello, b"{\"v\":1,".to_vec()).await;
    agent
        .send_raw(UpKind::Bye, br#"{"v":2,"host":"x","reason":"r"}"#.to_vec())
        .await;
    // A broker user whose host the store does not know.
    let (stranger, spw) = node.stranger();
    let ghost = node.agent(stranger, &spw).await;
    ghost.hello().await;

    wait_until("every rejection counted", || {
        rejected("routing_key") >= rk + 2
            && rejected("forged") > forged
            && rejected("malformed") + rejected("invalid") >= malformed + invalid + 2
            && rejected("unknown_host") > unknown
    })
    .await;
    // Acked, not left in the queue.
    let queue = node.names.shard_queue(Shard(shard));
    wait_until("the shard queue drained", || {
        comodit_testkit::queue_counts(&queue) == Some((0, 0))
    })
    .await;

    // Good traffic still flows.
    let replier = auto_reply(agent);
    let r = node
        .orch()
        .submit(host, ping(), opts(Some(Duration::from_secs(20))))
        .await
        .unwrap();
    assert!(
        matches!(&r, Submitted::Completed(c) if c.status == ChangeStatus::Applied),
        "{r:?}"
    );
    replier.abort();
    ghost.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_epoch_in_the_store_stops_this_node_from_writing() {
    init_logs();
    recorder();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    // Another node took the shard at epoch 5 and wrote the host's runtime.
    let theirs = HostRuntime {
        host,
        epoch: Epoch(5),
        online: true,
        last_seen: Some(Utc::now()),
        facts: Some(Facts {
            hostname: "theirs".into(),
            ..Facts::default()
        }),
        desired_digest: None,
        drift: Vec::new(),
        updated_at: Utc::now(),
    };
    node.store().put_runtime(&theirs).await.unwrap();

    let err = node
        .orch()
        .submit(host, ping(), opts(None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OpsError::Store(StoreError::StaleEpoch { .. })),
        "{err}"
    );

    let stale = recorder().counter("comodit_node_stale_epoch_total{}");
    let mut agent = node.agent(host, &pw).await;
    agent.send(agent.hello_msg("ours")).await;
    wait_until("the hello refused by the store", || {
        recorder().counter("comodit_node_stale_epoch_total{}") > stale
    })
    .await;
    // Their change, recorded at their epoch, is theirs to dispatch.
    let now = Utc::now();
    node.store()
        .append_change(&Change {
            id: ChangeId::random(),
            host,
            seq: 0,
            request: serde_json::to_value(ping()).unwrap(),
            status: ChangeStatus::Queued,
            command_id: CommandId::random(),
            epoch: Epoch(5),
            requested_by: "other node".into(),
            created_at: now,
            updated_at: now,
            expires_at: now + chrono::Duration::minutes(10),
            reply: None,
            job: None,
        })
        .await
        .unwrap();
    agent.heartbeat().await;
    assert!(
        agent.next_command(Duration::from_secs(2)).await.is_none(),
        "a fenced node sends nothing"
    );
    assert_eq!(
        node.store().get_runtime(host).await.unwrap().unwrap(),
        theirs
    );
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_never_sent_changes_can_be_cancelled() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    // No queue for the host yet: publishes are returned unroutable, the change stays queued.
    let ch = node.admin.channel().await.unwrap();
    comodit_bus::topology::delete_agent_queue(&ch, &node.names, host)
        .await
        .unwrap();
    let change = submit_ping(&node, host).await;
    let cancelled = node.orch().cancel(host, change.id).await.expect("cancel");
    assert_eq!(cancelled.status, ChangeStatus::Cancelled);
    assert!(node.store().pending_changes(host).await.unwrap().is_empty());
    let again = node.orch().cancel(host, change.id).await.unwrap_err();
    assert!(
        matches!(again, OpsError::Store(StoreError::Conflict(_))),
        "{again}"
    );
    let missing = node
        .orch()
        .cancel(host, ChangeId::random())
        .await
        .unwrap_err();
    assert!(
        matches!(missing, OpsError::Store(StoreError::NotFound(_))),
        "{missing}"
    );

    // With its queue back, a new change goes out and cannot be cancelled any more.
    comodit_bus::topology::declare_agent_queue(&ch, &node.names, host)
        .await
        .unwrap();
    let mut agent = node.agent(host, &pw).await;
    let sent = submit_ping(&node, host).await;
    let cmd = agent.command().await;
    assert_eq!(cmd.id, sent.command_id);
    let err = node.orch().cancel(host, sent.id).await.unwrap_err();
    assert!(
        matches!(err, OpsError::Store(StoreError::Conflict(_))),
        "{err}"
    );
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_stops_the_actor_and_stop_stops_them_all() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (a, pa) = node.add_host().await;
    let (b, pb) = node.add_host().await;
    let mut events = node.events();
    let agent_a = node.agent(a, &pa).await;
    let agent_b = node.agent(b, &pb).await;
    agent_a.hello().await;
    agent_b.hello().await;
    for h in [a, b] {
        events
            .wait_for("online", |e| *e == NodeEvent::HostOnline { host: h })
            .await;
    }
    let orch = node.orch().clone();
    assert_eq!(orch.host_actor_count(), 2);
    orch.forget(a).await;
    wait_until("one actor left", || orch.host_actor_count() == 1).await;
    node.stop_orchestrator().await;
    assert_eq!(orch.host_actor_count(), 0);
    let err = orch.submit(b, ping(), opts(None)).await.unwrap_err();
    assert!(matches!(err, OpsError::ShuttingDown), "{err}");
    agent_a.disconnect().await;
    agent_b.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_keeps_the_hosts_messages_in_order() {
    init_logs();
    // A mailbox of one: the shard consumer waits for the host at almost every message.
    let mut node = Node::new(|c| c.mailbox = 1).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    let x = ResourceRef::new(Collection::Files, "/x").unwrap();
    let y = ResourceRef::new(Collection::Files, "/y").unwrap();
    let drift = |r: &ResourceRef| {
        Up::Drift(Drift {
            v: V1,
            host,
            report: DriftReport {
                r#ref: r.clone(),
                diff: Vec::new(),
                since: Utc::now(),
                repaired: false,
                repair_error: None,
            },
        })
    };
    let cleared = |r: &ResourceRef| {
        Up::DriftCleared(DriftCleared {
            v: V1,
            host,
            r#ref: r.clone(),
            at: Utc::now(),
        })
    };
    for _ in 0..15 {
        agent.send(drift(&x)).await;
        agent.send(cleared(&x)).await;
    }
    agent.send(drift(&y)).await;
    events
        .wait_for(
            "the last drift",
            |e| matches!(e, NodeEvent::Drift { report, .. } if report.r#ref == y),
        )
        .await;
    // In order, every /x drift was cleared before /y came.
    let rt = node.store().get_runtime(host).await.unwrap().unwrap();
    let refs: Vec<_> = rt.drift.iter().map(|d| d.r#ref.clone()).collect();
    assert_eq!(refs, vec![y]);
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_output_is_an_event_of_its_change() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let mut agent = node.agent(host, &pw).await;
    let change = submit_ping(&node, host).await;
    let cmd = agent.command().await;
    agent
        .send(Up::Output(Output {
            v: V1,
            host,
            re: cmd.id,
            seq: 0,
            stream: Stream::Stdout,
            data: "hello\n".into(),
        }))
        .await;
    let e = events
        .wait_for("output", |e| matches!(e, NodeEvent::Output { .. }))
        .await;
    assert_eq!(
        e,
        NodeEvent::Output {
            host,
            change: change.id,
            seq: 0,
            stream: Stream::Stdout,
            data: "hello\n".into()
        }
    );
    agent.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_marks_the_host_offline_at_once() {
    init_logs();
    // No routed heartbeats: only the broker's connection event can tell.
    let mut node = Node::new(|c| c.connection_events = true).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    agent.hello().await;
    events
        .wait_for("host online", |e| *e == NodeEvent::HostOnline { host })
        .await;
    // A second connection of the same host (a reconnect seen before the old one's close):
    // closing one of the two leaves the host online.
    let second = node.agent(host, &pw).await;
    wait_until("both connections open", || {
        comodit_testkit::user_connection_count(&host.to_string()) == 2
    })
    .await;
    agent.disconnect().await;
    wait_until("one connection left", || {
        comodit_testkit::user_connection_count(&host.to_string()) == 1
    })
    .await;
    events
        .expect_none(Duration::from_millis(1500), |e| {
            *e == NodeEvent::HostOffline { host }
        })
        .await;
    comodit_testkit::close_user_connections(&host.to_string(), "test");
    events
        .wait_for("host offline", |e| *e == NodeEvent::HostOffline { host })
        .await;
    assert!(
        !node
            .store()
            .get_runtime(host)
            .await
            .unwrap()
            .unwrap()
            .online
    );
    second.disconnect().await;
    node.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_token_stops_the_runtime() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    let mut events = node.events();
    let agent = node.agent(host, &pw).await;
    agent.hello().await;
    events
        .wait_for("host online", |e| *e == NodeEvent::HostOnline { host })
        .await;
    let orch = node.orch().clone();
    assert_eq!(orch.host_actor_count(), 1);
    node.stop.cancel();
    wait_until("the actors stopped", || orch.host_actor_count() == 0).await;
    let err = orch.submit(host, ping(), opts(None)).await.unwrap_err();
    assert!(matches!(err, OpsError::ShuttingDown), "{err}");
    agent.disconnect().await;
    node.finish().await;
}

/// Ownership a test can move: owns every shard at `epoch`, or none.
struct Switch {
    owned: std::sync::Mutex<Option<Epoch>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Switch {
    fn set(&self, epoch: Option<Epoch>) {
        *self.owned.lock().unwrap() = epoch;
        self.changes.send_modify(|n| *n += 1);
    }
}

impl Ownership for Switch {
    fn n_shards(&self) -> u32 {
        4
    }
    fn owned(&self) -> Vec<(Shard, Epoch)> {
        match *self.owned.lock().unwrap() {
            Some(e) => (0..4).map(|s| (Shard(s), e)).collect(),
            None => Vec::new(),
        }
    }
    fn epoch(&self, shard: Shard) -> Option<Epoch> {
        self.owned.lock().unwrap().filter(|_| shard.0 < 4)
    }
    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_are_taken_and_handed_over_as_ownership_changes() {
    init_logs();
    let mut node = Node::new(|_| {}).await;
    let (host, pw) = node.add_host().await;
    node.stop_orchestrator().await;
    let switch = Arc::new(Switch {
        owned: std::sync::Mutex::new(None),
        changes: tokio::sync::watch::channel(0).0,
    });
    node.start_with(switch.clone()).await;
    let mut events = node.events();
    let mut agent = node.agent(host, &pw).await;

    // Nobody consumes the shard: the hello waits in its queue.
    agent.hello().await;
    let queue = node.names.shard_queue(host.shard(node.n_shards));
    wait_until("the hello waiting in the shard queue", || {
        comodit_testkit::queue_counts(&queue) == Some((1, 0))
    })
    .await;
    let err = node
        .orch()
        .submit(host, ping(), opts(None))
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::NotOwner(_)), "{err}");

    // The shard is assigned to this node at epoch 7: the hello is handled.
    switch.set(Some(Epoch(7)));
    events
        .wait_for("host online", |e| *e == NodeEvent::HostOnline { host })
        .await;
    assert_eq!(
        node.store().get_runtime(host).await.unwrap().unwrap().epoch,
        Epoch(7)
    );
    let change = submit_ping(&node, host).await;
    let cmd = agent.command().await;
    assert_eq!((cmd.id, cmd.epoch), (change.command_id, Epoch(7)));

    // Handed over: the actors stop, new messages wait for the next owner.
    let orch = node.orch().clone();
    switch.set(None);
    wait_until("the host actor stopped", || orch.host_actor_count() == 0).await;
    agent.reply_ok(&cmd).await;
    wait_until("the reply waiting for the next owner", || {
        comodit_testkit::queue_counts(&queue) == Some((1, 0))
    })
    .await;
    // The next owner (this node again, at a new epoch) records it.
    switch.set(Some(Epoch(8)));
    wait_until_async("the change applied", || async {
        node.store()
            .get_change(host, change.id)
            .await
            .unwrap()
            .is_some_and(|c| c.status == ChangeStatus::Applied && c.epoch == Epoch(8))
    })
    .await;
    agent.disconnect().await;
    node.finish().await;
}
