//! The shared fleet user the loadtest's simulated hosts log in with (`BrokerAdmin::ensure_fleet_user`)
//! and `Bus::consume_many`, against the real broker: the user may speak for any host of its run
//! (publishing with the host's `user_id`, reading the host queues), and nothing else — no `kick`,
//! no declarations, no other prefix.

use std::time::Duration;

use comodit_bus::admin::BrokerAdmin;
use comodit_bus::{topology, Bus, BusConfig, BusError, ConsumeOptions, OutMessage};
use comodit_protocol::{HostId, UpKey, UpKind};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(15);

fn admin() -> BrokerAdmin {
    BrokerAdmin::new("http://127.0.0.1:15672", "guest", "guest", "/").unwrap()
}

fn bus(url: String, stop: &CancellationToken) -> Bus {
    Bus::start(
        BusConfig {
            url,
            connection_name: "comodit-loadtest-test".into(),
            backoff_min_ms: 50,
            backoff_max_ms: 500,
            ..BusConfig::default()
        },
        stop.clone(),
    )
}

fn signed(kind: UpKind, user: &str) -> OutMessage {
    let mut m = OutMessage::json(kind.as_str(), b"{}".to_vec());
    m.user_id = Some(user.to_owned());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_user_speaks_for_its_hosts_and_for_nothing_else() {
    let names = comodit_testkit::unique_names();
    let other = comodit_testkit::unique_names();
    let user = format!("{}-fleet", names.prefix());
    let _cleanup = comodit_testkit::Cleanup {
        prefix: names.prefix().to_owned(),
        users: vec![user.clone()],
    };
    let _cleanup_other = comodit_testkit::Cleanup {
        prefix: other.prefix().to_owned(),
        users: vec![],
    };
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let hosts = [HostId::random(), HostId::random(), HostId::random()];
    let n_shards = 2;
    let guest = bus(comodit_testkit::amqp_url(), &stop);
    guest.wait_connected(DEADLINE).await.unwrap();
    {
        let ch = guest.channel().await.unwrap();
        for n in [&names, &other] {
            topology::declare_core(&ch, n, n_shards).await.unwrap();
            for h in &hosts {
                topology::declare_agent_queue(&ch, n, *h).await.unwrap();
            }
        }
    }
    admin()
        .ensure_fleet_user(&names, &user, "fleet-secret")
        .await
        .unwrap();
    let fleet = bus(comodit_testkit::amqp_url_for(&user, "fleet-secret"), &stop);
    fleet.wait_connected(DEADLINE).await.unwrap();

    // A reply for each host, with that host's user_id: accepted and routed to its shard queue.
    let up = names.up_exchange();
    for h in &hosts {
        let key = UpKey::new(*h, n_shards, UpKind::Reply).to_string();
        fleet
            .publish(&up, &key, signed(UpKind::Reply, &h.to_string()))
            .await
            .unwrap_or_else(|e| panic!("reply for {h} refused: {e}"));
    }
    // A kick — the node's own kind — is refused, whoever it claims to be from.
    let kick = UpKey::new(hosts[0], n_shards, UpKind::Kick).to_string();
    let r = fleet
        .publish(&up, &kick, signed(UpKind::Kick, &hosts[0].to_string()))
        .await;
    assert!(
        matches!(r, Err(BusError::Refused { code: 403, .. })),
        "{r:?}"
    );
    // Another run's exchange is out of reach.
    let key = UpKey::new(hosts[0], n_shards, UpKind::Reply).to_string();
    let r = fleet
        .publish(
            &other.up_exchange(),
            &key,
            signed(UpKind::Reply, &hosts[0].to_string()),
        )
        .await;
    assert!(
        matches!(r, Err(BusError::Refused { code: 403, .. })),
        "{r:?}"
    );
    // No declarations.
    let ch = fleet.channel().await.unwrap();
    let declared = ch
        .queue_declare(
            format!("{}.mine", names.prefix()).as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await;
    assert!(declared.is_err(), "the fleet user declared a queue");

    // One consumer over the three host queues, on one channel: each delivery names its queue.
    let mut consumer = fleet.consume_many(
        hosts.iter().map(|h| names.agent_queue(*h)).collect(),
        ConsumeOptions::default(),
    );
    for h in &hosts {
        guest
            .publish(
                &names.down_exchange(),
                &h.to_string(),
                OutMessage::json("command", h.to_string().into_bytes()),
            )
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    for _ in &hosts {
        let d = tokio::time::timeout(DEADLINE, consumer.next())
            .await
            .expect("a delivery in time")
            .expect("consumer open");
        assert_eq!(
            &*d.queue,
            names.agent_queue(d.routing_key.parse().unwrap()),
            "the queue of a delivery is its host's"
        );
        assert_eq!(d.payload, d.routing_key.as_bytes());
        seen.push(d.routing_key.clone());
        d.ack().await.unwrap();
    }
    seen.sort();
    let mut want: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    // Another run's host queue cannot be read.
    let mut foreign =
        fleet.consume_many(vec![other.agent_queue(hosts[0])], ConsumeOptions::default());
    guest
        .publish(
            &other.down_exchange(),
            &hosts[0].to_string(),
            OutMessage::json("command", b"x".to_vec()),
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), foreign.next())
            .await
            .is_err(),
        "read another run's queue"
    );
}
