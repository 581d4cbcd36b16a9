//! The executor: turns a command into a reply.
//!
//! ```text
//! bytes ─► decode ─► host check ─► dedup window ─► expiry ─► epoch fence ─► op ─► reply (recorded)
//! ```
//! Every refusal is a `rejected` (or `expired`) reply with a reason, counted in
//! `comodit_agent_rejected_total{reason}`, and changes nothing. Replies are recorded in the local
//! store before they are returned, so a redelivered command gets the same reply without running again.
//!
//! Resource-changing work (apply, remove, set_desired, compliance repairs) holds one lock, so one
//! resource is never changed by two things at once; `run`, `read`, `facts` and `ping` do not wait for it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use comodit_protocol::{
    ApplyMode, Body, Collection, Command, CommandId, Ensure, HostId, Output, PackageEnsure,
    PackageSpec, Refresh, Reply, ReplyData, Resource, ResourceRef, ResourceResult, ServiceSpec,
    Spec, Status, Up, V1,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::platform::Platform;
use crate::providers::cmd::{Runner, SystemRunner};
use crate::providers::{self, Change, Provider, ProviderError};
use crate::state::{LocalStore, Seen};
use crate::stats::Stats;

/// Every collection's provider for this host.
pub struct Providers {
    map: HashMap<Collection, Box<dyn Provider>>,
}

impl Providers {
    /// The providers for `platform`. `system_root` relocates users, groups and repos (their
    /// configuration files) under another root, e.g. a throwaway root in tests; files, directories and
    /// symlinks always use the absolute paths they are given.
    pub fn for_host(
        platform: &Platform,
        runner: Arc<dyn Runner>,
        system_root: Option<PathBuf>,
    ) -> Self {
        let mut map: HashMap<Collection, Box<dyn Provider>> = HashMap::new();
        map.insert(
            Collection::Files,
            Box::new(providers::files::FileProvider::new()),
        );
        map.insert(
            Collection::Directories,
            Box::new(providers::files::DirectoryProvider::new()),
        );
        map.insert(
            Collection::Symlinks,
            Box::new(providers::files::SymlinkProvider::new()),
        );
        map.insert(
            Collection::Packages,
            providers::packages::for_platform(platform, runner.clone()),
        );
        map.insert(
            Collection::Repos,
            providers::repos::for_platform(
                platform,
                runner.clone(),
                system_root.clone().unwrap_or_else(|| PathBuf::from("/")),
            ),
        );
        map.insert(
            Collection::Services,
            providers::services::for_platform(platform, runner.clone()),
        );
        map.insert(
            Collection::Users,
            Box::new(providers::users::UserProvider::new(
                runner.clone(),
                system_root.clone(),
            )),
        );
        map.insert(
            Collection::Groups,
            Box::new(providers::users::GroupProvider::new(runner, system_root)),
        );
        Providers { map }
    }

    pub fn get(&self, c: Collection) -> &dyn Provider {
        self.map
            .get(&c)
            .map(|b| b.as_ref())
            .expect("every collection has a provider")
    }
}

/// The spec that makes a resource absent (`remove`): services are stopped and disabled.
pub fn absent_spec(collection: Collection) -> Spec {
    match collection {
        Collection::Files => Spec::File(comodit_protocol::FileSpec {
            ensure: Ensure::Absent,
            ..Default::default()
        }),
        Collection::Directories => Spec::Directory(comodit_protocol::DirectorySpec {
            ensure: Ensure::Absent,
            ..Default::default()
        }),
        Collection::Symlinks => Spec::Symlink(comodit_protocol::SymlinkSpec {
            ensure: Ensure::Absent,
            ..Default::default()
        }),
        Collection::Packages => Spec::Package(PackageSpec {
            ensure: PackageEnsure::Absent,
            version: None,
        }),
        Collection::Repos => Spec::Repo(comodit_protocol::RepoSpec {
            ensure: Ensure::Absent,
            ..Default::default()
        }),
        Collection::Services => Spec::Service(ServiceSpec {
            running: Some(false),
            enabled: Some(false),
            refresh: Refresh::Restart,
        }),
        Collection::Users => Spec::User(comodit_protocol::UserSpec {
            ensure: Ensure::Absent,
            ..Default::default()
        }),
        Collection::Groups => Spec::Group(comodit_protocol::GroupSpec {
            ensure: Ensure::Absent,
            ..Default::default()
        }),
    }
}

