//! `failover`: a fleet on a 3-node cluster (one shared PostgreSQL database, Raft between the
//! members), one `run` per host through the API spread over the three nodes, and one member
//! SIGKILLed once `--kill-after` of the hosts answered.
//!
//! Counted from the fleet's side (the simulated hosts see every delivery): hosts never answered
//! by the deadline, commands a host received more than once (the same command id redelivered, or
//! a second change for the same host because a request to the dead node was sent again to a
//! survivor), and the time from the kill until the last host answered. Requests that were in
//! flight to the killed node fail at the transport and go to the next node: that is what a
//! client does, and any duplicate it causes is counted, not hidden.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comodit_protocol::HostId;
use serde_json::{json, Value};

use crate::measure::{mean, Sampler};
use crate::report::{latency_over_time, Figure, Plot};
use crate::rig::{self, Api};
use crate::scenarios::{self, ApiOp, Ctx, Rig};

const CLUSTER_SECRET: &str = "loadtest-cluster-secret-0123456789";

pub async fn run(ctx: &mut Ctx, postgres_url: &str, kill_after: f64) -> anyhow::Result<()> {
    let mut rig = cluster(ctx, postgres_url)?;
    let sampler = Sampler::start(rig.pids(), Duration::from_millis(500), ctx.started);
    let r = run_in(ctx, &mut rig, &sampler, kill_after).await;
    ctx.report.samples = sampler.stop().await;
    scenarios::add_resource_plot(&mut ctx.report);
    rig.cleanup(&ctx.broker, &ctx.out).await;
    r
}

