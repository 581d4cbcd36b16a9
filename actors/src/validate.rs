//! The checks every delivery from a shard queue passes before anything else looks at it
//! (DESIGN §5, §12): a well-formed routing key for this shard, a sender that is the host itself
//! (or the node, for `kick`), and a body that parses and names the same host. Plain code over
//! plain data: the shard consumer calls it, the tests feed it garbage.

use comodit_protocol::{ProtocolError, Shard, Up, UpKey, UpKind};

/// Why a delivery was refused; [`Reject::reason`] is the `reason` label of
/// `comodit_node_rejected_messages_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// Not `up.<shard>.<host>.<kind>`, or the shard does not match the host.
    RoutingKey(String),
    /// A valid key of another shard (a binding mistake).
    WrongShard { key: Shard, queue: Shard },
    /// The broker-validated `user_id` is not the host of the key (or not the node for `kick`).
    Forged { user_id: Option<String> },
    /// The body does not parse (`malformed`, `invalid`, `too_large`).
    Body(ProtocolError),
    /// The body names another host than the routing key.
    HostMismatch,
    /// No such host in the store.
    UnknownHost,
}

impl Reject {
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::RoutingKey(_) => "routing_key",
            Reject::WrongShard { .. } => "wrong_shard",
            Reject::Forged { .. } => "forged",
            Reject::Body(e) => e.label(),
            Reject::HostMismatch => "host_mismatch",
            Reject::UnknownHost => "unknown_host",
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::RoutingKey(e) => write!(f, "bad routing key: {e}"),
            Reject::WrongShard { key, queue } => {
                write!(
                    f,
                    "routing key of shard {key} on the queue of shard {queue}"
                )
            }
            Reject::Forged { user_id } => {
                write!(
                    f,
                    "sender {user_id:?} may not publish with this routing key"
                )
            }
            Reject::Body(e) => write!(f, "bad body: {}", truncate(&e.to_string(), 200)),
            Reject::HostMismatch => f.write_str("the body names another host than the routing key"),
            Reject::UnknownHost => f.write_str("no such host"),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks one delivery of the queue of `shard`; returns its key and parsed body.
pub fn check(
    routing_key: &str,
    user_id: Option<&str>,
    payload: &[u8],
    n_shards: u32,
    shard: Shard,
    node_user: &str,
) -> Result<(UpKey, Up), Reject> {
    let key = UpKey::parse(routing_key, n_shards).map_err(|e| {
        // The key is at most 255 bytes (AMQP short string); keep the log line short anyway.
        Reject::RoutingKey(truncate(&e.to_string(), 200).to_owned())
    })?;
    if key.shard != shard {
        return Err(Reject::WrongShard {
            key: key.shard,
            queue: shard,
        });
    }
    // Identity comes from the broker, never from the body (DESIGN §12).
    let allowed = match key.kind {
        UpKind::Kick => user_id == Some(node_user),
        _ => user_id.is_some_and(|u| u == key.host.to_string()),
    };
    if !allowed {
        return Err(Reject::Forged {
            user_id: user_id.map(|u| truncate(u, 64).to_owned()),
        });
    }
    let up = Up::decode(key.kind, payload).map_err(Reject::Body)?;
    if up.host() != key.host {
        return Err(Reject::HostMismatch);
    }
    Ok((key, up))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use comodit_protocol::{Bye, HostId, Kick, V1};

    const N: u32 = 8;

    fn bye(host: HostId) -> Vec<u8> {
        Up::Bye(Bye {
            v: V1,
            host,
            reason: "stop".into(),
        })
        .encode()
    }

    fn key(host: HostId, kind: UpKind) -> (String, Shard) {
        let k = UpKey::new(host, N, kind);
        (k.to_string(), k.shard)
    }

    #[test]
    fn a_good_message_passes() {
        let h = HostId::random();
        let (k, s) = key(h, UpKind::Bye);
        let (key, up) = check(&k, Some(&h.to_string()), &bye(h), N, s, "node").unwrap();
        assert_eq!(key.host, h);
        assert_eq!(up.kind(), UpKind::Bye);
    }

    #[test]
    fn keys_senders_and_bodies_are_checked() {
        let h = HostId::random();
        let other = HostId::random();
        let me = h.to_string();
        let (k, s) = key(h, UpKind::Bye);
        let reason = |r: Result<(UpKey, Up), Reject>| r.unwrap_err().reason();

        assert_eq!(
            reason(check("up.x", Some(&me), &bye(h), N, s, "node")),
            "routing_key"
        );
        let wrong = Shard((s.0 + 1) % N);
        assert_eq!(
            reason(check(&k, Some(&me), &bye(h), N, wrong, "node")),
            "wrong_shard"
        );
        assert_eq!(reason(check(&k, None, &bye(h), N, s, "node")), "forged");
        assert_eq!(
            reason(check(&k, Some(&other.to_string()), &bye(h), N, s, "node")),
            "forged"
        );
        // The node's own user may only kick.
        assert_eq!(
            reason(check(&k, Some("node"), &bye(h), N, s, "node")),
            "forged"
        );
        assert_eq!(
            reason(check(&k, Some(&me), b"{not json", N, s, "node")),
            "malformed"
        );
        assert_eq!(
            reason(check(&k, Some(&me), &bye(other), N, s, "node")),
            "host_mismatch"
        );
        let huge = vec![b' '; comodit_protocol::limits::MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            reason(check(&k, Some(&me), &huge, N, s, "node")),
            "too_large"
        );
    }

    #[test]
    fn only_the_node_kicks() {
        let h = HostId::random();
        let (k, s) = key(h, UpKind::Kick);
        let kick = Up::Kick(Kick {
            v: V1,
            host: h,
            cancel: None,
        })
        .encode();
        assert!(check(&k, Some("node"), &kick, N, s, "node").is_ok());
        let err = check(&k, Some(&h.to_string()), &kick, N, s, "node").unwrap_err();
        assert_eq!(err.reason(), "forged");
    }

    #[test]
    fn reasons_never_echo_long_input() {
        let h = HostId::random();
        let (k, s) = key(h, UpKind::Heartbeat);
        let body = format!(
            r#"{{"v":1,"host":"{h}","sent_at":"{}","drifted":0,"{}":1}}"#,
            Utc::now().to_rfc3339(),
            "x".repeat(10_000)
        );
        let err = check(&k, Some(&h.to_string()), body.as_bytes(), N, s, "node").unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }
}
