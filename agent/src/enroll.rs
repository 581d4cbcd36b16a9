//! Enrollment, the agent's side (DESIGN §5, "Per-agent credentials").
//!
//! A host gets its identity from the node: the agent connects with the shared enrollment user
//! (which may only publish on `<p>.enroll`), sends an [`EnrollRequest`] with the token an
//! operator gave it and its facts, and waits for the reply through direct reply-to. On success
//! the reply carries the host id, the password of the host's own broker user and the cluster's
//! shard count; the agent stores the first two in `credentials.json` (0600) and the host id and
//! shard count in `enrollment.json`, where `run` reads the shard count for its routing keys
//! (a configured `n_shards` still wins: [`apply_enrollment`]).
//!
//! ```text
//! enroll --token T ─► connect as enroll user ─► request (≤ attempts × timeout, same message id)
//!    ─► Ok: credentials.json + enrollment.json      ─► Rejected: exit code 3 with the reason
//! run --enroll-token T ─► credentials present (and no --force)? skip : enroll ─► run
//! ```
//!
//! Every attempt carries the same `message_id`, so a retry after a lost reply gets the same
//! answer from the node instead of a second host. A request expires from the queue after one
//! attempt's timeout, so a request nobody answered in time is not processed later for nobody.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use comodit_bus::{backoff, topology, Bus, BusConfig, BusError, OutMessage, RpcReply};
use comodit_protocol::{EnrollReply, EnrollRequest, HostId, Secret, Status, V1};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{url_with_credentials, AgentConfig};
use crate::state::{self, Credentials, StateError};

/// How long one attempt waits for the node's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts before giving up.
pub const ATTEMPTS: u32 = 3;
/// How long to wait for a connection as the enrollment user.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The exit code of `comodit-agent enroll` (and `run --enroll-token`) when the node refused.
pub const EXIT_REJECTED: u8 = 3;

/// What the agent keeps of its enrollment besides the credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub host: HostId,
    /// The cluster's shard count, for the routing keys `up.<shard>.<host>.<kind>`.
    pub n_shards: u32,
    pub enrolled_at: DateTime<Utc>,
}

/// How to enroll.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    pub token: Secret,
    /// Re-enroll a host that has credentials already (the node then gives it a new password
    /// and closes the old connections).
    pub force: bool,
    pub timeout: Duration,
    pub attempts: u32,
}

