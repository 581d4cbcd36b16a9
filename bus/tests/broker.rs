//! The bus against the real RabbitMQ: topology, confirmed publishing and its error cases,
//! per-agent permissions. Nothing here disturbs other tests (see `disruptive.rs` for that).

mod common;

use std::time::Duration;

use common::{blocking, recv, start, wait_counts};
use comodit_bus::lapin::options::QueueDeclareOptions;
use comodit_bus::lapin::types::FieldTable;
use comodit_bus::{topology, Bus, BusError, ConsumeOptions, OutMessage};
use comodit_protocol::{HostId, Shard, UpKey, UpKind};
use comodit_testkit as kit;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_idempotent_and_shards_are_quorum_with_single_active_consumer() {
    let names = kit::unique_names();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![],
    };
    let shutdown = CancellationToken::new();
    let bus = start(kit::amqp_url(), "topology", &shutdown);
    bus.wait_connected(common::DEADLINE).await.unwrap();
    let ch = bus.channel().await.unwrap();
    topology::declare_core(&ch, &names, 3).await.unwrap();
    topology::declare_core(&ch, &names, 3).await.unwrap();
    let host = HostId::random();
    topology::declare_agent_queue(&ch, &names, host)
        .await
        .unwrap();
    topology::declare_agent_queue(&ch, &names, host)
        .await
        .unwrap();

    for n in 0..3 {
        let queue = names.shard_queue(Shard(n));
        // A passive declare answers only if the queue exists.
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{queue} missing: {e}"));
        let info = {
            let queue = queue.clone();
            blocking(move || kit::queue_info(&queue)).await
        }
        .unwrap_or_else(|| panic!("{queue} not in the management API"));
        assert_eq!(info["type"], "quorum", "{queue}: {info}");
        assert_eq!(info["durable"], true, "{queue}");
        assert_eq!(
            info["arguments"]["x-single-active-consumer"], true,
            "{queue}: {info}"
        );
    }
    assert!(
        blocking(move || kit::queue_info(&names.shard_queue(Shard(3))))
            .await
            .is_none(),
        "only n_shards shard queues"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_messages_land_in_their_shard_queue() {
    let names = kit::unique_names();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![],
    };
    let shutdown = CancellationToken::new();
    let bus = start(kit::amqp_url(), "shards", &shutdown);
    let n_shards = 4;
    {
        let names = names.clone();
        bus.on_connect(move |ch| {
            let names = names.clone();
            async move { topology::declare_core(&ch, &names, n_shards).await }
        });
    }
    bus.wait_connected(common::DEADLINE).await.unwrap();
    let host = HostId::random();
    let key = UpKey::new(host, n_shards, UpKind::Hello);
    let mut msg = OutMessage::json("hello", b"{\"n\":1}".to_vec());
    msg.mandatory = true;
    bus.publish(&names.up_exchange(), &key.to_string(), msg.clone())
        .await
        .unwrap();
    let mut consumer = bus.consume(&names.shard_queue(key.shard), ConsumeOptions::default());
    let d = recv(&mut consumer, "the hello").await;
    assert_eq!(d.routing_key, key.to_string());
    assert_eq!(d.message_id.as_deref(), Some(msg.message_id.as_str()));
    d.ack().await.unwrap();
    // No other shard got a copy.
    for n in (0..n_shards).filter(|n| *n != key.shard.0) {
        let queue = names.shard_queue(Shard(n));
        let counts = blocking(move || kit::queue_counts(&queue)).await;
        assert_eq!(counts, Some((0, 0)), "shard {n}");
    }
    shutdown.cancel();
    assert!(consumer.next().await.is_none(), "consumer ends at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_messages_arrive_with_their_properties_and_unbound_keys_are_unroutable() {
    let names = kit::unique_names();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![],
    };
    let shutdown = CancellationToken::new();
    let bus = start(kit::amqp_url(), "publish", &shutdown);
    let host = HostId::random();
    {
        let names = names.clone();
        bus.on_connect(move |ch| {
            let names = names.clone();
            async move {
                topology::declare_core(&ch, &names, 1).await?;
                topology::declare_agent_queue(&ch, &names, host).await
            }
        });
    }
    let mut consumer = bus.consume(
        &names.agent_queue(host),
        ConsumeOptions {
            prefetch: 4,
            consumer_tag: "publish-test".into(),
            exclusive: true,
        },
    );
    bus.wait_connected(common::DEADLINE).await.unwrap();
    // on_connect ran before the connection was announced: the queue is there already.
    let queue = names.agent_queue(host);
    assert!(blocking(move || kit::queue_info(&queue)).await.is_some());

    let mut msg = OutMessage::json("command", b"{\"op\":\"ping\"}".to_vec());
    msg.user_id = Some("guest".into());
    msg.reply_to = Some("some.reply.queue".into());
    msg.correlation_id = Some("corr-1".into());
    msg.expiration_ms = Some(60_000);
    msg.mandatory = true;
    bus.publish(&names.down_exchange(), &host.to_string(), msg.clone())
        .await
        .unwrap();
    let d = recv(&mut consumer, "the command").await;
    assert_eq!(d.exchange, names.down_exchange());
    assert_eq!(d.routing_key, host.to_string());
    assert_eq!(d.payload, msg.payload);
    assert_eq!(d.kind.as_deref(), Some("command"));
    assert_eq!(d.message_id.as_deref(), Some(msg.message_id.as_str()));
    assert_eq!(d.user_id.as_deref(), Some("guest"));
    assert_eq!(d.reply_to.as_deref(), Some("some.reply.queue"));
    assert_eq!(d.correlation_id.as_deref(), Some("corr-1"));
    assert!(!d.redelivered);
    assert_eq!(d.generation, 1);
    assert!(d.timestamp.unwrap() > 1_600_000_000);
    d.ack().await.unwrap();

    // Nack with requeue puts it back: it comes again, marked redelivered.
    bus.publish(
        &names.down_exchange(),
        &host.to_string(),
        OutMessage::json("command", b"{}".to_vec()),
    )
    .await
    .unwrap();
    let first = recv(&mut consumer, "the second command").await;
    let id = first.message_id.clone();
    first.nack(true).await.unwrap();
    let again = recv(&mut consumer, "the requeued command").await;
    assert_eq!(again.message_id, id);
    assert!(again.redelivered);
    again.ack().await.unwrap();

    // A mandatory message nobody is bound for comes back.
    let stranger = HostId::random().to_string();
    let mut lost = OutMessage::json("command", b"{}".to_vec());
    lost.mandatory = true;
    let err = bus
        .publish(&names.down_exchange(), &stranger, lost.clone())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BusError::Unroutable {
            exchange: names.down_exchange(),
            routing_key: stranger.clone()
        }
    );
    assert!(!err.is_outcome_unknown());
    // Without mandatory the broker just drops it, and confirms.
    lost.mandatory = false;
    bus.publish(&names.down_exchange(), &stranger, lost)
        .await
        .unwrap();

    // After deleting the host's queue its key is unroutable too.
    let ch = bus.channel().await.unwrap();
    topology::delete_agent_queue(&ch, &names, host)
        .await
        .unwrap();
    let queue = names.agent_queue(host);
    assert!(blocking(move || kit::queue_info(&queue)).await.is_none());
    let mut late = OutMessage::json("command", b"{}".to_vec());
    late.mandatory = true;
    assert!(matches!(
        bus.publish(&names.down_exchange(), &host.to_string(), late)
            .await,
        Err(BusError::Unroutable { .. })
    ));

    // A missing exchange closes the channel with 404; the next publish works.
    let err = bus
        .publish(
            &format!("{}.nope", names.prefix()),
            "x",
            OutMessage::json("x", vec![]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(404), "{err}");
    bus.publish(
        &names.up_exchange(),
        "up.0.x.hello",
        OutMessage::json("x", vec![]),
    )
    .await
    .unwrap();
    assert_eq!(
        *bus.generation().borrow(),
        1,
        "channel errors keep the connection"
    );

    // A routine that subscribes once the connection is up still sees that connection.
    let mut late = bus.generation();
    tokio::time::timeout(Duration::from_secs(1), late.changed())
        .await
        .expect("a late subscriber's first change is the current connection")
        .unwrap();
    assert_eq!(*late.borrow_and_update(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), late.changed())
            .await
            .is_err(),
        "no second change without a reconnect"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_holds_an_agent_to_its_own_keys_and_the_bus_recovers() {
    common::init_logs();
    let names = kit::unique_names();
    let host = HostId::random();
    let other = HostId::random();
    let n_shards = 8;
    let password = {
        let names = names.clone();
        blocking(move || kit::create_agent_user(&names, host)).await
    };
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![host.to_string()],
    };
    let shutdown = CancellationToken::new();
    let admin = start(kit::amqp_url(), "admin", &shutdown);
    {
        let names = names.clone();
        admin.on_connect(move |ch| {
            let names = names.clone();
            async move {
                topology::declare_core(&ch, &names, n_shards).await?;
                topology::declare_agent_queue(&ch, &names, host).await?;
                topology::declare_agent_queue(&ch, &names, other).await
            }
        });
    }
    admin.wait_connected(common::DEADLINE).await.unwrap();
    let agent = start(
        kit::amqp_url_for(&host.to_string(), &password),
        "agent",
        &shutdown,
    );
    agent.wait_connected(common::DEADLINE).await.unwrap();

    let own = UpKey::new(host, n_shards, UpKind::Hello).to_string();
    let foreign = UpKey::new(other, n_shards, UpKind::Hello).to_string();
    let signed = |kind: &str, user: HostId| {
        let mut m = OutMessage::json(kind, b"{}".to_vec());
        m.user_id = Some(user.to_string());
        m
    };

    // Another host's routing key: 403, the channel closes, the message is certainly not routed.
    let err = agent
        .publish(&names.up_exchange(), &foreign, signed("hello", host))
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(403), "{err}");
    assert!(!err.is_outcome_unknown());

    // The bus recovers: the next publish with its own key goes through.
    let good = signed("hello", host);
    agent
        .publish(&names.up_exchange(), &own, good.clone())
        .await
        .unwrap();

    // A forged user_id: 406.
    let err = agent
        .publish(&names.up_exchange(), &own, signed("hello", other))
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(406), "{err}");

    // Declaring anything: 403.
    let ch = agent.channel().await.unwrap();
    let err = topology::declare_agent_queue(&ch, &names, host)
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(403), "{err}");

    // Only the good message reached the shard, with the broker-checked user id.
    let mut shard = admin.consume(
        &names.shard_queue(host.shard(n_shards)),
        ConsumeOptions::default(),
    );
    let d = recv(&mut shard, "the agent's hello").await;
    assert_eq!(d.message_id.as_deref(), Some(good.message_id.as_str()));
    assert_eq!(d.user_id.as_deref(), Some(host.to_string().as_str()));
    d.ack().await.unwrap();
    let queue = names.shard_queue(host.shard(n_shards));
    assert_eq!(
        blocking(move || kit::queue_counts(&queue)).await,
        Some((0, 0))
    );

    // The agent consumes its own queue, and commands reach it.
    let mut commands = agent.consume(&names.agent_queue(host), ConsumeOptions::default());
    let cmd = OutMessage::json("command", b"{}".to_vec());
    admin
        .publish(&names.down_exchange(), &host.to_string(), cmd.clone())
        .await
        .unwrap();
    let d = recv(&mut commands, "the command").await;
    assert_eq!(d.message_id, Some(cmd.message_id));
    d.ack().await.unwrap();

    assert_eq!(
        *agent.generation().borrow(),
        1,
        "refusals never cost the connection"
    );
    shutdown.cancel();
}

