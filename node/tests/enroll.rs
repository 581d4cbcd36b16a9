//! Enrollment and revocation end to end, against the real RabbitMQ: the node's
//! [`EnrollService`] on one side, the agent's own enrollment code (`comodit_agent::enroll`) and
//! daemon on the other, a store in between.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use comodit_actors::{HostLifecycle, NodeEvent, OpsError};
use comodit_agent::enroll::{self as agent_enroll, EnrollError as AgentEnrollError, EnrollOptions};
use comodit_agent::AgentConfig;
use comodit_bus::admin::BrokerAdmin;
use comodit_bus::{topology, Bus, BusConfig, ConsumeOptions, OutMessage};
use comodit_node::enroll::{hash_token, EnrollConfig, EnrollService, INVALID_TOKEN, RETRY_LATER};
use comodit_protocol::{
    EnrollReply, EnrollRequest, Facts, HostId, Names, Secret, Status, UpKey, UpKind, V1,
};
use comodit_store::embedded::EmbeddedStore;
use comodit_store::{
    EnrollmentToken, EnvId, Environment, HostFilter, OrgId, Organization, Page, Store, TokenId,
};
use comodit_testkit as kit;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const N_SHARDS: u32 = 4;
const WAIT: Duration = Duration::from_secs(30);

fn admin_as(user: &str, password: &str) -> BrokerAdmin {
    let (url, _, _, vhost) = kit::mgmt_login();
    BrokerAdmin::new(&url, user, password, &vhost).expect("admin client")
}

fn admin() -> BrokerAdmin {
    let (_, user, password, _) = kit::mgmt_login();
    admin_as(&user, &password)
}

