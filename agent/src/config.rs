//! The agent's typed configuration: a TOML file, then `COMODIT_*` environment variables, then
//! command-line flags, each overriding the one before. Unknown keys in the file are refused.
//! Every default is listed in the README.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Holds credentials (0600), the local store and the metrics textfile; created 0700.
    pub state_dir: PathBuf,
    /// The broker, without credentials (they come from the state directory).
    pub broker_url: String,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// The cluster's shard count (fixed at cluster creation; given at enrollment).
    pub n_shards: u32,
    /// Routed heartbeat period; 0 turns it off (liveness then rests on AMQP heartbeats alone).
    pub heartbeat_s: u64,
    /// AMQP connection heartbeat: the broker notices a dead agent within about twice this.
    pub amqp_heartbeat_s: u16,
    /// AMQP frame size: lapin sizes its IO buffers from it, so a small frame keeps the idle agent
    /// small (16 KiB: about 8 MiB resident instead of 16). Large commands just take more frames.
    pub amqp_frame_max: u32,
    /// Compliance check period, and its random spread in percent.
    pub check_interval_s: u64,
    pub check_jitter_pct: u32,
    /// Check monitored files as soon as inotify reports a change to them.
    pub inotify: bool,
    /// How many recent command ids (and replies) are remembered for de-duplication.
    pub dedup_window: usize,
    /// Commands in flight at once (AMQP prefetch).
    pub prefetch: u16,
    /// Manage users, groups and repos under this root instead of `/` (throwaway roots, images).
    pub system_root: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: String,
    /// A tracing filter (`info`, `comodit_agent=debug`).
    pub log: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_dir: PathBuf::from("/var/lib/comodit-agent"),
            broker_url: "amqp://127.0.0.1:5672/%2f".into(),
            prefix: "comodit".into(),
            n_shards: 256,
            heartbeat_s: 300,
            amqp_heartbeat_s: 30,
            amqp_frame_max: 16384,
            check_interval_s: 300,
            check_jitter_pct: 10,
            inotify: true,
            dedup_window: 4096,
            prefetch: 8,
            system_root: None,
            log_format: "text".into(),
            log: "info".into(),
        }
    }
}

/// Flags (and their `COMODIT_*` variables) that override the file.
#[derive(Clone, Debug, Default, Args)]
pub struct Overrides {
    #[arg(long, env = "COMODIT_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    #[arg(long, env = "COMODIT_BROKER_URL", global = true)]
    pub broker_url: Option<String>,
    #[arg(long, env = "COMODIT_PREFIX", global = true)]
    pub prefix: Option<String>,
    #[arg(long, env = "COMODIT_N_SHARDS", global = true)]
    pub n_shards: Option<u32>,
    #[arg(long, env = "COMODIT_HEARTBEAT_S", global = true)]
    pub heartbeat_s: Option<u64>,
    #[arg(long, env = "COMODIT_AMQP_HEARTBEAT_S", global = true)]
    pub amqp_heartbeat_s: Option<u16>,
    #[arg(long, env = "COMODIT_AMQP_FRAME_MAX", global = true)]
    pub amqp_frame_max: Option<u32>,
    #[arg(long, env = "COMODIT_CHECK_INTERVAL_S", global = true)]
    pub check_interval_s: Option<u64>,
    #[arg(long, env = "COMODIT_CHECK_JITTER_PCT", global = true)]
    pub check_jitter_pct: Option<u32>,
    #[arg(long, env = "COMODIT_INOTIFY", global = true)]
    pub inotify: Option<bool>,
    #[arg(long, env = "COMODIT_DEDUP_WINDOW", global = true)]
    pub dedup_window: Option<usize>,
    #[arg(long, env = "COMODIT_PREFETCH", global = true)]
    pub prefetch: Option<u16>,
    #[arg(long, env = "COMODIT_SYSTEM_ROOT", global = true)]
    pub system_root: Option<PathBuf>,
    #[arg(long, env = "COMODIT_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    #[arg(long, env = "COMODIT_LOG", global = true)]
    pub log: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl AgentConfig {
    /// Loads the file (if any), applies the overrides and validates the result.
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
            None => AgentConfig::default(),
        };
        let o = overrides.clone();
        macro_rules! take {
            ($($f:ident),*) => {$( if let Some(v) = o.$f { cfg.$f = v; } )*};
        }
        take!(
            state_dir,
            broker_url,
            prefix,
            n_shards,
            heartbeat_s,
            amqp_heartbeat_s,
            amqp_frame_max,
            check_interval_s,
            check_jitter_pct,
            inotify,
            dedup_window,
            prefetch,
            log_format,
            log
        );
        if o.system_root.is_some() {
            cfg.system_root = o.system_root;
        }
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
        if self.n_shards == 0 {
            return invalid("n_shards", "must be positive");
        }
        if let Err(e) = comodit_protocol::Names::new(&self.prefix) {
            return invalid("prefix", &e.to_string());
        }
        if !(self.broker_url.starts_with("amqp://") || self.broker_url.starts_with("amqps://")) {
            return invalid("broker_url", "must start with amqp:// or amqps://");
        }
        if !(4096..=1 << 20).contains(&self.amqp_frame_max) {
            return invalid("amqp_frame_max", "must be 4096..=1048576");
        }
        if self.check_interval_s == 0 {
            return invalid("check_interval_s", "must be positive");
        }
        if self.check_jitter_pct > 100 {
            return invalid("check_jitter_pct", "must be 0..=100");
        }
        if self.dedup_window == 0 || self.prefetch == 0 {
            return invalid("dedup_window/prefetch", "must be positive");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return invalid("log_format", "text or json");
        }
        Ok(())
    }

    pub fn names(&self) -> comodit_protocol::Names {
        comodit_protocol::Names::new(&self.prefix).expect("validated")
    }
}

