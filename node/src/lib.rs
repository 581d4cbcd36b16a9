//! # comodit-node
//!
//! The orchestrator node, wired from the other crates (DESIGN §2, §8). A single node is a cluster of
//! one: it owns every shard through [`comodit_actors::ownership::SingleNode`] (the cluster issue backs
//! the same interface with Raft).
//!
//! With `cluster_id` set, the node is instead a member of a Raft cluster ([`cluster`]): the
//! members share a PostgreSQL store and each acts only for the shards the cluster gives it.
//!
//! Start-up, in order: the store (embedded `<data_dir>/comodit.redb`, or PostgreSQL) → first-start
//! bootstrap (an admin API token written to `<data_dir>/admin-token`, 0600, by whichever node finds
//! the store without tokens; a `default` organization and environment) → the cluster member, if
//! configured → the Prometheus recorder → the broker connection, which declares the topology of DESIGN §5 on every
//! (re)connect → the host actors ([`comodit_actors::Orchestrator`]) consuming the shard queues → the
//! enrollment service on `<prefix>.enroll` → the REST API.
//!
//! Shutdown ([`run`]'s `shutdown` token), in reverse: the API stops accepting and finishes in-flight
//! requests, the actors stop consuming and finish in-flight work, then the broker connection closes.

pub mod cluster;
pub mod config;
pub mod enroll;
mod enroll_broker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use comodit_actors::ownership::{Ownership, SingleNode};
use comodit_actors::{ActorsConfig, Orchestrator};
use comodit_bus::{Bus, BusConfig};
use comodit_store::embedded::EmbeddedStore;
use comodit_store::postgres::PgStore;
use comodit_store::{
    ApiToken, EnvId, Environment, OrgId, Organization, Page, Role, Scope, Store, TokenId,
};
use tokio_util::sync::CancellationToken;

pub use config::NodeConfig;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] comodit_store::StoreError),
    #[error("broker: {0}")]
    Bus(String),
    #[error("actors: {0}")]
    Actors(String),
    #[error("enrollment: {0}")]
    Enroll(String),
    #[error("api listener {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("cluster: {0}")]
    Cluster(#[from] comodit_cluster::runtime::ClusterError),
}

/// Connections of the PostgreSQL pool.
const PG_MAX_CONNECTIONS: usize = 16;