/// A node's bus that declares the core topology, and a client's bus, both connected.
async fn node_and_client(
    names: &comodit_protocol::Names,
    shutdown: &CancellationToken,
) -> (Bus, Bus) {
    let node = start(kit::amqp_url(), "node", shutdown);
    {
        let names = names.clone();
        node.on_connect(move |ch| {
            let names = names.clone();
            async move { topology::declare_core(&ch, &names, 1).await }
        });
    }
    node.wait_connected(common::DEADLINE).await.unwrap();
    let client = start(kit::amqp_url(), "client", shutdown);
    client.wait_connected(common::DEADLINE).await.unwrap();
    (node, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_get_their_reply_through_direct_reply_to() {
    let names = kit::unique_names();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![],
    };
    let shutdown = CancellationToken::new();
    let (node, client) = node_and_client(&names, &shutdown).await;

    // Nobody answers yet: the request is routed (mandatory passes) and times out.
    let mut req = OutMessage::json("enroll", b"{\"token\":\"t\"}".to_vec());
    req.mandatory = true;
    let err = client
        .request(
            &names.enroll(),
            topology::ENROLL_ROUTING_KEY,
            req.clone(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert_eq!(err, BusError::Timeout(Duration::from_millis(300)));

    // The node answers each request on the default exchange, to its reply-to address.
    let mut requests = node.consume(&names.enroll(), ConsumeOptions::default());
    let responder = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            while let Some(d) = requests.next().await {
                let reply_to = d.reply_to.clone().expect("requests carry reply_to");
                assert!(reply_to.starts_with("amq.rabbitmq.reply-to"), "{reply_to}");
                let mut reply = OutMessage::json("enroll_reply", d.payload.clone());
                reply.correlation_id = d.message_id.clone();
                node.publish("", &reply_to, reply).await.unwrap();
                d.ack().await.unwrap();
                answered += 1;
            }
            answered
        })
    };
    // The first (timed-out) request is still in the queue: it gets answered into the void.
    let reply = client
        .request(
            &names.enroll(),
            topology::ENROLL_ROUTING_KEY,
            req.clone(),
            common::DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(reply.payload, req.payload);
    assert_eq!(reply.kind.as_deref(), Some("enroll_reply"));
    assert_eq!(
        reply.correlation_id.as_deref(),
        Some(req.message_id.as_str())
    );

    // A request nobody could route fails at once.
    let err = client
        .request(&names.enroll(), "nowhere", req, common::DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, BusError::Unroutable { .. }), "{err}");

    shutdown.cancel();
    assert_eq!(responder.await.unwrap(), 2);
}

