//! The scenarios. Each starts what it measures (node processes on a fresh prefix, the simulated
//! fleet), measures, runs the bare ceiling of the same size on the same broker for the ratios,
//! cleans the broker up (also after an error), and writes the report.
//!
//! ```text
//! enroll:   node ─► N enrollments through <p>.enroll at --enroll-rate        ─► hosts/min
//! steady:   node ─► enroll ─► fleet connects in --steps ─► RSS per host (slope)
//!                 ─► routed heartbeats every --heartbeat-s for --duration-s ─► none for --duration-s
//! apply/run: node ─► enroll ─► fleet ─► one PUT / POST per host through the API (--concurrency)
//! bare:     no node: unicast and broadcast straight through the broker
//! failover: 3 nodes on PostgreSQL ─► enroll ─► fleet ─► runs through the API, one node SIGKILLed
//!           once --kill-after of them answered ─► unanswered, duplicated, time until all answered
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comodit_protocol::{Body, Collection, HostId, Names, Resource, RunSpec, Secret, Spec};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::bare::{self, BareOptions, BareResult, Ceiling};
use crate::enroller::{self, EnrollOptions, Enrolled};
use crate::fleet::{Fleet, FleetConfig, Login};
use crate::measure::{mean, median_wave, percentiles, slope, wave_name, CpuMeter, Sampler, Wave};
use crate::probe::Probe;
use crate::report::{latency_over_time, Figure, Plot, Report, Series};
use crate::rig::{self, Api, Broker, NodeOptions, NodeProc};

/// Everything a scenario is configured with (the common flags).
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    /// Where report.json, report.md and the plots go.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(
        long,
        env = "COMODIT_LOADTEST_AMQP",
        default_value = "amqp://127.0.0.1:5672/%2f"
    )]
    pub broker_url: String,
    #[arg(
        long,
        env = "COMODIT_LOADTEST_MGMT",
        default_value = "http://127.0.0.1:15672"
    )]
    pub mgmt_url: String,
    /// A broker administrator (creates the run's users, declares and deletes its topology).
    #[arg(long, env = "COMODIT_LOADTEST_BROKER_USER", default_value = "guest")]
    pub broker_user: String,
    #[arg(
        long,
        env = "COMODIT_LOADTEST_BROKER_PASSWORD",
        default_value = "guest",
        hide_env_values = true
    )]
    pub broker_password: String,
    /// The node binary (default: `comodit-node` beside this binary).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// Shards of the node (and of the bare topology).
    #[arg(long, default_value_t = 32)]
    pub n_shards: u32,
    /// Publishes in flight on the node's connection, and on the bare driver's (the same bound on
    /// both, so the ratio compares like with like; ARCHITECTURE §28).
    #[arg(long, default_value_t = comodit_bus::NODE_PUBLISHES_IN_FLIGHT as u16,
        value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub publishes_in_flight: u16,
    /// Simulated hosts per AMQP connection (with the shared fleet user).
    #[arg(long, default_value_t = 500)]
    pub hosts_per_conn: usize,
    /// Every simulated host logs in as itself (its enrollment password), one connection each,
    /// like real agents; default: the run's shared fleet user, --hosts-per-conn per connection.
    #[arg(long)]
    pub own_credentials: bool,
    /// Enrollment requests started per second (0 = as fast as --enroll-concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub enroll_rate: f64,
    /// Enrollment requests in flight. When 1,024 or more new hosts wait at the node together
    /// their broker users go in one import, far cheaper for the broker than three calls each
    /// (ARCHITECTURE §21), so fewer here means fewer hosts a minute.
    #[arg(long, default_value_t = 2048)]
    pub enroll_concurrency: usize,
    /// Routed heartbeat period of the simulated hosts (0 = none; the agent's default is 300), the
    /// bare run's fleet included, so that the ceiling carries the same heartbeats.
    #[arg(long, default_value_t = 300)]
    pub heartbeat_s: u64,
    /// Fraction of commands the simulated hosts answer `failed`.
    #[arg(long, default_value_t = 0.0)]
    pub fail_fraction: f64,
    /// Fraction of commands answered after --slow-ms.
    #[arg(long, default_value_t = 0.0)]
    pub slow_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub slow_ms: u64,
    /// Concurrent API requests (apply, run, failover). At 10,000 hosts 1,024 finished the wave
    /// sooner than 256 (fewer requests waiting on their answer) and than 4,096 (docs/performance.md).
    #[arg(long, default_value_t = 1024)]
    pub concurrency: usize,
    /// Waves of the same command (apply, run): the bare unicast and the API wave each run this
    /// many times on the same hosts, and the figures compare their median waves. Every wave is
    /// in the report.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub waves: u16,
    /// Hard bound of the whole run, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub deadline_s: u64,
    /// The node's log filter.
    #[arg(long, default_value = "warn")]
    pub node_log: String,
    /// Skip the bare comparison (its figures and ratios are then absent).
    #[arg(long)]
    pub no_bare: bool,
    /// `apply`, `run`, `job`: measure the bare ceiling on the node's own fleet instead of a fleet
    /// of its own before it: beside each API wave (before it in pairs 1, 3, ..., after it in
    /// pairs 2, 4, ...) the node is stopped, a bare unicast wave runs on the same host and shard
    /// queues, and the node is started again; the bare broadcast runs last. Both kinds of wave
    /// then see the same broker state and, wave by wave, the same machine speed
    /// (docs/performance.md).
    #[arg(long, conflicts_with = "no_bare")]
    pub interleave_bare: bool,
    /// Run the node(s) on these CPUs only (a `taskset -c` list such as `1`). With the broker and
    /// this process pinned elsewhere, the node gets cores of its own, as on a real deployment
    /// (docs/performance.md).
    #[arg(long)]
    pub node_cpus: Option<String>,
    /// Send an `Idempotency-Key` with every API POST (`run`, `failover`; `apply` is a PUT, which
    /// takes none): a request sent again to another node after a transport error then joins the
    /// first one's change instead of becoming a second command (ARCHITECTURE §24). Costs the node
    /// two more store writes per request.
    #[arg(long)]
    pub idempotency_keys: bool,
}

impl Common {
    pub fn broker(&self) -> Broker {
        Broker {
            amqp: self.broker_url.clone(),
            mgmt: self.mgmt_url.clone(),
            user: self.broker_user.clone(),
            password: self.broker_password.clone(),
        }
    }
}

pub struct Ctx {
    pub c: Common,
    pub broker: Broker,
    pub shutdown: CancellationToken,
    pub report: Report,
    pub started: Instant,
    pub out: PathBuf,
}

