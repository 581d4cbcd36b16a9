//! `comodit-agent`: the binary only parses flags, sets up logging and calls the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use comodit_agent::config::{AgentConfig, Overrides};
use comodit_agent::state::{self, Credentials};
use comodit_protocol::{ApplyMode, HostId, Secret};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "comodit-agent", version, about = "The comodit host agent")]
struct Cli {
    /// TOML configuration file (then COMODIT_* variables, then flags, override it).
    #[arg(long, short = 'c', env = "COMODIT_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Option<Verb>,
}

#[derive(Subcommand)]
enum Verb {
    /// Connect to the broker and serve commands (the default).
    Run,
    /// Apply a resource file on this host, without a broker, and print the results as JSON.
    Apply {
        file: PathBuf,
        /// Report what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also add the resources to the monitored baseline in the state directory.
        #[arg(long)]
        monitor: bool,
    },
    /// Print this host's facts as JSON.
    Facts,
    /// Store the host id and its broker password (read from standard input) in the state directory.
    Credentials {
        #[arg(long)]
        host: HostId,
    },
}

fn init_logging(cfg: &AgentConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = AgentConfig::load(cli.config.as_deref(), &cli.overrides)?;
    init_logging(&cfg);
    match cli.command.unwrap_or(Verb::Run) {
        Verb::Run => {
            // The agent idles most of its life: one worker thread and few malloc arenas keep its
            // resident memory small (README, Figures). Provider work runs on blocking threads.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(8)
                .enable_all()
                .build()?;
            rt.block_on(async {
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
                comodit_agent::run(cfg, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Apply {
            file,
            dry_run,
            monitor,
        } => {
            let mode = if dry_run {
                ApplyMode::DryRun
            } else {
                ApplyMode::Enforce
            };
            let monitor_dir = monitor.then_some(cfg.state_dir.as_path());
            let (results, ok) = comodit_agent::oneshot::apply_file(
                &file,
                mode,
                cfg.system_root.clone(),
                monitor_dir,
            )?;
            let out = serde_json::json!({
                "status": if ok { "ok" } else { "failed" },
                "mode": if dry_run { "dry_run" } else { "enforce" },
                "changed": results.iter().filter(|r| r.changed).count(),
                "results": results,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Verb::Facts => {
            let platform = comodit_agent::platform::Platform::detect(
                &comodit_agent::providers::cmd::SystemRunner,
            );
            let facts =
                comodit_agent::facts::gather(&platform, comodit_agent::exec::capabilities());
            println!("{}", serde_json::to_string_pretty(&facts)?);
            Ok(ExitCode::SUCCESS)
        }
        Verb::Credentials { host } => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            anyhow::ensure!(!password.is_empty(), "empty password on standard input");
            state::write_credentials(
                &cfg.state_dir,
                &Credentials {
                    host,
                    password: Secret::new(password),
                },
            )?;
            eprintln!(
                "credentials for {host} written to {}",
                state::credentials_path(&cfg.state_dir).display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
