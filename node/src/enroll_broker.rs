//! The broker side of enrollment: every host that enrolls needs a broker user (with its vhost
//! and topic permissions) and a queue. [`WORKERS`] tasks make them; each keeps one channel for
//! the queues it declares.
//!
//! ```text
//! enroll_new ─► create(host, password) ─► dispatcher: takes every host waiting (≤ MAX_BATCH)
//!     ≥ IMPORT_MIN waiting: their users in one POST /api/definitions, then to the workers
//!     fewer:                to the workers as they are
//!   ─► worker (one of WORKERS): the user's 3 management calls unless imported,
//!      then the queue and its binding on the worker's channel ─► result
//! ```
//!
//! Why two ways to make users (ARCHITECTURE §21): one definitions import costs the broker a fixed
//! amount that grows with the broker's size, not with the import — RabbitMQ 3.10 garbage-collects
//! every Erlang process of the broker eleven times per import (`rabbit_runtime:gc_all_processes`
//! after each category of definitions), about 3 s of CPU with 50,000 host queues. Three small
//! calls cost it about 4 ms whatever its size. So a lone host (the usual case) gets the calls, and
//! only a crowd of waiting hosts — a fleet enrolling at once, when the broker is the bottleneck —
//! shares one import. While the workers declare one crowd's queues, the next crowd gathers.
//! (Handing the workers half a crowd ahead, so that the next import overlaps the last
//! declarations, measured no faster: 9,359 hosts/min against 9,704.)

use comodit_bus::admin::BrokerAdmin;
use comodit_bus::{topology, Bus};
use comodit_protocol::{HostId, Names};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, Mutex};
use tracing::{debug, warn};

/// Hosts whose user or queue is made at once. The management API answered 23,000 users a
/// minute with 8 concurrent clients and no more with 32 (docs/performance.md).
pub const WORKERS: usize = 16;
/// Hosts waiting together from which their users go in one definitions import. With about
/// 100,000 Erlang processes in the broker (50,000 host queues) an import's collections cost
/// about 3 ms of broker CPU per host at this size, as much as the three calls per host.
pub const IMPORT_MIN: usize = 1024;
/// Most hosts the dispatcher takes at once.
pub const MAX_BATCH: usize = 4096;
/// What a host is told when the workers are gone (the node is stopping).
const STOPPED: &str = "the broker workers stopped";
/// Broker users made, by how: `import` or `calls`.
const USERS_METRIC: &str = "comodit_node_enroll_broker_users_total";
/// How long each step of the broker side took: `import` (one crowd's users), `user` (one
/// host's three calls), `queue` (one host's queue and binding).
const STEP_METRIC: &str = "comodit_node_enroll_broker_step_seconds";

struct Job {
    host: HostId,
    password: String,
    done: oneshot::Sender<Result<(), String>>,
}

/// One host for a worker: `user_made` when an import already made its user.
struct Task {
    job: Job,
    user_made: bool,
}

/// Hands hosts to the dispatcher. Cheap to clone; the tasks end when every clone is gone.
#[derive(Clone)]
pub(crate) struct BrokerWorkers {
    tx: mpsc::Sender<Job>,
}

impl BrokerWorkers {
    /// `import_min`: hosts waiting together from which their users go in one import.
    pub(crate) fn start(bus: Bus, admin: BrokerAdmin, names: Names, import_min: usize) -> Self {
        let (tx, jobs) = mpsc::channel(MAX_BATCH);
        let (to_workers, tasks) = mpsc::channel(WORKERS);
        let tasks = Arc::new(Mutex::new(tasks));
        for _ in 0..WORKERS {
            tokio::spawn(work(
                bus.clone(),
                admin.clone(),
                names.clone(),
                tasks.clone(),
            ));
        }
        tokio::spawn(dispatch(admin, names, import_min, jobs, to_workers));
        BrokerWorkers { tx }
    }

    /// Creates `host`'s broker user with `password`, its permissions and its queue.
    /// `Err` = not (or not surely) done: the caller undoes the host.
    pub(crate) async fn create(&self, host: HostId, password: &str) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        let job = Job {
            host,
            password: password.to_owned(),
            done,
        };
        self.tx.send(job).await.map_err(|_| STOPPED.to_owned())?;
        result.await.map_err(|_| STOPPED.to_owned())?
    }
}

async fn dispatch(
    admin: BrokerAdmin,
    names: Names,
    import_min: usize,
    mut jobs: mpsc::Receiver<Job>,
    to_workers: mpsc::Sender<Task>,
) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let user_made = batch.len() >= import_min && import(&admin, &names, &batch).await;
        for job in batch {
            if let Err(mpsc::error::SendError(task)) =
                to_workers.send(Task { job, user_made }).await
            {
                let _ = task.job.done.send(Err(STOPPED.into()));
            }
        }
    }
}

/// The users of `batch` in one import. `false` (logged) = not surely made: the workers make
/// each with its own calls, which also repairs whatever part of the import was done.
async fn import(admin: &BrokerAdmin, names: &Names, batch: &[Job]) -> bool {
    let users: Vec<(HostId, &str)> = batch
        .iter()
        .map(|j| (j.host, j.password.as_str()))
        .collect();
    let started = Instant::now();
    let made = admin.create_agent_users(names, &users).await;
    metrics::histogram!(STEP_METRIC, "step" => "import").record(started.elapsed().as_secs_f64());
    match made {
        Ok(()) => {
            metrics::counter!(USERS_METRIC, "how" => "import").increment(batch.len() as u64);
            true
        }
        Err(e) => {
            warn!(hosts = batch.len(), error = %e, "broker users not imported, made one by one");
            false
        }
    }
}