impl Ctx {
    pub fn new(scenario: &str, c: Common, params: Value, shutdown: CancellationToken) -> Ctx {
        let broker = c.broker();
        let out = c.out.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "loadtest-out/{scenario}-{}",
                chrono::Utc::now().format("%Y%m%d-%H%M%S")
            ))
        });
        let mut params = params;
        params["common"] = json!({
            "hosts": c.hosts, "n_shards": c.n_shards, "hosts_per_conn": c.hosts_per_conn,
            "publishes_in_flight": c.publishes_in_flight,
            "own_credentials": c.own_credentials, "enroll_rate": c.enroll_rate,
            "enroll_concurrency": c.enroll_concurrency, "heartbeat_s": c.heartbeat_s,
            "fail_fraction": c.fail_fraction, "slow_fraction": c.slow_fraction, "slow_ms": c.slow_ms,
            "concurrency": c.concurrency, "waves": c.waves,
        });
        Ctx {
            report: Report::new(scenario, params),
            c,
            broker,
            shutdown,
            started: Instant::now(),
            out,
        }
    }

    pub(crate) fn node_options(&self) -> anyhow::Result<NodeOptions> {
        let bin = match &self.c.node_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no directory of the executable")?
                .join("comodit-node"),
        };
        Ok(NodeOptions {
            bin,
            n_shards: self.c.n_shards,
            heartbeat_s: if self.c.heartbeat_s == 0 {
                3600
            } else {
                self.c.heartbeat_s
            },
            command_timeout_s: 60,
            log: self.c.node_log.clone(),
            env: vec![(
                "COMODIT_PUBLISHES_IN_FLIGHT".into(),
                self.c.publishes_in_flight.to_string(),
            )],
            cpus: self.c.node_cpus.clone(),
        })
    }

    /// Finishes the report (machine, duration) and writes it.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        self.report.machine = crate::report::machine(&self.broker);
        self.report.duration_s = self.started.elapsed().as_secs_f64();
        self.report.write(&self.out)?;
        Ok(self.out)
    }
}

/// Node processes of one run, on one prefix; what the run created is deleted by [`Rig::cleanup`].
pub struct Rig {
    pub prefix: String,
    pub names: Names,
    pub work: PathBuf,
    pub nodes: Vec<NodeProc>,
    pub apis: Vec<Api>,
    pub users: Vec<String>,
}

impl Rig {
    /// A prefix and a work directory, no node yet.
    pub fn empty(_ctx: &Ctx) -> anyhow::Result<Rig> {
        let prefix = rig::run_prefix();
        let work = std::env::temp_dir().join(format!("comodit-loadtest-{prefix}"));
        Ok(Rig {
            names: rig::names(&prefix)?,
            users: vec![rig::enroll_user(&prefix)],
            prefix,
            work,
            nodes: Vec::new(),
            apis: Vec::new(),
        })
    }

    /// One node with the embedded store.
    pub fn single(ctx: &Ctx) -> anyhow::Result<Rig> {
        let mut rig = Rig::empty(ctx)?;
        let node = rig::spawn_node(
            1,
            &rig.work,
            &rig.prefix,
            &ctx.broker,
            &ctx.node_options()?,
            &[],
        )?;
        let token = read_token(&node)?;
        rig.apis.push(Api::new(&node, &token));
        rig.nodes.push(node);
        Ok(rig)
    }

    pub fn api(&self) -> &Api {
        &self.apis[0]
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(NodeProc::pid).collect()
    }

