//! Broker names and routing keys (DESIGN §5), all under a configurable prefix.
//!
//! | name | what |
//! |---|---|
//! | `<p>.up` | topic exchange, routing key `up.<shard>.<host>.<kind>` |
//! | `<p>.shard.<n>` | quorum queue bound with `up.<n>.#` |
//! | `<p>.down` | direct exchange, routing key = host id |
//! | `<p>.agent.<host>` | one durable queue per host |
//! | `<p>.enroll` | direct exchange + queue for enrollment |

use std::fmt;

use crate::envelope::UpKind;
use crate::ids::{HostId, Shard};
use crate::ProtocolError;

/// The names of every exchange and queue for one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            prefix: "comodit".into(),
        }
    }
}

impl Names {
    /// A prefix is `[a-z0-9_-]+` (no dots, so names and permission regexes stay unambiguous).
    pub fn new(prefix: &str) -> Result<Self, ProtocolError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !ok {
            return Err(ProtocolError::invalid(
                "prefix",
                format!("must be [a-z0-9_-]{{1,64}}: {prefix:?}"),
            ));
        }
        Ok(Names {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn up_exchange(&self) -> String {
        format!("{}.up", self.prefix)
    }

    pub fn down_exchange(&self) -> String {
        format!("{}.down", self.prefix)
    }

    pub fn enroll(&self) -> String {
        format!("{}.enroll", self.prefix)
    }

    pub fn shard_queue(&self, shard: Shard) -> String {
        format!("{}.shard.{}", self.prefix, shard.0)
    }

    pub fn agent_queue(&self, host: HostId) -> String {
        format!("{}.agent.{}", self.prefix, host)
    }

    /// Binding key of a shard queue on the up exchange.
    pub fn shard_binding(shard: Shard) -> String {
        format!("up.{}.#", shard.0)
    }

    /// The broker permissions of a host's own user (DESIGN §5): (configure, write, read, topic
    /// write on the up exchange).
    pub fn agent_permissions(&self, host: HostId) -> AgentPermissions {
        let p = regex_escape(&self.prefix);
        AgentPermissions {
            configure: "^$".into(),
            write: format!("^{p}\\.up$"),
            read: format!("^{p}\\.agent\\.{host}$"),
            topic_exchange: self.up_exchange(),
            topic_write: format!("^up\\.[0-9]+\\.{host}\\.[a-z_]+$"),
            topic_read: "^$".into(),
        }
    }
}

/// What a host's broker user may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPermissions {
    pub configure: String,
    pub write: String,
    pub read: String,
    pub topic_exchange: String,
    pub topic_write: String,
    pub topic_read: String,
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The routing key of an upward message: `up.<shard>.<host>.<kind>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpKey {
    pub shard: Shard,
    pub host: HostId,
    pub kind: UpKind,
}

impl UpKey {
    pub fn new(host: HostId, n_shards: u32, kind: UpKind) -> Self {
        UpKey {
            shard: host.shard(n_shards),
            host,
            kind,
        }
    }

    /// Parses a routing key; the shard must match the host for `n_shards`.
    pub fn parse(key: &str, n_shards: u32) -> Result<Self, ProtocolError> {
        let bad = |why: &str| ProtocolError::invalid("routing_key", format!("{why}: {key:?}"));
        let mut parts = key.split('.');
        let (Some("up"), Some(shard), Some(host), Some(kind), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("not up.<shard>.<host>.<kind>"));
        };
        let shard = Shard(shard.parse().map_err(|_| bad("shard is not a number"))?);
        let host: HostId = host.parse()?;
        let kind = UpKind::parse(kind).ok_or_else(|| bad("unknown kind"))?;
        if host.shard(n_shards) != shard {
            return Err(bad("shard does not match host"));
        }
        Ok(UpKey { shard, host, kind })
    }
}

impl fmt::Display for UpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "up.{}.{}.{}", self.shard, self.host, self.kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_design() {
        let n = Names::default();
        let h: HostId = "7c9e6679-7425-40de-944b-e07fc1f90ae7".parse().unwrap();
        assert_eq!(n.up_exchange(), "comodit.up");
        assert_eq!(n.down_exchange(), "comodit.down");
        assert_eq!(n.shard_queue(Shard(7)), "comodit.shard.7");
        assert_eq!(
            n.agent_queue(h),
            "comodit.agent.7c9e6679-7425-40de-944b-e07fc1f90ae7"
        );
        let p = n.agent_permissions(h);
        assert_eq!(p.write, "^comodit\\.up$");
        assert_eq!(
            p.read,
            "^comodit\\.agent\\.7c9e6679-7425-40de-944b-e07fc1f90ae7$"
        );
        assert!(Names::new("Bad.Prefix").is_err());
        assert_eq!(
            Names::new("t-1").unwrap().agent_permissions(h).write,
            "^t\\-1\\.up$"
        );
    }

    #[test]
    fn up_keys_round_trip_and_check_shard() {
        let h = HostId::random();
        let k = UpKey::new(h, 256, UpKind::DriftCleared);
        let s = k.to_string();
        assert_eq!(UpKey::parse(&s, 256).unwrap(), k);
        let wrong = format!("up.{}.{}.reply", (k.shard.0 + 1) % 256, h);
        assert!(UpKey::parse(&wrong, 256).is_err());
        assert!(UpKey::parse("up.1.x.reply", 256).is_err());
        assert!(UpKey::parse(&format!("{s}.extra"), 256).is_err());
    }
}
