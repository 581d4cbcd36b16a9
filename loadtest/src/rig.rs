//! The system under test: `comodit-node` processes started by the loadtest itself (a temporary
//! data directory, a unique broker prefix, a free port on loopback), their REST API, and the
//! cleanup of everything a run created on the broker.
//!
//! A run owns its prefix (`lt` + 8 random hex digits): every queue, exchange and broker user it
//! leaves behind carries it, so [`cleanup`] can find them even after a failed run. Node processes
//! are killed when their handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comodit_bus::admin::BrokerAdmin;
use comodit_bus::{Bus, BusConfig};
use comodit_protocol::Names;
use rand::Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Where the broker and its management API are, and as whom the loadtest administers it.
#[derive(Clone, Debug)]
pub struct Broker {
    /// `amqp://127.0.0.1:5672/%2f` (no credentials).
    pub amqp: String,
    pub mgmt: String,
    pub user: String,
    pub password: String,
}

impl Broker {
    pub fn admin_url(&self) -> String {
        crate::fleet::with_credentials(&self.amqp, &self.user, &self.password)
    }

    pub fn admin(&self) -> anyhow::Result<BrokerAdmin> {
        Ok(BrokerAdmin::new(
            &self.mgmt,
            &self.user,
            &self.password,
            "/",
        )?)
    }

    /// A management API GET, parsed.
    pub fn mgmt_get(&self, path: &str) -> anyhow::Result<Value> {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let auth = comodit_bus::admin::basic_auth(&self.user, &self.password);
        let mut r = http
            .get(format!("{}{path}", self.mgmt.trim_end_matches('/')))
            .header("Authorization", &auth)
            .call()
            .with_context(|| format!("GET {path}"))?;
        let bytes = r.body_mut().with_config().limit(256 << 20).read_to_vec()?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// A fresh prefix for one run.
pub fn run_prefix() -> String {
    format!("lt{:08x}", rand::thread_rng().gen::<u32>())
}

/// Whether `p` is of the form [`run_prefix`] makes.
pub fn is_run_prefix(p: &str) -> bool {
    p.len() == 10 && p.starts_with("lt") && p[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// A child process killed (SIGKILL) when dropped.
pub struct NodeProc {
    pub id: u64,
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The extra environment it was started with (a restart gives it again).
    extra: Vec<(String, String)>,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The CPUs the node may run on, as the kernel has them (`Cpus_allowed_list`).
    pub fn cpus_allowed(&self) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_owned())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How to start nodes.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub bin: PathBuf,
    pub n_shards: u32,
    /// The agents' routed heartbeat period the node expects (its offline sweep).
    pub heartbeat_s: u64,
    pub command_timeout_s: u64,
    pub log: String,
    /// Extra `COMODIT_*` variables.
    pub env: Vec<(String, String)>,
    /// CPUs the node may run on (a `taskset -c` list), e.g. to give it a core of its own.
    pub cpus: Option<String>,
}

/// A loopback port free now and never handed out before by this process: the kernel may give a
/// released port again at once, and the failover scenario picks its Raft ports before the nodes'
/// API ports.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if given.insert(port) {
            return Ok(port);
        }
    }
}

/// Starts one node and waits (≤ 60 s) for `/healthz`.
pub fn spawn_node(
    id: u64,
    work: &Path,
    prefix: &str,
    broker: &Broker,
    opts: &NodeOptions,
    extra: &[(String, String)],
) -> anyhow::Result<NodeProc> {
    let dir = work.join(format!("node{id}"));
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let log = dir.join("node.log");
    std::fs::File::create(&log)?;
    start_node(id, dir, port, log, prefix, broker, opts, extra)
}

