//! The bus across dropped connections and a broker restart. These tests break connections, so
//! they live in their own test binary and hold the test kit's broker lock: cargo runs test
//! binaries one after another, so no other test of this workspace sees the broker go away.

mod common;

use std::time::{Duration, Instant};

use common::{blocking, recv, start, wait_counts, wait_generation};
use comodit_bus::{topology, Bus, ConsumeOptions, Delivery, OutMessage};
use comodit_protocol::{HostId, Names, UpKey, UpKind};
use comodit_testkit as kit;
use tokio_util::sync::CancellationToken;

/// An admin bus (guest) that declares the topology on every connect, and an agent bus connected
/// as the host's own broker user.
async fn admin_and_agent(
    names: &Names,
    host: HostId,
    n_shards: u32,
    shutdown: &CancellationToken,
) -> (Bus, Bus) {
    let password = {
        let names = names.clone();
        blocking(move || kit::create_agent_user(&names, host)).await
    };
    let admin = start(kit::amqp_url(), "disruptive-admin", shutdown);
    {
        let names = names.clone();
        admin.on_connect(move |ch| {
            let names = names.clone();
            async move {
                topology::declare_core(&ch, &names, n_shards).await?;
                topology::declare_agent_queue(&ch, &names, host).await
            }
        });
    }
    admin.wait_connected(common::DEADLINE).await.unwrap();
    let agent = start(
        kit::amqp_url_for(&host.to_string(), &password),
        "disruptive-agent",
        shutdown,
    );
    agent.wait_connected(common::DEADLINE).await.unwrap();
    (admin, agent)
}

async fn command(admin: &Bus, names: &Names, host: HostId, persistent: bool) -> OutMessage {
    let mut msg = OutMessage::json("command", b"{}".to_vec());
    msg.persistent = persistent;
    msg.mandatory = true;
    admin
        .publish(&names.down_exchange(), &host.to_string(), msg.clone())
        .await
        .unwrap();
    msg
}

fn is(d: &Delivery, m: &OutMessage) -> bool {
    d.message_id.as_deref() == Some(m.message_id.as_str())
}

#[test]
fn a_consumer_survives_a_dropped_connection_and_nothing_is_lost_or_repeated() {
    common::init_logs();
    // Held outside the runtime: the guard is a std one and the test's thread just waits.
    let _lock = kit::broker_lock();
    common::runtime()
        .block_on(a_consumer_survives_a_dropped_connection_and_nothing_is_lost_or_repeated_body());
}

async fn a_consumer_survives_a_dropped_connection_and_nothing_is_lost_or_repeated_body() {
    let names = kit::unique_names();
    let host = HostId::random();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![host.to_string()],
    };
    let shutdown = CancellationToken::new();
    let (admin, agent) = admin_and_agent(&names, host, 2, &shutdown).await;
    let queue = names.agent_queue(host);
    let mut consumer = agent.consume(
        &queue,
        ConsumeOptions {
            prefetch: 8,
            ..ConsumeOptions::default()
        },
    );
    assert_eq!(wait_generation(&agent, 1).await, 1);

    // A is acked; B is held unacked when the connection drops.
    let a = command(&admin, &names, host, false).await;
    let d = recv(&mut consumer, "A").await;
    assert!(is(&d, &a));
    d.ack().await.unwrap();
    let b = command(&admin, &names, host, false).await;
    let held = recv(&mut consumer, "B").await;
    assert!(is(&held, &b) && !held.redelivered);
    // The broker has processed A's ack before the drop: one unacked (B), nothing ready.
    wait_counts(queue.clone(), (0, 1)).await;

    let user = host.to_string();
    blocking(move || kit::close_user_connections(&user, "bus test: dropped connection")).await;
    assert_eq!(wait_generation(&agent, 2).await, 2, "one reconnect");
    assert_eq!(
        *admin.generation().borrow(),
        1,
        "only the agent's connection was closed"
    );

    // B's channel is gone: its ack cannot be sent, and the broker gives it again.
    assert_eq!(held.ack().await, Err(comodit_bus::BusError::Stale));
    let c = command(&admin, &names, host, false).await;
    let again = recv(&mut consumer, "B again").await;
    assert!(
        is(&again, &b),
        "B comes first, before C, and A is not repeated"
    );
    assert!(again.redelivered);
    assert_eq!(again.generation, 2);
    again.ack().await.unwrap();
    let d = recv(&mut consumer, "C").await;
    assert!(
        is(&d, &c),
        "after B comes C: A, acked, is never delivered again"
    );
    assert!(!d.redelivered);
    d.ack().await.unwrap();
    wait_counts(queue, (0, 0)).await;

    // The agent's publisher works on the new connection too.
    let mut hello = OutMessage::json("hello", b"{}".to_vec());
    hello.user_id = Some(host.to_string());
    agent
        .publish(
            &names.up_exchange(),
            &UpKey::new(host, 2, UpKind::Hello).to_string(),
            hello,
        )
        .await
        .unwrap();

    // Shutdown closes the connection: the broker sees the agent's user go away.
    shutdown.cancel();
    assert!(consumer.next().await.is_none());
    let user = host.to_string();
    let until = Instant::now() + common::DEADLINE;
    while blocking({
        let user = user.clone();
        move || kit::user_connection_count(&user)
    })
    .await
        > 0
    {
        assert!(
            Instant::now() < until,
            "agent connection still open after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_consumer_survives_a_broker_restart() {
    common::init_logs();
    // Held outside the runtime: the guard is a std one and the test's thread just waits.
    let _lock = kit::broker_lock();
    common::runtime().block_on(a_consumer_survives_a_broker_restart_body());
}

async fn a_consumer_survives_a_broker_restart_body() {
    let names = kit::unique_names();
    let host = HostId::random();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![host.to_string()],
    };
    let shutdown = CancellationToken::new();
    let (admin, agent) = admin_and_agent(&names, host, 1, &shutdown).await;
    let mut consumer = agent.consume(&names.agent_queue(host), ConsumeOptions::default());

    // A persistent command held unacked over the restart, a transient one waiting in the queue.
    let kept = command(&admin, &names, host, true).await;
    let held = recv(&mut consumer, "the persistent command").await;
    assert!(is(&held, &kept));
    // An up message waits in the (quorum) shard queue: nobody consumes it.
    let mut hello = OutMessage::json("hello", b"{}".to_vec());
    hello.user_id = Some(host.to_string());
    agent
        .publish(
            &names.up_exchange(),
            &UpKey::new(host, 1, UpKind::Hello).to_string(),
            hello.clone(),
        )
        .await
        .unwrap();
    let shard = names.shard_queue(host.shard(1));
    wait_counts(shard.clone(), (1, 0)).await;

    blocking(kit::restart_broker_app).await;
    wait_generation(&admin, 2).await;
    wait_generation(&agent, 2).await;

    // The unacked persistent command comes back; a command sent after the restart arrives.
    let again = recv(&mut consumer, "the persistent command again").await;
    assert!(is(&again, &kept), "{again:?}");
    assert!(again.redelivered);
    again.ack().await.unwrap();
    let after = command(&admin, &names, host, false).await;
    let d = recv(&mut consumer, "the command sent after the restart").await;
    assert!(is(&d, &after), "{d:?}");
    d.ack().await.unwrap();
    // The quorum shard queue kept its message, and the re-run declarations did not disturb it.
    wait_counts(shard, (1, 0)).await;
    shutdown.cancel();
}