/// Adds `frame_max` to the URL's query unless it names one already.
pub fn with_frame_max(url: &str, frame_max: u32) -> String {
    if url.contains("frame_max=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}frame_max={frame_max}")
}

/// `broker_url` with `user:password@` put in (replacing any credentials it had), percent-encoded.
pub fn url_with_credentials(broker_url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = broker_url.split_once("://").unwrap_or(("amqp", broker_url));
    let rest = match rest.split_once('@') {
        Some((_, after)) if !after.contains('/') || rest.find('@') < rest.find('/') => after,
        _ => rest,
    };
    format!("{scheme}://{}:{}@{rest}", encode(user), encode(password))
}

fn encode(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "prefix = \"lab\"\nheartbeat_s = 60\n").unwrap();
        let o = Overrides {
            heartbeat_s: Some(0),
            ..Default::default()
        };
        let cfg = AgentConfig::load(Some(&path), &o).unwrap();
        assert_eq!(cfg.prefix, "lab");
        assert_eq!(cfg.heartbeat_s, 0);
        assert_eq!(cfg.n_shards, 256);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "prefx = \"lab\"\n").unwrap();
        let err = AgentConfig::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("prefx"), "{err}");
        let o = Overrides {
            n_shards: Some(0),
            ..Default::default()
        };
        assert!(AgentConfig::load(None, &o).is_err());
        let o = Overrides {
            broker_url: Some("http://x".into()),
            ..Default::default()
        };
        assert!(AgentConfig::load(None, &o).is_err());
    }

    #[test]
    fn frame_max_goes_into_the_query() {
        assert_eq!(
            with_frame_max("amqp://h/%2f", 16384),
            "amqp://h/%2f?frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?heartbeat=5", 8192),
            "amqp://h/%2f?heartbeat=5&frame_max=8192"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?frame_max=4096", 8192),
            "amqp://h/%2f?frame_max=4096"
        );
    }

    #[test]
    fn credentials_go_into_the_url() {
        assert_eq!(
            url_with_credentials("amqp://127.0.0.1:5672/%2f", "h-1", "p@ss/w"),
            "amqp://h-1:p%40ss%2Fw@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url_with_credentials("amqp://guest:guest@127.0.0.1:5672/%2f", "u", "p"),
            "amqp://u:p@127.0.0.1:5672/%2f"
        );
    }
}
