//! Enrollment through the real path: what `comodit-agent enroll` does, for N hosts at a target
//! rate. Each request is an [`EnrollRequest`] with simulated facts, published on `<p>.enroll` as
//! the shared enrollment user with RabbitMQ's direct reply-to ([`Bus::request`]); the node
//! creates the host record, its broker user and its queue, and answers with the host id and the
//! host's broker password.
//!
//! Requests start on a schedule (`rate` per second, 0 = as fast as `concurrency` allows) and the
//! latency of each is measured from its *scheduled* start, so a node that falls behind shows in
//! the percentiles (no coordinated omission). A request keeps its message id across its
//! retries, as the agent does, so a lost reply does not make a second host.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use comodit_bus::{topology, Bus, BusConfig, BusError, OutMessage};
use comodit_protocol::{EnrollReply, EnrollRequest, HostId, Names, Secret, Status, V1};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// One attempt's wait for the node's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const ATTEMPTS: u32 = 3;
/// Requests in flight on one enrollment connection: the bus's confirm window.
const PER_CONNECTION: usize = 64;

pub struct Enrolled {
    pub hosts: Vec<(HostId, Secret)>,
    /// Microseconds from each request's scheduled start to its answer.
    pub latency: Histogram<u64>,
    /// (seconds since the start, hosts enrolled so far), one point per completion bucket.
    pub progress: Vec<(f64, f64)>,
    pub elapsed: Duration,
    pub failed: u64,
}

pub struct EnrollOptions {
    pub broker: String,
    pub names: Names,
    pub user: String,
    pub password: String,
    pub token: String,
    pub count: usize,
    /// Requests started per second; 0 = no pacing.
    pub rate: f64,
    pub concurrency: usize,
    pub deadline: Duration,
}

pub async fn enroll(opts: EnrollOptions, shutdown: CancellationToken) -> anyhow::Result<Enrolled> {
    let stop = shutdown.child_token();
    let _guard = stop.clone().drop_guard();
    let mut buses = Vec::new();
    // Enough connections that `concurrency` requests can be in flight at once.
    let in_flight = opts.concurrency.min(opts.count);
    for i in 0..in_flight.div_ceil(PER_CONNECTION).max(1) {
        let bus = Bus::start(
            BusConfig {
                url: crate::fleet::with_credentials(&opts.broker, &opts.user, &opts.password),
                connection_name: format!("comodit-loadtest enroll {i}"),
                ..BusConfig::default()
            },
            stop.clone(),
        );
        bus.wait_connected(Duration::from_secs(30)).await?;
        buses.push(bus);
    }
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + opts.deadline;
    let exchange = opts.names.enroll();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.count {
        let scheduled = if opts.rate > 0.0 {
            start + Duration::from_secs_f64(i as f64 / opts.rate)
        } else {
            Instant::now()
        };
        tokio::select! {
            _ = stop.cancelled() => bail!("interrupted"),
            _ = tokio::time::sleep_until(scheduled.into()) => {}
        }
        let permit = tokio::select! {
            _ = stop.cancelled() => bail!("interrupted"),
            p = sem.clone().acquire_owned() => p?,
        };
        if Instant::now() > until {
            bail!(
                "enrollment deadline of {:?} passed after {i} requests",
                opts.deadline
            );
        }
        let bus = buses[i % buses.len()].clone();
        let (exchange, token, done) = (exchange.clone(), opts.token.clone(), done.clone());
        tasks.spawn(async move {
            let r = one(&bus, &exchange, &token).await;
            drop(permit);
            let finished = Instant::now();
            done.fetch_add(1, Ordering::Relaxed);
            (
                r,
                finished.duration_since(scheduled),
                finished.duration_since(start),
            )
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut hosts = Vec::with_capacity(opts.count);
    let mut finish_times = Vec::with_capacity(opts.count);
    let mut failed = 0;
    let mut first_error = None;
    while let Some(joined) = tokio::select! {
        _ = stop.cancelled() => bail!("interrupted"),
        _ = tokio::time::sleep_until(until.into()) => bail!("enrollment deadline of {:?} passed with {} of {} answered", opts.deadline, hosts.len(), opts.count),
        j = tasks.join_next() => j,
    } {
        let (r, lat, at) = joined?;
        match r {
            Ok(host) => {
                latency.record((lat.as_micros() as u64).max(1))?;
                finish_times.push(at.as_secs_f64());
                hosts.push(host);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let elapsed = start.elapsed();
    if let Some(e) = first_error {
        eprintln!("enroll: {failed} requests failed; first: {e:#}");
    }
    finish_times.sort_by(f64::total_cmp);
    let step = (finish_times.len() / 200).max(1);
    let progress = finish_times
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == finish_times.len())
        .map(|(i, t)| (*t, (i + 1) as f64))
        .collect();
    Ok(Enrolled {
        hosts,
        latency,
        progress,
        elapsed,
        failed,
    })
}

/// One host's enrollment, with the agent's retry rule (same message id every attempt).
async fn one(bus: &Bus, exchange: &str, token: &str) -> anyhow::Result<(HostId, Secret)> {
    let probe = HostId::random();
    let request = EnrollRequest {
        v: V1,
        token: Secret::new(token.to_owned()),
        facts: crate::fleet::facts(probe),
        host: None,
        force: false,
    };
    let mut msg = OutMessage::json("enroll", serde_json::to_vec(&request)?);
    msg.mandatory = true;
    msg.correlation_id = Some(msg.message_id.clone());
    msg.expiration_ms = Some(ATTEMPT_TIMEOUT.as_millis() as u64);
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match bus
            .request(
                exchange,
                topology::ENROLL_ROUTING_KEY,
                msg.clone(),
                ATTEMPT_TIMEOUT,
            )
            .await
        {
            Ok(reply) => {
                let reply: EnrollReply = serde_json::from_slice(&reply.payload)?;
                match (reply.status, reply.host, reply.password) {
                    (Status::Ok, Some(host), Some(password)) => return Ok((host, password)),
                    (status, _, _) => {
                        let reason = reply.reason.unwrap_or_default();
                        // "retry later" is the node's word for a transient failure.
                        if reason.contains("retry") {
                            last = Some(anyhow::anyhow!("{status:?}: {reason}"));
                            continue;
                        }
                        bail!("enrollment {status:?}: {reason}")
                    }
                }
            }
            Err(BusError::Shutdown) => bail!("interrupted"),
            Err(e) => last = Some(e.into()),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no answer")))
}
