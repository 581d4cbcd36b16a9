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
    /// `text` or `json`.
    pub log_format: String,
    pub log: String,
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
            log_format: "text".into(),
            log: "info".into(),
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
    #[arg(long, env = "COMODIT_LOG_FORMAT")]
    pub log_format: Option<String>,
    #[arg(long, env = "COMODIT_LOG")]
    pub log: Option<String>,
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
            log_format,
            log
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
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return invalid("log_format", "text or json");
        }
        Ok(())
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
    fn broker_user_comes_from_the_url() {
        let cfg = NodeConfig {
            broker_url: "amqp://node-1:secret@10.0.0.1:5672/%2f".into(),
            ..Default::default()
        };
        assert_eq!(cfg.broker_user(), "node-1");
        assert_eq!(NodeConfig::default().broker_user(), "guest");
    }
}
