//! `comodit`: the command-line client of the REST API. Every verb is one API call; responses are
//! printed as JSON on stdout, problems (RFC 9457) on stderr with a non-zero exit code.

use std::io::{BufRead, BufReader};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "comodit",
    version,
    about = "Manage hosts through a comodit node"
)]
struct Cli {
    /// The node's API.
    #[arg(long, env = "COMODIT_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token (prefer --token-file or COMODIT_TOKEN_FILE: flags show in `ps`).
    #[arg(long, env = "COMODIT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (e.g. the node's admin-token file).
    #[arg(long, env = "COMODIT_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Sent with a POST as its `Idempotency-Key`: run the same command again with the same key
    /// (after a timeout, say) and the node answers with the first outcome instead of running it
    /// twice, for 24 hours and from any node of a cluster.
    #[arg(long, env = "COMODIT_IDEMPOTENCY_KEY")]
    idempotency_key: Option<String>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Organizations.
    #[command(subcommand)]
    Orgs(Orgs),
    /// Environments of an organization.
    #[command(subcommand)]
    Envs(Envs),
    /// Hosts.
    #[command(subcommand)]
    Hosts(Hosts),
    /// A host's resources, through its agent.
    #[command(subcommand)]
    Resources(Resources),
    /// Run a program on a host: `comodit run HOST -- ARGV...`.
    Run {
        host: String,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Return at once with the change to follow.
        #[arg(long = "async")]
        asynchronous: bool,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// A host's change log.
    #[command(subcommand)]
    Changes(Changes),
    /// Jobs: one command to many hosts of an organization.
    #[command(subcommand)]
    Jobs(Jobs),
    /// Enrollment tokens.
    #[command(subcommand)]
    EnrollTokens(EnrollTokens),
    /// API tokens (admin).
    #[command(subcommand)]
    Tokens(Tokens),
    /// Stream node events (host online/offline, change status, drift) until interrupted.
    Events,
    /// The cluster: `comodit cluster` shows nodes, roles, leader, term, leases and shards.
    Cluster {
        #[command(subcommand)]
        verb: Option<ClusterVerb>,
    },
    /// The audit log (admin).
    Audit {
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClusterVerb {
    /// Nodes, roles, leader, term, leases and the shard table (the default).
    Status,
    /// The shard table: each shard's owner and epoch.
    Shards,
    /// Admit a node (admin); start it with `comodit-node --join <member raft addr>`.
    Join {
        /// Its Raft id (positive, never used before).
        id: u64,
        /// The ip:port its Raft transport listens on.
        addr: String,
    },
    /// Hand a node's shards off, then remove it from the cluster (admin); its process exits.
    Decommission { id: u64 },
}

#[derive(Subcommand)]
enum Orgs {
    List,
    Create { name: String },
    Get { org: String },
    Delete { org: String },
}

#[derive(Subcommand)]
enum Envs {
    List { org: String },
    Create { org: String, name: String },
    Delete { org: String, env: String },
}

#[derive(Subcommand)]
enum Hosts {
    /// List hosts, with optional filters.
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        env: Option<String>,
        /// key=value
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        online: Option<bool>,
        /// fact=value
        #[arg(long)]
        fact: Option<String>,
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    Get {
        host: String,
    },
    Facts {
        host: String,
    },
    Compliance {
        host: String,
    },
    /// Set labels (key=value; key= removes).
    Label {
        host: String,
        labels: Vec<String>,
    },
    /// Revoke: delete the host's broker user, queue and records.
    Revoke {
        host: String,
    },
}

#[derive(Subcommand)]
enum Resources {
    List {
        host: String,
        collection: String,
        /// For files, directories and symlinks: the directory to list.
        #[arg(long)]
        under: Option<String>,
    },
    Get {
        host: String,
        collection: String,
        id: String,
    },
    /// Apply a spec: `--spec '{"content":"hi\n","mode":"0644"}'` or `--spec @file.json`. The
    /// resource is also monitored (compliance) unless `--no-monitor`.
    Put {
        host: String,
        collection: String,
        id: String,
        #[arg(long)]
        spec: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(long = "async")]
        asynchronous: bool,
        /// Do not add the resource to the host's monitored baseline.
        #[arg(long)]
        no_monitor: bool,
    },
    Delete {
        host: String,
        collection: String,
        id: String,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum Changes {
    List { host: String },
    Get { host: String, change: String },
    Cancel { host: String, change: String },
}

#[derive(Subcommand)]
enum Jobs {
    /// Run a program on every host the target matches:
    /// `comodit jobs run ORG [--env E] [--label k=v] [--host ID]... -- ARGV...`.
    Run {
        org: String,
        #[command(flatten)]
        target: JobTarget,
        #[command(flatten)]
        rate: JobRate,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Ask every host the target matches to answer (`ping`), collect facts or run compliance.
    Send {
        org: String,
        /// `ping`, `facts` or `check`.
        command: String,
        #[command(flatten)]
        target: JobTarget,
        #[command(flatten)]
        rate: JobRate,
    },
    /// The organization's jobs, newest first.
    List {
        org: String,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// A job and how many of its hosts are where.
    Get { org: String, job: String },
    /// The job's hosts, each with its change and status.
    Hosts {
        org: String,
        job: String,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel the job's changes that are still queued.
    Cancel { org: String, job: String },
}

#[derive(clap::Args)]
struct JobTarget {
    /// Only hosts of this environment.
    #[arg(long)]
    env: Option<String>,
    /// Only hosts with this label (`key=value`).
    #[arg(long)]
    label: Option<String>,
    /// Only these hosts (repeat).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

impl JobTarget {
    fn json(&self) -> Value {
        let mut t = serde_json::Map::new();
        if let Some(e) = &self.env {
            t.insert("env".into(), json!(e));
        }
        if let Some(l) = &self.label {
            t.insert("label".into(), json!(l));
        }
        if !self.hosts.is_empty() {
            t.insert("hosts".into(), json!(self.hosts));
        }
        Value::Object(t)
    }
}

/// How fast a job goes out, and when it stops.
#[derive(clap::Args)]
struct JobRate {
    /// At most this many hosts with the command pending at once; the rest follow as hosts answer.
    #[arg(long)]
    max_concurrency: Option<u64>,
    /// Stop once more than this many hosts failed: no more hosts get the command.
    #[arg(long)]
    max_errors: Option<u64>,
}

impl JobRate {
    /// The job request: target, command and whichever limits are set.
    fn request(&self, target: &JobTarget, command: Value) -> Value {
        let mut r = json!({"target": target.json(), "command": command});
        if let Some(n) = self.max_concurrency {
            r["max_concurrency"] = json!(n);
        }
        if let Some(n) = self.max_errors {
            r["max_errors"] = json!(n);
        }
        r
    }
}

#[derive(Subcommand)]
enum EnrollTokens {
    Create {
        org: String,
        env: String,
        #[arg(long, default_value_t = 86_400)]
        expires_in_s: u64,
        #[arg(long)]
        max_uses: Option<u32>,
        #[arg(long, default_value = "")]
        description: String,
    },
    List {
        org: String,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum Tokens {
    Create {
        name: String,
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    List,
    Revoke {
        id: String,
    },
}

struct Api {
    base: String,
    token: String,
    idempotency_key: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{}", self.base.trim_end_matches('/'), path);
        let auth = format!("Bearer {}", self.token);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (m, body) => {
                let body = body.unwrap_or(json!({}));
                let req = match (m, &self.idempotency_key) {
                    ("POST", Some(key)) => self.agent.post(&url).header("Idempotency-Key", key),
                    ("POST", None) => self.agent.post(&url),
                    ("PUT", _) => self.agent.put(&url),
                    ("PATCH", _) => self.agent.patch(&url),
                    (other, _) => bail!("unsupported method {other}"),
                };
                req.header("Authorization", &auth).send_json(&body)
            }
        }
        .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response.into_body().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let detail = value
                .get("detail")
                .or_else(|| value.get("title"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            bail!("{status}: {detail}");
        }
        Ok(value)
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The resource path: path ids keep their slashes (`/hosts/H/resources/files/etc/motd`).
fn resource_path(host: &str, collection: &str, id: &str) -> String {
    if id.starts_with('/') {
        format!(
            "/hosts/{}/resources/{}{}",
            enc(host),
            enc(collection),
            id.split('/').map(enc).collect::<Vec<_>>().join("/")
        )
    } else {
        format!(
            "/hosts/{}/resources/{}/{}",
            enc(host),
            enc(collection),
            enc(id)
        )
    }
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn read_spec(spec: &str) -> anyhow::Result<Value> {
    let text = match spec.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => spec.to_owned(),
    };
    serde_json::from_str(&text).context("the spec is not JSON")
}

fn run(cli: Cli) -> anyhow::Result<Option<Value>> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => {
            bail!("no token: pass --token-file (or COMODIT_TOKEN_FILE) or COMODIT_TOKEN")
        }
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let api = Api {
        base: cli.url.clone(),
        token,
        idempotency_key: cli.idempotency_key.clone(),
        agent,
    };
    let out = match cli.verb {
        Verb::Orgs(Orgs::List) => api.call("GET", "/orgs", None)?,
        Verb::Orgs(Orgs::Create { name }) => api.call("POST", "/orgs", Some(json!({"name": name})))?,
        Verb::Orgs(Orgs::Get { org }) => api.call("GET", &format!("/orgs/{}", enc(&org)), None)?,
        Verb::Orgs(Orgs::Delete { org }) => {
            api.call("DELETE", &format!("/orgs/{}", enc(&org)), None)?
        }
        Verb::Envs(Envs::List { org }) => {
            api.call("GET", &format!("/orgs/{}/envs", enc(&org)), None)?
        }
        Verb::Envs(Envs::Create { org, name }) => api.call(
            "POST",
            &format!("/orgs/{}/envs", enc(&org)),
            Some(json!({"name": name})),
        )?,
        Verb::Envs(Envs::Delete { org, env }) => api.call(
            "DELETE",
            &format!("/orgs/{}/envs/{}", enc(&org), enc(&env)),
            None,
        )?,
        Verb::Hosts(Hosts::List {
            org,
            env,
            label,
            online,
            fact,
            cursor,
            limit,
        }) => api.call(
            "GET",
            &format!(
                "/hosts{}",
                query(&[
                    ("org", org),
                    ("env", env),
                    ("label", label),
                    ("online", online.map(|b| b.to_string())),
                    ("fact", fact),
                    ("cursor", cursor),
                    ("limit", limit.map(|l| l.to_string())),
                ])
            ),
            None,
        )?,
        Verb::Hosts(Hosts::Get { host }) => api.call("GET", &format!("/hosts/{}", enc(&host)), None)?,
        Verb::Hosts(Hosts::Facts { host }) => {
            api.call("GET", &format!("/hosts/{}/facts", enc(&host)), None)?
        }
        Verb::Hosts(Hosts::Compliance { host }) => {
            api.call("GET", &format!("/hosts/{}/compliance", enc(&host)), None)?
        }
        Verb::Hosts(Hosts::Label { host, labels }) => {
            // A merge patch of the labels (`key=` removes one), guarded by the ETag just read.
            let url = format!("{}/api/v1/hosts/{}", api.base.trim_end_matches('/'), enc(&host));
            let auth = format!("Bearer {}", api.token);
            let current = api.agent.get(&url).header("Authorization", &auth).call()?;
            if current.status().as_u16() >= 400 {
                bail!("{}: cannot read the host", current.status());
            }
            let etag = current
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .context("the API sent no ETag")?
                .to_owned();
            let mut patch = serde_json::Map::new();
            for l in labels {
                let (k, v) = l.split_once('=').context("labels are key=value")?;
                let value = if v.is_empty() { Value::Null } else { Value::String(v.to_owned()) };
                patch.insert(k.to_owned(), value);
            }
            let response = api
                .agent
                .patch(&url)
                .header("Authorization", &auth)
                .header("If-Match", &etag)
                .send_json(json!({"labels": patch}))?;
            let status = response.status().as_u16();
            let body: Value = response.into_body().read_json().unwrap_or(Value::Null);
            if status >= 400 {
                bail!("{status}: {}", body.get("detail").and_then(Value::as_str).unwrap_or(""));
            }
            body
        }
        Verb::Hosts(Hosts::Revoke { host }) => {
            api.call("DELETE", &format!("/hosts/{}", enc(&host)), None)?
        }
        Verb::Resources(Resources::List {
            host,
            collection,
            under,
        }) => api.call(
            "GET",
            &format!(
                "/hosts/{}/resources/{}{}",
                enc(&host),
                enc(&collection),
                query(&[("under", under)])
            ),
            None,
        )?,
        Verb::Resources(Resources::Get {
            host,
            collection,
            id,
        }) => api.call("GET", &resource_path(&host, &collection, &id), None)?,
        Verb::Resources(Resources::Put {
            host,
            collection,
            id,
            spec,
            dry_run,
            asynchronous,
            no_monitor,
        }) => api.call(
            "PUT",
            &format!(
                "{}{}",
                resource_path(&host, &collection, &id),
                query(&[
                    ("dry_run", dry_run.then(|| "true".into())),
                    ("async", asynchronous.then(|| "true".into())),
                ])
            ),
            Some(json!({"spec": read_spec(&spec)?, "monitor": !no_monitor})),
        )?,
        Verb::Resources(Resources::Delete {
            host,
            collection,
            id,
            dry_run,
        }) => api.call(
            "DELETE",
            &format!(
                "{}{}",
                resource_path(&host, &collection, &id),
                query(&[("dry_run", dry_run.then(|| "true".into()))])
            ),
            None,
        )?,
        Verb::Run {
            host,
            timeout_s,
            asynchronous,
            argv,
        } => api.call(
            "POST",
            &format!(
                "/hosts/{}/run{}",
                enc(&host),
                query(&[("async", asynchronous.then(|| "true".into()))])
            ),
            Some(json!({"argv": argv, "timeout_s": timeout_s})),
        )?,
        Verb::Jobs(Jobs::Run {
            org,
            target,
            rate,
            timeout_s,
            argv,
        }) => api.call(
            "POST",
            &format!("/orgs/{}/jobs", enc(&org)),
            Some(rate.request(
                &target,
                json!({"run": {"argv": argv, "timeout_s": timeout_s}}),
            )),
        )?,
        Verb::Jobs(Jobs::Send {
            org,
            command,
            target,
            rate,
        }) => api.call(
            "POST",
            &format!("/orgs/{}/jobs", enc(&org)),
            Some(rate.request(&target, json!(command))),
        )?,
        Verb::Jobs(Jobs::List { org, cursor }) => api.call(
            "GET",
            &format!("/orgs/{}/jobs{}", enc(&org), query(&[("cursor", cursor)])),
            None,
        )?,
        Verb::Jobs(Jobs::Get { org, job }) => {
            api.call("GET", &format!("/orgs/{}/jobs/{}", enc(&org), enc(&job)), None)?
        }
        Verb::Jobs(Jobs::Hosts { org, job, cursor }) => api.call(
            "GET",
            &format!(
                "/orgs/{}/jobs/{}/hosts{}",
                enc(&org),
                enc(&job),
                query(&[("cursor", cursor)])
            ),
            None,
        )?,
        Verb::Jobs(Jobs::Cancel { org, job }) => api.call(
            "POST",
            &format!("/orgs/{}/jobs/{}/cancel", enc(&org), enc(&job)),
            None,
        )?,
        Verb::Changes(Changes::List { host }) => {
            api.call("GET", &format!("/hosts/{}/changes", enc(&host)), None)?
        }
        Verb::Changes(Changes::Get { host, change }) => api.call(
            "GET",
            &format!("/hosts/{}/changes/{}", enc(&host), enc(&change)),
            None,
        )?,
        Verb::Changes(Changes::Cancel { host, change }) => api.call(
            "POST",
            &format!("/hosts/{}/changes/{}/cancel", enc(&host), enc(&change)),
            None,
        )?,
        Verb::EnrollTokens(EnrollTokens::Create {
            org,
            env,
            expires_in_s,
            max_uses,
            description,
        }) => api.call(
            "POST",
            &format!("/orgs/{}/envs/{}/enrollment-tokens", enc(&org), enc(&env)),
            Some(json!({"expires_in_s": expires_in_s, "max_uses": max_uses, "description": description})),
        )?,
        Verb::EnrollTokens(EnrollTokens::List { org }) => api.call(
            "GET",
            &format!("/orgs/{}/enrollment-tokens", enc(&org)),
            None,
        )?,
        Verb::EnrollTokens(EnrollTokens::Revoke { id }) => {
            api.call("DELETE", &format!("/enrollment-tokens/{}", enc(&id)), None)?
        }
        Verb::Tokens(Tokens::Create { name, role }) => api.call(
            "POST",
            "/tokens",
            Some(json!({"name": name, "role": role})),
        )?,
        Verb::Tokens(Tokens::List) => api.call("GET", "/tokens", None)?,
        Verb::Tokens(Tokens::Revoke { id }) => {
            api.call("DELETE", &format!("/tokens/{}", enc(&id)), None)?
        }
        Verb::Cluster { verb } => match verb.unwrap_or(ClusterVerb::Status) {
            ClusterVerb::Status => api.call("GET", "/cluster", None)?,
            ClusterVerb::Shards => api.call("GET", "/cluster/shards", None)?,
            ClusterVerb::Join { id, addr } => api.call(
                "POST",
                "/cluster/nodes",
                Some(json!({"id": id, "addr": addr})),
            )?,
            ClusterVerb::Decommission { id } => {
                api.call("POST", &format!("/cluster/nodes/{id}/decommission"), None)?
            }
        },
        Verb::Audit { cursor } => api.call(
            "GET",
            &format!("/audit{}", query(&[("cursor", cursor)])),
            None,
        )?,
        Verb::Events => {
            let url = format!("{}/api/v1/events", api.base.trim_end_matches('/'));
            let response = api
                .agent
                .get(&url)
                .header("Authorization", &format!("Bearer {}", api.token))
                .header("Accept", "text/event-stream")
                .call()?;
            if response.status().as_u16() >= 400 {
                bail!("{}", response.status());
            }
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let line = line?;
                if let Some(data) = line.strip_prefix("data:") {
                    println!("{}", data.trim());
                }
            }
            return Ok(None);
        }
    };
    Ok(Some(out))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Some(v)) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_keep_slashes_of_path_ids() {
        assert_eq!(
            resource_path("h", "files", "/etc/motd"),
            "/hosts/h/resources/files/etc/motd"
        );
        assert_eq!(
            resource_path("h", "files", "/a b/c"),
            "/hosts/h/resources/files/a%20b/c"
        );
        assert_eq!(
            resource_path("h", "packages", "libstdc++6"),
            "/hosts/h/resources/packages/libstdc%2B%2B6"
        );
    }

    #[test]
    fn queries_skip_absent_values() {
        assert_eq!(query(&[("a", None), ("b", Some("x=y".into()))]), "?b=x%3Dy");
        assert_eq!(query(&[("a", None)]), "");
    }

    #[test]
    fn the_cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