/// Three founding members on one prefix and one database, started one after the other (the
/// first bootstraps the store and writes the admin token).
fn cluster(ctx: &Ctx, postgres_url: &str) -> anyhow::Result<Rig> {
    let mut rig = Rig::empty(ctx)?;
    let raft: Vec<u16> = (0..3).map(|_| rig::free_port()).collect::<Result<_, _>>()?;
    let peers = raft
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let opts = ctx.node_options()?;
    let mut token = String::new();
    for id in 1..=3u64 {
        let env: Vec<(String, String)> = [
            ("COMODIT_STORE", "postgres".to_owned()),
            ("COMODIT_POSTGRES_URL", postgres_url.to_owned()),
            ("COMODIT_CLUSTER_ID", id.to_string()),
            (
                "COMODIT_CLUSTER_LISTEN",
                format!("127.0.0.1:{}", raft[id as usize - 1]),
            ),
            ("COMODIT_CLUSTER_SECRET", CLUSTER_SECRET.to_owned()),
            ("COMODIT_CLUSTER_PEERS", peers.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let node = rig::spawn_node(id, &rig.work, &rig.prefix, &ctx.broker, &opts, &env)?;
        if id == 1 {
            token =
                scenarios::read_token(&node).context("the first member writes the admin token")?;
        }
        rig.apis.push(Api::new(&node, &token));
        rig.nodes.push(node);
    }
    Ok(rig)
}

/// Waits until every member sees the same leader, every shard owned and its own lease valid.
async fn wait_balanced(apis: &[Api], n_shards: u32, deadline: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let a = apis.to_vec();
        let views: Vec<Value> = tokio::task::spawn_blocking(move || {
            a.iter()
                .map(|api| {
                    api.call("GET", "/api/v1/cluster", None)
                        .map(|(_, v)| v)
                        .unwrap_or(Value::Null)
                })
                .collect()
        })
        .await?;
        let leader = views[0]["leader"].as_u64();
        let ok = leader.is_some()
            && views.iter().all(|v| {
                v["leader"].as_u64() == leader
                    && v["lease_valid"] == true
                    && v["shards"].as_array().is_some_and(|s| {
                        s.len() == n_shards as usize
                            && s.iter().all(|x| x["owner"].as_u64().is_some())
                    })
            });
        if ok {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("the cluster did not settle within {deadline:?}: {views:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_in(
    ctx: &mut Ctx,
    rig: &mut Rig,
    sampler: &Sampler,
    kill_after: f64,
) -> anyhow::Result<()> {
    wait_balanced(&rig.apis, ctx.c.n_shards, Duration::from_secs(60)).await?;
    let enrolled = scenarios::enroll_phase(ctx, rig, sampler).await?;
    let n = enrolled.hosts.len();
    let fleet = scenarios::start_fleet(ctx, rig, &enrolled.hosts, ctx.c.heartbeat_s).await?;
    scenarios::wait_actors(&rig.apis, n, Duration::from_secs(600)).await?;
    let ids: Vec<HostId> = enrolled.hosts.iter().map(|(h, _)| *h).collect();
    fleet.reset_tallies();
    // The victim: member 2 (not the one that bootstrapped; any member would do).
    let victim = 1usize;
    let victim_pid = rig.nodes[victim].pid().context("victim not running")?;
    let threshold = ((n as f64 * kill_after.clamp(0.0, 1.0)) as usize).max(1);
    let killed = Arc::new(AtomicBool::new(false));
    let killed_at_ms = Arc::new(AtomicU64::new(0));
    let fleet_start = fleet.started;
    let progress = {
        let (killed, killed_at_ms) = (killed.clone(), killed_at_ms.clone());
        Arc::new(move |answered: usize| {
            if answered >= threshold && !killed.swap(true, Ordering::SeqCst) {
                unsafe {
                    libc::kill(victim_pid as i32, libc::SIGKILL);
                }
                killed_at_ms.store(fleet_start.elapsed().as_millis() as u64, Ordering::SeqCst);
                eprintln!(
                    "failover: member {} (pid {victim_pid}) SIGKILLed after {answered} answers",
                    victim + 1
                );
            }
        }) as Arc<dyn Fn(usize) + Send + Sync>
    };
    let t0 = ctx.started.elapsed().as_secs_f64();
    let (wave, resent) = scenarios::api_wave(
        "failover_run",
        &rig.apis,
        &ids,
        &ApiOp::Run,
        ctx.c.concurrency,
        Duration::from_secs(ctx.c.deadline_s.min(600)),
        ctx.c.idempotency_keys.then_some(rig.prefix.as_str()),
        Some(progress),
    )
    .await?;
    // Reap the killed child so the rig does not try to stop it.
    rig.nodes[victim].kill9();
    let t1 = ctx.started.elapsed().as_secs_f64();
    let tallies = fleet.tallies();
    let unanswered = tallies.iter().filter(|t| t.replied == 0).count();
    let redelivered: u32 = tallies.iter().map(|t| t.duplicates).sum();
    let second_commands: u32 = tallies
        .iter()
        .map(|t| (t.received - t.duplicates).saturating_sub(1))
        .sum();
    let kill_ms = killed_at_ms.load(Ordering::SeqCst);
    let last_ms = tallies.iter().map(|t| t.last_reply_ms).max().unwrap_or(0);
    let recovery_s = if kill_ms > 0 {
        last_ms.saturating_sub(kill_ms) as f64 / 1000.0
    } else {
        0.0
    };
    eprintln!(
        "failover: {} of {n} answered through the API; fleet: {unanswered} unanswered, {redelivered} redelivered, {second_commands} second commands; last answer {recovery_s:.2} s after the kill",
        wave.answered
    );
    let w = sampler.window(t0, t1);
    ctx.report.phases.push(json!({
        "phase": "failover wave",
        "killed_member": victim + 1,
        "killed_after_answers": threshold,
        "node_cpu_pct": mean(&w, |s| s.node_cpu_pct),
        "broker_cpu_pct": mean(&w, |s| s.broker_cpu_pct),
    }));
    ctx.report.counts = json!({
        "expected": n,
        "counted": n - unanswered,
        "unanswered": unanswered,
        "duplicated": redelivered + second_commands,
        "redelivered_same_command": redelivered,
        "second_command_same_host": second_commands,
        "api_answered": wave.answered,
        "api_requests_sent_again_to_a_survivor": resent,
        "api_failed": wave.failed,
        "idempotency_keys_sent": ctx.c.idempotency_keys,
    });
    ctx.report.figures.push(
        Figure::new("unanswered hosts", unanswered as f64, "hosts").goal("0", unanswered == 0),
    );
    ctx.report.figures.push(Figure::new(
        "duplicated commands (redelivered + sent again)",
        (redelivered + second_commands) as f64,
        "commands",
    ));
    // With keys, a request sent again joins the first one's change: no host gets a second one.
    let second = Figure::new(
        "second commands to a host (a request sent again made a new change)",
        second_commands as f64,
        "commands",
    );
    ctx.report.figures.push(if ctx.c.idempotency_keys {
        second.goal("0 (Idempotency-Key sent)", second_commands == 0)
    } else {
        second
    });
    ctx.report.figures.push(Figure::new(
        "from the kill until the last host answered",
        recovery_s,
        "s",
    ));
    ctx.report.figures.push(Figure::new(
        "wave: time until the last host answered",
        wave.elapsed.as_secs_f64(),
        "s",
    ));
    ctx.report.waves.push(wave.summary());
    ctx.report.plots.push(Plot {
        file: "latency-over-time.svg".into(),
        title: format!(
            "failover: run latency over time ({n} hosts; member {} killed after {threshold} answers)",
            victim + 1
        ),
        x: "seconds since the wave began".into(),
        y: "latency (ms)".into(),
        series: latency_over_time("run", &wave.points, 60),
    });
    fleet.stop().await;
    Ok(())
}