fn result_of(r: &ResourceRef, outcome: Result<Change, ProviderError>) -> ResourceResult {
    match outcome {
        Ok(change) => ResourceResult {
            r#ref: r.clone(),
            changed: change.changed,
            diff: change.diff,
            error: None,
            skipped: false,
        },
        Err(e) => ResourceResult {
            r#ref: r.clone(),
            changed: false,
            diff: vec![],
            error: Some(e.to_string()),
            skipped: false,
        },
    }
}

/// Applies `resources` in order, stopping at the first failure (the rest are reported `skipped`),
/// then refreshes the services notified by resources that changed. Returns the results and whether
/// all succeeded. Blocking: call from a blocking thread.
pub fn apply_resources(
    providers: &Providers,
    resources: &[Resource],
    mode: ApplyMode,
) -> (Vec<ResourceResult>, bool) {
    let mut results = Vec::with_capacity(resources.len());
    let mut failed = false;
    let mut to_refresh: Vec<ResourceRef> = Vec::new();
    for res in resources {
        if failed {
            results.push(ResourceResult {
                r#ref: res.r#ref.clone(),
                changed: false,
                diff: vec![],
                error: None,
                skipped: true,
            });
            continue;
        }
        let outcome = providers
            .get(res.r#ref.collection)
            .apply(&res.r#ref.id, &res.spec, mode);
        let result = result_of(&res.r#ref, outcome);
        if result.error.is_some() {
            tracing::warn!(resource = %res.r#ref, error = result.error.as_deref(), "resource failed");
            failed = true;
        } else if result.changed {
            for n in &res.notify {
                if !to_refresh.contains(n) {
                    to_refresh.push(n.clone());
                }
            }
        }
        results.push(result);
    }
    for service in to_refresh {
        if failed {
            results.push(ResourceResult {
                r#ref: service,
                changed: false,
                diff: vec![],
                error: None,
                skipped: true,
            });
            continue;
        }
        // The service's own spec in this list says restart or reload; restart by default.
        let how = resources
            .iter()
            .find_map(|r| match (r.r#ref == service, &r.spec) {
                (true, Spec::Service(s)) => Some(s.refresh),
                _ => None,
            })
            .unwrap_or_default();
        // The provider reports the refresh in its diff (and nothing for a stopped service).
        let outcome = providers
            .get(Collection::Services)
            .refresh(&service.id, how, mode);
        let result = result_of(&service, outcome);
        failed |= result.error.is_some();
        results.push(result);
    }
    (results, !failed)
}

/// Merges `added` into `baseline`: same refs are replaced in place, new ones appended.
pub fn merge_baseline(baseline: &mut Vec<Resource>, added: &[Resource]) {
    for r in added {
        match baseline.iter_mut().find(|b| b.r#ref == r.r#ref) {
            Some(slot) => *slot = r.clone(),
            None => baseline.push(r.clone()),
        }
    }
}

/// What the executor needs to run.
pub struct Executor {
    pub host: HostId,
    pub platform: Platform,
    pub providers: Arc<Providers>,
    pub store: Arc<LocalStore>,
    pub stats: Arc<Stats>,
    /// Events (drift, output) to publish.
    pub events: mpsc::Sender<Up>,
    /// Held by anything that changes resources: commands and compliance repairs.
    pub apply_lock: tokio::sync::Mutex<()>,
    /// Wakes the compliance loop (after `set_desired` or a monitored apply).
    pub compliance_kick: tokio::sync::Notify,
    /// Commands executing now: a redelivery of one of them (the node re-sends after its timeout
    /// while a long `run` is still going) is not answered; the real reply follows.
    inflight: std::sync::Mutex<std::collections::HashSet<CommandId>>,
    pub shutdown: CancellationToken,
}

/// The capabilities an agent advertises: its collections and ops.
pub fn capabilities() -> Vec<String> {
    let mut caps: Vec<String> = Collection::ALL.iter().map(|c| c.to_string()).collect();
    caps.extend(
        [
            "op:apply",
            "op:remove",
            "op:read",
            "op:list",
            "op:run",
            "op:facts",
            "op:check",
            "op:ping",
            "op:set_desired",
        ]
        .map(String::from),
    );
    caps
}

impl Executor {
    pub fn new(
        host: HostId,
        platform: Platform,
        providers: Providers,
        store: LocalStore,
        stats: Arc<Stats>,
        events: mpsc::Sender<Up>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Executor {
            host,
            platform,
            providers: Arc::new(providers),
            store: Arc::new(store),
            stats,
            events,
            apply_lock: tokio::sync::Mutex::new(()),
            compliance_kick: tokio::sync::Notify::new(),
            inflight: Default::default(),
            shutdown,
        })
    }

    /// Builds providers for this machine with the real tool runner.
    pub fn system_providers(platform: &Platform, system_root: Option<PathBuf>) -> Providers {
        Providers::for_host(platform, Arc::new(SystemRunner), system_root)
    }

    fn reply(&self, re: Option<CommandId>, status: Status, reason: Option<String>) -> Reply {
        let now = Utc::now();
        Reply {
            v: V1,
            re,
            host: self.host,
            status,
            reason,
            results: vec![],
            data: None,
            started_at: now,
            finished_at: now,
        }
    }

    fn rejected(&self, re: Option<CommandId>, label: &str, reason: String) -> Reply {
        self.stats.inc("rejected", &[("reason", label)]);
        tracing::warn!(command_id = ?re, reason = %reason, "command rejected");
        self.reply(re, Status::Rejected, Some(reason))
    }

    /// Handles one delivery's body and returns the reply to publish (for a message that is not even
    /// JSON, `re` is absent). `None` only for a redelivery of a command still executing here.
    pub async fn handle(self: &Arc<Self>, bytes: &[u8]) -> Option<Reply> {
        let cmd = match Command::decode(bytes) {
            Ok(cmd) => cmd,
            Err(e) => {
                // Best effort to name the command in the refusal, so the sender can match it.
                let re = serde_json::from_slice::<serde_json::Value>(bytes)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str()?.parse().ok());
                return Some(self.rejected(re, e.label(), e.to_string()));
            }
        };
        self.handle_command(cmd).await
    }

    /// Handles a decoded command: host check, dedup, expiry, epoch fence, then the op. `None` when
    /// the same command is executing right now (its reply is on the way).
    pub async fn handle_command(self: &Arc<Self>, cmd: Command) -> Option<Reply> {
        if !self.inflight.lock().unwrap().insert(cmd.id) {
            self.stats.inc("duplicates", &[]);
            tracing::info!(command_id = %cmd.id, "redelivered while executing; the reply will follow");
            return None;
        }
        let id = cmd.id;
        let reply = self.handle_fresh(cmd).await;
        self.inflight.lock().unwrap().remove(&id);
        Some(reply)
    }

    async fn handle_fresh(self: &Arc<Self>, cmd: Command) -> Reply {
        let span = tracing::info_span!("command", command_id = %cmd.id, host_id = %self.host,
            epoch = cmd.epoch.0, op = cmd.body.op());
        let _guard = span.enter();
        if cmd.host != self.host {
            return self.rejected(
                Some(cmd.id),
                "wrong_host",
                format!("command is for host {}, this is {}", cmd.host, self.host),
            );
        }
        match self.store.seen(cmd.id) {
            Ok(Seen::Done(reply)) => {
                self.stats.inc("duplicates", &[]);
                tracing::info!("duplicate command answered from the dedup window");
                return *reply;
            }
            Ok(Seen::Interrupted) => {
                self.stats.inc("duplicates", &[]);
                let reply = self.reply(
                    Some(cmd.id),
                    Status::Failed,
                    Some("the agent stopped while executing this command; its outcome is unknown and it was not run again".into()),
                );
                self.record(cmd.id, &reply);
                return reply;
            }
            Ok(Seen::New) => {}
            Err(e) => {
                return self.reply(
                    Some(cmd.id),
                    Status::Failed,
                    Some(format!("local store: {e}")),
                );
            }
        }
        if Utc::now() > cmd.expires_at {
            self.stats.inc("rejected", &[("reason", "expired")]);
            let reply = self.reply(
                Some(cmd.id),
                Status::Expired,
                Some(format!("expired at {}", cmd.expires_at.to_rfc3339())),
            );
            self.record(cmd.id, &reply);
            return reply;
        }
        match self.store.accept_epoch(cmd.epoch) {
            Ok(Ok(())) => {}
            Ok(Err(highest)) => {
                let reply = self.rejected(
                    Some(cmd.id),
                    "stale_epoch",
                    format!("stale epoch {} < {}", cmd.epoch, highest),
                );
                self.record(cmd.id, &reply);
                return reply;
            }
            Err(e) => {
                return self.reply(
                    Some(cmd.id),
                    Status::Failed,
                    Some(format!("local store: {e}")),
                );
            }
        }
        if let Err(e) = self.store.mark_started(cmd.id) {
            return self.reply(
                Some(cmd.id),
                Status::Failed,
                Some(format!("local store: {e}")),
            );
        }
        let started_at = Utc::now();
        let mut reply = self.execute(&cmd).await;
        reply.started_at = started_at;
        reply.finished_at = Utc::now();
        self.stats.inc(
            "commands",
            &[
                ("op", cmd.body.op()),
                ("status", status_label(reply.status)),
            ],
        );
        self.record(cmd.id, &reply);
        reply
    }

    fn record(&self, id: CommandId, reply: &Reply) {
        if let Err(e) = self.store.record_reply(id, reply) {
            tracing::error!(error = %e, "could not record reply in the dedup window");
        }
    }

    async fn execute(self: &Arc<Self>, cmd: &Command) -> Reply {
        let mut reply = self.reply(Some(cmd.id), Status::Ok, None);
        match &cmd.body {
            Body::Apply {
                mode,
                monitor,
                resources,
            } => {
                let _lock = self.apply_lock.lock().await;
                let (results, ok) = self.apply_blocking(resources.clone(), *mode).await;
                reply.results = results;
                if !ok {
                    reply.status = Status::Failed;
                    reply.reason = Some("a resource failed; the rest were skipped".into());
                }
                if *monitor && *mode == ApplyMode::Enforce {
                    let updated = self.store.baseline().and_then(|mut b| {
                        merge_baseline(&mut b, resources);
                        self.store.set_baseline(&b)
                    });
                    if let Err(e) = updated {
                        reply.status = Status::Failed;
                        reply.reason =
                            Some(format!("applied, but the baseline was not saved: {e}"));
                    }
                    self.compliance_kick.notify_one();
                }
            }
            Body::Remove { mode, refs } => {
                let _lock = self.apply_lock.lock().await;
                let resources: Vec<Resource> = refs
                    .iter()
                    .map(|r| Resource {
                        r#ref: r.clone(),
                        spec: absent_spec(r.collection),
                        policy: Default::default(),
                        notify: vec![],
                    })
                    .collect();
                let (results, ok) = self.apply_blocking(resources, *mode).await;
                reply.results = results;
                if !ok {
                    reply.status = Status::Failed;
                    reply.reason = Some("a resource failed; the rest were skipped".into());
                }
                if *mode == ApplyMode::Enforce {
                    let updated = self.store.baseline().and_then(|mut b| {
                        b.retain(|r| !refs.contains(&r.r#ref));
                        self.store.set_baseline(&b)
                    });
                    if let Err(e) = updated {
                        reply.status = Status::Failed;
                        reply.reason = Some(format!("baseline not saved: {e}"));
                    }
                    for r in refs {
                        let _ = self.store.clear_drift(r);
                    }
                }
            }
            Body::Read { r#ref } => {
                let providers = self.providers.clone();
                let r = r#ref.clone();
                let outcome =
                    tokio::task::spawn_blocking(move || providers.get(r.collection).read(&r.id))
                        .await;
                match outcome {
                    Ok(Ok(state)) => {
                        reply.data = Some(ReplyData::Read {
                            r#ref: r#ref.clone(),
                            state,
                        })
                    }
                    Ok(Err(e)) => fail(&mut reply, e.to_string()),
                    Err(e) => fail(&mut reply, format!("provider panicked: {e}")),
                }
            }
            Body::List { collection, under } => {
                let providers = self.providers.clone();
                let (c, u) = (*collection, under.clone());
                let outcome =
                    tokio::task::spawn_blocking(move || providers.get(c).list(u.as_deref())).await;
                match outcome {
                    Ok(Ok(ids)) => {
                        reply.data = Some(ReplyData::List {
                            collection: *collection,
                            ids,
                        })
                    }
                    Ok(Err(e)) => fail(&mut reply, e.to_string()),
                    Err(e) => fail(&mut reply, format!("provider panicked: {e}")),
                }
            }
            Body::Run(spec) => match self.run_streamed(cmd.id, spec).await {
                Ok(result) => {
                    if result.exit_code != Some(0) {
                        reply.status = Status::Failed;
                        reply.reason =
                            Some(match (result.timed_out, result.exit_code, result.signal) {
                                (true, _, _) => format!("timed out after {}s", spec.timeout_s),
                                (_, Some(code), _) => format!("exited with {code}"),
                                (_, None, Some(sig)) => format!("killed by signal {sig}"),
                                _ => "ended without an exit code".into(),
                            });
                    }
                    reply.data = Some(ReplyData::Run(result));
                }
                Err(e) => fail(&mut reply, e.to_string()),
            },
            Body::Facts {} => {
                let platform = self.platform.clone();
                let facts = tokio::task::spawn_blocking(move || {
                    crate::facts::gather(&platform, capabilities())
                })
                .await;
                match facts {
                    Ok(f) => reply.data = Some(ReplyData::Facts(Box::new(f))),
                    Err(e) => fail(&mut reply, format!("facts panicked: {e}")),
                }
            }
            Body::Check {} => match crate::compliance::check(self, None).await {
                Ok(drift) => reply.data = Some(ReplyData::Check { drift }),
                Err(e) => fail(&mut reply, e),
            },
            Body::Ping {} => {}
            Body::SetDesired { resources } => {
                let _lock = self.apply_lock.lock().await;
                if let Err(e) = self.store.set_baseline(resources) {
                    fail(&mut reply, format!("baseline not saved: {e}"));
                } else {
                    // Forget drift of resources no longer monitored.
                    if let Ok(drift) = self.store.drift() {
                        for d in drift {
                            if !resources.iter().any(|r| r.r#ref == d.r#ref) {
                                let _ = self.store.clear_drift(&d.r#ref);
                            }
                        }
                    }
                    self.compliance_kick.notify_one();
                }
            }
        }
        reply
    }

    /// Runs provider work on a blocking thread.
    pub async fn apply_blocking(
        &self,
        resources: Vec<Resource>,
        mode: ApplyMode,
    ) -> (Vec<ResourceResult>, bool) {
        let providers = self.providers.clone();
        let refs: Vec<ResourceRef> = resources.iter().map(|r| r.r#ref.clone()).collect();
        match tokio::task::spawn_blocking(move || apply_resources(&providers, &resources, mode))
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let results = refs
                    .into_iter()
                    .map(|r| ResourceResult {
                        r#ref: r,
                        changed: false,
                        diff: vec![],
                        error: Some(format!("provider panicked: {e}")),
                        skipped: false,
                    })
                    .collect();
                (results, false)
            }
        }
    }

    async fn run_streamed(
        self: &Arc<Self>,
        id: CommandId,
        spec: &comodit_protocol::RunSpec,
    ) -> Result<comodit_protocol::RunResult, crate::run::RunError> {
        let (chunks, forward) = if spec.stream {
            let (tx, mut rx) = mpsc::channel::<(comodit_protocol::Stream, String)>(16);
            let events = self.events.clone();
            let host = self.host;
            let forward = tokio::spawn(async move {
                let mut seq = 0u64;
                while let Some((stream, data)) = rx.recv().await {
                    let out = Up::Output(Output {
                        v: V1,
                        host,
                        re: id,
                        seq,
                        stream,
                        data,
                    });
                    seq += 1;
                    if events.send(out).await.is_err() {
                        break;
                    }
                }
            });
            (Some(tx), Some(forward))
        } else {
            (None, None)
        };
        let result = crate::run::run(spec, chunks, self.shutdown.child_token()).await;
        if let Some(f) = forward {
            let _ = f.await;
        }
        result
    }
}

fn fail(reply: &mut Reply, reason: String) {
    reply.status = Status::Failed;
    reply.reason = Some(reason);
}

pub fn status_label(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Failed => "failed",
        Status::Rejected => "rejected",
        Status::Expired => "expired",
    }
}
