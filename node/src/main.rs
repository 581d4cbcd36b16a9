//! `comodit-node`: parses flags, sets up logging and metrics, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use comodit_node::config::{NodeConfig, Overrides};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: a 10,000-host job spent about 15 % of the node's CPU in
/// glibc's `malloc`/`free` (buffers allocated on one thread and freed on another, arena
/// consolidation); ARCHITECTURE §29.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "comodit-node",
    version,
    about = "The comodit orchestrator node"
)]
struct Cli {
    /// TOML configuration file (then COMODIT_* variables, then flags, override it).
    #[arg(long, short = 'c', env = "COMODIT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match NodeConfig::load(cli.config.as_deref(), &cli.overrides) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    // Histograms as Prometheus histograms (not summaries), with latency buckets from 0.5 ms to 60 s.
    const BUCKETS_S: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ];
    // The store's group-commit batches are counted in writes (up to 256), not seconds.
    const BUCKETS_WRITES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(BUCKETS_S)
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("comodit_store_write_batch_size".into()),
                BUCKETS_WRITES,
            )
        })
        .and_then(|b| b.install_recorder())
    {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("error: metrics recorder: {e}");
            return ExitCode::from(1);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.worker_threads {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            signal.cancel();
        });
        comodit_node::run(cfg, metrics, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node failed");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
