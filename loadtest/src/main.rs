//! `comodit-loadtest`: measures a running node through its REST API.
//!
//! - `api-get`: `GET /api/v1/hosts/{id}` at a fixed rate; latency is measured from each request's
//!   *scheduled* start, so a stalled server shows up in the percentiles (no coordinated omission).
//! - `api-put`: resource PUTs one after another (API → host actor → agent → reply → API), each a real
//!   change of a file on the agent's host; reports the round-trip distribution.
//!
//! Every run is bounded by its request count or duration. The simulated fleets, the broker's `bare`
//! ceiling and the report of the loadtest issue build on this crate.

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
    #[arg(long, env = "COMODIT_TOKEN_FILE")]
    token_file: std::path::PathBuf,
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
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| format!("reading {}", cli.token_file.display()))?
        .trim()
        .to_owned();
    let auth = format!("Bearer {token}");
    match cli.scenario {
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
    }
    Ok(())
}