/// Starts a stopped node again on its data directory and port; its log goes on in the same file.
pub fn restart_node(
    node: &mut NodeProc,
    prefix: &str,
    broker: &Broker,
    opts: &NodeOptions,
) -> anyhow::Result<()> {
    node.stop(Duration::from_secs(30));
    let fresh = start_node(
        node.id,
        node.dir.clone(),
        node.port,
        node.log.clone(),
        prefix,
        broker,
        opts,
        &node.extra,
    )?;
    *node = fresh;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_node(
    id: u64,
    dir: PathBuf,
    port: u16,
    log: PathBuf,
    prefix: &str,
    broker: &Broker,
    opts: &NodeOptions,
    extra: &[(String, String)],
) -> anyhow::Result<NodeProc> {
    let out = std::fs::OpenOptions::new().append(true).open(&log)?;
    if !opts.bin.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p comodit-node) or pass --node-bin",
            opts.bin.display()
        );
    }
    let mut cmd = match &opts.cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(&opts.bin);
            c
        }
        None => Command::new(&opts.bin),
    };
    let child = cmd
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("COMODIT_LISTEN", format!("127.0.0.1:{port}"))
        .env("COMODIT_DATA_DIR", dir.join("data"))
        .env("COMODIT_PREFIX", prefix)
        .env("COMODIT_BROKER_URL", broker.admin_url())
        .env("COMODIT_MGMT_URL", &broker.mgmt)
        .env("COMODIT_MGMT_USER", &broker.user)
        .env("COMODIT_MGMT_PASSWORD", &broker.password)
        .env("COMODIT_N_SHARDS", opts.n_shards.to_string())
        .env("COMODIT_HEARTBEAT_S", opts.heartbeat_s.max(1).to_string())
        .env(
            "COMODIT_COMMAND_TIMEOUT_S",
            opts.command_timeout_s.to_string(),
        )
        .env("COMODIT_ENROLL_USER", enroll_user(prefix))
        .env("COMODIT_ENROLL_PASSWORD", ENROLL_PASSWORD)
        .env("COMODIT_LOG", &opts.log)
        .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", opts.bin.display()))?;
    let mut node = NodeProc {
        id,
        child: Some(child),
        port,
        dir,
        log,
        extra: extra.to_vec(),
    };
    let http = http(Duration::from_secs(2));
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(node.url("/healthz")).call() {
            if r.status().as_u16() == 200 {
                return Ok(node);
            }
        }
        if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
            bail!(
                "node {id} exited with {status}; log {}:\n{}",
                node.log.display(),
                tail(&node.log)
            );
        }
        if Instant::now() > until {
            bail!(
                "node {id} not healthy within 60 s; log {}",
                node.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub const ENROLL_PASSWORD: &str = "loadtest-enroll";

pub fn enroll_user(prefix: &str) -> String {
    format!("{prefix}-enroll")
}

pub fn fleet_user(prefix: &str) -> String {
    format!("{prefix}-fleet")
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub fn http(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_idle_connections(1024)
        .max_idle_connections_per_host(1024)
        .build()
        .into()
}

type AsyncHttp = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<hyper::body::Bytes>,
>;

/// The node's REST API with the admin token.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub auth: String,
    pub http: ureq::Agent,
    /// For the waves: thousands of requests in flight on the runtime's own threads, where the
    /// blocking client needs a thread per request (and their wake-ups take CPU from the broker).
    pub client: AsyncHttp,
}

impl Api {
    pub fn new(node: &NodeProc, token: &str) -> Api {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(4096)
                .build_http();
        Api {
            base: format!("http://127.0.0.1:{}", node.port),
            auth: format!("Bearer {token}"),
            http: http(Duration::from_secs(120)),
            client,
        }
    }

    /// [`Self::call`] on the async client; `timeout` bounds the whole exchange.
    pub async fn call_async(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Value)> {
        self.call_keyed(method, path, body, timeout, None).await
    }

    /// [`Api::call_async`] with an `Idempotency-Key`, if given.
    pub async fn call_keyed(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        use http_body_util::BodyExt;
        let payload = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", &self.auth)
            .header("content-type", "application/json");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let req = req.body(http_body_util::Full::new(hyper::body::Bytes::from(payload)))?;
        let exchange = async {
            let r = self.client.request(req).await?;
            let status = r.status().as_u16();
            let bytes = r.into_body().collect().await?.to_bytes();
            anyhow::Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("{method} {path}: no answer within {timeout:?}"))?
            .with_context(|| format!("{method} {path}"))
    }

    /// One call; returns the status and the JSON answer (`Null` if none). Transport errors are
    /// errors.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let r = match method {
            "GET" => self
                .http
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            "POST" => self
                .http
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(body.cloned().unwrap_or(json!({}))),
            "PUT" => self
                .http
                .put(&url)
                .header("Authorization", &self.auth)
                .send_json(body.cloned().unwrap_or(json!({}))),
            m => bail!("method {m}"),
        }
        .with_context(|| format!("{method} {path}"))?;
        let status = r.status().as_u16();
        let text = r.into_body().read_to_string().unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    pub fn enrollment_token(&self, uses: u64) -> anyhow::Result<String> {
        let (status, body) = self.call(
            "POST",
            "/api/v1/orgs/default/envs/default/enrollment-tokens",
            Some(&json!({"expires_in_s": 86_400, "max_uses": uses, "description": "loadtest"})),
        )?;
        if status != 201 {
            bail!("enrollment token: HTTP {status}: {body}");
        }
        Ok(body["secret"].as_str().context("no secret")?.to_owned())
    }

    /// A gauge or counter from `/metrics` (summed over its label sets).
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(parse_metric(&self.metrics_text()?, name))
    }

    /// The node's whole `/metrics` exposition.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .call()
            .context("GET /metrics")?;
        Ok(r.into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()?)
    }
}

