//! The test harness: the real router over the real embedded store (in a temporary directory),
//! with a fake `HostOps` that records every submit and answers as the test scripts it, and a fake
//! `HostLifecycle` that records revocations.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body as HttpBody;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chrono::Utc;
use comodit_actors::{HostLifecycle, HostOps, NodeEvent, OpsError, SubmitOptions, Submitted};
use comodit_api::{hash_token, router, ApiLimits, ApiState, Problem};
use comodit_protocol::{
    Body, CommandId, Epoch, HostId, Reply, ReplyData, ResourceResult, Status, V1,
};
use comodit_store::embedded::EmbeddedStore;
use comodit_store::{
    ApiToken, Change, ChangeId, ChangeStatus, EnvId, Environment, Host, OrgId, Organization, Role,
    Scope, Store, StoreError, TokenId,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::Value;
use tokio::sync::broadcast;
use tower::ServiceExt;

pub const N_SHARDS: u32 = 16;

/// What the fake answers to the next submit.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The agent answered with this status (and data).
    Completed(Status, Option<ReplyData>),
    /// Recorded, queued, not answered.
    Pending,
    Fail(&'static str),
    /// Never answers (a stuck actor).
    Hang,
}

/// One recorded submit.
#[derive(Debug, Clone)]
pub struct Submit {
    pub host: HostId,
    pub body: Body,
    pub wait: Option<Duration>,
    pub requested_by: String,
    pub change_id: Option<ChangeId>,
}

pub struct FakeOps {
    pub store: Arc<dyn Store>,
    pub submits: Mutex<Vec<Submit>>,
    pub script: Mutex<VecDeque<Answer>>,
    pub events: broadcast::Sender<NodeEvent>,
    pub forgotten: Mutex<Vec<HostId>>,
}

impl FakeOps {
    pub fn submits(&self) -> Vec<Submit> {
        self.submits.lock().unwrap().clone()
    }

    pub fn answer(&self, a: Answer) {
        self.script.lock().unwrap().push_back(a);
    }
}

#[async_trait]
impl HostOps for FakeOps {
    async fn submit(
        &self,
        host: HostId,
        body: Body,
        opts: SubmitOptions,
    ) -> Result<Submitted, OpsError> {
        self.submits.lock().unwrap().push(Submit {
            host,
            body: body.clone(),
            wait: opts.wait,
            requested_by: opts.requested_by.clone(),
            change_id: opts.change_id,
        });
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::Completed(Status::Ok, None));
        let now = Utc::now();
        let command_id = CommandId::random();
        let mut change = Change {
            id: opts.change_id.unwrap_or_else(ChangeId::random),
            host,
            seq: 0,
            request: serde_json::to_value(&body).unwrap(),
            status: ChangeStatus::Queued,
            command_id,
            epoch: Epoch(1),
            requested_by: opts.requested_by,
            created_at: now,
            updated_at: now,
            expires_at: now + chrono::Duration::from_std(opts.ttl).unwrap(),
            reply: None,
            job: opts.job,
        };
        let completed = match answer {
            Answer::Fail(what) => return Err(OpsError::Bus(what.into())),
            Answer::Hang => std::future::pending().await,
            Answer::Pending => false,
            Answer::Completed(status, data) => {
                let results = match &body {
                    Body::Apply { resources, .. } => resources
                        .iter()
                        .map(|r| ResourceResult {
                            r#ref: r.r#ref.clone(),
                            changed: true,
                            diff: vec![],
                            error: (status == Status::Failed).then(|| "it broke".to_owned()),
                            skipped: false,
                        })
                        .collect(),
                    _ => vec![],
                };
                change.status = if status == Status::Ok {
                    ChangeStatus::Applied
                } else {
                    ChangeStatus::Failed
                };
                change.reply = Some(Reply {
                    v: V1,
                    re: Some(command_id),
                    host,
                    status,
                    reason: None,
                    results,
                    data,
                    started_at: now,
                    finished_at: now,
                });
                true
            }
        };
        let change = match self.store.append_change(&change).await {
            Ok(c) => c,
            // As the runtime does: a change asked for again under its id answers with the first.
            Err(StoreError::Conflict(_)) if opts.change_id.is_some() => {
                let first = self.store.get_change(host, change.id).await?.unwrap();
                return Ok(if first.status.is_pending() {
                    Submitted::Pending(first)
                } else {
                    Submitted::Completed(first)
                });
            }
            Err(e) => return Err(e.into()),
        };
        Ok(if completed {
            Submitted::Completed(change)
        } else {
            Submitted::Pending(change)
        })
    }

    async fn cancel(&self, host: HostId, change: ChangeId) -> Result<Change, OpsError> {
        Ok(self
            .store
            .update_change(host, change, ChangeStatus::Cancelled, None, Epoch(1))
            .await?)
    }

    fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    async fn forget(&self, host: HostId) {
        self.forgotten.lock().unwrap().push(host);
    }
}

pub struct FakeLifecycle {
    pub store: Arc<dyn Store>,
    pub revoked: Mutex<Vec<HostId>>,
}

