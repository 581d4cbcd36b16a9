//! `comodit-agent`: the binary only parses flags, sets up logging and calls the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use comodit_agent::config::{AgentConfig, Overrides};
use comodit_agent::enroll::{self, EnrollError, EnrollOptions};
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
    Run(RunArgs),
    /// Get this host's identity and broker credentials from the node with an enrollment token
    /// (exit code 3 if the node refuses).
    Enroll {
        /// The enrollment token (prefer the environment variable: flags show in `ps`).
        #[arg(long, env = "COMODIT_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Re-enroll a host that has credentials already: new password, old connections closed.
        #[arg(long)]
        force: bool,
    },
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

#[derive(Args, Default)]
struct RunArgs {
    /// Enroll first with this token when no credentials are stored.
    #[arg(long, env = "COMODIT_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// With --enroll-token: enroll again even if credentials are stored.
    #[arg(long)]
    force: bool,
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

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// A token cancelled on SIGINT or SIGTERM. Call within the runtime.
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal.cancel();
    });
    shutdown
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e
                .downcast_ref::<EnrollError>()
                .map_or(1, EnrollError::exit_code);
            ExitCode::from(code)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let mut cfg = AgentConfig::load(cli.config.as_deref(), &cli.overrides)?;
    init_logging(&cfg);
    // Without a verb, `run` still takes its token from the environment.
    let verb = cli.command.unwrap_or_else(|| {
        Verb::Run(RunArgs {
            enroll_token: std::env::var("COMODIT_ENROLL_TOKEN").ok(),
            force: false,
        })
    });
    match verb {
        Verb::Run(args) => {
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
                let shutdown = shutdown_on_signal();
                if let Some(token) = args.enroll_token {
                    let opts = EnrollOptions::new(Secret::new(token), args.force);
                    enroll::ensure_enrolled(&cfg, &opts, &shutdown).await?;
                }
                enroll::apply_enrollment(&mut cfg)?;
                comodit_agent::run(cfg, shutdown).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Enroll { token, force } => {
            let rt = runtime()?;
            let enrollment = rt.block_on(async {
                let shutdown = shutdown_on_signal();
                let opts = EnrollOptions::new(Secret::new(token), force);
                enroll::enroll(&cfg, &opts, &shutdown).await
            })?;
            eprintln!(
                "enrolled as {} ({} shards); credentials written to {}",
                enrollment.host,
                enrollment.n_shards,
                state::credentials_path(&cfg.state_dir).display()
            );
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