/// Requests reuse their channel (the same reply-to address every time), and a duplicated
/// answer to an earlier request, which then lands on the reused channel, is not taken for the
/// answer to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reuse_their_channel_and_skip_answers_to_others() {
    let names = kit::unique_names();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![],
    };
    let shutdown = CancellationToken::new();
    let (node, client) = node_and_client(&names, &shutdown).await;

    // The responder answers each of the three requests twice. The duplicate is confirmed before
    // the responder reads the next request, so it reaches the client's channel before the next
    // request's answer does.
    let mut requests = node.consume(&names.enroll(), ConsumeOptions::default());
    let responder = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut reply_tos = Vec::new();
            for _ in 0..3 {
                let d = requests.next().await.expect("a request");
                let reply_to = d.reply_to.clone().expect("requests carry reply_to");
                let mut reply = OutMessage::json("enroll_reply", d.payload.clone());
                reply.correlation_id = d.correlation_id.clone();
                node.publish("", &reply_to, reply.clone()).await.unwrap();
                reply.message_id = format!("{}-again", reply.message_id);
                node.publish("", &reply_to, reply).await.unwrap();
                d.ack().await.unwrap();
                reply_tos.push(reply_to);
            }
            reply_tos
        })
    };
    for n in 0..3 {
        let payload = format!("{{\"n\":{n}}}").into_bytes();
        let mut req = OutMessage::json("enroll", payload.clone());
        req.mandatory = true;
        let reply = client
            .request(
                &names.enroll(),
                topology::ENROLL_ROUTING_KEY,
                req.clone(),
                common::DEADLINE,
            )
            .await
            .unwrap();
        assert_eq!(reply.payload, payload, "request {n} got another's answer");
        // Left empty by the caller, the correlation id is the message id.
        assert_eq!(
            reply.correlation_id.as_deref(),
            Some(req.message_id.as_str())
        );
    }
    let reply_tos = responder.await.unwrap();
    shutdown.cancel();
    assert!(
        reply_tos.iter().all(|r| r == &reply_tos[0]),
        "one channel for sequential requests: {reply_tos:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_what_a_consumer_holds() {
    let names = kit::unique_names();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![],
    };
    let shutdown = CancellationToken::new();
    let bus = start(kit::amqp_url(), "prefetch", &shutdown);
    let host = HostId::random();
    {
        let names = names.clone();
        bus.on_connect(move |ch| {
            let names = names.clone();
            async move {
                topology::declare_core(&ch, &names, 1).await?;
                topology::declare_agent_queue(&ch, &names, host).await
            }
        });
    }
    bus.wait_connected(common::DEADLINE).await.unwrap();
    let queue = names.agent_queue(host);
    for _ in 0..5 {
        bus.publish(
            &names.down_exchange(),
            &host.to_string(),
            OutMessage::json("command", vec![]),
        )
        .await
        .unwrap();
    }
    // Nobody calls next(): the broker hands over exactly `prefetch` and keeps the rest.
    let mut consumer = bus.consume(
        &queue,
        ConsumeOptions {
            prefetch: 2,
            ..ConsumeOptions::default()
        },
    );
    wait_counts(queue.clone(), (3, 2)).await;
    let first = recv(&mut consumer, "the first").await;
    let _second = recv(&mut consumer, "the second").await;
    wait_counts(queue.clone(), (3, 2)).await;
    // Each ack lets exactly one more in.
    first.ack().await.unwrap();
    wait_counts(queue, (2, 2)).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_nothing_is_sent_and_nothing_waits_forever() {
    // Port 1 on loopback: nothing listens, connects are refused at once.
    let shutdown = CancellationToken::new();
    let bus = start(
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        "nobroker",
        &shutdown,
    );
    let err = bus
        .wait_connected(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err, BusError::Timeout(Duration::from_millis(300)));
    assert!(!bus.is_connected());
    assert_eq!(*bus.generation().borrow(), 0);
    let err = bus
        .publish("x", "y", OutMessage::json("x", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err, BusError::NotConnected);
    assert!(matches!(bus.channel().await, Err(BusError::NotConnected)));
    let mut consumer = bus.consume("q", ConsumeOptions::default());
    shutdown.cancel();
    assert!(consumer.next().await.is_none(), "consumer ends at shutdown");
    assert_eq!(
        bus.wait_connected(Duration::from_secs(1)).await,
        Err(BusError::Shutdown)
    );
    assert_eq!(
        bus.publish("x", "y", OutMessage::json("x", vec![])).await,
        Err(BusError::Shutdown)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_keep_retrying_without_connecting() {
    let shutdown = CancellationToken::new();
    let bus: Bus = start(kit::amqp_url_for("nobody", "wrong"), "badauth", &shutdown);
    assert!(matches!(
        bus.wait_connected(Duration::from_millis(500)).await,
        Err(BusError::Timeout(_))
    ));
    assert_eq!(*bus.generation().borrow(), 0);
    shutdown.cancel();
}