/// Sums the samples of `name` (with any labels) in a Prometheus text exposition.
pub fn parse_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Deletes what a run created on the broker: its users (the per-host users the node made at
/// enrollment, the enrollment and fleet users) and every queue and exchange under its prefix.
/// Best effort and bounded: what fails is printed, never raised.
///
/// Users are also found by their permissions, which name the prefix: a run interrupted during
/// enrollment does not know every host the node enrolled (its replies were lost with the
/// interruption), so `users` alone would leave them behind. Queues and exchanges are listed again
/// after a pass, because a node still finishing its last requests may have made more meanwhile.
pub async fn cleanup(broker: &Broker, prefix: &str, users: Vec<String>) {
    if prefix.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut users: std::collections::BTreeSet<String> = users.into_iter().collect();
    match prefixed_users(broker, prefix).await {
        Ok(found) => users.extend(found),
        Err(e) => eprintln!("cleanup {prefix}: listing users: {e:#}"),
    }
    let users: Vec<String> = users.into_iter().collect();
    if let Ok(admin) = broker.admin() {
        for chunk in users.chunks(5000) {
            // The bulk call refuses the whole list if one user does not exist (a run that
            // failed before making it): then one by one, where a missing user is fine.
            if admin.delete_users(chunk).await.is_err() {
                for u in chunk {
                    if let Err(e) = admin.delete_user(u).await {
                        eprintln!("cleanup: deleting user {u}: {e}");
                    }
                }
            }
        }
    }
    let stop = CancellationToken::new();
    let bus = Bus::start(
        BusConfig {
            url: broker.admin_url(),
            connection_name: format!("comodit-loadtest cleanup {prefix}"),
            ..BusConfig::default()
        },
        stop.clone(),
    );
    if let Err(e) = bus.wait_connected(Duration::from_secs(20)).await {
        eprintln!("cleanup {prefix}: {e}");
        stop.cancel();
        return;
    }
    let (mut nq, mut ne, mut failed) = (0, 0, 0);
    let mut deadline: Option<Instant> = None;
    for pass in 0..3 {
        let listed = match prefixed_objects(broker, prefix).await {
            Ok(listed) => listed,
            Err(e) => {
                eprintln!("cleanup {prefix}: listing: {e:#}");
                break;
            }
        };
        if listed.queues.is_empty() && listed.exchanges.is_empty() {
            break;
        }
        // Five minutes from the first listing, and 20 ms more per queue it found: a fixed five
        // minutes left 11,814 of two 50,000-host runs' queues behind (2026-11-29), which loaded
        // the broker under every later run.
        let deadline = *deadline.get_or_insert_with(|| {
            Instant::now()
                + Duration::from_secs(300)
                + Duration::from_millis(20) * listed.queues.len() as u32
        });
        if pass > 0 {
            eprintln!(
                "cleanup {prefix}: {} queues and {} exchanges appeared meanwhile",
                listed.queues.len(),
                listed.exchanges.len()
            );
        }
        nq += listed.queues.len();
        ne += listed.exchanges.len();
        // Four channels at once: a queue deletion is a broker-side transaction, and the broker
        // has more than one core.
        let mut deletes = tokio::task::JoinSet::new();
        for part in listed.queues.chunks(listed.queues.len().div_ceil(4).max(1)) {
            deletes.spawn(delete_each(bus.clone(), part.to_vec(), Kind::Queue));
        }
        deletes.spawn(delete_each(bus.clone(), listed.exchanges, Kind::Exchange));
        let joined = tokio::time::timeout_at(deadline.into(), async {
            let mut failed = 0;
            while let Some(r) = deletes.join_next().await {
                failed += r.unwrap_or(1);
            }
            failed
        })
        .await;
        match joined {
            Ok(n) => failed += n,
            Err(_) => {
                eprintln!("cleanup {prefix}: timed out");
                break;
            }
        }
    }
    eprintln!(
        "cleanup {prefix}: {} users, {nq} queues, {ne} exchanges deleted in {:.1} s{}",
        users.len(),
        started.elapsed().as_secs_f64(),
        if failed > 0 {
            format!(", {failed} deletions FAILED")
        } else {
            String::new()
        }
    );
    stop.cancel();
}

#[derive(Clone, Copy)]
enum Kind {
    Queue,
    Exchange,
}

/// Deletes each named object on one channel, opening another after a refusal (which closes the
/// channel). Returns how many deletions failed; one failure does not stop the rest.
async fn delete_each(bus: Bus, names: Vec<String>, kind: Kind) -> usize {
    let mut failed = 0;
    let mut channel: Option<comodit_bus::lapin::Channel> = None;
    for name in &names {
        if channel.as_ref().is_none_or(|ch| !ch.status().connected()) {
            channel = bus.channel().await.ok();
        }
        let Some(ch) = channel.as_ref() else {
            failed += 1;
            continue;
        };
        let r = match kind {
            Kind::Queue => ch
                .queue_delete(name.as_str().into(), Default::default())
                .await
                .map(|_| ()),
            Kind::Exchange => {
                ch.exchange_delete(name.as_str().into(), Default::default())
                    .await
            }
        };
        if let Err(e) = r {
            failed += 1;
            eprintln!("cleanup: deleting {name}: {e}");
        }
    }
    if let Some(ch) = channel.filter(|ch| ch.status().connected()) {
        let _ = ch.close(200, "cleanup done".into()).await;
    }
    failed
}

/// The queues a load-test run left on the broker (its cleanup was interrupted or timed out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    pub prefix: String,
    pub queues: usize,
    /// Queues with a consumer: a run (or its node) still going, not to be touched.
    pub consumed: usize,
    /// Connections of the run's own users (`<prefix>-fleet`, `<prefix>-enroll`): a run still
    /// going, possibly enrolling, when its host queues have no consumer yet.
    pub connections: usize,
}

