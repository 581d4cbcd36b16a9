//! The broker side of enrollment, in batches: every host that enrolls needs a broker user (with
//! its permissions) and a queue. Made one host at a time that is three management-API calls
//! and a channel per host, and the management API is what bounded enrollment (docs/performance.md).
//! Here the requests that arrive while the broker is busy with one batch wait and then go
//! together: one `POST /api/definitions` for all their users, then their queues declared on a
//! few shared channels.
//!
//! ```text
//! enroll_new ─► create(host, password) ─► queue ─► [batch of ≤ MAX_BATCH]
//!   ─► create_agent_users (one import) ─► declare_agent_queue × n (CHANNELS channels) ─► results
//! ```
//!
//! There is no waiting for a batch to fill: a lone request goes at once, alone. Each host gets
//! its own result; on an error the enrollment service undoes that host as before.

use comodit_bus::admin::BrokerAdmin;
use comodit_bus::{topology, Bus};
use comodit_protocol::{HostId, Names};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Most hosts in one definitions import (a few hundred per import is where it pays most:
/// about 27,000 users a minute, measured alone).
pub const MAX_BATCH: usize = 256;
/// Channels one batch declares its queues on, concurrently.
const CHANNELS: usize = 8;

struct Job {
    host: HostId,
    password: String,
    done: oneshot::Sender<Result<(), String>>,
}

/// Hands hosts to the batching task. Cheap to clone; the task ends when every clone is gone.
#[derive(Clone)]
pub(crate) struct BrokerBatcher {
    tx: mpsc::Sender<Job>,
}

impl BrokerBatcher {
    pub(crate) fn start(bus: Bus, admin: BrokerAdmin, names: Names) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        tokio::spawn(run(bus, admin, names, rx));
        BrokerBatcher { tx }
    }

    /// Creates `host`'s broker user with `password` and its queue, together with whatever other
    /// hosts are waiting. `Err` = not (or not surely) done: the caller undoes the host.
    pub(crate) async fn create(&self, host: HostId, password: &str) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        let job = Job {
            host,
            password: password.to_owned(),
            done,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| "the broker batcher stopped".to_owned())?;
        result
            .await
            .map_err(|_| "the broker batcher stopped".to_owned())?
    }
}

async fn run(bus: Bus, admin: BrokerAdmin, names: Names, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = create_batch(&bus, &admin, &names, &batch).await;
        for (job, result) in batch.into_iter().zip(results) {
            // A caller that went away (shutdown) undoes nothing; its host has no password out.
            let _ = job.done.send(result);
        }
    }
}

/// One result per job, in order.
async fn create_batch(
    bus: &Bus,
    admin: &BrokerAdmin,
    names: &Names,
    batch: &[Job],
) -> Vec<Result<(), String>> {
    let users: Vec<(HostId, &str)> = batch
        .iter()
        .map(|j| (j.host, j.password.as_str()))
        .collect();
    if let Err(e) = admin.create_agent_users(names, &users).await {
        warn!(hosts = batch.len(), error = %e, "broker users not created");
        let reason = format!("broker users: {e}");
        return batch.iter().map(|_| Err(reason.clone())).collect();
    }
    let per_channel = batch.len().div_ceil(CHANNELS).max(1);
    let declared = futures_util::future::join_all(
        batch
            .chunks(per_channel)
            .map(|jobs| declare_queues(bus, names, jobs)),
    )
    .await;
    debug!(hosts = batch.len(), "broker users and queues created");
    declared.into_iter().flatten().collect()
}

/// Declares the queues of `jobs` one after another on one channel; a failed declaration closes
/// the channel, so the next one opens another.
async fn declare_queues(bus: &Bus, names: &Names, jobs: &[Job]) -> Vec<Result<(), String>> {
    let mut out = Vec::with_capacity(jobs.len());
    let mut channel: Option<comodit_bus::lapin::Channel> = None;
    for job in jobs {
        channel = channel.filter(|ch| ch.status().connected());
        let ch = match channel {
            Some(ref ch) => ch,
            None => match bus.channel().await {
                Ok(ch) => channel.insert(ch),
                Err(e) => {
                    out.push(Err(format!("queue: {e}")));
                    continue;
                }
            },
        };
        out.push(
            topology::declare_agent_queue(ch, names, job.host)
                .await
                .map_err(|e| format!("queue: {e}")),
        );
    }
    if let Some(ch) = channel.filter(|ch| ch.status().connected()) {
        let _ = ch.close(200, "done".into()).await;
    }
    out
}
