//! The agent across a broker restart and a dropped connection. These tests disturb the shared
//! broker, so they live in their own test binary and take the testkit's broker lock.
// The broker lock is held for the whole test on purpose: it serializes tests, not data.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use comodit_protocol::*;

async fn blocking(f: fn()) {
    tokio::task::spawn_blocking(f).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_a_broker_restart_and_keeps_working() {
    let _lock = comodit_testkit::broker_lock();
    let mut rig = Rig::new().await;
    rig.start_agent();
    rig.hello().await;
    let reply = rig.call(&rig.command(1, Body::Ping {})).await;
    assert_eq!(reply.status, Status::Ok);

    blocking(comodit_testkit::restart_broker_app).await;

    // A fresh hello says the agent is back; then it serves commands again.
    let hello = rig.hello().await;
    assert_eq!(hello.host, rig.host);
    let path = rig.path("after-restart");
    let apply = rig.command(
        1,
        Body::Apply {
            mode: ApplyMode::Enforce,
            monitor: false,
            resources: vec![file_resource(&path, "still here\n", "0644")],
        },
    );
    let reply = rig.call(&apply).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "still here\n");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_its_connection_is_dropped() {
    let _lock = comodit_testkit::broker_lock();
    let mut rig = Rig::new().await;
    rig.start_agent();
    rig.hello().await;
    let host = rig.host.to_string();
    tokio::task::spawn_blocking(move || {
        comodit_testkit::close_user_connections(&host, "test drops the agent")
    })
    .await
    .unwrap();
    rig.hello().await;
    let reply = rig.call(&rig.command(1, Body::Ping {})).await;
    assert_eq!(reply.status, Status::Ok);
    rig.finish().await;
}