    /// Stops the nodes, keeps their logs in `out`, deletes the run's broker objects and users.
    pub async fn cleanup(mut self, broker: &Broker, out: &std::path::Path) {
        for n in &mut self.nodes {
            n.stop(Duration::from_secs(10));
            let _ = std::fs::create_dir_all(out);
            let _ = std::fs::copy(&n.log, out.join(format!("node{}.log", n.id)));
        }
        rig::cleanup(broker, &self.prefix, std::mem::take(&mut self.users)).await;
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

pub(crate) fn read_token(node: &NodeProc) -> anyhow::Result<String> {
    let path = node.dir.join("data/admin-token");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// Warns (stderr and a report note) about queues earlier runs left on the broker: idle host
/// queues cost it CPU (about 1.1 % of a core per 1,000) under every figure of this run.
pub async fn note_leftovers(ctx: &mut Ctx) {
    match rig::leftovers(&ctx.broker).await {
        Ok(l) if !l.is_empty() => {
            let queues: usize = l.iter().map(|l| l.queues).sum();
            let running = l.iter().filter(|l| !l.idle()).count();
            let note = format!(
                "at the start the broker held {queues} queues of {} earlier load-test runs ({}; {running} \
                 of them still running): idle queues cost the broker CPU under every \
                 figure; `comodit-loadtest cleanup` deletes the idle ones",
                l.len(),
                l.iter()
                    .map(|l| format!("{}: {}", l.prefix, l.queues))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            eprintln!("WARNING: {note}");
            ctx.report.notes.push(note);
        }
        Ok(_) => {}
        Err(e) => eprintln!("listing the broker's queues: {e:#}"),
    }
}

/// `cleanup`: deletes the named run prefixes, or every run prefix with nothing connected (no
/// consumer on any of its queues, none of its users connected).
pub async fn cleanup_leftovers(c: &Common, named: &[String]) -> anyhow::Result<()> {
    let broker = c.broker();
    let found = rig::leftovers(&broker).await?;
    let prefixes: Vec<String> = if named.is_empty() {
        for l in found.iter().filter(|l| !l.idle()) {
            eprintln!(
                "cleanup: {} left alone (a run still going): {} of its {} queues have consumers, {} connections of its users",
                l.prefix, l.consumed, l.queues, l.connections
            );
        }
        found
            .iter()
            .filter(|l| l.idle())
            .map(|l| l.prefix.clone())
            .collect()
    } else {
        for p in named {
            anyhow::ensure!(
                rig::is_run_prefix(p),
                "--prefix {p:?}: not a load-test run's prefix (lt and 8 hex digits)"
            );
        }
        named.to_vec()
    };
    if prefixes.is_empty() {
        eprintln!("cleanup: no idle load-test run on the broker");
    }
    for p in &prefixes {
        rig::cleanup(&broker, p, Vec::new()).await;
    }
    Ok(())
}

/// Enrolls `ctx.c.hosts` hosts through the real path; records the phase in the report.
pub(crate) async fn enroll_phase(
    ctx: &mut Ctx,
    rig: &mut Rig,
    sampler: &Sampler,
) -> anyhow::Result<Enrolled> {
    let n = ctx.c.hosts;
    let token = {
        let api = rig.api().clone();
        tokio::task::spawn_blocking(move || api.enrollment_token(n as u64)).await??
    };
    let t0 = ctx.started.elapsed().as_secs_f64();
    eprintln!("enrolling {n} hosts through {}", rig.names.enroll());
    let enrolled = enroller::enroll(
        EnrollOptions {
            broker: ctx.broker.amqp.clone(),
            names: rig.names.clone(),
            user: rig::enroll_user(&rig.prefix),
            password: rig::ENROLL_PASSWORD.into(),
            token,
            count: n,
            rate: ctx.c.enroll_rate,
            concurrency: ctx.c.enroll_concurrency,
            deadline: Duration::from_secs(ctx.c.deadline_s),
        },
        ctx.shutdown.clone(),
    )
    .await;
    let t1 = ctx.started.elapsed().as_secs_f64();
    let enrolled = enrolled?;
    rig.users
        .extend(enrolled.hosts.iter().map(|(h, _)| h.to_string()));
    let per_min = enrolled.hosts.len() as f64 / enrolled.elapsed.as_secs_f64() * 60.0;
    eprintln!(
        "enrolled {} hosts in {:.1} s ({per_min:.0}/min), {} failed",
        enrolled.hosts.len(),
        enrolled.elapsed.as_secs_f64(),
        enrolled.failed
    );
    let during = sampler.window(t0, t1);
    ctx.report.phases.push(json!({
        "phase": "enroll",
        "hosts": enrolled.hosts.len(),
        "failed": enrolled.failed,
        "elapsed_s": enrolled.elapsed.as_secs_f64(),
        "hosts_per_min": per_min,
        "latency_ms": percentiles(&enrolled.latency),
        "node_cpu_pct": mean(&during, |s| s.node_cpu_pct),
        "broker_cpu_pct": mean(&during, |s| s.broker_cpu_pct),
        "loadtest_cpu_pct": mean(&during, |s| s.self_cpu_pct),
    }));
    ctx.report.plots.push(Plot {
        file: "enroll.svg".into(),
        title: format!("Enrollment of {n} hosts"),
        x: "seconds".into(),
        y: "hosts enrolled".into(),
        series: vec![Series {
            name: "enrolled".into(),
            points: enrolled.progress.clone(),
        }],
    });
    if enrolled.hosts.len() < n {
        bail!("only {} of {n} hosts enrolled", enrolled.hosts.len());
    }
    Ok(enrolled)
}

/// Starts a fleet for `hosts` on the run's prefix (shared fleet user or own credentials).
pub(crate) async fn start_fleet(
    ctx: &Ctx,
    rig: &mut Rig,
    hosts: &[(HostId, Secret)],
    heartbeat_s: u64,
) -> anyhow::Result<Fleet> {
    let login = if ctx.c.own_credentials {
        Login::Own
    } else {
        let user = rig::fleet_user(&rig.prefix);
        if !rig.users.contains(&user) {
            rig.users.push(user.clone());
        }
        let password = uuid::Uuid::new_v4().to_string();
        ctx.broker
            .admin()?
            .ensure_fleet_user(&rig.names, &user, &password)
            .await?;
        Login::Shared { user, password }
    };
    let fleet = Fleet::start(
        FleetConfig {
            broker: ctx.broker.amqp.clone(),
            names: rig.names.clone(),
            n_shards: ctx.c.n_shards,
            login,
            hosts_per_conn: ctx.c.hosts_per_conn,
            heartbeat_s,
            amqp_heartbeat_s: 30,
            prefetch: 4,
            fail_fraction: ctx.c.fail_fraction,
            slow_fraction: ctx.c.slow_fraction,
            slow_ms: ctx.c.slow_ms,
        },
        hosts.iter().map(|(h, p)| (*h, Some(p.clone()))).collect(),
        ctx.shutdown.child_token(),
    );
    fleet
        .wait_ready(Duration::from_secs(120 + hosts.len() as u64 / 50))
        .await?;
    Ok(fleet)
}

/// Waits until the nodes hold at least `n` host actors (every host's hello was handled).
pub(crate) async fn wait_actors(apis: &[Api], n: usize, deadline: Duration) -> anyhow::Result<f64> {
    let until = Instant::now() + deadline;
    loop {
        let apis2 = apis.to_vec();
        let have = tokio::task::spawn_blocking(move || {
            apis2
                .iter()
                .map(|a| a.metric("comodit_node_host_actors").unwrap_or(0.0))
                .sum::<f64>()
        })
        .await?;
        if have >= n as f64 {
            return Ok(have);
        }
        if Instant::now() > until {
            bail!("the nodes hold {have} host actors, not {n}, after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The bare waves of the same size, unless --no-bare.
async fn bare_phase(
    ctx: &mut Ctx,
    body: Body,
    broadcast: bool,
) -> anyhow::Result<Option<BareResult>> {
    if ctx.c.no_bare {
        return Ok(None);
    }
    eprintln!("bare: {} hosts, no node", ctx.c.hosts);
    let r = bare::run(
        &ctx.broker,
        &BareOptions {
            hosts: ctx.c.hosts,
            n_shards: ctx.c.n_shards,
            hosts_per_conn: ctx.c.hosts_per_conn,
            publishes_in_flight: usize::from(ctx.c.publishes_in_flight),
            body,
            deadline: Duration::from_secs(ctx.c.deadline_s.min(1800)),
            broadcast,
            waves: usize::from(ctx.c.waves),
            heartbeat_s: ctx.c.heartbeat_s,
        },
        &ctx.shutdown,
    )
    .await?;
    ctx.report.waves.extend(r.ceiling.summaries());
    ctx.report.phases.push(json!({
        "phase": "bare",
        "setup_s": r.setup.as_secs_f64(),
        "heartbeat_s": ctx.c.heartbeat_s,
        "heartbeats": r.heartbeats,
    }));
    Ok(Some(r))
}

pub fn apply_body(content: &str) -> anyhow::Result<Body> {
    let spec = Spec::from_json(
        Collection::Files,
        json!({"content": content, "mode": "0644"}),
    )?;
    Ok(Body::Apply {
        mode: comodit_protocol::ApplyMode::Enforce,
        monitor: false,
        resources: vec![Resource::new(
            Collection::Files,
            "/etc/comodit-loadtest.conf",
            spec,
        )?],
    })
}

pub fn run_body() -> Body {
    Body::Run(RunSpec {
        argv: vec!["/bin/true".into()],
        env: Default::default(),
        cwd: None,
        timeout_s: 30,
        stream: false,
    })
}

// --- enroll ---------------------------------------------------------------------------------

pub async fn enroll(ctx: &mut Ctx) -> anyhow::Result<()> {
    // The ceiling first, on a broker that holds none of this run's queues yet.
    let bare = bare_phase(ctx, run_body(), false).await?;
    let mut rig = Rig::single(ctx)?;
    let sampler = Sampler::start(rig.pids(), Duration::from_millis(500), ctx.started);
    let r = async {
        let enrolled = enroll_phase(ctx, &mut rig, &sampler).await?;
        let counted = {
            let api = rig.api().clone();
            tokio::task::spawn_blocking(move || {
                api.metric("comodit_node_enroll_total").unwrap_or(0.0)
            })
            .await?
        };
        let per_min = enrolled.hosts.len() as f64 / enrolled.elapsed.as_secs_f64() * 60.0;
        ctx.report.counts = json!({
            "expected": ctx.c.hosts,
            "counted": enrolled.hosts.len(),
            "node_enroll_total": counted,
            "failed": enrolled.failed,
        });
        let mut f = Figure::new("enrollment rate", per_min, "hosts/min")
            .goal("≥ 10,000 hosts/min", per_min >= 10_000.0);
        if let Some(b) = &bare {
            // An enrollment is one request and one reply: compare with the bare round trips.
            f = f.vs_bare(b.ceiling.unicast().throughput() * 60.0);
        }
        ctx.report.figures.push(f);
        ctx.report.figures.push(Figure::new(
            "enrollment latency p99",
            enrolled.latency.value_at_quantile(0.99) as f64 / 1000.0,
            "ms",
        ));
        anyhow::Ok(())
    }
    .await;
    ctx.report.samples = sampler.stop().await;
    add_resource_plot(&mut ctx.report);
    rig.cleanup(&ctx.broker, &ctx.out).await;
    r
}

pub(crate) fn add_resource_plot(report: &mut Report) {
    if report.samples.is_empty() {
        return;
    }
    let s = &report.samples;
    let line = |name: &str, f: &dyn Fn(&crate::measure::Sample) -> f64| Series {
        name: name.into(),
        points: s.iter().map(|x| (x.t_s, f(x))).collect(),
    };
    report.plots.push(Plot {
        file: "cpu.svg".into(),
        title: "CPU over the run (% of one core)".into(),
        x: "seconds".into(),
        y: "% CPU".into(),
        series: vec![
            line("node", &|x| x.node_cpu_pct),
            line("broker", &|x| x.broker_cpu_pct),
            line("loadtest", &|x| x.self_cpu_pct),
        ],
    });
    report.plots.push(Plot {
        file: "memory.svg".into(),
        title: "Memory over the run".into(),
        x: "seconds".into(),
        y: "RSS (MiB)".into(),
        series: vec![
            line("node", &|x| x.node_rss as f64 / 1048576.0),
            line("broker", &|x| x.broker_rss as f64 / 1048576.0),
            line("loadtest", &|x| x.self_rss as f64 / 1048576.0),
        ],
    });
}

// --- steady ---------------------------------------------------------------------------------

pub async fn steady(ctx: &mut Ctx, duration_s: u64, steps: usize) -> anyhow::Result<()> {
    let mut rig = Rig::single(ctx)?;
    let sampler = Sampler::start(rig.pids(), Duration::from_millis(500), ctx.started);
    let r = steady_in(ctx, &mut rig, &sampler, duration_s, steps).await;
    ctx.report.samples = sampler.stop().await;
    add_resource_plot(&mut ctx.report);
    rig.cleanup(&ctx.broker, &ctx.out).await;
    r
}

async fn steady_in(
    ctx: &mut Ctx,
    rig: &mut Rig,
    sampler: &Sampler,
    duration_s: u64,
    steps: usize,
) -> anyhow::Result<()> {
    let enrolled = enroll_phase(ctx, rig, sampler).await?;
    let n = enrolled.hosts.len();
    let steps = steps.clamp(1, n.max(1));
    // Memory over fleet size: the fleet connects in steps; after each, every host has its actor.
    // Long enough for a few samples after the node's allocations settle.
    let settle_s = if n < 1000 { 1.5 } else { 3.0 };
    let settle = |sampler: &Sampler, ctx: &Ctx| {
        let now = ctx.started.elapsed().as_secs_f64();
        let w = sampler.window(now - settle_s + 0.4, now);
        (
            mean(&w, |s| s.node_rss as f64),
            mean(&w, |s| s.broker_rss as f64),
        )
    };
    tokio::time::sleep(Duration::from_secs_f64(settle_s)).await;
    let (rss0, brss0) = settle(sampler, ctx);
    let mut mem_points = vec![(0.0, rss0)];
    let mut broker_points = vec![(0.0, brss0)];
    let mut fleets = Vec::new();
    let per = n.div_ceil(steps);
    let mut connected = 0;
    // Heartbeats off while connecting, so the steps measure presence, not traffic.
    for chunk in enrolled.hosts.chunks(per) {
        let fleet = start_fleet(ctx, rig, chunk, 0).await?;
        connected += chunk.len();
        sampler.hosts.store(connected as u64, Ordering::Relaxed);
        wait_actors(&rig.apis, connected, Duration::from_secs(300)).await?;
        tokio::time::sleep(Duration::from_secs_f64(settle_s)).await;
        let (rss, brss) = settle(sampler, ctx);
        eprintln!(
            "steady: {connected} hosts connected; node RSS {:.1} MiB, broker RSS {:.1} MiB",
            rss / 1048576.0,
            brss / 1048576.0
        );
        mem_points.push((connected as f64, rss));
        broker_points.push((connected as f64, brss));
        fleets.push(fleet);
    }
    // Marginal cost: the slope over the connected steps. The first step also pays one-off costs
    // (shard consumers, the actor system's first allocations); it is reported apart.
    let node_per_host = if mem_points.len() > 2 {
        slope(&mem_points[1..])
    } else {
        slope(&mem_points)
    };
    let node_per_host_all = slope(&mem_points);
    let broker_per_host = slope(&broker_points);
    // Phase A: routed heartbeats; phase B: none (AMQP heartbeats on the connections only).
    let hb = if ctx.c.heartbeat_s == 0 {
        30
    } else {
        ctx.c.heartbeat_s
    };
    eprintln!("steady: routed heartbeats every {hb} s for {duration_s} s");
    let a = steady_phase(ctx, &fleets, sampler, "routed heartbeats", hb, duration_s).await?;
    eprintln!("steady: no routed heartbeats for {duration_s} s");
    let b = steady_phase(
        ctx,
        &fleets,
        sampler,
        "connection-level liveness only",
        0,
        duration_s,
    )
    .await?;
    let conns: usize = fleets.iter().map(Fleet::connections).sum();
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let rss_end = f(&b, "node_rss");
    ctx.report.figures.push(
        Figure::new(
            "node memory per idle host (RSS slope over the connected steps)",
            node_per_host,
            "B",
        )
        .goal("≤ 2 KiB", node_per_host <= 2048.0),
    );
    ctx.report.figures.push(Figure::new(
        "node memory per host, slope including the first step from 0 hosts",
        node_per_host_all,
        "B",
    ));
    ctx.report.figures.push(Figure::new(
        "node RSS, whole fleet idle",
        rss_end / 1048576.0,
        "MiB",
    ));
    ctx.report.figures.push(Figure::new(
        "broker memory per host (RSS slope)",
        broker_per_host,
        "B",
    ));
    ctx.report.figures.push(Figure::new(
        &format!("broker CPU with routed heartbeats every {hb} s"),
        f(&a, "broker_cpu_pct"),
        "% of a core",
    ));
    ctx.report.figures.push(Figure::new(
        "broker CPU, connection-level liveness only",
        f(&b, "broker_cpu_pct"),
        "% of a core",
    ));
    ctx.report.figures.push(Figure::new(
        &format!("broker CPU per 1,000 hosts, routed heartbeats every {hb} s"),
        f(&a, "broker_cpu_pct") / n as f64 * 1000.0,
        "% of a core",
    ));
    ctx.report.figures.push(Figure::new(
        "broker CPU per 1,000 hosts, connection-level liveness only",
        f(&b, "broker_cpu_pct") / n as f64 * 1000.0,
        "% of a core",
    ));
    ctx.report.figures.push(Figure::new(
        &format!("node CPU, routed heartbeats every {hb} s"),
        f(&a, "node_cpu_pct"),
        "% of a core",
    ));
    ctx.report.figures.push(Figure::new(
        "node CPU, idle fleet",
        f(&b, "node_cpu_pct"),
        "% of a core",
    ));
    ctx.report.phases.push(a);
    ctx.report.phases.push(b);
    let actors = wait_actors(&rig.apis, n, Duration::from_secs(5))
        .await
        .unwrap_or(0.0);
    ctx.report.counts = json!({
        "expected": ctx.c.hosts,
        "counted": fleets.iter().map(|f| f.counters.hellos.load(Ordering::Relaxed)).sum::<u64>().min(n as u64),
        "node_host_actors": actors,
        "connections": conns,
    });
    ctx.report.plots.push(Plot {
        file: "memory-over-fleet.svg".into(),
        title: "Memory over fleet size (idle hosts)".into(),
        x: "hosts connected".into(),
        y: "RSS (MiB)".into(),
        series: vec![
            Series {
                name: "node".into(),
                points: mem_points
                    .iter()
                    .map(|(x, y)| (*x, y / 1048576.0))
                    .collect(),
            },
            Series {
                name: "broker".into(),
                points: broker_points
                    .iter()
                    .map(|(x, y)| (*x, y / 1048576.0))
                    .collect(),
            },
        ],
    });
    ctx.report.notes.push(format!(
        "{n} hosts on {conns} AMQP connections ({}). With the shared fleet user, AMQP heartbeats \
         cost per connection, not per host; run with --own-credentials for one connection per host, \
         as real agents have.",
        if ctx.c.own_credentials { "own credentials" } else { "shared fleet user" }
    ));
    for f in fleets {
        f.stop().await;
    }
    Ok(())
}

/// One steady phase: every host's routed heartbeat set to `period` (0 = none) for `duration_s`.
async fn steady_phase(
    ctx: &Ctx,
    fleets: &[Fleet],
    sampler: &Sampler,
    name: &str,
    period: u64,
    duration_s: u64,
) -> anyhow::Result<Value> {
    for f in fleets {
        f.set_heartbeat(period);
    }
    let beats = || -> u64 {
        fleets
            .iter()
            .map(|f| f.counters.heartbeats.load(Ordering::Relaxed))
            .sum()
    };
    let beats0 = beats();
    let t0 = ctx.started.elapsed().as_secs_f64();
    tokio::select! {
        _ = ctx.shutdown.cancelled() => bail!("interrupted"),
        _ = tokio::time::sleep(Duration::from_secs(duration_s)) => {}
    }
    let t1 = ctx.started.elapsed().as_secs_f64();
    let w = sampler.window(t0 + 1.0, t1);
    Ok(json!({
        "phase": name,
        "routed_heartbeat_s": period,
        "duration_s": t1 - t0,
        "heartbeats_per_s": (beats() - beats0) as f64 / (t1 - t0),
        "broker_cpu_pct": mean(&w, |s| s.broker_cpu_pct),
        "node_cpu_pct": mean(&w, |s| s.node_cpu_pct),
        "loadtest_cpu_pct": mean(&w, |s| s.self_cpu_pct),
        "node_rss": mean(&w, |s| s.node_rss as f64),
        "broker_rss": mean(&w, |s| s.broker_rss as f64),
    }))
}

// --- apply / run ----------------------------------------------------------------------------

/// One command per host through the API.
#[derive(Clone)]
pub enum ApiOp {
    Apply {
        content: String,
    },
    Run,
    /// The same `run` to every host in one request: a job (`POST /orgs/{org}/jobs`), at most
    /// `max_concurrency` hosts pending at once if given.
    Job {
        max_concurrency: Option<u64>,
    },
}

pub async fn api_wave_scenario(ctx: &mut Ctx, op: ApiOp) -> anyhow::Result<()> {
    // The ceiling first, on a broker that holds none of this run's queues yet.
    let body = match &op {
        ApiOp::Apply { content } => apply_body(content)?,
        ApiOp::Run | ApiOp::Job { .. } => run_body(),
    };
    let mut bare = if ctx.c.interleave_bare {
        None
    } else {
        bare_phase(ctx, body.clone(), true)
            .await?
            .map(|r| r.ceiling)
    };
    let mut rig = Rig::single(ctx)?;
    let sampler = Sampler::start(rig.pids(), Duration::from_millis(500), ctx.started);
    let r = async {
        let enrolled = enroll_phase(ctx, &mut rig, &sampler).await?;
        let fleet = start_fleet(ctx, &mut rig, &enrolled.hosts, ctx.c.heartbeat_s).await?;
        sampler
            .hosts
            .store(enrolled.hosts.len() as u64, Ordering::Relaxed);
        wait_actors(&rig.apis, enrolled.hosts.len(), Duration::from_secs(600)).await?;
        let ids: Vec<HostId> = enrolled.hosts.iter().map(|(h, _)| *h).collect();
        if let Some(cpus) = rig.nodes.first().and_then(NodeProc::cpus_allowed) {
            ctx.report.notes.push(format!("node 1 ran on CPUs {cpus}"));
        }
        let name = match op {
            ApiOp::Apply { .. } => "api_apply",
            ApiOp::Run => "api_run",
            ApiOp::Job { .. } => "api_job",
        };
        match op {
            ApiOp::Job { max_concurrency } => eprintln!(
                "{name}: one job to all {} hosts, at most {} pending",
                ids.len(),
                max_concurrency.map_or("all".to_owned(), |n| n.to_string())
            ),
            _ => eprintln!(
                "{name}: one command to each of {} hosts, {} at a time",
                ids.len(),
                ctx.c.concurrency
            ),
        }
        let n_waves = usize::from(ctx.c.waves);
        let mut waves = Vec::with_capacity(n_waves);
        let mut interleaved = Ceiling {
            unicasts: Vec::new(),
            broadcast: None,
        };
        let names = rig.names.clone();
        let on_fleet = bare::OnFleet {
            broker: &ctx.broker,
            names: &names,
            hosts: &ids,
            n_shards: ctx.c.n_shards,
            publishes_in_flight: usize::from(ctx.c.publishes_in_flight),
            body: &body,
            deadline: Duration::from_secs(ctx.c.deadline_s.min(1800)),
        };
        let mut probe = Probe::new(fleet.counters.clone());
        for i in 0..n_waves {
            // Pairs alternate their order (bare first in pairs 1, 3, ..., API first in pairs
            // 2, 4, ...), so that broker work that comes after a fixed number of messages (the
            // quorum queues' log flush, docs/performance.md) does not always land on the same
            // kind of wave.
            let bare_first = i % 2 == 0;
            if ctx.c.interleave_bare && bare_first {
                let w = interleaved_bare_wave(
                    ctx, &mut rig, &sampler, &on_fleet, &mut probe, i, n_waves,
                )
                .await?;
                interleaved.unicasts.push(w);
            }
            let wave_name = wave_name(name, i, n_waves);
            let t0 = ctx.started.elapsed().as_secs_f64();
            let meter = CpuMeter::start(&rig.pids());
            let node_mark = Probe::mark_node(rig.api()).await;
            let keys = format!("{}-{wave_name}", rig.prefix);
            let deadline = Duration::from_secs(ctx.c.deadline_s);
            let keys = ctx.c.idempotency_keys.then_some(keys.as_str());
            let mut wave = match op {
                ApiOp::Job { max_concurrency } => {
                    job_wave(
                        &wave_name,
                        rig.api(),
                        ids.len(),
                        max_concurrency,
                        deadline,
                        keys,
                    )
                    .await?
                }
                _ => {
                    let apis = &rig.apis;
                    let (w, _) = api_wave(
                        &wave_name,
                        apis,
                        &ids,
                        &op,
                        ctx.c.concurrency,
                        deadline,
                        keys,
                        None,
                    )
                    .await?;
                    w
                }
            };
            let t1 = ctx.started.elapsed().as_secs_f64();
            wave.cpu = Some(meter.end(wave.answered));
            eprintln!("{}", wave.done_line());
            let under = probe
                .wave_ended(Some((rig.api(), node_mark)), &ctx.broker)
                .await;
            eprintln!("{wave_name} underneath: {under}");
            wave.underneath = Some(under);
            let during = sampler.window(t0, t1);
            ctx.report.phases.push(json!({
                "phase": wave_name,
                "node_cpu_pct": mean(&during, |s| s.node_cpu_pct),
                "broker_cpu_pct": mean(&during, |s| s.broker_cpu_pct),
                "loadtest_cpu_pct": mean(&during, |s| s.self_cpu_pct),
            }));
            waves.push(wave);
            if ctx.c.interleave_bare && !bare_first {
                let w = interleaved_bare_wave(
                    ctx, &mut rig, &sampler, &on_fleet, &mut probe, i, n_waves,
                )
                .await?;
                interleaved.unicasts.push(w);
            }
        }
        // The node's own view of the wave (round trips, dispatches, store errors), kept beside
        // the report for the analysis.
        {
            let api = rig.api().clone();
            let path = ctx.out.join("node1-metrics.prom");
            let _ = std::fs::create_dir_all(&ctx.out);
            if let Ok(Ok(text)) = tokio::task::spawn_blocking(move || api.metrics_text()).await {
                let _ = std::fs::write(path, text);
            }
        }
        if ctx.c.interleave_bare {
            // Last, with the node stopped for good: the fleet's queues get a fanout binding each.
            rig.nodes[0].stop(Duration::from_secs(30));
            let mut w = bare::broadcast_on_fleet(&on_fleet, &ctx.shutdown).await?;
            eprintln!("{}", w.done_line());
            w.underneath = Some(probe.wave_ended(None, &ctx.broker).await);
            interleaved.broadcast = Some(w);
            ctx.report.waves.extend(interleaved.summaries());
            // Each API wave against the bare wave just before it: the drift of the machine's
            // speed between the two is seconds, not minutes.
            let pairs: Vec<f64> = waves
                .iter()
                .zip(&interleaved.unicasts)
                .map(|(api, bare)| api.elapsed.as_secs_f64() / bare.elapsed.as_secs_f64())
                .collect();
            ctx.report.notes.push(format!(
                "each API wave against the bare wave just before it: {}",
                pairs
                    .iter()
                    .map(|r| format!("{r:.2}×"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            ctx.report.phases.push(json!({
                "phase": "bare",
                "interleaved": true,
                "heartbeat_s": ctx.c.heartbeat_s,
                "pair_ratios": pairs,
            }));
            bare = Some(interleaved);
        }
        let tallies = fleet.tallies();
        let replied = tallies.iter().filter(|t| t.replied > 0).count();
        // Each host gets one command per wave (and per bare wave on this fleet).
        let per_host = if ctx.c.interleave_bare {
            2 * u32::from(ctx.c.waves) + 1
        } else {
            u32::from(ctx.c.waves)
        };
        let duplicated: u32 = tallies
            .iter()
            .map(|t| t.duplicates + t.received.saturating_sub(per_host))
            .sum();
        let answered: usize = waves.iter().map(|w| w.answered).sum();
        let failed: usize = waves.iter().map(|w| w.failed).sum();
        let expected = ids.len() * n_waves;
        ctx.report.counts = json!({
            "expected": expected,
            "counted": answered,
            "answered_ok": answered - failed,
            "failed": failed,
            "unanswered": expected - answered,
            "hosts_that_replied": replied,
            "duplicated_commands": duplicated,
        });
        fleet.stop().await;
        let wave = median_wave(&waves);
        let secs = wave.elapsed.as_secs_f64();
        let mut last = Figure::new("time until the last host answered", secs, "s");
        let mut tput = Figure::new("throughput", wave.throughput(), "answers/s");
        let p50 = wave.latency.value_at_quantile(0.5) as f64 / 1000.0;
        let p99 = wave.latency.value_at_quantile(0.99) as f64 / 1000.0;
        let mut f50 = Figure::new("latency p50", p50, "ms");
        let mut f99 = Figure::new("latency p99", p99, "ms");
        let mut series = latency_over_time(&wave.name, &wave.points, 60);
        // Only when it was measured: no figure rather than a made-up zero.
        let node_cpu = wave
            .cpu
            .and_then(|c| c.node_ms)
            .map(|ms| Figure::new("node CPU per answer", ms, "ms"));
        if ctx.c.interleave_bare {
            ctx.report.notes.push(
                "bare ceiling interleaved: beside each API wave the node was stopped, a bare \
                 unicast wave ran on its fleet (same host and shard queues), and the node was \
                 started again; the bare wave came first in pairs 1, 3, ... and second in pairs \
                 2, 4, ...; the bare broadcast ran last"
                    .into(),
            );
        }
        if n_waves > 1 {
            ctx.report.notes.push(format!(
                "{n_waves} API waves on the same hosts (and as many bare unicast waves, unless \
                 --no-bare): the figures are the median waves ({}); every wave is listed below.",
                wave.name
            ));
        }
        if let Some(b) = &bare {
            let bu = b.unicast();
            let bs = bu.elapsed.as_secs_f64();
            last = last
                .vs_bare(bs)
                .goal("≤ 1.25× bare unicast", secs <= 1.25 * bs);
            tput = tput.vs_bare(bu.throughput());
            f50 = f50.vs_bare(bu.latency.value_at_quantile(0.5) as f64 / 1000.0);
            f99 = f99.vs_bare(bu.latency.value_at_quantile(0.99) as f64 / 1000.0);
            series.extend(latency_over_time("bare unicast", &bu.points, 60));
            if let Some(bc) = &b.broadcast {
                ctx.report.figures.push(
                    Figure::new(
                        "bare broadcast: time until the last host answered",
                        bc.elapsed.as_secs_f64(),
                        "s",
                    )
                    .vs_bare(bs),
                );
            }
        }
        ctx.report.figures.extend([last, tput, f50, f99]);
        ctx.report.figures.extend(node_cpu);
        ctx.report
            .waves
            .splice(0..0, waves.iter().map(Wave::summary));
        ctx.report.plots.push(Plot {
            file: "latency-over-time.svg".into(),
            title: format!("{name}: latency over time ({} hosts)", ids.len()),
            x: "seconds since the wave began".into(),
            y: "latency (ms)".into(),
            series,
        });
        anyhow::Ok(())
    }
    .await;
    ctx.report.samples = sampler.stop().await;
    add_resource_plot(&mut ctx.report);
    rig.cleanup(&ctx.broker, &ctx.out).await;
    r
}

/// `--interleave-bare`: stops the node, runs bare unicast wave `i` on its fleet, starts the node
/// again and waits until it holds an actor for every host. Pair `i` runs it before its API wave
/// when `i` is even, after it when odd.
async fn interleaved_bare_wave(
    ctx: &Ctx,
    rig: &mut Rig,
    sampler: &Sampler,
    on_fleet: &bare::OnFleet<'_>,
    probe: &mut Probe,
    i: usize,
    n: usize,
) -> anyhow::Result<Wave> {
    let name = wave_name("bare_unicast", i, n);
    rig.nodes[0].stop(Duration::from_secs(30));
    let mut w = bare::unicast_on_fleet(on_fleet, &name, &ctx.shutdown).await;
    if let Ok(w) = &mut w {
        eprintln!("{}", w.done_line());
        let under = probe.wave_ended(None, &ctx.broker).await;
        eprintln!("{name} underneath: {under}");
        w.underneath = Some(under);
    }
    let opts = ctx.node_options()?;
    rig::restart_node(&mut rig.nodes[0], &rig.prefix, &ctx.broker, &opts)?;
    sampler.set_node_pids(rig.pids());
    let w = w?;
    let started = Instant::now();
    wait_actors(&rig.apis, on_fleet.hosts.len(), Duration::from_secs(600)).await?;
    eprintln!(
        "node restarted; {} host actors after {:.1} s",
        on_fleet.hosts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(w)
}

/// One request per host, `concurrency` at a time, each to `apis[i % len]` (a request that cannot
/// reach its node goes to the next one: counted in the second value returned, as each may make a
/// second change for its host). A 202 is followed until the change is no longer pending.
/// `on_progress(answered)` is called after every answer (the failover scenario kills a node from
/// there).
/// `keys`: a prefix for an `Idempotency-Key` per request (`<prefix>-<host>`), or none.
#[allow(clippy::too_many_arguments)]
pub async fn api_wave(
    name: &str,
    apis: &[Api],
    hosts: &[HostId],
    op: &ApiOp,
    concurrency: usize,
    deadline: Duration,
    keys: Option<&str>,
    on_progress: Option<Arc<dyn Fn(usize) + Send + Sync>>,
) -> anyhow::Result<(Wave, u64)> {
    let resent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let until = start + deadline;
    // No request starts after the deadline; those in flight then end by their own timeouts.
    let results: Vec<(Duration, Duration, Outcome)> = futures_util::stream::iter(0..hosts.len())
        .take_while(|_| futures_util::future::ready(Instant::now() <= until))
        .map(|i| {
            let (resent, answered, progress) = (&resent, &answered, &on_progress);
            async move {
                let t = Instant::now();
                let key = keys.map(|k| format!("{k}-{}", hosts[i]));
                let (outcome, again) =
                    one_request(apis, i, hosts[i], op, key.as_deref(), until).await;
                resent.fetch_add(again, Ordering::Relaxed);
                let done = Instant::now();
                let n = answered.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(p) = progress {
                    p(n);
                }
                (done.duration_since(start), done.duration_since(t), outcome)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut wave = Wave::new(name, hosts.len());
    let mut errors = 0;
    for (at, lat, outcome) in results {
        match outcome {
            Outcome::Done(ok) => wave.record(at, lat, ok),
            Outcome::Error(e) => {
                errors += 1;
                if errors <= 3 {
                    eprintln!("{name}: {e:#}");
                }
            }
        }
    }
    wave.end_at_last_answer(start.elapsed());
    Ok((wave, resent.load(Ordering::Relaxed)))
}

/// How often a job wave asks the node where its job is.
const JOB_POLL: Duration = Duration::from_millis(250);

/// One job to every host of the fleet's environment (`default/default`): one request, then the
/// job's counts polled until no host is pending. Each host's latency is from the request's start
/// to the time the node recorded its answer (the job's per-host `updated_at`, read after the
/// wave: the node and this process share one clock); the wave ends at the last of those.
pub async fn job_wave(
    name: &str,
    api: &Api,
    hosts: usize,
    max_concurrency: Option<u64>,
    deadline: Duration,
    key: Option<&str>,
) -> anyhow::Result<Wave> {
    let body = json!({
        "target": {"env": "default"},
        "command": {"run": {"argv": ["/bin/true"], "timeout_s": 30}},
        "max_concurrency": max_concurrency,
    });
    let start = Instant::now();
    let start_wall = chrono::Utc::now();
    let until = start + deadline;
    let key = key.map(|k| format!("{k}-job"));
    let (status, job) = api
        .call_keyed(
            "POST",
            "/api/v1/orgs/default/jobs",
            Some(&body),
            deadline,
            key.as_deref(),
        )
        .await?;
    anyhow::ensure!(status == 202, "{name}: POST job: HTTP {status}: {job}");
    let released = start.elapsed();
    let id = job["id"].as_str().context("job without an id")?.to_owned();
    anyhow::ensure!(
        job["hosts"].as_u64() == Some(hosts as u64),
        "{name}: the job targets {} hosts, the fleet has {hosts}",
        job["hosts"]
    );
    eprintln!(
        "{name}: job {id} for {hosts} hosts accepted in {:.2} s",
        released.as_secs_f64()
    );
    let path = format!("/api/v1/orgs/default/jobs/{id}");
    loop {
        let (status, now) = api
            .call_async("GET", &path, None, Duration::from_secs(30))
            .await?;
        anyhow::ensure!(status == 200, "{path}: HTTP {status}: {now}");
        if now["status"] != "running" {
            break;
        }
        if Instant::now() >= until {
            eprintln!(
                "{name}: job still running at the deadline: {}",
                now["counts"]
            );
            break;
        }
        tokio::time::sleep(JOB_POLL).await;
    }
    // Where each host is, from the node's per-host results.
    let mut wave = Wave::new(name, hosts);
    let mut cursor: Option<String> = None;
    loop {
        let page = match &cursor {
            Some(c) => format!("{path}/hosts?limit=1000&cursor={c}"),
            None => format!("{path}/hosts?limit=1000"),
        };
        let (status, v) = api
            .call_async("GET", &page, None, Duration::from_secs(60))
            .await?;
        anyhow::ensure!(status == 200, "{page}: HTTP {status}: {v}");
        for item in v["items"].as_array().into_iter().flatten() {
            let s = item["status"].as_str().unwrap_or("");
            if s == "queued" || s == "dispatched" {
                continue;
            }
            let at: chrono::DateTime<chrono::Utc> = item["updated_at"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .context("job host without updated_at")?;
            let since = (at - start_wall).to_std().unwrap_or_default();
            wave.record(since, since, s == "applied");
        }
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => break,
        }
    }
    wave.end_at_last_answer(start.elapsed());
    Ok(wave)
}

enum Outcome {
    /// The change reached a final status; `true` when the host answered ok.
    Done(bool),
    Error(anyhow::Error),
}

/// The outcome, and how many times the request was sent again to another node.
async fn one_request(
    apis: &[Api],
    i: usize,
    host: HostId,
    op: &ApiOp,
    key: Option<&str>,
    until: Instant,
) -> (Outcome, u64) {
    let wait = until
        .saturating_duration_since(Instant::now())
        .as_secs()
        .clamp(1, 60);
    // The node holds the request up to `wait` seconds for the answer.
    let timeout = Duration::from_secs(wait + 60);
    let (method, path, body) = match op {
        ApiOp::Apply { content } => (
            "PUT",
            format!("/api/v1/hosts/{host}/resources/files/etc/comodit-loadtest.conf?wait_s={wait}"),
            json!({"spec": {"content": content, "mode": "0644"}, "monitor": false}),
        ),
        ApiOp::Run | ApiOp::Job { .. } => (
            "POST",
            format!("/api/v1/hosts/{host}/run?wait_s={wait}"),
            json!({"argv": ["/bin/true"], "timeout_s": 30}),
        ),
    };
    // The node of this request; on a transport error, the next ones.
    let mut last = None;
    for k in 0..apis.len() {
        let api = &apis[(i + k) % apis.len()];
        let again = k as u64;
        match api
            .call_keyed(method, &path, Some(&body), timeout, key)
            .await
        {
            Ok((200, v)) => return (Outcome::Done(is_ok(&v)), again),
            Ok((202, v)) => return (follow(api, host, &v, until).await, again),
            Ok((status, v)) => {
                let e = anyhow::anyhow!("{host}: HTTP {status}: {v}");
                return (Outcome::Error(e), again);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| anyhow::anyhow!("no node"));
    (Outcome::Error(e), apis.len() as u64 - 1)
}

fn is_ok(change: &Value) -> bool {
    change["status"] == "applied" && change["result"]["status"] == "ok"
}

/// Polls a pending change until it is final or the deadline passes.
async fn follow(api: &Api, host: HostId, change: &Value, until: Instant) -> Outcome {
    let Some(id) = change["id"].as_str() else {
        return Outcome::Error(anyhow::anyhow!("{host}: 202 without a change id: {change}"));
    };
    let path = format!("/api/v1/hosts/{host}/changes/{id}");
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match api
            .call_async("GET", &path, None, Duration::from_secs(30))
            .await
        {
            Ok((200, v)) => {
                let s = v["status"].as_str().unwrap_or("");
                if s != "queued" && s != "dispatched" {
                    return Outcome::Done(is_ok(&v));
                }
            }
            Ok((status, v)) => {
                return Outcome::Error(anyhow::anyhow!("{path}: HTTP {status}: {v}"))
            }
            Err(_) => {}
        }
    }
    Outcome::Error(anyhow::anyhow!(
        "{host}: change {id} still pending at the deadline"
    ))
}

// --- bare -----------------------------------------------------------------------------------

pub async fn bare_only(ctx: &mut Ctx) -> anyhow::Result<()> {
    let sampler = Sampler::start(Vec::new(), Duration::from_millis(500), ctx.started);
    ctx.c.no_bare = false;
    let r = bare_phase(ctx, apply_body("bare\n")?, true).await;
    ctx.report.samples = sampler.stop().await;
    add_resource_plot(&mut ctx.report);
    let r = r?.context("bare skipped")?;
    let u = r.ceiling.unicast();
    ctx.report.figures.push(Figure::new(
        "unicast: time until the last host answered",
        u.elapsed.as_secs_f64(),
        "s",
    ));
    ctx.report
        .figures
        .push(Figure::new("unicast round trips", u.throughput(), "per s"));
    let mut series = latency_over_time("unicast", &u.points, 60);
    if let Some(b) = &r.ceiling.broadcast {
        ctx.report.figures.push(
            Figure::new(
                "broadcast: time until the last host answered",
                b.elapsed.as_secs_f64(),
                "s",
            )
            .vs_bare(u.elapsed.as_secs_f64()),
        );
        ctx.report.figures.push(
            Figure::new("broadcast replies", b.throughput(), "per s").vs_bare(u.throughput()),
        );
        series.extend(latency_over_time("broadcast", &b.points, 60));
    }
    let waves = r.ceiling.unicasts.len();
    ctx.report.counts = json!({
        "expected": ctx.c.hosts * waves,
        "counted": r.ceiling.unicasts.iter().map(|w| w.answered).sum::<usize>(),
        "unicast_answered": u.answered,
        "broadcast_answered": r.ceiling.broadcast.as_ref().map(|b| b.answered),
    });
    ctx.report.notes.push(format!(
        "Setup (queues, bindings, {} connections, hellos) took {:.1} s and is not in the figures. \
         Ratios in this report are broadcast ÷ unicast.",
        ctx.c.hosts.div_ceil(ctx.c.hosts_per_conn.max(1)),
        r.setup.as_secs_f64()
    ));
    ctx.report.plots.push(Plot {
        file: "latency-over-time.svg".into(),
        title: format!("bare: latency over time ({} hosts)", ctx.c.hosts),
        x: "seconds since the wave began".into(),
        y: "latency (ms)".into(),
        series,
    });
    Ok(())
}