#[async_trait]
impl HostLifecycle for FakeLifecycle {
    async fn revoke(&self, host: HostId) -> Result<(), OpsError> {
        self.revoked.lock().unwrap().push(host);
        self.store.delete_host(host).await?;
        Ok(())
    }
}

/// One global Prometheus recorder per test binary (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("one recorder per test binary");
            handle
        })
        .clone()
}

pub struct TestApp {
    pub router: Router,
    /// A second router on the same store and host operations: another node of a cluster, or this
    /// node after a restart.
    pub peer: Router,
    pub store: Arc<dyn Store>,
    pub ops: Arc<FakeOps>,
    pub lifecycle: Arc<FakeLifecycle>,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// An admin token's secret.
    pub admin: String,
    _dir: tempfile::TempDir,
}

/// A response, its body read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The body as a problem document, checking the content type.
    pub fn problem(&self) -> Problem {
        let ct = self
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert_eq!(
            ct, "application/problem+json",
            "status {} body {}",
            self.status, self.text
        );
        let p: Problem = serde_json::from_str(&self.text).unwrap();
        assert_eq!(p.status, self.status.as_u16());
        assert!(!p.title.is_empty() && !p.detail.is_empty(), "{p:?}");
        p
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

impl TestApp {
    pub async fn new() -> TestApp {
        Self::with_limits(ApiLimits::default(), 64).await
    }

    pub async fn with_limits(limits: ApiLimits, event_capacity: usize) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let (events, _) = broadcast::channel(event_capacity);
        let ops = Arc::new(FakeOps {
            store: store.clone(),
            submits: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            events,
            forgotten: Mutex::new(Vec::new()),
        });
        let lifecycle = Arc::new(FakeLifecycle {
            store: store.clone(),
            revoked: Mutex::new(Vec::new()),
        });
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let state = || {
            let r = ready.clone();
            ApiState {
                store: store.clone(),
                ops: ops.clone(),
                lifecycle: lifecycle.clone(),
                metrics: metrics_handle(),
                ready: Arc::new(move || r.load(std::sync::atomic::Ordering::SeqCst)),
                n_shards: N_SHARDS,
                cluster: None,
                limits: limits.clone(),
            }
        };
        let app = TestApp {
            router: router(state()),
            peer: router(state()),
            store,
            ops,
            lifecycle,
            ready,
            admin: String::new(),
            _dir: dir,
        };
        let admin = app.token("root", Role::Admin, Scope::Global).await;
        TestApp { admin, ..app }
    }

    /// Creates an API token directly in the store; returns its secret.
    pub async fn token(&self, name: &str, role: Role, scope: Scope) -> String {
        let secret = format!("secret-{name}-{}", uuid::Uuid::new_v4());
        self.store
            .create_api_token(&ApiToken {
                id: TokenId::random(),
                name: name.to_owned(),
                secret_sha256: hash_token(&secret),
                role,
                scope,
                revoked: false,
                created_at: Utc::now(),
            })
            .await
            .unwrap();
        secret
    }

    pub async fn org(&self, name: &str) -> Organization {
        let org = Organization {
            id: OrgId::random(),
            name: name.to_owned(),
            created_at: Utc::now(),
            version: 1,
        };
        self.store.create_org(&org).await.unwrap();
        org
    }

    pub async fn env(&self, org: &Organization, name: &str) -> Environment {
        let env = Environment {
            id: EnvId::random(),
            org: org.id,
            name: name.to_owned(),
            created_at: Utc::now(),
            version: 1,
        };
        self.store.create_env(&env).await.unwrap();
        env
    }

    pub async fn host(&self, env: &Environment, name: &str) -> Host {
        let id = HostId::random();
        let host = Host {
            id,
            org: env.org,
            env: env.id,
            name: name.to_owned(),
            labels: BTreeMap::new(),
            created_at: Utc::now(),
            enrolled_at: Utc::now(),
            shard: id.shard(N_SHARDS).0,
            version: 1,
        };
        self.store.create_host(&host).await.unwrap()
    }

    /// An organization `acme`, an environment `prod` and one host in it.
    pub async fn fleet(&self) -> (Organization, Environment, Host) {
        let org = self.org("acme").await;
        let env = self.env(&org, "prod").await;
        let host = self.host(&env, "web-1").await;
        (org, env, host)
    }

    pub async fn send(&self, req: Request<HttpBody>) -> Resp {
        Self::send_to(&self.router, req).await
    }

    /// Sends `req` to `router` (this app's or its peer's).
    pub async fn send_to(router: &Router, req: Request<HttpBody>) -> Resp {
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// A request with an optional bearer token and an optional JSON body.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        self.send(request(method, uri, token, body)).await
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.call(Method::GET, uri, Some(&self.admin.clone()), None)
            .await
    }

    pub async fn audit(&self) -> Vec<comodit_store::AuditEntry> {
        self.store
            .list_audit(&comodit_store::Page::first(1000))
            .await
            .unwrap()
            .items
    }
}

pub fn request(
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Request<HttpBody> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(HttpBody::from(serde_json::to_vec(&v).unwrap()))
            .unwrap(),
        None => b.body(HttpBody::empty()).unwrap(),
    }
}
