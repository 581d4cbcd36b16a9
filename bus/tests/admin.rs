//! The management API client against the real RabbitMQ: a host's user made by
//! [`BrokerAdmin::create_agent_user`] is held to its own queue and routing keys, passwords
//! change, users and connections go away, and the shared enrollment user can ask for enrollment
//! and do nothing else.

mod common;

use std::time::{Duration, Instant};

use common::{blocking, recv, start};
use comodit_bus::admin::{AdminError, BrokerAdmin};
use comodit_bus::lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use comodit_bus::lapin::types::FieldTable;
use comodit_bus::{topology, Bus, BusError, ConsumeOptions, OutMessage};
use comodit_protocol::{HostId, Names, Shard, UpKey, UpKind};
use comodit_testkit as kit;
use tokio_util::sync::CancellationToken;

const N_SHARDS: u32 = 2;

/// The management API of the test broker, as the admin user of the AMQP url.
fn admin() -> BrokerAdmin {
    let mgmt =
        std::env::var("COMODIT_TEST_MGMT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let (user, password, vhost) = url_parts(&kit::amqp_url());
    BrokerAdmin::new(&mgmt, &user, &password, &vhost).expect("admin client")
}

/// (user, password, vhost) of an `amqp://user:password@host:port/vhost` url.
fn url_parts(url: &str) -> (String, String, String) {
    let rest = url.split_once("://").expect("url has a scheme").1;
    let (userinfo, hostpath) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let vhost = hostpath.split_once('/').map_or("%2f", |(_, v)| v);
    let decode = |s: &str| s.replace("%2f", "/").replace("%2F", "/");
    (decode(user), decode(password), decode(vhost))
}

/// One AMQP login attempt with these credentials, straight through lapin (no retry): `Ok` if
/// the broker let the user in.
async fn login(user: &str, password: &str) -> Result<(), String> {
    use comodit_bus::lapin::{uri::AMQPUri, Connection, ConnectionProperties};
    let mut uri: AMQPUri = kit::amqp_url_for(user, password).parse()?;
    // The uri parser turns IP addresses into "localhost": keep the test broker's address.
    uri.authority.host = "127.0.0.1".into();
    let connect = Connection::connect_uri(uri, ConnectionProperties::default());
    match tokio::time::timeout(common::DEADLINE, connect).await {
        Err(_) => Err("login timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "bye".into()).await;
            Ok(())
        }
    }
}

/// Waits, with a deadline, until `bus` has lost its connection.
async fn wait_disconnected(bus: &Bus, what: &str) {
    let until = Instant::now() + common::DEADLINE;
    let mut generation = bus.generation();
    while bus.is_connected() {
        assert!(Instant::now() < until, "{what}: still connected");
        // The bus notices a closed connection within its status check (1 s) or at once by event;
        // either way nothing tells us when, so wake up on the next change or shortly after.
        let _ = tokio::time::timeout(Duration::from_millis(100), generation.changed()).await;
    }
}

/// A guest bus with the core topology and the agent queues of `hosts`.
async fn node_bus(names: &Names, hosts: &[HostId], shutdown: &CancellationToken) -> Bus {
    let bus = start(kit::amqp_url(), "admin-test-node", shutdown);
    let (names, hosts) = (names.clone(), hosts.to_vec());
    bus.on_connect(move |ch| {
        let (names, hosts) = (names.clone(), hosts.clone());
        async move {
            topology::declare_core(&ch, &names, N_SHARDS).await?;
            for host in hosts {
                topology::declare_agent_queue(&ch, &names, host).await?;
            }
            Ok(())
        }
    });
    bus.wait_connected(common::DEADLINE).await.unwrap();
    bus
}

/// Subscribing to `queue` on a channel of `bus`, once, without the consumer's retries.
async fn try_consume(bus: &Bus, queue: &str) -> Result<(), BusError> {
    let ch = bus.channel().await?;
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

fn signed(kind: &str, user: &str) -> OutMessage {
    let mut m = OutMessage::json(kind, b"{}".to_vec());
    m.user_id = Some(user.to_owned());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_user_is_held_to_its_own_queue_and_keys_and_deleting_it_cuts_it_off() {
    agent_user_is_held_to_its_own(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_users_created_in_one_import_are_held_like_one_created_alone() {
    agent_user_is_held_to_its_own(true).await;
}

/// Creates `host`'s user alone (three calls) or in one definitions import with two more hosts,
/// then checks everything that user may and may not do.
async fn agent_user_is_held_to_its_own(batched: bool) {
    common::init_logs();
    let names = kit::unique_names();
    let (host, other) = (HostId::random(), HostId::random());
    let third = HostId::random();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![host.to_string(), other.to_string(), third.to_string()],
    };
    let admin = admin();
    let shutdown = CancellationToken::new();
    let node = node_bus(&names, &[host, other], &shutdown).await;
    let password = "pw-".to_owned() + &HostId::random().to_string();
    let other_password = "pw-".to_owned() + &HostId::random().to_string();
    // Twice: idempotent, the same call again changes nothing and succeeds.
    for _ in 0..2 {
        if batched {
            admin
                .create_agent_users(
                    &names,
                    &[
                        (other, other_password.as_str()),
                        (host, password.as_str()),
                        (third, "third"),
                    ],
                )
                .await
                .unwrap();
        } else {
            admin
                .create_agent_user(&names, host, &password)
                .await
                .unwrap();
        }
    }
    if batched {
        // Each user got its own password, not its neighbour's.
        assert!(login(&other.to_string(), &other_password).await.is_ok());
        assert!(login(&other.to_string(), &password).await.is_err());
        assert!(login(&third.to_string(), "third").await.is_ok());
        let empty = admin.create_agent_users(&names, &[(third, "")]).await;
        assert!(
            matches!(empty, Err(AdminError::Invalid { .. })),
            "{empty:?}"
        );
    }

    let agent = start(
        kit::amqp_url_for(&host.to_string(), &password),
        "admin-test-agent",
        &shutdown,
    );
    agent.wait_connected(common::DEADLINE).await.unwrap();
    let me = host.to_string();

    // Its own queue: commands reach it.
    let mut commands = agent.consume(&names.agent_queue(host), ConsumeOptions::default());
    let cmd = OutMessage::json("command", b"{}".to_vec());
    node.publish(&names.down_exchange(), &me, cmd.clone())
        .await
        .unwrap();
    let d = recv(&mut commands, "a command on its own queue").await;
    assert_eq!(d.message_id, Some(cmd.message_id));
    d.ack().await.unwrap();

    // Another host's queue: 403.
    let err = try_consume(&agent, &names.agent_queue(other))
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(403), "{err}");

    // Its own routing key goes through, with the broker-checked user id.
    let own = UpKey::new(host, N_SHARDS, UpKind::Hello).to_string();
    agent
        .publish(&names.up_exchange(), &own, signed("hello", &me))
        .await
        .unwrap();
    let mut shard = node.consume(
        &names.shard_queue(host.shard(N_SHARDS)),
        ConsumeOptions::default(),
    );
    let d = recv(&mut shard, "the agent's hello").await;
    assert_eq!(d.user_id.as_deref(), Some(me.as_str()));
    d.ack().await.unwrap();

    // Another host's routing key: 403. A forged user_id: 406.
    let foreign = UpKey::new(other, N_SHARDS, UpKind::Hello).to_string();
    let err = agent
        .publish(&names.up_exchange(), &foreign, signed("hello", &me))
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(403), "{err}");
    let err = agent
        .publish(
            &names.up_exchange(),
            &own,
            signed("hello", &other.to_string()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(406), "{err}");
    // Straight onto the down exchange (commands to itself or others): 403.
    let err = agent
        .publish(&names.down_exchange(), &me, signed("command", &me))
        .await
        .unwrap_err();
    assert_eq!(err.refused_code(), Some(403), "{err}");

    // Declaring any queue: 403.
    let ch = agent.channel().await.unwrap();
    let err: BusError = ch
        .queue_declare(
            format!("{}.mine", names.prefix()).as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err()
        .into();
    assert_eq!(err.refused_code(), Some(403), "{err}");

    // Deleting the user closes its live connection, and the password no longer logs in.
    assert!(agent.is_connected());
    assert!(admin.delete_user(&me).await.unwrap(), "the user existed");
    wait_disconnected(&agent, "the deleted user's connection").await;
    let refused = login(&me, &password).await;
    assert!(refused.is_err(), "a deleted user logged in");
    assert!(!admin.user_exists(&me).await.unwrap());
    // Deleting it again is fine.
    assert!(!admin.delete_user(&me).await.unwrap());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_password_replaces_the_old_and_connections_can_be_closed() {
    common::init_logs();
    let names = kit::unique_names();
    let host = HostId::random();
    let me = host.to_string();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![me.clone()],
    };
    let admin = admin();
    admin
        .create_agent_user(&names, host, "first")
        .await
        .unwrap();
    login(&me, "first").await.expect("the first password works");

    // A live connection with the first password.
    let shutdown = CancellationToken::new();
    let agent = start(kit::amqp_url_for(&me, "first"), "admin-test-pw", &shutdown);
    agent.wait_connected(common::DEADLINE).await.unwrap();

    admin.set_password(&me, "second").await.unwrap();
    login(&me, "second").await.expect("the new password works");
    assert!(
        login(&me, "first").await.is_err(),
        "the old password is refused"
    );
    // Changing the password leaves live connections open: they are closed apart.
    assert!(agent.is_connected());
    // The broker's connection tracking may still list the login that just closed.
    assert!(!admin.connections_of(&me).await.unwrap().is_empty());
    let closed = admin
        .close_connections(&me, "test: password changed")
        .await
        .unwrap();
    assert!(closed >= 1, "{closed}");
    wait_disconnected(&agent, "the closed connection").await;
    // The bus cannot come back with the old password: no connection of the user is left.
    assert_eq!(
        blocking({
            let me = me.clone();
            move || kit::user_connection_count(&me)
        })
        .await,
        0
    );
    assert_eq!(
        admin.close_connections("no-such-user-x", "none").await,
        Ok(0)
    );

    // No such user: a certain refusal.
    let err = admin.set_password("no-such-user-x", "p").await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    assert!(!err.is_outcome_unknown());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_certain_failures() {
    let names = kit::unique_names();
    let host = HostId::random();
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![host.to_string()],
    };
    let mgmt =
        std::env::var("COMODIT_TEST_MGMT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let (user, password, _) = url_parts(&kit::amqp_url());
    // Permissions on a vhost that does not exist.
    let nowhere = BrokerAdmin::new(&mgmt, &user, &password, "comodit-no-such-vhost").unwrap();
    let err = nowhere
        .create_agent_user(&names, host, "p")
        .await
        .unwrap_err();
    assert!(
        matches!(err.status(), Some(400..=499)),
        "a missing vhost is a refusal: {err}"
    );
    assert!(!err.is_outcome_unknown());
    // Wrong admin password.
    let wrong = BrokerAdmin::new(&mgmt, &user, "wrong-password", "/").unwrap();
    let err = wrong.user_exists("x").await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(!err.to_string().contains("wrong-password"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enroll_user_can_ask_for_enrollment_and_nothing_else() {
    common::init_logs();
    let names = kit::unique_names();
    let host = HostId::random();
    let enroll_user = format!("{}-enroll", names.prefix());
    let _cleanup = kit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![enroll_user.clone()],
    };
    let admin = admin();
    let shutdown = CancellationToken::new();
    let node = node_bus(&names, &[host], &shutdown).await;
    admin
        .ensure_enroll_user(&names, &enroll_user, "enroll-pw")
        .await
        .unwrap();
    // Idempotent.
    admin
        .ensure_enroll_user(&names, &enroll_user, "enroll-pw")
        .await
        .unwrap();
    // A host's id is never an enrollment user: that would rewrite the host's permissions.
    assert!(matches!(
        admin
            .ensure_enroll_user(&names, &host.to_string(), "x")
            .await,
        Err(AdminError::Invalid { .. })
    ));

    let client = start(
        kit::amqp_url_for(&enroll_user, "enroll-pw"),
        "admin-test-enroll",
        &shutdown,
    );
    client.wait_connected(common::DEADLINE).await.unwrap();

    // The node answers enrollment requests through direct reply-to.
    let mut requests = node.consume(&names.enroll(), ConsumeOptions::default());
    let responder = {
        let node = node.clone();
        tokio::spawn(async move {
            let d = requests.next().await.expect("a request");
            let mut reply = OutMessage::json("enroll_reply", b"{\"ok\":1}".to_vec());
            reply.correlation_id = d.message_id.clone();
            node.publish("", d.reply_to.as_deref().expect("reply_to"), reply)
                .await
                .unwrap();
            d.ack().await.unwrap();
        })
    };
    let mut req = OutMessage::json("enroll", b"{}".to_vec());
    req.mandatory = true;
    let reply = client
        .request(
            &names.enroll(),
            topology::ENROLL_ROUTING_KEY,
            req.clone(),
            common::DEADLINE,
        )
        .await
        .expect("the enroll user gets its reply");
    assert_eq!(reply.payload, b"{\"ok\":1}");
    assert_eq!(
        reply.correlation_id.as_deref(),
        Some(req.message_id.as_str())
    );
    responder.await.unwrap();

    // Nothing else: no reading any queue (agents', shards', the enrollment queue itself) ...
    for queue in [
        names.agent_queue(host),
        names.shard_queue(Shard(0)),
        names.enroll(),
    ] {
        let err = try_consume(&client, &queue).await.unwrap_err();
        assert_eq!(err.refused_code(), Some(403), "{queue}: {err}");
    }
    // ... no publishing on up, down, or the default exchange (straight into a queue) ...
    let up_key = UpKey::new(host, N_SHARDS, UpKind::Hello).to_string();
    for (exchange, key) in [
        (names.up_exchange(), up_key.as_str()),
        (names.down_exchange(), &host.to_string()),
        (String::new(), &names.agent_queue(host)),
    ] {
        let err = client
            .publish(&exchange, key, OutMessage::json("x", b"{}".to_vec()))
            .await
            .unwrap_err();
        assert_eq!(err.refused_code(), Some(403), "{exchange:?} {key}: {err}");
    }
    // ... and no declaring.
    let ch = client.channel().await.unwrap();
    let err: BusError = ch
        .queue_declare(
            format!("{}.mine", names.prefix()).as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err()
        .into();
    assert_eq!(err.refused_code(), Some(403), "{err}");
    // The refusals cost channels, never the connection.
    assert_eq!(*client.generation().borrow(), 1);
    shutdown.cancel();
}
