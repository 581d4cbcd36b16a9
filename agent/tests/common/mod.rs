//! A test rig around one real agent and the real broker: it declares a throwaway topology (its own
//! prefix, one shard), creates the host's broker user with the DESIGN §5 permissions, runs the agent
//! in-process with `comodit_agent::run`, and plays the node: it publishes commands on `<p>.down` and
//! reads everything the agent sends from the shard queue.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use comodit_agent::AgentConfig;
use comodit_bus::{topology, Bus, BusConfig, ConsumeOptions, Consumer, OutMessage};
use comodit_protocol::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Rig {
    pub names: Names,
    pub host: HostId,
    pub state: tempfile::TempDir,
    pub work: tempfile::TempDir,
    pub admin: Bus,
    admin_stop: CancellationToken,
    ups: Consumer,
    agent: Option<(CancellationToken, JoinHandle<()>)>,
    pub config: AgentConfig,
    /// Upward messages read while waiting for something else, kept for later waits.
    backlog: Vec<Up>,
}

impl Rig {
    pub async fn new() -> Rig {
        Self::with(|_| {}).await
    }

    pub async fn with(tune: impl FnOnce(&mut AgentConfig)) -> Rig {
        let names = comodit_testkit::unique_names();
        let host = HostId::random();
        let admin_stop = CancellationToken::new();
        let admin = Bus::start(
            BusConfig {
                url: comodit_testkit::amqp_url(),
                connection_name: "agent-test-node".into(),
                ..BusConfig::default()
            },
            admin_stop.clone(),
        );
        admin.wait_connected(WAIT).await.expect("broker reachable");
        let ch = admin.channel().await.expect("channel");
        topology::declare_core(&ch, &names, 1)
            .await
            .expect("topology");
        topology::declare_agent_queue(&ch, &names, host)
            .await
            .expect("agent queue");
        let password = comodit_testkit::create_agent_user(&names, host);
        let state = tempfile::tempdir().unwrap();
        comodit_agent::state::write_credentials(
            state.path(),
            &comodit_agent::state::Credentials {
                host,
                password: Secret::new(password),
            },
        )
        .unwrap();
        let ups = admin.consume(
            &names.shard_queue(Shard(0)),
            ConsumeOptions {
                prefetch: 64,
                consumer_tag: "test-node".into(),
                exclusive: false,
            },
        );
        let mut config = AgentConfig {
            state_dir: state.path().to_owned(),
            broker_url: strip_credentials(&comodit_testkit::amqp_url()),
            prefix: names.prefix().to_owned(),
            n_shards: 1,
            heartbeat_s: 0,
            check_interval_s: 3600,
            ..AgentConfig::default()
        };
        tune(&mut config);
        Rig {
            names,
            host,
            state,
            work: tempfile::tempdir().unwrap(),
            admin,
            admin_stop,
            ups,
            agent: None,
            config,
            backlog: Vec::new(),
        }
    }

    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let stop = CancellationToken::new();
        let cfg = self.config.clone();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            comodit_agent::run(cfg, token).await.expect("agent ran");
        });
        self.agent = Some((stop, handle));
    }

    pub async fn stop_agent(&mut self) {
        if let Some((stop, handle)) = self.agent.take() {
            stop.cancel();
            tokio::time::timeout(WAIT, handle)
                .await
                .expect("agent stops in time")
                .expect("agent task ok");
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    pub fn command(&self, epoch: u64, body: Body) -> Command {
        let now = Utc::now();
        Command {
            v: V1,
            id: CommandId::random(),
            host: self.host,
            epoch: Epoch(epoch),
            issued_at: now,
            expires_at: now + chrono::Duration::minutes(10),
            body,
        }
    }

    pub async fn send_raw(&self, bytes: Vec<u8>) {
        self.admin
            .publish(
                &self.names.down_exchange(),
                &self.host.to_string(),
                OutMessage::json("command", bytes),
            )
            .await
            .expect("command published");
    }

    /// Publishes bytes past the bus's own size check (the bus refuses to send what no agent
    /// accepts), to see the agent refuse them itself.
    pub async fn send_unchecked(&self, bytes: Vec<u8>) {
        use lapin::types::ShortString;
        let ch = self.admin.channel().await.expect("channel");
        ch.basic_publish(
            ShortString::try_new(self.names.down_exchange()).unwrap(),
            ShortString::try_new(self.host.to_string()).unwrap(),
            lapin::options::BasicPublishOptions::default(),
            &bytes,
            lapin::BasicProperties::default(),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed or not in confirm mode");
    }

    pub async fn send(&self, cmd: &Command) {
        self.send_raw(cmd.encode()).await;
    }

    /// Sends and waits for the reply to that command.
    pub async fn call(&mut self, cmd: &Command) -> Reply {
        self.send(cmd).await;
        self.reply_to(cmd.id).await
    }

    /// The next upward message matching `pick`, within WAIT.
    pub async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Up) -> Option<T>) -> T {
        if let Some(i) = self.backlog.iter().position(|u| pick(u).is_some()) {
            let up = self.backlog.remove(i);
            return pick(&up).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let d = tokio::time::timeout_at(deadline, self.ups.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("timed out waiting for {what}; backlog: {:?}", self.backlog)
                })
                .expect("consumer open");
            let key = UpKey::parse(&d.routing_key, 1).expect("agent routing key is valid");
            assert_eq!(key.host, self.host, "message from another host");
            assert_eq!(
                d.user_id.as_deref(),
                Some(self.host.to_string().as_str()),
                "user_id must be the host's broker user"
            );
            let up = Up::decode(key.kind, &d.payload).expect("agent sends valid messages");
            d.ack().await.expect("ack");
            if let Some(t) = pick(&up) {
                return t;
            }
            self.backlog.push(up);
        }
    }

    pub async fn reply_to(&mut self, id: CommandId) -> Reply {
        self.wait_for(&format!("reply to {id}"), |u| match u {
            Up::Reply(r) if r.re == Some(id) => Some(r.clone()),
            _ => None,
        })
        .await
    }

    pub async fn hello(&mut self) -> Hello {
        self.wait_for("hello", |u| match u {
            Up::Hello(h) => Some(h.clone()),
            _ => None,
        })
        .await
    }

    /// Replies seen so far (in the backlog) to `id`.
    pub fn backlog_replies_to(&self, id: CommandId) -> usize {
        self.backlog
            .iter()
            .filter(|u| matches!(u, Up::Reply(r) if r.re == Some(id)))
            .count()
    }

    pub fn metrics(&self) -> String {
        std::fs::read_to_string(self.state.path().join("metrics.prom")).unwrap_or_default()
    }

    pub async fn finish(mut self) {
        self.stop_agent().await;
        // The broker user and the prefix go with the rig (Drop).
    }
}

impl Drop for Rig {
    /// Deletes the rig's broker user and prefix, also when a test failed before [`Rig::finish`].
    /// On a thread of its own: the cleanup's own assertions must not panic inside an unwinding
    /// one.
    fn drop(&mut self) {
        self.admin_stop.cancel();
        let (host, prefix) = (self.host.to_string(), self.names.prefix().to_owned());
        let cleanup = std::thread::spawn(move || {
            comodit_testkit::delete_user(&host);
            comodit_testkit::cleanup_prefix(&prefix);
        });
        if cleanup.join().is_err() {
            eprintln!("rig of host {}: cleanup failed", self.host);
        }
    }
}

fn strip_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, after)) => format!("{scheme}://{after}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

pub fn file_resource(path: &std::path::Path, content: &str, mode: &str) -> Resource {
    Resource::new(
        Collection::Files,
        path.to_str().unwrap(),
        Spec::File(FileSpec {
            content: Some(content.into()),
            mode: Some(Mode::parse(mode).unwrap()),
            ..Default::default()
        }),
    )
    .unwrap()
}

pub fn run_body(argv: &[&str]) -> Body {
    Body::Run(RunSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        timeout_s: 30,
        stream: false,
    })
}