impl EnrollOptions {
    pub fn new(token: Secret, force: bool) -> Self {
        EnrollOptions {
            token,
            force,
            timeout: REQUEST_TIMEOUT,
            attempts: ATTEMPTS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The node said no; the reason is the node's ("invalid or expired token", ...).
    #[error("enrollment rejected: {0}")]
    Rejected(String),
    #[error("cannot connect to the broker as {user:?}: {reason}")]
    Connect { user: String, reason: String },
    #[error("no answer to the enrollment request after {attempts} attempts: {last}")]
    NoAnswer { attempts: u32, last: BusError },
    #[error("invalid enrollment reply: {0}")]
    BadReply(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("enrollment record {path}: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error("shutting down")]
    Shutdown,
}

impl EnrollError {
    /// The process exit code for this error: [`EXIT_REJECTED`] when the node refused, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            EnrollError::Rejected(_) => EXIT_REJECTED,
            _ => 1,
        }
    }
}

pub fn enrollment_path(dir: &Path) -> PathBuf {
    dir.join("enrollment.json")
}

/// The stored enrollment, if any.
pub fn read_enrollment(dir: &Path) -> Result<Option<Enrollment>, EnrollError> {
    let path = enrollment_path(dir);
    let bad = |reason: String| EnrollError::Record {
        path: path.clone(),
        reason,
    };
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| bad(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Writes the enrollment record atomically (0600, like everything in the state directory).
pub fn write_enrollment(dir: &Path, enrollment: &Enrollment) -> Result<(), EnrollError> {
    state::ensure_state_dir(dir)?;
    let path = enrollment_path(dir);
    let tmp = dir.join(".enrollment.json.tmp");
    let err = |e: std::io::Error| EnrollError::Record {
        path: path.clone(),
        reason: e.to_string(),
    };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&serde_json::to_vec_pretty(enrollment).expect("enrollment serializes"))
        .map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    Ok(())
}

/// Uses the shard count learned at enrollment, unless `n_shards` was configured.
pub fn apply_enrollment(cfg: &mut AgentConfig) -> Result<(), EnrollError> {
    if cfg.n_shards_set {
        return Ok(());
    }
    if let Some(enrollment) = read_enrollment(&cfg.state_dir)? {
        if enrollment.n_shards > 0 {
            cfg.n_shards = enrollment.n_shards;
        }
    }
    Ok(())
}

/// For `run --enroll-token`: enrolls unless credentials are stored already (then, without
/// `force`, nothing is done and `None` is returned).
pub async fn ensure_enrolled(
    cfg: &AgentConfig,
    opts: &EnrollOptions,
    shutdown: &CancellationToken,
) -> Result<Option<Enrollment>, EnrollError> {
    if !opts.force && state::credentials_path(&cfg.state_dir).exists() {
        tracing::info!("credentials present, enrollment skipped");
        return Ok(None);
    }
    enroll(cfg, opts, shutdown).await.map(Some)
}

/// Enrolls this host (or re-enrolls it, with `force`) and stores what the node answered.
pub async fn enroll(
    cfg: &AgentConfig,
    opts: &EnrollOptions,
    shutdown: &CancellationToken,
) -> Result<Enrollment, EnrollError> {
    state::ensure_state_dir(&cfg.state_dir)?;
    let known = known_host(&cfg.state_dir);
    let platform = crate::platform::Platform::detect(&crate::providers::cmd::SystemRunner);
    let facts = crate::facts::gather(&platform, crate::exec::capabilities());
    let request = EnrollRequest {
        v: V1,
        token: opts.token.clone(),
        facts,
        host: known,
        force: opts.force,
    };
    let mut msg = OutMessage::json(
        "enroll",
        serde_json::to_vec(&request).expect("requests serialize"),
    );
    msg.mandatory = true;
    msg.correlation_id = Some(msg.message_id.clone());
    // Not answered within one attempt: the request is dropped from the queue, the next attempt
    // (same message id) takes its place.
    msg.expiration_ms = Some(opts.timeout.as_millis() as u64);

    let bus_stop = shutdown.child_token();
    let _stop_bus = bus_stop.clone().drop_guard();
    let bus = Bus::start(
        BusConfig {
            url: url_with_credentials(
                &cfg.broker_url,
                &cfg.enroll_user,
                cfg.enroll_password.expose(),
            ),
            heartbeat_s: cfg.amqp_heartbeat_s,
            connection_name: "comodit-agent enroll".into(),
            backoff_min_ms: 200,
            backoff_max_ms: 5_000,
            ..BusConfig::default()
        },
        bus_stop,
    );
    let connect_error = |e: BusError| match e {
        BusError::Shutdown => EnrollError::Shutdown,
        e => EnrollError::Connect {
            user: cfg.enroll_user.clone(),
            reason: format!(
                "{e} (is the broker reachable, and are the enrollment user and password right?)"
            ),
        },
    };
    bus.wait_connected(CONNECT_TIMEOUT)
        .await
        .map_err(connect_error)?;
    tracing::info!(known_host = ?known, force = opts.force, "asking the node for enrollment");

    let exchange = cfg.names().enroll();
    let attempts = opts.attempts.max(1);
    let mut last = BusError::NotConnected;
    for attempt in 0..attempts {
        if attempt > 0 {
            let delay = backoff::delay(attempt - 1, 500, 5_000);
            tokio::select! {
                _ = shutdown.cancelled() => return Err(EnrollError::Shutdown),
                _ = tokio::time::sleep(delay) => {}
            }
            if !bus.is_connected() {
                bus.wait_connected(CONNECT_TIMEOUT)
                    .await
                    .map_err(connect_error)?;
            }
        }
        match bus
            .request(
                &exchange,
                topology::ENROLL_ROUTING_KEY,
                msg.clone(),
                opts.timeout,
            )
            .await
        {
            Ok(reply) => return accept(cfg, &msg.message_id, reply),
            Err(BusError::Shutdown) => return Err(EnrollError::Shutdown),
            Err(e) => {
                let hint = match &e {
                    BusError::Unroutable { .. } => " (no node has declared the enrollment queue)",
                    BusError::Refused { code: 404, .. } => {
                        " (no node has declared the enrollment exchange)"
                    }
                    _ => "",
                };
                tracing::warn!(attempt = attempt + 1, attempts, error = %e, "enrollment request failed{hint}");
                last = e;
            }
        }
    }
    Err(EnrollError::NoAnswer { attempts, last })
}

/// The host id this agent had, from its credentials or its enrollment record.
fn known_host(dir: &Path) -> Option<HostId> {
    match state::read_credentials(dir) {
        Ok(creds) => Some(creds.host),
        Err(_) => read_enrollment(dir).ok().flatten().map(|e| e.host),
    }
}

/// Checks the reply and, when it is a yes, stores the credentials and the enrollment record.
fn accept(cfg: &AgentConfig, request_id: &str, reply: RpcReply) -> Result<Enrollment, EnrollError> {
    if reply
        .correlation_id
        .as_deref()
        .is_some_and(|c| c != request_id)
    {
        return Err(EnrollError::BadReply(
            "the reply answers another request".into(),
        ));
    }
    let reply: EnrollReply = serde_json::from_slice(&reply.payload)
        .map_err(|e| EnrollError::BadReply(format!("not an enrollment reply: {e}")))?;
    match reply.status {
        Status::Ok => {}
        Status::Rejected => {
            let reason = reply.reason.unwrap_or_else(|| "no reason given".into());
            tracing::warn!(%reason, "enrollment rejected");
            return Err(EnrollError::Rejected(reason));
        }
        other => {
            return Err(EnrollError::BadReply(format!(
                "unexpected status {other:?}"
            )))
        }
    }
    let (Some(host), Some(password)) = (reply.host, reply.password) else {
        return Err(EnrollError::BadReply(
            "an accepted enrollment without host or password".into(),
        ));
    };
    if password.expose().is_empty() {
        return Err(EnrollError::BadReply("an empty password".into()));
    }
    let n_shards = match reply.n_shards {
        Some(n) if n > 0 => n,
        Some(_) => return Err(EnrollError::BadReply("n_shards is 0".into())),
        None => cfg.n_shards,
    };
    state::write_credentials(&cfg.state_dir, &Credentials { host, password })?;
    let enrollment = Enrollment {
        host,
        n_shards,
        enrolled_at: Utc::now(),
    };
    write_enrollment(&cfg.state_dir, &enrollment)?;
    tracing::info!(host_id = %host, n_shards, "enrolled");
    Ok(enrollment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path) -> AgentConfig {
        AgentConfig {
            state_dir: dir.to_owned(),
            ..AgentConfig::default()
        }
    }

    fn rpc(reply: &EnrollReply, correlation: &str) -> RpcReply {
        RpcReply {
            payload: serde_json::to_vec(reply).unwrap(),
            kind: Some("enroll_reply".into()),
            message_id: None,
            correlation_id: Some(correlation.into()),
            user_id: None,
        }
    }

    fn ok(host: HostId, n_shards: Option<u32>) -> EnrollReply {
        EnrollReply {
            v: V1,
            status: Status::Ok,
            reason: None,
            host: Some(host),
            password: Some(Secret::new("pw")),
            n_shards,
        }
    }

    #[test]
    fn an_accepted_reply_stores_credentials_and_the_shard_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let host = HostId::random();
        let e = accept(&cfg, "m1", rpc(&ok(host, Some(16)), "m1")).unwrap();
        assert_eq!((e.host, e.n_shards), (host, 16));
        let creds = state::read_credentials(dir.path()).unwrap();
        assert_eq!(creds.host, host);
        assert_eq!(creds.password.expose(), "pw");
        let mode = fs::metadata(enrollment_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_enrollment(dir.path()).unwrap(), Some(e));
        assert_eq!(known_host(dir.path()), Some(host));

        // `run` takes the shard count from the enrollment unless it was configured.
        apply_enrollment(&mut cfg).unwrap();
        assert_eq!(cfg.n_shards, 16);
        let mut set = config(dir.path());
        set.n_shards = 4;
        set.n_shards_set = true;
        apply_enrollment(&mut set).unwrap();
        assert_eq!(set.n_shards, 4);
    }

    #[test]
    fn rejections_and_bad_replies_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let rejected = EnrollReply {
            v: V1,
            status: Status::Rejected,
            reason: Some("invalid or expired token".into()),
            host: None,
            password: None,
            n_shards: None,
        };
        let err = accept(&cfg, "m", rpc(&rejected, "m")).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_REJECTED);
        assert!(
            err.to_string().contains("invalid or expired token"),
            "{err}"
        );
        let host = HostId::random();
        for (reply, corr) in [
            (rpc(&ok(host, Some(4)), "other"), "m"),
            (rpc(&ok(host, Some(0)), "m"), "m"),
            (
                RpcReply {
                    payload: b"{\"v\":1,\"status\":\"ok\",\"x\":1}".to_vec(),
                    ..rpc(&ok(host, None), "m")
                },
                "m",
            ),
            (
                rpc(
                    &EnrollReply {
                        password: None,
                        ..ok(host, Some(4))
                    },
                    "m",
                ),
                "m",
            ),
        ] {
            let err = accept(&cfg, corr, reply).unwrap_err();
            assert!(matches!(err, EnrollError::BadReply(_)), "{err}");
            assert_eq!(err.exit_code(), 1);
        }
        assert!(!state::credentials_path(dir.path()).exists());
        assert_eq!(read_enrollment(dir.path()).unwrap(), None);
        // Without n_shards in the reply, the configured value is kept.
        let e = accept(&cfg, "m", rpc(&ok(host, None), "m")).unwrap();
        assert_eq!(e.n_shards, cfg.n_shards);
    }

    #[tokio::test]
    async fn with_credentials_run_skips_enrollment_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        // Nothing listens on port 1: an attempt to enroll would fail to connect.
        cfg.broker_url = "amqp://127.0.0.1:1/%2f".into();
        state::write_credentials(
            dir.path(),
            &Credentials {
                host: HostId::random(),
                password: Secret::new("pw"),
            },
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let opts = EnrollOptions::new(Secret::new("t"), false);
        assert_eq!(ensure_enrolled(&cfg, &opts, &shutdown).await.unwrap(), None);
        // Forced, it does try (and here cannot connect); shutdown ends the wait at once.
        let forced = EnrollOptions::new(Secret::new("t"), true);
        let stop = shutdown.clone();
        tokio::spawn(async move { stop.cancel() });
        let err = ensure_enrolled(&cfg, &forced, &shutdown).await.unwrap_err();
        assert!(matches!(err, EnrollError::Shutdown), "{err}");
    }
}
