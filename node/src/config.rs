//! The node's typed configuration: a TOML file, then `COMODIT_*` environment variables, then flags,
//! each overriding the one before. Unknown keys in the file are refused. Defaults are in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Where the REST API listens.
    pub listen: SocketAddr,
    /// Holds the embedded store (`comodit.redb`) and the first admin token (`admin-token`, 0600).
    pub data_dir: PathBuf,
    /// The node's own broker connection (a user allowed to declare the topology).
    pub broker_url: String,
    /// RabbitMQ management API, for per-agent users (DESIGN §5).
    pub mgmt_url: String,
    pub mgmt_user: String,
    pub mgmt_password: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Fixed when the cluster is created (DESIGN §4).
    pub n_shards: u32,
    /// The shared, low-privilege broker user agents use to ask for enrollment.
    pub enroll_user: String,
    pub enroll_password: String,
    /// Re-send a dispatched command that got no reply after this long.
    pub command_timeout_s: u64,
    pub max_retries: u32,
    /// The agents' routed heartbeat period, and how many may be missed before a host is offline.
    pub heartbeat_s: u64,
    pub offline_after_missed: u32,
    /// Deliveries in flight per shard queue.
    pub prefetch: u16,
    /// Commands waiting for the broker's confirm at once (one channel each).
    pub publishes_in_flight: usize,
    /// Threads the host actors are spread over (actix arbiters).
    pub arbiters: usize,
    /// Threads of the async runtime (API, store calls, broker I/O); unset: one per core.
    pub worker_threads: Option<usize>,
    /// `text` or `json`.
    pub log_format: String,
    pub log: String,
    /// Where records live: `embedded` (default: `<data_dir>/comodit.redb`, one node only) or
    /// `postgres` (the database at `postgres_url`, which the members of a cluster share).
    pub store: String,
    /// `postgres://user:password@host:port/database`; required with `store = "postgres"`.
    pub postgres_url: Option<String>,
    /// This node's Raft id (positive). Unset: a single node that owns every shard, as without a
    /// cluster. Set: a member of the cluster of `cluster_peers`, which needs `store = "postgres"`
    /// and the other `cluster_*` keys.
    pub cluster_id: Option<u64>,
    /// Address the Raft transport listens on (the address peers know this node by).
    pub cluster_listen: Option<SocketAddr>,
    /// Shared secret that authenticates the members to each other (at least 16 characters).
    pub cluster_secret: Option<String>,
    /// The founding voters, this node included: `id=host:port,...` (their Raft addresses).
    pub cluster_peers: Option<String>,
    /// Join a running cluster instead of founding one: Raft addresses of members to ask,
    /// `host:port,...` (any one answering is enough). Exclusive with `cluster_peers`.
    pub cluster_join: Option<String>,
}

/// A member's cluster settings (see [`NodeConfig::cluster_membership`]).
#[derive(Debug, Clone)]
pub struct Membership {
    pub id: u64,
    pub listen: SocketAddr,
    pub secret: String,
    /// Founding voters (empty for a joining node).
    pub peers: std::collections::BTreeMap<u64, SocketAddr>,
    /// Members to ask for admission (empty for a founder).
    pub join: Vec<SocketAddr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            data_dir: PathBuf::from("/var/lib/comodit-node"),
            broker_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            mgmt_url: "http://127.0.0.1:15672".into(),
            mgmt_user: "guest".into(),
            mgmt_password: "guest".into(),
            prefix: "comodit".into(),
            n_shards: 256,
            enroll_user: "comodit-enroll".into(),
            enroll_password: "comodit-enroll".into(),
            command_timeout_s: 60,
            max_retries: 5,
            heartbeat_s: 300,
            offline_after_missed: 3,
            prefetch: 256,
            publishes_in_flight: comodit_bus::NODE_PUBLISHES_IN_FLIGHT,
            arbiters: 2,
            worker_threads: None,
            log_format: "text".into(),
            log: "info".into(),
            store: "embedded".into(),
            postgres_url: None,
            cluster_id: None,
            cluster_listen: None,
            cluster_secret: None,
            cluster_peers: None,
            cluster_join: None,
        }
    }
}