/// Where the first admin token is written.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// On first start (no API token yet): creates an admin token and writes its secret, 0600, to
/// `<data_dir>/admin-token`; creates the `default` organization and environment. Idempotent, and
/// safe when members of a cluster start at the same moment on an empty database: each of them
/// that found no token writes its own (each works), and the default organization and environment
/// are created once (a name conflict means another member created them).
pub async fn bootstrap(store: &dyn Store, data_dir: &Path) -> Result<(), NodeError> {
    use comodit_store::StoreError;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let tokens = store.list_api_tokens(&Page::first(1)).await?;
    if tokens.items.is_empty() {
        let secret = random_secret();
        let path = admin_token_path(data_dir);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| NodeError::DataDir {
                path: path.clone(),
                source,
            })?;
        f.write_all(format!("{secret}\n").as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|source| NodeError::DataDir {
                path: path.clone(),
                source,
            })?;
        store
            .create_api_token(&ApiToken {
                id: TokenId::random(),
                name: "admin".into(),
                secret_sha256: comodit_api::hash_token(&secret),
                role: Role::Admin,
                scope: Scope::Global,
                revoked: false,
                created_at: Utc::now(),
            })
            .await?;
        tracing::info!(path = %path.display(), "admin token written");
    }
    let org = match store.get_org_by_name("default").await? {
        Some(org) => org,
        None => {
            let org = Organization {
                id: OrgId::random(),
                name: "default".into(),
                created_at: Utc::now(),
                version: 1,
            };
            match store.create_org(&org).await {
                Ok(()) => org,
                // Another member starting at the same moment created it first: use theirs.
                Err(StoreError::Conflict(_)) => store
                    .get_org_by_name("default")
                    .await?
                    .ok_or_else(|| StoreError::NotFound("organization default".into()))?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if store.get_env_by_name(org.id, "default").await?.is_none() {
        let created = store
            .create_env(&Environment {
                id: EnvId::random(),
                org: org.id,
                name: "default".into(),
                created_at: Utc::now(),
                version: 1,
            })
            .await;
        // Taken by a member starting at the same moment: fine.
        match created {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// 32 random bytes, hex.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Runs a node until `shutdown` is cancelled. `metrics` is the process's Prometheus handle (one
/// recorder per process: the binary installs it, tests pass a handle of their own).
pub async fn run(
    config: NodeConfig,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let names = config.names();
    let span = tracing::info_span!("node", prefix = names.prefix());
    let _guard = span.enter();

    let store: Arc<dyn Store> = match (config.store.as_str(), &config.postgres_url) {
        ("postgres", Some(url)) => Arc::new(PgStore::connect(url, PG_MAX_CONNECTIONS).await?),
        _ => Arc::new(EmbeddedStore::open(&config.data_dir.join("comodit.redb"))?),
    };
    bootstrap(store.as_ref(), &config.data_dir).await?;

    // A member of a cluster acts for the shards Raft gives it; a single node owns them all.
    let (ownership, cluster): (Arc<dyn Ownership>, Option<comodit_api::ClusterProvider>) =
        match config.cluster_membership()? {
            None => (Arc::new(SingleNode::new(config.n_shards)), None),
            Some(m) => {
                let node = comodit_cluster::runtime::ClusterNode::start(
                    cluster::cluster_config(&m, &config.data_dir, config.n_shards),
                    shutdown.clone(),
                )
                .await?;
                tracing::info!(cluster_id = m.id, cluster_listen = %m.listen, joining = !m.join.is_empty(), "cluster member started");
                tokio::spawn(cluster::exit_when_decommissioned(
                    node.clone(),
                    shutdown.clone(),
                ));
                (
                    Arc::new(cluster::ClusterOwnership::new(
                        node.clone(),
                        config.n_shards,
                    )),
                    Some(Arc::new(cluster::ClusterApi(node)) as comodit_api::ClusterProvider),
                )
            }
        };

    // The broker connection outlives `shutdown` until the actors have finished in-flight work.
    let bus_stop = CancellationToken::new();
    let bus = Bus::start(
        BusConfig {
            url: config.broker_url.clone(),
            connection_name: "comodit-node".into(),
            max_publishes_in_flight: config.publishes_in_flight,
            ..BusConfig::default()
        },
        bus_stop.clone(),
    );
    {
        let names = names.clone();
        let n_shards = config.n_shards;
        bus.on_connect(move |ch| {
            let names = names.clone();
            async move { comodit_bus::topology::declare_core(&ch, &names, n_shards).await }
        });
    }
    bus.wait_connected(Duration::from_secs(60))
        .await
        .map_err(|e| NodeError::Bus(e.to_string()))?;
    // Kicks on a connection of their own (comodit_actors::Buses).
    let kick_bus = Bus::start(
        BusConfig {
            url: config.broker_url.clone(),
            connection_name: "comodit-node-kicks".into(),
            ..BusConfig::default()
        },
        bus_stop.clone(),
    );
    kick_bus
        .wait_connected(Duration::from_secs(60))
        .await
        .map_err(|e| NodeError::Bus(e.to_string()))?;

    let orchestrator = Orchestrator::start(
        ActorsConfig {
            command_timeout: Duration::from_secs(config.command_timeout_s),
            max_retries: config.max_retries,
            heartbeat_s: config.heartbeat_s,
            offline_after_missed: config.offline_after_missed,
            prefetch: config.prefetch,
            arbiters: config.arbiters,
            node_user: config.broker_user(),
            ..ActorsConfig::default()
        },
        store.clone(),
        comodit_actors::Buses {
            bus: bus.clone(),
            kicks: kick_bus,
        },
        names.clone(),
        ownership,
        shutdown.clone(),
    )
    .await
    .map_err(|e| NodeError::Actors(e.to_string()))?;

    let admin = comodit_bus::admin::BrokerAdmin::new(
        &config.mgmt_url,
        &config.mgmt_user,
        &config.mgmt_password,
        &vhost_of(&config.broker_url),
    )
    .map_err(|e| NodeError::Enroll(e.to_string()))?;
    let enroll = enroll::EnrollService::start(
        store.clone(),
        bus.clone(),
        admin,
        names.clone(),
        enroll::EnrollConfig {
            enroll_user: config.enroll_user.clone(),
            enroll_password: config.enroll_password.clone(),
            n_shards: config.n_shards,
            import_min: enroll::IMPORT_MIN,
        },
        Some(orchestrator.event_sender()),
        shutdown.clone(),
    )
    .await
    .map_err(|e| NodeError::Enroll(e.to_string()))?;

    let ready = {
        let bus = bus.clone();
        Arc::new(move || bus.is_connected()) as Arc<dyn Fn() -> bool + Send + Sync>
    };
    let app = comodit_api::router(comodit_api::ApiState {
        store: store.clone(),
        ops: Arc::new(orchestrator.clone()),
        lifecycle: Arc::new(enroll.clone()),
        metrics,
        ready,
        n_shards: config.n_shards,
        cluster,
        limits: Default::default(),
    });
    tokio::spawn(purge_idempotency_keys(store.clone(), shutdown.clone()));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(listen = %config.listen, admin_token = %admin_token_path(&config.data_dir).display(), "node ready");
    let http_stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { http_stop.cancelled().await })
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;

    tracing::info!("stopping");
    orchestrator.stop().await;
    bus_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}

/// How often the node deletes lapsed idempotency keys.
const IDEMPOTENCY_PURGE_EVERY: Duration = Duration::from_secs(600);

/// Deletes lapsed idempotency keys every [`IDEMPOTENCY_PURGE_EVERY`] until `shutdown`. Every member
/// of a cluster does it; a purge is idempotent, so they need not agree on who.
async fn purge_idempotency_keys(store: Arc<dyn Store>, shutdown: CancellationToken) {
    // The first purge one period after start: nothing to add to start-up.
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + IDEMPOTENCY_PURGE_EVERY,
        IDEMPOTENCY_PURGE_EVERY,
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match store.purge_idempotency_keys(chrono::Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "lapsed idempotency keys deleted"),
            Err(e) => tracing::warn!(error = %e, "could not delete lapsed idempotency keys"),
        }
    }
}

/// The vhost of an AMQP URL (`%2f` → `/`).
pub fn vhost_of(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    if path.is_empty() {
        "/".into()
    } else {
        path.replace("%2f", "/").replace("%2F", "/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhosts() {
        assert_eq!(vhost_of("amqp://u:p@h:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://h:5672/prod?heartbeat=5"), "prod");
        assert_eq!(vhost_of("amqp://h"), "/");
    }
}