fn strip_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, after)) => format!("{scheme}://{after}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// One AMQP login attempt, no retry: `Ok` if the broker lets the user in.
async fn login(user: &str, password: &str) -> Result<(), String> {
    use comodit_bus::lapin::{uri::AMQPUri, Connection, ConnectionProperties};
    let mut uri: AMQPUri = kit::amqp_url_for(user, password).parse()?;
    // The uri parser turns IP addresses into "localhost": keep the test broker's address.
    uri.authority.host = "127.0.0.1".into();
    let connect = Connection::connect_uri(uri, ConnectionProperties::default());
    match tokio::time::timeout(WAIT, connect).await {
        Err(_) => Err("login timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "bye".into()).await;
            Ok(())
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking helper")
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("comodit_node=debug,comodit_agent=info,comodit_bus=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A store with one organization and two environments, a node bus, and a running
/// enrollment service on a throwaway prefix.
struct Rig {
    names: Names,
    store: Arc<dyn Store>,
    org: OrgId,
    env: EnvId,
    other_env: EnvId,
    bus: Bus,
    service: EnrollService,
    events: broadcast::Receiver<NodeEvent>,
    enroll_user: String,
    enroll_password: String,
    stop: CancellationToken,
    cleanup: kit::Cleanup,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new() -> Rig {
        Self::with_admin(admin()).await
    }

    async fn with_admin(admin: BrokerAdmin) -> Rig {
        init_logs();
        let names = kit::unique_names();
        let dir = tempfile::tempdir().unwrap();
        let store = test_store(dir.path()).await;
        let now = Utc::now();
        let org = OrgId::random();
        store
            .create_org(&Organization {
                id: org,
                name: format!("org-{}", names.prefix()),
                created_at: now,
                version: 0,
            })
            .await
            .unwrap();
        let (env, other_env) = (EnvId::random(), EnvId::random());
        for (id, name) in [(env, "prod"), (other_env, "staging")] {
            store
                .create_env(&Environment {
                    id,
                    org,
                    name: name.into(),
                    created_at: now,
                    version: 0,
                })
                .await
                .unwrap();
        }
        let enroll_user = format!("{}-enroll", names.prefix());
        let enroll_password = format!("pw-{}", HostId::random());
        let cleanup = kit::Cleanup {
            prefix: names.prefix().to_owned(),
            users: vec![enroll_user.clone()],
        };
        let stop = CancellationToken::new();
        let bus = Bus::start(
            BusConfig {
                url: kit::amqp_url(),
                connection_name: format!("enroll-test-node {}", names.prefix()),
                backoff_min_ms: 50,
                backoff_max_ms: 500,
                ..BusConfig::default()
            },
            stop.clone(),
        );
        bus.wait_connected(WAIT).await.unwrap();
        let (events_tx, events) = broadcast::channel(64);
        let service = EnrollService::start(
            store.clone(),
            bus.clone(),
            admin,
            names.clone(),
            EnrollConfig {
                enroll_user: enroll_user.clone(),
                enroll_password: enroll_password.clone(),
                n_shards: N_SHARDS,
                import_min: comodit_node::enroll::IMPORT_MIN,
            },
            Some(events_tx),
            stop.clone(),
        )
        .await
        .expect("enrollment service starts");
        Rig {
            names,
            store,
            org,
            env,
            other_env,
            bus,
            service,
            events,
            enroll_user,
            enroll_password,
            stop,
            cleanup,
            _dir: dir,
        }
    }

    /// A token of `env` in the store; returns its id and secret.
    async fn token(
        &self,
        env: EnvId,
        max_uses: Option<u32>,
        expires_in: chrono::Duration,
    ) -> (TokenId, String) {
        let secret = format!("tok-{}", HostId::random());
        let id = TokenId::random();
        self.store
            .create_enrollment_token(&EnrollmentToken {
                id,
                org: self.org,
                env,
                description: "test".into(),
                secret_sha256: hash_token(&secret),
                expires_at: Utc::now() + expires_in,
                max_uses,
                uses: 0,
                revoked: false,
                created_at: Utc::now(),
                created_by: "test".into(),
            })
            .await
            .unwrap();
        (id, secret)
    }

    async fn uses(&self, token: TokenId) -> u32 {
        self.store
            .get_enrollment_token(token)
            .await
            .unwrap()
            .unwrap()
            .uses
    }

    /// An agent configuration with its own state directory. `n_shards` is deliberately not
    /// the cluster's: the agent must learn it at enrollment.
    fn agent_config(&self, state: &std::path::Path) -> AgentConfig {
        AgentConfig {
            state_dir: state.to_owned(),
            broker_url: strip_credentials(&kit::amqp_url()),
            prefix: self.names.prefix().to_owned(),
            n_shards: 1,
            enroll_user: self.enroll_user.clone(),
            enroll_password: Secret::new(self.enroll_password.clone()),
            heartbeat_s: 0,
            check_interval_s: 3600,
            ..AgentConfig::default()
        }
    }

    /// Enrolls through the agent's own code; remembers the host's user for cleanup.
    async fn enroll(
        &mut self,
        cfg: &AgentConfig,
        token: &str,
        force: bool,
    ) -> Result<agent_enroll::Enrollment, AgentEnrollError> {
        let opts = EnrollOptions {
            timeout: Duration::from_secs(15),
            attempts: 2,
            ..EnrollOptions::new(Secret::new(token), force)
        };
        let result = agent_enroll::enroll(cfg, &opts, &self.stop).await;
        if let Ok(e) = &result {
            self.cleanup.users.push(e.host.to_string());
        }
        result
    }

    async fn hosts_in(&self, env: EnvId) -> usize {
        let filter = HostFilter {
            env: Some(env),
            ..HostFilter::default()
        };
        self.store
            .list_hosts(&filter, &Page::first(100))
            .await
            .unwrap()
            .items
            .len()
    }

    /// The next event matching `pick`, within the deadline.
    async fn event(&mut self, what: &str, pick: impl Fn(&NodeEvent) -> bool) -> NodeEvent {
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            let e = tokio::time::timeout_at(until, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} event"))
                .expect("events open");
            if pick(&e) {
                return e;
            }
        }
    }

    /// Audit entries, oldest first.
    async fn audit(&self) -> Vec<(String, String, String)> {
        let mut items = self
            .store
            .list_audit(&Page::first(1000))
            .await
            .unwrap()
            .items;
        items.reverse();
        items
            .into_iter()
            .map(|e| (e.action, e.target, e.outcome))
            .collect()
    }

    async fn finish(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.service.stopped())
            .await
            .expect("the service stops");
    }
}

/// The embedded store in a file of the test's own directory.
async fn test_store(dir: &std::path::Path) -> Arc<dyn Store> {
    let path = dir.join("comodit.redb");
    let store = blocking(move || EmbeddedStore::open(&path))
        .await
        .expect("embedded store opens");
    Arc::new(store)
}

/// Waits, with a deadline, until the broker lists no connection of `user`.
async fn wait_no_connections(user: &str) {
    let until = Instant::now() + WAIT;
    loop {
        let u = user.to_owned();
        let n = blocking(move || kit::user_connection_count(&u)).await;
        if n == 0 {
            return;
        }
        assert!(Instant::now() < until, "{user} still has {n} connections");
        // A bounded poll of rabbitmqctl: the broker offers no notification for this.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolls_runs_with_its_credentials_and_revocation_cuts_it_off() {
    let mut rig = Rig::new().await;
    let (token_id, token) = rig
        .token(rig.env, Some(5), chrono::Duration::hours(1))
        .await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = rig.agent_config(state.path());

    let enrollment = rig.enroll(&cfg, &token, false).await.expect("enrolled");
    let host = enrollment.host;
    assert_eq!(
        enrollment.n_shards, N_SHARDS,
        "the node tells its shard count"
    );
    assert_eq!(rig.uses(token_id).await, 1);

    // The host is in the store where the token says, with its shard and name.
    let record = rig
        .store
        .get_host(host)
        .await
        .unwrap()
        .expect("host stored");
    assert_eq!((record.org, record.env), (rig.org, rig.env));
    assert_eq!(record.shard, host.shard(N_SHARDS).0);
    assert_eq!(record.name, hostname());
    assert!(record.labels.is_empty());
    let runtime = rig.store.get_runtime(host).await.unwrap().expect("runtime");
    assert_eq!(runtime.epoch.0, 0);
    assert_eq!(runtime.facts.expect("facts").hostname, hostname());
    assert!(!runtime.online);
    rig.event("enrolled", |e| *e == NodeEvent::HostEnrolled { host })
        .await;
    assert!(rig
        .audit()
        .await
        .contains(&("enroll".into(), host.to_string(), "ok".into())));

    // The agent runs with what it stored: its hello arrives on its shard's queue, sent as
    // its own broker user.
    let creds = comodit_agent::state::read_credentials(state.path()).expect("credentials 0600");
    assert_eq!(creds.host, host);
    let mut shard = rig.bus.consume(
        &rig.names.shard_queue(host.shard(N_SHARDS)),
        ConsumeOptions::default(),
    );
    agent_enroll::apply_enrollment(&mut cfg).unwrap();
    assert_eq!(cfg.n_shards, N_SHARDS);
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(comodit_agent::run(cfg.clone(), agent_stop.clone()));
    let hello = tokio::time::timeout(WAIT, shard.next())
        .await
        .expect("hello within the deadline")
        .expect("consumer open");
    let key = UpKey::parse(&hello.routing_key, N_SHARDS).expect("valid routing key");
    assert_eq!((key.host, key.kind), (host, UpKind::Hello));
    assert_eq!(hello.user_id.as_deref(), Some(host.to_string().as_str()));
    hello.ack().await.unwrap();
    let user = host.to_string();
    {
        let user = user.clone();
        assert_eq!(blocking(move || kit::user_connection_count(&user)).await, 1);
    }
    let queue = rig.names.agent_queue(host);
    assert!(blocking({
        let q = queue.clone();
        move || kit::queue_info(&q)
    })
    .await
    .is_some());

    // Revocation: the broker user goes (its connection with it), then the queue, then the host.
    rig.service.revoke(host).await.expect("revoked");
    rig.event("revoked", |e| *e == NodeEvent::HostRevoked { host })
        .await;
    assert!(rig.store.get_host(host).await.unwrap().is_none());
    assert!(rig.store.get_runtime(host).await.unwrap().is_none());
    assert!(blocking(move || kit::queue_info(&queue)).await.is_none());
    assert!(!admin().user_exists(&user).await.unwrap());
    // The agent keeps trying to reconnect, and the broker keeps refusing its credentials.
    let refused = login(&user, creds.password.expose()).await;
    assert!(refused.is_err(), "revoked credentials still log in");
    wait_no_connections(&user).await;
    assert!(rig
        .audit()
        .await
        .contains(&("revoke".into(), host.to_string(), "ok".into())));
    // Revoking again: there is no such host any more.
    assert!(matches!(
        rig.service.revoke(host).await,
        Err(OpsError::UnknownHost(h)) if h == host
    ));

    agent_stop.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("agent stops")
        .unwrap()
        .expect("agent ran");
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tokens_are_rejected_and_create_nothing() {
    let mut rig = Rig::new().await;
    let (_, expired) = rig
        .token(rig.env, None, chrono::Duration::seconds(-1))
        .await;
    let (revoked_id, revoked) = rig.token(rig.env, None, chrono::Duration::hours(1)).await;
    rig.store.revoke_enrollment_token(revoked_id).await.unwrap();
    let (used_id, used_up) = rig
        .token(rig.env, Some(1), chrono::Duration::hours(1))
        .await;
    rig.store
        .use_enrollment_token(&hash_token(&used_up), Utc::now())
        .await
        .unwrap();
    let unknown = "tok-nobody-has-this".to_owned();

    for (what, token) in [
        ("expired", expired),
        ("revoked", revoked),
        ("used up", used_up),
        ("unknown", unknown),
    ] {
        let state = tempfile::tempdir().unwrap();
        let cfg = rig.agent_config(state.path());
        let err = rig.enroll(&cfg, &token, false).await.unwrap_err();
        match &err {
            AgentEnrollError::Rejected(reason) => {
                assert_eq!(
                    reason, INVALID_TOKEN,
                    "{what}: the same reason for every token"
                )
            }
            other => panic!("{what}: {other}"),
        }
        assert_eq!(err.exit_code(), 3, "{what}");
        assert!(
            !comodit_agent::state::credentials_path(state.path()).exists(),
            "{what}"
        );
    }
    assert_eq!(rig.uses(used_id).await, 1, "a refused use is not counted");
    assert_eq!(rig.hosts_in(rig.env).await, 0, "no host was created");
    let audit = rig.audit().await;
    assert_eq!(audit.len(), 4, "{audit:?}");
    assert!(audit
        .iter()
        .all(|(a, _, o)| a == "enroll" && o == "denied: invalid or expired token"));
    assert!(
        matches!(
            rig.events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ),
        "no enrollment event"
    );
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_enrollment_needs_force_and_the_same_environment_and_replaces_the_password() {
    let mut rig = Rig::new().await;
    let (token_id, token) = rig.token(rig.env, None, chrono::Duration::hours(1)).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = rig.agent_config(state.path());
    let first = rig.enroll(&cfg, &token, false).await.unwrap();
    let host = first.host;
    let user = host.to_string();
    let old = comodit_agent::state::read_credentials(state.path()).unwrap();

    // A live connection with the first password.
    let stop = CancellationToken::new();
    let live = Bus::start(
        BusConfig {
            url: kit::amqp_url_for(&user, old.password.expose()),
            connection_name: "enroll-test-old-agent".into(),
            ..BusConfig::default()
        },
        stop.clone(),
    );
    live.wait_connected(WAIT).await.unwrap();

    // Without force: refused, nothing changes.
    let err = rig.enroll(&cfg, &token, false).await.unwrap_err();
    assert!(
        matches!(&err, AgentEnrollError::Rejected(r) if r.contains("already enrolled")),
        "{err}"
    );
    assert_eq!(
        comodit_agent::state::read_credentials(state.path())
            .unwrap()
            .password
            .expose(),
        old.password.expose()
    );
    login(&user, old.password.expose())
        .await
        .expect("the old password still works");

    // A token of another environment cannot take the host over, even with force.
    let (_, staging) = rig
        .token(rig.other_env, None, chrono::Duration::hours(1))
        .await;
    let err = rig.enroll(&cfg, &staging, true).await.unwrap_err();
    assert!(matches!(&err, AgentEnrollError::Rejected(_)), "{err}");

    // With force: the same host, a new password; the old one is refused and its connection
    // closed.
    let second = rig.enroll(&cfg, &token, true).await.unwrap();
    assert_eq!(second.host, host);
    let new = comodit_agent::state::read_credentials(state.path()).unwrap();
    assert_ne!(new.password.expose(), old.password.expose());
    login(&user, new.password.expose())
        .await
        .expect("the new password works");
    assert!(
        login(&user, old.password.expose()).await.is_err(),
        "the old password is refused"
    );
    let until = Instant::now() + WAIT;
    while live.is_connected() {
        assert!(Instant::now() < until, "the old connection stays open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rig.uses(token_id).await,
        2,
        "the enrollment and the forced re-enrollment used the token, the refused request did not"
    );
    assert_eq!(rig.hosts_in(rig.env).await, 1, "still one host");
    assert_eq!(rig.hosts_in(rig.other_env).await, 0);
    assert!(rig
        .audit()
        .await
        .contains(&("enroll".into(), user.clone(), "ok: re-enrolled".into())));
    stop.cancel();
    rig.finish().await;
}

/// A raw enrollment request, as a client of the enrollment user would send it.
fn request_bytes(token: &str) -> Vec<u8> {
    serde_json::to_vec(&EnrollRequest {
        v: V1,
        token: Secret::new(token),
        facts: Facts {
            hostname: "raw-client".into(),
            ..Facts::default()
        },
        host: None,
        force: false,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_retries_are_answered_once_and_the_service_keeps_going() {
    // The only test of this binary that installs a recorder: it sees every test's counts, and
    // only this one sends malformed requests or replays.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("metrics recorder");
    let mut rig = Rig::new().await;
    let (token_id, token) = rig.token(rig.env, None, chrono::Duration::hours(1)).await;
    let stop = CancellationToken::new();
    let client = Bus::start(
        BusConfig {
            url: kit::amqp_url_for(&rig.enroll_user, &rig.enroll_password),
            connection_name: "enroll-test-client".into(),
            ..BusConfig::default()
        },
        stop.clone(),
    );
    client.wait_connected(WAIT).await.unwrap();
    let exchange = rig.names.enroll();
    let ask = |msg: OutMessage| {
        let (client, exchange) = (client.clone(), exchange.clone());
        async move {
            let reply = client
                .request(&exchange, topology::ENROLL_ROUTING_KEY, msg, WAIT)
                .await
                .expect("an answer");
            serde_json::from_slice::<EnrollReply>(&reply.payload).expect("an enrollment reply")
        }
    };

    // Garbage with a reply address gets a refusal that says why (and never echoes the token).
    for garbage in [
        b"not json at all".to_vec(),
        b"{\"v\":1}".to_vec(),
        b"{\"v\":2,\"token\":\"s3cr3t\",\"facts\":{}}".to_vec(),
        vec![b'x'; 70 * 1024],
    ] {
        let reply = ask(OutMessage::json("enroll", garbage)).await;
        assert_eq!(reply.status, Status::Rejected);
        let reason = reply.reason.unwrap_or_default();
        assert!(reason.contains("malformed"), "{reason}");
        assert!(!reason.contains("s3cr3t"), "{reason}");
        assert_eq!((reply.host, reply.password), (None, None));
    }
    // Garbage without a reply address, or with a reply address that is a queue: no answer
    // (the node never publishes into a queue a client names).
    client
        .publish(
            &exchange,
            topology::ENROLL_ROUTING_KEY,
            OutMessage::json("enroll", b"\xff\xfe".to_vec()),
        )
        .await
        .unwrap();
    let victim = HostId::random();
    {
        let ch = rig.bus.channel().await.unwrap();
        topology::declare_agent_queue(&ch, &rig.names, victim)
            .await
            .unwrap();
    }
    let mut aimed = OutMessage::json("enroll", b"{}".to_vec());
    aimed.reply_to = Some(rig.names.agent_queue(victim));
    client
        .publish(&exchange, topology::ENROLL_ROUTING_KEY, aimed)
        .await
        .unwrap();

    // The same request twice (a retry after a lost reply): one host, the same answer, one use.
    let msg = OutMessage::json("enroll", request_bytes(&token));
    let first = ask(msg.clone()).await;
    assert_eq!(first.status, Status::Ok, "{:?}", first.reason);
    let again = ask(msg.clone()).await;
    assert_eq!(again, first);
    let host = first.host.unwrap();
    rig.cleanup.users.push(host.to_string());
    assert_eq!(rig.uses(token_id).await, 1);
    assert_eq!(rig.hosts_in(rig.env).await, 1);
    let stored = rig.store.get_host(host).await.unwrap().unwrap();
    assert_eq!(stored.name, "raw-client");
    // The same message id with another token is not a retry: no reply of the first leaks.
    let mut forged = msg.clone();
    forged.payload = request_bytes("tok-wrong");
    let reply = ask(forged).await;
    assert_eq!(reply.status, Status::Rejected);
    assert_eq!(reply.password, None);

    // After all that the service still enrolls, and the aimed queue got nothing.
    let state = tempfile::tempdir().unwrap();
    let cfg = rig.agent_config(state.path());
    rig.enroll(&cfg, &token, false)
        .await
        .expect("still enrolling");
    // Every request was settled (acked after its answer) ...
    let enroll_queue = rig.names.enroll();
    let until = Instant::now() + WAIT;
    loop {
        let q = enroll_queue.clone();
        let counts = blocking(move || kit::queue_counts(&q)).await;
        if counts == Some((0, 0)) {
            break;
        }
        assert!(
            Instant::now() < until,
            "enroll queue never drained: {counts:?}"
        );
        // A bounded poll of rabbitmqctl: the broker offers no notification for this.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and the queue named as a reply address got nothing.
    let victim_queue = rig.names.agent_queue(victim);
    assert_eq!(
        blocking(move || kit::queue_counts(&victim_queue)).await,
        Some((0, 0))
    );
    // Every malformed request was counted (four answered, two not), and the one replay.
    let text = metrics.render();
    let count = |outcome: &str| {
        let key = format!("comodit_node_enroll_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(|v| v.trim().parse::<u64>().expect("a count"))
            .unwrap_or(0)
    };
    assert_eq!(count("malformed"), 6, "{text}");
    assert_eq!(count("replayed"), 1, "{text}");
    stop.cancel();
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_failure_after_the_host_was_recorded_is_undone() {
    // The service acts through an administrator of its own, whose password changes behind its
    // back once the service is started.
    let admin_user = format!("enroll-test-admin-{}", HostId::random());
    let admin_password = "first-admin-password";
    let (_, _, _, vhost) = kit::mgmt_login();
    {
        let user = admin_user.clone();
        blocking(move || {
            rabbitmqctl(&["add_user", &user, admin_password]);
            rabbitmqctl(&["set_user_tags", &user, "administrator"]);
            rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
        })
        .await;
    }
    let mut rig = Rig::with_admin(admin_as(&admin_user, admin_password)).await;
    rig.cleanup.users.push(admin_user.clone());
    let (token_id, token) = rig.token(rig.env, None, chrono::Duration::hours(1)).await;
    admin()
        .set_password(&admin_user, "changed-behind-its-back")
        .await
        .unwrap();

    let state = tempfile::tempdir().unwrap();
    let cfg = rig.agent_config(state.path());
    let err = rig.enroll(&cfg, &token, false).await.unwrap_err();
    assert!(
        matches!(&err, AgentEnrollError::Rejected(r) if r == RETRY_LATER),
        "{err}"
    );
    assert_eq!(rig.hosts_in(rig.env).await, 0, "the host was removed again");
    assert_eq!(
        rig.uses(token_id).await,
        0,
        "a failed enrollment gives its token use back"
    );
    let audit = rig.audit().await;
    assert!(
        audit
            .iter()
            .any(|(a, _, o)| a == "enroll" && o.starts_with("failed: ")),
        "{audit:?}"
    );
    rig.finish().await;
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {:?}: {}",
        args.first(),
        String::from_utf8_lossy(&out.stderr)
    );
}