impl Leftover {
    /// Nothing of the run is connected: what is left is what its cleanup did not delete.
    pub fn idle(&self) -> bool {
        self.consumed == 0 && self.connections == 0
    }
}

/// The queues of load-test runs (`lt` and 8 hex digits, [`run_prefix`]) on the broker, by prefix.
pub async fn leftovers(broker: &Broker) -> anyhow::Result<Vec<Leftover>> {
    let b = broker.clone();
    let (queues, conns) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Value, Value)> {
        Ok((
            b.mgmt_get("/api/queues/%2F?columns=name,consumers")?,
            b.mgmt_get("/api/connections?columns=user")?,
        ))
    })
    .await??;
    Ok(group_leftovers(&queues, &conns))
}

fn group_leftovers(queues: &Value, connections: &Value) -> Vec<Leftover> {
    let mut by: std::collections::BTreeMap<&str, Leftover> = Default::default();
    for q in queues.as_array().into_iter().flatten() {
        let Some(prefix) = q["name"].as_str().and_then(|n| n.split('.').next()) else {
            continue;
        };
        if !is_run_prefix(prefix) {
            continue;
        }
        let l = by.entry(prefix).or_insert_with(|| Leftover {
            prefix: prefix.to_owned(),
            queues: 0,
            consumed: 0,
            connections: 0,
        });
        l.queues += 1;
        if q["consumers"].as_u64().unwrap_or(0) > 0 {
            l.consumed += 1;
        }
    }
    for c in connections.as_array().into_iter().flatten() {
        let user = c["user"].as_str().unwrap_or("");
        if let Some(l) = user.split('-').next().and_then(|p| by.get_mut(p)) {
            l.connections += 1;
        }
    }
    by.into_values().collect()
}