async fn work(bus: Bus, admin: BrokerAdmin, names: Names, tasks: Arc<Mutex<mpsc::Receiver<Task>>>) {
    let mut channel: Option<comodit_bus::lapin::Channel> = None;
    loop {
        // The lock is held only while waiting for the next task, not while working on it.
        let task = tasks.lock().await.recv().await;
        let Some(Task { job, user_made }) = task else {
            break;
        };
        let result = provision(&bus, &admin, &names, &mut channel, &job, user_made).await;
        // A caller that went away (shutdown) undoes nothing; its host has no password out.
        let _ = job.done.send(result);
    }
    if let Some(ch) = channel.filter(|ch| ch.status().connected()) {
        let _ = ch.close(200, "done".into()).await;
    }
}

/// The user and its permissions (unless `user_made`), then the queue on `channel` (opened
/// again if a failed declaration closed it).
async fn provision(
    bus: &Bus,
    admin: &BrokerAdmin,
    names: &Names,
    channel: &mut Option<comodit_bus::lapin::Channel>,
    job: &Job,
    user_made: bool,
) -> Result<(), String> {
    if !user_made {
        let started = Instant::now();
        admin
            .create_agent_user(names, job.host, &job.password)
            .await
            .map_err(|e| format!("broker user: {e}"))?;
        metrics::histogram!(STEP_METRIC, "step" => "user").record(started.elapsed().as_secs_f64());
        metrics::counter!(USERS_METRIC, "how" => "calls").increment(1);
    }
    let started = Instant::now();
    let ch = match channel.take().filter(|ch| ch.status().connected()) {
        Some(ch) => channel.insert(ch),
        None => channel.insert(bus.channel().await.map_err(|e| format!("queue: {e}"))?),
    };
    topology::declare_agent_queue(ch, names, job.host)
        .await
        .map_err(|e| format!("queue: {e}"))?;
    metrics::histogram!(STEP_METRIC, "step" => "queue").record(started.elapsed().as_secs_f64());
    debug!(host_id = %job.host, user_made, "broker user and queue created");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use comodit_bus::BusConfig;
    use comodit_testkit as kit;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    const WAIT: Duration = Duration::from_secs(30);

    /// Whether the broker lets `user` in with `password` within `wait`.
    async fn logs_in(user: &str, password: &str, wait: Duration) -> bool {
        let stop = CancellationToken::new();
        let bus = Bus::start(
            BusConfig {
                url: kit::amqp_url_for(user, password),
                connection_name: "enroll-broker-test login".into(),
                ..BusConfig::default()
            },
            stop.clone(),
        );
        let connected = bus.wait_connected(wait).await.is_ok();
        stop.cancel();
        connected
    }

    // One thread: the crowd's jobs are all queued before the dispatcher first runs, so it
    // takes them as one batch.
    #[tokio::test(flavor = "current_thread")]
    async fn a_crowd_shares_one_import_and_a_lone_host_gets_its_own_calls() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let names = kit::unique_names();
        let _cleanup = kit::Cleanup {
            prefix: names.prefix().to_owned(),
            users: Vec::new(),
        };
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let bus = Bus::start(
            BusConfig {
                url: kit::amqp_url(),
                connection_name: "enroll-broker-test".into(),
                ..BusConfig::default()
            },
            stop.clone(),
        );
        bus.wait_connected(WAIT).await.unwrap();
        let ch = bus.channel().await.unwrap();
        topology::declare_core(&ch, &names, 4).await.unwrap();
        let (url, user, password, vhost) = kit::mgmt_login();
        let admin = BrokerAdmin::new(&url, &user, &password, &vhost).unwrap();
        let workers = BrokerWorkers::start(bus, admin, names.clone(), 4);

        let crowd: Vec<(HostId, String)> = (0..6)
            .map(|i| (HostId::random(), format!("crowd-password-{i}")))
            .collect();
        let made =
            futures_util::future::join_all(crowd.iter().map(|(h, p)| workers.create(*h, p))).await;
        assert!(made.iter().all(Result::is_ok), "{made:?}");
        let lone = (HostId::random(), "lone-password".to_owned());
        workers.create(lone.0, &lone.1).await.unwrap();

        let text = handle.render();
        assert!(
            text.contains(&format!("{USERS_METRIC}{{how=\"import\"}} 6")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{USERS_METRIC}{{how=\"calls\"}} 1")),
            "{text}"
        );
        // Each step timed: the crowd's one import, the lone host's calls, all seven queues.
        for (step, count) in [("import", 1), ("user", 1), ("queue", 7)] {
            let line = format!("{STEP_METRIC}_count{{step=\"{step}\"}} {count}");
            assert!(text.contains(&line), "{line} not in {text}");
        }
        for (host, password) in crowd.iter().chain([&lone]) {
            assert!(
                logs_in(&host.to_string(), password, WAIT).await,
                "{host} cannot log in"
            );
            assert!(
                kit::queue_info(&names.agent_queue(*host)).is_some(),
                "{host} has no queue"
            );
        }
        // A wrong password is refused: the check above can fail.
        let (user, short) = (lone.0.to_string(), Duration::from_secs(2));
        assert!(!logs_in(&user, "not-its-password", short).await);
    }
}
