//! `comodit-loadtest`: measures a running node through its REST API.
//!
//! - `api-get`: `GET /api/v1/hosts/{id}` at a fixed rate; latency is measured from each request's
//!   *scheduled* start, so a stalled server shows up in the percentiles (no coordinated omission).
//! - `api-put`: resource PUTs one after another (API → host actor → agent → reply → API), each a real
//!   change of a file on the agent's host; reports the round-trip distribution.
//!
//! Every run is bounded by its request count or duration.
//!
//! The fleet scenarios (`enroll`, `steady`, `apply`, `run`, `job`, `bare`, `failover`) start what they
//! measure themselves — `comodit-node` processes on a fresh broker prefix, thousands of simulated
//! hosts ([`fleet`]) — measure, run the bare ceiling of the same size ([`bare`]), delete what they
//! created on the broker, and write `report.json`, `report.md` and SVG plots ([`report`]) into
//! `--out`. See docs/performance.md for the figures and the exact commands.

mod bare;
mod enroller;
mod failover;
mod fleet;
mod measure;
mod probe;
mod report;
mod rig;
mod scenarios;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;

#[derive(Parser)]
#[command(name = "comodit-loadtest", version)]
struct Cli {
    #[arg(long, env = "COMODIT_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The admin token of the node (api-get and api-put).
    #[arg(long, env = "COMODIT_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// GET /api/v1/hosts/{id} at a fixed rate.
    ApiGet {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 500)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        duration_s: u64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
    },
    /// PUT a file resource through the agent, `count` times in a row (alternating content).
    ApiPut {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 500)]
        count: u32,
        /// The file written on the agent's host.
        #[arg(long, default_value = "/tmp/comodit-loadtest.txt")]
        path: String,
    },
    /// Enroll --hosts simulated hosts through the real enrollment path; reports hosts/min.
    Enroll {
        #[command(flatten)]
        common: scenarios::Common,
    },
    /// The whole fleet connected: node memory per idle host, then broker and node load with
    /// routed heartbeats and without (connection-level liveness only), --duration-s each.
    Steady {
        #[command(flatten)]
        common: scenarios::Common,
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
        /// The fleet connects in this many steps (memory over fleet size).
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// One file resource PUT to every host through the API, --concurrency at a time.
    Apply {
        #[command(flatten)]
        common: scenarios::Common,
    },
    /// One `run` to every host through the API, --concurrency at a time.
    Run {
        #[command(flatten)]
        common: scenarios::Common,
    },
    /// The same `run` to every host in one request (a job), then its counts followed until no
    /// host is pending.
    Job {
        #[command(flatten)]
        common: scenarios::Common,
        /// At most this many hosts pending at once (the job's `max_concurrency`); default all.
        #[arg(long)]
        max_concurrency: Option<u64>,
    },
    /// The broker's ceiling with no node: unicast and broadcast to --hosts queues.
    Bare {
        #[command(flatten)]
        common: scenarios::Common,
    },
    /// A fleet on a 3-node cluster (PostgreSQL), one node SIGKILLed mid-wave.
    Failover {
        #[command(flatten)]
        common: scenarios::Common,
        /// An empty PostgreSQL database the three nodes share.
        #[arg(long, env = "COMODIT_LOADTEST_PG_URL", hide_env_values = true)]
        postgres_url: String,
        /// Kill a node once this fraction of the hosts answered.
        #[arg(long, default_value_t = 0.3)]
        kill_after: f64,
    },
    /// Deletes what earlier runs left on the broker (queues, exchanges, users of their prefix):
    /// the named --prefix, or else every run prefix none of whose queues has a consumer and none
    /// of whose users is connected (a run that is still going is left alone). Writes no report.
    Cleanup {
        #[command(flatten)]
        common: scenarios::Common,
        /// A run's prefix (`lt` and 8 hex digits); repeatable.
        #[arg(long)]
        prefix: Vec<String>,
    },
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn report(name: &str, h: &Histogram<u64>, elapsed: Duration, errors: u64) {
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "{name}: {} requests in {:.1} s ({:.0}/s), errors {errors}; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        h.len(),
        elapsed.as_secs_f64(),
        h.len() as f64 / elapsed.as_secs_f64(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
    );
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let scenario = match cli.scenario {
        s @ (Scenario::ApiGet { .. } | Scenario::ApiPut { .. }) => s,
        fleet => return fleet_scenario(fleet),
    };
    let token_file = cli
        .token_file
        .context("--token-file (or COMODIT_TOKEN_FILE) is required for api-get and api-put")?;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?
        .trim()
        .to_owned();
    let auth = format!("Bearer {token}");
    match scenario {
        Scenario::ApiGet {
            host,
            rate,
            duration_s,
            connections,
        } => {
            if rate == 0 || connections == 0 {
                bail!("rate and connections must be positive");
            }
            let url = format!("{}/api/v1/hosts/{host}", cli.url.trim_end_matches('/'));
            let total = u64::from(rate) * duration_s;
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
            let (tx, rx) = mpsc::sync_channel::<Instant>(connections * 4);
            let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
            let (done_tx, done_rx) = mpsc::channel::<(u64, bool)>();
            let mut workers = Vec::new();
            for _ in 0..connections {
                let rx = rx.clone();
                let done = done_tx.clone();
                let (url, auth) = (url.clone(), auth.clone());
                workers.push(std::thread::spawn(move || {
                    let http = agent();
                    loop {
                        let scheduled = match rx.lock().unwrap().recv() {
                            Ok(t) => t,
                            Err(_) => return,
                        };
                        let ok = http
                            .get(&url)
                            .header("Authorization", &auth)
                            .call()
                            .map(|r| {
                                let ok = r.status().as_u16() == 200;
                                let _ = r.into_body().read_to_vec();
                                ok
                            })
                            .unwrap_or(false);
                        let _ = done.send((scheduled.elapsed().as_micros() as u64, ok));
                    }
                }));
            }
            drop(done_tx);
            let start = Instant::now();
            for i in 0..total {
                let at = start + interval * i as u32;
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                tx.send(at)?;
            }
            drop(tx);
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0;
            for (us, ok) in done_rx {
                h.record(us.max(1))?;
                errors += u64::from(!ok);
            }
            for w in workers {
                let _ = w.join();
            }
            report(&format!("api-get at {rate}/s"), &h, start.elapsed(), errors);
            if errors > 0 {
                bail!("{errors} requests failed");
            }
        }
        Scenario::ApiPut { host, count, path } => {
            let base = cli.url.trim_end_matches('/');
            let url = format!("{base}/api/v1/hosts/{host}/resources/files{path}");
            let http = agent();
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0;
            let start = Instant::now();
            for i in 0..count {
                let body = json!({"spec": {"content": format!("run {i}\n"), "mode": "0644"}, "monitor": false});
                let t = Instant::now();
                let r = http
                    .put(&url)
                    .header("Authorization", &auth)
                    .send_json(&body)?;
                let status = r.status().as_u16();
                let v: serde_json::Value = r.into_body().read_json().unwrap_or_default();
                h.record((t.elapsed().as_micros() as u64).max(1))?;
                if status != 200 || v["status"] != "applied" {
                    errors += 1;
                    if errors <= 3 {
                        eprintln!("put {i}: {status} {v}");
                    }
                }
            }
            report("api-put round trip", &h, start.elapsed(), errors);
            if errors > 0 {
                bail!("{errors} requests failed");
            }
        }
        _ => unreachable!("fleet scenarios return above"),
    }
    Ok(())
}

/// Runs a fleet scenario on a tokio runtime; Ctrl-C (or SIGTERM) stops it, and it still cleans
/// the broker up and writes what it measured.
fn fleet_scenario(s: Scenario) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COMODIT_LOADTEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(1024)
        .build()?;
    rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                eprintln!("interrupted: cleaning up");
                shutdown.cancel();
            });
        }
        if let Scenario::Cleanup { common, prefix } = &s {
            return scenarios::cleanup_leftovers(common, prefix).await;
        }
        let (name, common, params) = match &s {
            Scenario::Enroll { common } => ("enroll", common.clone(), json!({})),
            Scenario::Steady {
                common,
                duration_s,
                steps,
            } => (
                "steady",
                common.clone(),
                json!({"duration_s": duration_s, "steps": steps}),
            ),
            Scenario::Apply { common } => ("apply", common.clone(), json!({})),
            Scenario::Run { common } => ("run", common.clone(), json!({})),
            Scenario::Job {
                common,
                max_concurrency,
            } => (
                "job",
                common.clone(),
                json!({"max_concurrency": max_concurrency}),
            ),
            Scenario::Bare { common } => ("bare", common.clone(), json!({})),
            Scenario::Failover {
                common, kill_after, ..
            } => (
                "failover",
                common.clone(),
                json!({"kill_after": kill_after}),
            ),
            _ => unreachable!("api scenarios run without a runtime"),
        };
        let mut ctx = scenarios::Ctx::new(name, common, params, shutdown.clone());
        scenarios::note_leftovers(&mut ctx).await;
        let started = std::time::Instant::now();
        let outcome = match s {
            Scenario::Enroll { .. } => scenarios::enroll(&mut ctx).await,
            Scenario::Steady {
                duration_s, steps, ..
            } => scenarios::steady(&mut ctx, duration_s, steps).await,
            Scenario::Apply { .. } => {
                let content = format!("loadtest {}\n", chrono::Utc::now().to_rfc3339());
                scenarios::api_wave_scenario(&mut ctx, scenarios::ApiOp::Apply { content }).await
            }
            Scenario::Run { .. } => {
                scenarios::api_wave_scenario(&mut ctx, scenarios::ApiOp::Run).await
            }
            Scenario::Job {
                max_concurrency, ..
            } => {
                let op = scenarios::ApiOp::Job { max_concurrency };
                scenarios::api_wave_scenario(&mut ctx, op).await
            }
            Scenario::Bare { .. } => scenarios::bare_only(&mut ctx).await,
            Scenario::Failover {
                postgres_url,
                kill_after,
                ..
            } => failover::run(&mut ctx, &postgres_url, kill_after).await,
            _ => unreachable!(),
        };
        if let Err(e) = &outcome {
            ctx.report.notes.push(format!("the run FAILED: {e:#}"));
        }
        let out = ctx.finish()?;
        eprintln!(
            "{name}: report in {} ({:.1} s)",
            out.join("report.md").display(),
            started.elapsed().as_secs_f64()
        );
        outcome
    })
}