/// The queues and exchanges under a run's prefix.
struct Prefixed {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

async fn prefixed_objects(broker: &Broker, prefix: &str) -> anyhow::Result<Prefixed> {
    let b = broker.clone();
    let p = format!("{prefix}.");
    tokio::task::spawn_blocking(move || -> anyhow::Result<Prefixed> {
        let names = |kind: &str| -> anyhow::Result<Vec<String>> {
            let v = b.mgmt_get(&format!("/api/{kind}/%2F?columns=name"))?;
            Ok(v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i["name"].as_str())
                        .filter(|n| n.starts_with(&p))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default())
        };
        Ok(Prefixed {
            queues: names("queues")?,
            exchanges: names("exchanges")?,
        })
    })
    .await?
}

/// Users whose permissions name the run's prefix: the node's per-host users, the run's own users.
async fn prefixed_users(broker: &Broker, prefix: &str) -> anyhow::Result<Vec<String>> {
    let b = broker.clone();
    // Permission patterns escape the dot (`<prefix>\.agent\.<id>`); some name it plainly.
    let (plain, escaped) = (format!("{prefix}."), format!("{prefix}\\."));
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let perms = b.mgmt_get("/api/permissions")?;
        Ok(perms
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| {
                        ["configure", "write", "read"].iter().any(|k| {
                            i[*k]
                                .as_str()
                                .is_some_and(|r| r.contains(&escaped) || r.contains(&plain))
                        })
                    })
                    .filter_map(|i| i["user"].as_str())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    })
    .await?
}

/// The names of a run.
pub fn names(prefix: &str) -> anyhow::Result<Names> {
    Ok(Names::new(prefix)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_grouped_by_run_prefix() {
        let v = json!([
            {"name": "lt0123abcd.agent.x", "consumers": 0},
            {"name": "lt0123abcd.shard.1", "consumers": 1},
            {"name": "lt0123abcd.agent.y"},
            {"name": "ltzzzzzzzz.agent.x", "consumers": 0},
            {"name": "comodit.agent.x", "consumers": 0},
            {"name": "lt00000001.agent.x", "consumers": 0},
            {"name": "lt00000002.agent.x", "consumers": 0},
        ]);
        let c =
            json!([{"user": "guest"}, {"user": "lt00000002-enroll"}, {"user": "lt0123abcd-fleet"}]);
        let l = group_leftovers(&v, &c);
        let line = |l: &Leftover| {
            (
                l.prefix.clone(),
                l.queues,
                l.consumed,
                l.connections,
                l.idle(),
            )
        };
        assert_eq!(
            l.iter().map(line).collect::<Vec<_>>(),
            vec![
                ("lt00000001".into(), 1, 0, 0, true),
                // Enrolling: its host queues have no consumer yet, its enrollment user is connected.
                ("lt00000002".into(), 1, 0, 1, false),
                ("lt0123abcd".into(), 3, 1, 1, false),
            ]
        );
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP x\ncomodit_node_host_actors 12\ncomodit_node_host_actors_other 5\n\
                    comodit_node_replies_total{status=\"ok\"} 3\ncomodit_node_replies_total{status=\"failed\"} 2\n";
        assert_eq!(parse_metric(text, "comodit_node_host_actors"), 12.0);
        assert_eq!(parse_metric(text, "comodit_node_replies_total"), 5.0);
        assert_eq!(parse_metric(text, "missing"), 0.0);
    }
}