#[test]
fn publishes_given_up_on_while_confirms_are_slow_keep_their_channels_bounded() {
    common::init_logs();
    let _lock = kit::broker_lock();
    common::runtime().block_on(publishes_given_up_on_body());
}

/// Callers that stop waiting for a confirm (a timeout) while the broker is slow to confirm: the
/// abandoned publishes keep their slots and channels until their confirms come, so no more than
/// `MAX_PUBLISHES_IN_FLIGHT` channels are ever opened, and once the broker catches up publishing
/// goes on. Before, each abandoned publish dropped its channel and the next opened a new one;
/// under a failover's load the broker answered the closes so late that lapin ran out of channel
/// numbers ("the maximum number of channels for this connection has been reached") and no
/// command went out.
async fn publishes_given_up_on_body() {
    let names = kit::unique_names();
    let host = HostId::random();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![host.to_string()],
    };
    let shutdown = CancellationToken::new();
    let (admin, agent) = admin_and_agent(&names, host, 1, &shutdown).await;
    let key = UpKey::new(host, 1, UpKind::Heartbeat).to_string();
    let up = names.up_exchange();
    // A classic queue that also gets the host's heartbeats: a confirm needs every queue's.
    let slow = format!("{}.slow", names.prefix());
    let ch = admin.channel().await.unwrap();
    ch.queue_declare(
        slow.as_str().into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        slow.as_str().into(),
        up.as_str().into(),
        key.as_str().into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let heartbeat = || {
        let mut m = OutMessage::json("heartbeat", b"{}".to_vec());
        m.user_id = Some(host.to_string());
        m
    };
    const GIVEN_UP: usize = 3 * comodit_bus::MAX_PUBLISHES_IN_FLIGHT;
    let suspended = {
        let slow = slow.clone();
        blocking(move || kit::SuspendedQueue::suspend(&slow)).await
    };
    for _ in 0..GIVEN_UP {
        let publish = agent.publish(&up, &key, heartbeat());
        let r = tokio::time::timeout(Duration::from_millis(20), publish).await;
        assert!(r.is_err(), "no confirm while the queue is suspended");
    }
    let user = host.to_string();
    let open = blocking(move || kit::user_channel_numbers(&user).len()).await;
    blocking(move || drop(suspended)).await;
    assert!(
        open <= comodit_bus::MAX_PUBLISHES_IN_FLIGHT,
        "{open} channels open for {GIVEN_UP} abandoned publishes"
    );
    tokio::time::timeout(common::DEADLINE, agent.publish(&up, &key, heartbeat()))
        .await
        .expect("a publish confirmed once the queue runs again")
        .unwrap();
    // No channel was opened per abandoned publish: the last publish took one of those the slots
    // had (lapin numbers channels in sequence, so a new one would be numbered past them all).
    let user = host.to_string();
    let numbers = blocking(move || kit::user_channel_numbers(&user)).await;
    let highest = numbers.iter().copied().max().unwrap_or(0);
    assert!(
        highest as usize <= comodit_bus::MAX_PUBLISHES_IN_FLIGHT,
        "channel {highest} opened for {GIVEN_UP} abandoned publishes: {numbers:?}"
    );
    shutdown.cancel();
}