/// Flags (and their `COMODIT_*` variables) that override the file.
#[derive(Clone, Debug, Default, Args)]
pub struct Overrides {
    #[arg(long, env = "COMODIT_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "COMODIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "COMODIT_BROKER_URL")]
    pub broker_url: Option<String>,
    #[arg(long, env = "COMODIT_MGMT_URL")]
    pub mgmt_url: Option<String>,
    #[arg(long, env = "COMODIT_MGMT_USER")]
    pub mgmt_user: Option<String>,
    #[arg(long, env = "COMODIT_MGMT_PASSWORD")]
    pub mgmt_password: Option<String>,
    #[arg(long, env = "COMODIT_PREFIX")]
    pub prefix: Option<String>,
    #[arg(long, env = "COMODIT_N_SHARDS")]
    pub n_shards: Option<u32>,
    #[arg(long, env = "COMODIT_ENROLL_USER")]
    pub enroll_user: Option<String>,
    #[arg(long, env = "COMODIT_ENROLL_PASSWORD")]
    pub enroll_password: Option<String>,
    #[arg(long, env = "COMODIT_COMMAND_TIMEOUT_S")]
    pub command_timeout_s: Option<u64>,
    #[arg(long, env = "COMODIT_MAX_RETRIES")]
    pub max_retries: Option<u32>,
    #[arg(long, env = "COMODIT_HEARTBEAT_S")]
    pub heartbeat_s: Option<u64>,
    #[arg(long, env = "COMODIT_OFFLINE_AFTER_MISSED")]
    pub offline_after_missed: Option<u32>,
    #[arg(long, env = "COMODIT_PREFETCH")]
    pub prefetch: Option<u16>,
    #[arg(long, env = "COMODIT_PUBLISHES_IN_FLIGHT")]
    pub publishes_in_flight: Option<usize>,
    #[arg(long, env = "COMODIT_ARBITERS")]
    pub arbiters: Option<usize>,
    #[arg(long, env = "COMODIT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    #[arg(long, env = "COMODIT_LOG_FORMAT")]
    pub log_format: Option<String>,
    #[arg(long, env = "COMODIT_LOG")]
    pub log: Option<String>,
    #[arg(long, env = "COMODIT_STORE")]
    pub store: Option<String>,
    #[arg(long, env = "COMODIT_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    #[arg(long, env = "COMODIT_CLUSTER_ID")]
    pub cluster_id: Option<u64>,
    #[arg(long, env = "COMODIT_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    #[arg(long, env = "COMODIT_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    #[arg(long, env = "COMODIT_CLUSTER_PEERS")]
    pub cluster_peers: Option<String>,
    /// Join a running cluster through these members' Raft addresses (`host:port,...`).
    #[arg(long = "join", env = "COMODIT_CLUSTER_JOIN")]
    pub cluster_join: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl NodeConfig {
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?
            }
            None => NodeConfig::default(),
        };
        let o = overrides.clone();
        macro_rules! take {
            ($($f:ident),*) => {$( if let Some(v) = o.$f { cfg.$f = v; } )*};
        }
        take!(
            listen,
            data_dir,
            broker_url,
            mgmt_url,
            mgmt_user,
            mgmt_password,
            prefix,
            n_shards,
            enroll_user,
            enroll_password,
            command_timeout_s,
            max_retries,
            heartbeat_s,
            offline_after_missed,
            prefetch,
            publishes_in_flight,
            arbiters,
            log_format,
            log,
            store
        );
        macro_rules! take_some {
            ($($f:ident),*) => {$( if let Some(v) = o.$f { cfg.$f = Some(v); } )*};
        }
        take_some!(
            postgres_url,
            worker_threads,
            cluster_id,
            cluster_listen,
            cluster_secret,
            cluster_peers,
            cluster_join
        );
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self.n_shards == 0 || self.n_shards > 65_536 {
            return invalid("n_shards", "must be 1..=65536");
        }
        if let Err(e) = comodit_protocol::Names::new(&self.prefix) {
            return invalid("prefix", &e.to_string());
        }
        if !(self.broker_url.starts_with("amqp://") || self.broker_url.starts_with("amqps://")) {
            return invalid("broker_url", "must start with amqp:// or amqps://");
        }
        if !(self.mgmt_url.starts_with("http://") || self.mgmt_url.starts_with("https://")) {
            return invalid("mgmt_url", "must start with http:// or https://");
        }
        if self.command_timeout_s == 0 || self.heartbeat_s == 0 || self.offline_after_missed == 0 {
            return invalid(
                "command_timeout_s/heartbeat_s/offline_after_missed",
                "must be positive",
            );
        }
        if self.prefetch == 0 {
            return invalid("prefetch", "must be positive");
        }
        if !(1..=comodit_bus::PUBLISHES_IN_FLIGHT_LIMIT).contains(&self.publishes_in_flight) {
            return invalid(
                "publishes_in_flight",
                &format!("must be 1..={}", comodit_bus::PUBLISHES_IN_FLIGHT_LIMIT),
            );
        }
        if !(1..=64).contains(&self.arbiters) {
            return invalid("arbiters", "must be 1..=64");
        }
        if self.worker_threads.is_some_and(|n| !(1..=256).contains(&n)) {
            return invalid("worker_threads", "must be 1..=256");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return invalid("log_format", "text or json");
        }
        match self.store.as_str() {
            "embedded" => {}
            "postgres" => match &self.postgres_url {
                Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {}
                Some(_) => return invalid("postgres_url", "must start with postgres://"),
                None => return invalid("postgres_url", "required with store = \"postgres\""),
            },
            _ => return invalid("store", "embedded or postgres"),
        }
        if self.cluster_id.is_some() {
            self.cluster_membership()?;
        }
        Ok(())
    }

    /// The cluster membership when `cluster_id` is set: this node's id, Raft address, secret and
    /// either the founding voters (this node among them) or the members to join through. `None`
    /// on a single node.
    pub fn cluster_membership(&self) -> Result<Option<Membership>, ConfigError> {
        let Some(id) = self.cluster_id else {
            return Ok(None);
        };
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.into(),
        };
        if id == 0 {
            return Err(invalid("cluster_id", "must be positive"));
        }
        if self.store != "postgres" {
            return Err(invalid(
                "store",
                "the members of a cluster share one database: store must be postgres",
            ));
        }
        let listen = self
            .cluster_listen
            .ok_or_else(|| invalid("cluster_listen", "required with cluster_id"))?;
        let secret = match &self.cluster_secret {
            Some(s) if s.len() >= 16 => s.clone(),
            _ => {
                return Err(invalid(
                    "cluster_secret",
                    "required with cluster_id, at least 16 characters",
                ))
            }
        };
        if let Some(join) = &self.cluster_join {
            if self.cluster_peers.is_some() {
                return Err(invalid(
                    "cluster_join",
                    "a joining node learns the members from the one it contacts: \
                     leave cluster_peers unset",
                ));
            }
            if listen.ip().is_unspecified() {
                return Err(invalid(
                    "cluster_listen",
                    "a joining node announces this address to the members: not 0.0.0.0",
                ));
            }
            let join = crate::cluster::parse_join(join)?;
            return Ok(Some(Membership {
                id,
                listen,
                secret,
                peers: Default::default(),
                join,
            }));
        }
        let peers =
            crate::cluster::parse_peers(self.cluster_peers.as_deref().ok_or_else(|| {
                invalid(
                    "cluster_peers",
                    "required with cluster_id (or cluster_join to join a running cluster)",
                )
            })?)?;
        if !peers.contains_key(&id) {
            return Err(invalid(
                "cluster_peers",
                "must include this node's cluster_id",
            ));
        }
        Ok(Some(Membership {
            id,
            listen,
            secret,
            peers,
            join: Vec::new(),
        }))
    }

    pub fn names(&self) -> comodit_protocol::Names {
        comodit_protocol::Names::new(&self.prefix).expect("validated")
    }

    /// The broker user in `broker_url` (the node's own user: the only one whose `kick` counts).
    pub fn broker_user(&self) -> String {
        let rest = self
            .broker_url
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or("");
        match rest.split_once('@') {
            Some((userinfo, _)) => userinfo.split(':').next().unwrap_or("guest").to_owned(),
            None => "guest".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_flags_in_order_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "n_shards = 16\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        let cfg = NodeConfig::load(
            Some(&path),
            &Overrides {
                listen: Some("127.0.0.1:9001".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.n_shards, 16);
        assert_eq!(cfg.listen.port(), 9001);
        std::fs::write(&path, "n_shard = 16\n").unwrap();
        let err = NodeConfig::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("n_shard"), "{err}");
    }

    #[test]
    fn thread_counts_are_bounded() {
        let cfg = NodeConfig::load(
            None,
            &Overrides {
                arbiters: Some(1),
                worker_threads: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((cfg.arbiters, cfg.worker_threads), (1, Some(3)));
        for (arbiters, worker_threads, field) in [
            (0, None, "arbiters"),
            (65, None, "arbiters"),
            (2, Some(0), "worker_threads"),
            (2, Some(257), "worker_threads"),
        ] {
            let err = NodeConfig {
                arbiters,
                worker_threads,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn publishes_in_flight_is_bounded() {
        let cfg = NodeConfig::load(
            None,
            &Overrides {
                publishes_in_flight: Some(512),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.publishes_in_flight, 512);
        assert_eq!(NodeConfig::default().publishes_in_flight, 256);
        for n in [0, 1025] {
            let err = NodeConfig {
                publishes_in_flight: n,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(err.contains("publishes_in_flight"), "{n}: {err}");
        }
    }

    #[test]
    fn store_and_cluster_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "store = \"postgres\"\npostgres_url = \"postgres://u:p@127.0.0.1/db\"\n\
             cluster_id = 2\ncluster_listen = \"127.0.0.1:7002\"\n\
             cluster_secret = \"0123456789abcdef\"\n\
             cluster_peers = \"1=127.0.0.1:7001,2=127.0.0.1:7002\"\n",
        )
        .unwrap();
        let cfg = NodeConfig::load(Some(&path), &Overrides::default()).unwrap();
        let m = cfg.cluster_membership().unwrap().unwrap();
        assert_eq!((m.id, m.listen.port(), m.peers.len()), (2, 7002, 2));
        assert!(m.join.is_empty());
        // A joiner names members to contact instead of founding peers.
        let joiner = NodeConfig {
            cluster_id: Some(4),
            cluster_listen: Some("127.0.0.1:7004".parse().unwrap()),
            cluster_peers: None,
            cluster_join: Some("127.0.0.1:7001, 127.0.0.1:7002".into()),
            ..cfg.clone()
        };
        let m = joiner.cluster_membership().unwrap().unwrap();
        assert_eq!((m.id, m.join.len(), m.peers.len()), (4, 2, 0));
        assert!(NodeConfig::default()
            .cluster_membership()
            .unwrap()
            .is_none());

        let refused = |cfg: NodeConfig, field: &str| {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        };
        refused(
            NodeConfig {
                store: "sqlite".into(),
                ..Default::default()
            },
            "store",
        );
        refused(
            NodeConfig {
                store: "postgres".into(),
                ..Default::default()
            },
            "postgres_url",
        );
        refused(
            NodeConfig {
                cluster_id: Some(3),
                ..cfg.clone()
            },
            "cluster_peers",
        );
        refused(
            NodeConfig {
                store: "embedded".into(),
                ..cfg.clone()
            },
            "store",
        );
        refused(
            NodeConfig {
                cluster_secret: Some("short".into()),
                ..cfg.clone()
            },
            "cluster_secret",
        );
        refused(
            NodeConfig {
                cluster_join: Some("127.0.0.1:7001".into()),
                ..cfg.clone()
            },
            "cluster_join",
        );
        refused(
            NodeConfig {
                cluster_peers: None,
                cluster_join: Some("127.0.0.1".into()),
                ..cfg.clone()
            },
            "cluster_join",
        );
        refused(
            NodeConfig {
                cluster_peers: None,
                cluster_join: Some("127.0.0.1:7001".into()),
                cluster_listen: Some("0.0.0.0:7002".parse().unwrap()),
                ..cfg.clone()
            },
            "cluster_listen",
        );
        refused(
            NodeConfig {
                cluster_listen: None,
                ..cfg
            },
            "cluster_listen",
        );
    }

    #[test]
    fn broker_user_comes_from_the_url() {
        let cfg = NodeConfig {
            broker_url: "amqp://node-1:secret@10.0.0.1:5672/%2f".into(),
            ..Default::default()
        };
        assert_eq!(cfg.broker_user(), "node-1");
        assert_eq!(NodeConfig::default().broker_user(), "guest");
    }
}
