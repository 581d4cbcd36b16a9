//! How to reach the broker. The password in the url never leaves this module in clear: `Debug`
//! and every log line use [`redact_url`].

use std::fmt;

use lapin::uri::AMQPUri;

use crate::BusError;

/// Connection settings of one [`Bus`](crate::Bus).
#[derive(Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// `amqp://user:pass@host:port/vhost` (vhost percent-encoded, `%2f` for `/`).
    pub url: String,
    /// AMQP heartbeat in seconds: the connection-level liveness that replaces routed heartbeats
    /// (DESIGN §6). The broker may negotiate it lower, never higher.
    pub heartbeat_s: u16,
    /// Shown in the management UI, so an operator can tell a node from an agent.
    pub connection_name: String,
    /// Reconnect backoff floor and cap (see [`crate::backoff`]).
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Publishes waiting for their confirm at once, each on a channel of its own (1 to
    /// [`PUBLISHES_IN_FLIGHT_LIMIT`](crate::PUBLISHES_IN_FLIGHT_LIMIT)); more wait for a slot.
    pub max_publishes_in_flight: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            heartbeat_s: 30,
            connection_name: "comodit".into(),
            backoff_min_ms: 100,
            backoff_max_ms: 10_000,
            max_publishes_in_flight: crate::MAX_PUBLISHES_IN_FLIGHT,
        }
    }
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &redact_url(&self.url))
            .field("heartbeat_s", &self.heartbeat_s)
            .field("connection_name", &self.connection_name)
            .field("backoff_min_ms", &self.backoff_min_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("max_publishes_in_flight", &self.max_publishes_in_flight)
            .finish()
    }
}

impl BusConfig {
    /// Checks the settings without connecting, so a binary can refuse a bad configuration at
    /// start-up instead of retrying forever.
    pub fn validate(&self) -> Result<(), BusError> {
        if !(1..=crate::PUBLISHES_IN_FLIGHT_LIMIT).contains(&self.max_publishes_in_flight) {
            return Err(BusError::invalid(
                "max_publishes_in_flight",
                format!("must be 1..={}", crate::PUBLISHES_IN_FLIGHT_LIMIT),
            ));
        }
        self.amqp_uri().map(|_| ())
    }

    /// The parsed url with the heartbeat applied.
    pub(crate) fn amqp_uri(&self) -> Result<AMQPUri, BusError> {
        // Some of the parser's messages quote the whole url: show it redacted.
        let mut uri: AMQPUri = self.url.parse().map_err(|e: String| {
            let e = e.replace(&self.url, &redact_url(&self.url));
            BusError::invalid("url", format!("{} ({e})", redact_url(&self.url)))
        })?;
        // amq-protocol-uri 10 keeps only DNS names and turns an IP address into "localhost":
        // take the host from the url ourselves.
        if let Some(host) = url_host(&self.url) {
            uri.authority.host = host;
        }
        uri.query.heartbeat = Some(self.heartbeat_s);
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout =
                Some(crate::connection::CONNECT_TIMEOUT.as_millis() as u64);
        }
        Ok(uri)
    }
}

/// The host part of `scheme://[userinfo@]host[:port][/...]`, without IPv6 brackets.
fn url_host(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let hostport = &authority[authority.rfind('@').map_or(0, |at| at + 1)..];
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        &v6[..v6.find(']')?]
    } else {
        hostport.split(':').next().unwrap_or_default()
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// The url with its password replaced by `***` (`amqp://user:***@host:5672/%2f`).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "<url without scheme>".into();
    };
    let rest = &url[scheme_end + 3..];
    // The last '@' ends the user info even when a password holds an unencoded '@'.
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    format!("{}://{}:***@{}", &url[..scheme_end], user, &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_redaction_hide_the_password() {
        let config = BusConfig {
            url: "amqp://agent:s3cr3t@broker:5672/%2f".into(),
            ..BusConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("amqp://agent:***@broker:5672/%2f"),
            "{shown}"
        );
        assert_eq!(
            redact_url("amqps://u:p@ss/w@h/v"),
            "amqps://u:***@h/v",
            "a password with '@' and '/' is hidden whole"
        );
        assert_eq!(redact_url("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_url("nonsense"), "<url without scheme>");
    }

    #[test]
    fn uri_carries_the_heartbeat() {
        let config = BusConfig {
            heartbeat_s: 7,
            ..BusConfig::default()
        };
        let uri = config.amqp_uri().unwrap();
        assert_eq!(uri.query.heartbeat, Some(7));
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.authority.userinfo.username, "guest");
        assert_eq!(uri.authority.host, "127.0.0.1");
    }

    #[test]
    fn ip_hosts_are_kept() {
        for (url, host, port) in [
            ("amqp://u:p@10.1.2.3:5673/v", "10.1.2.3", 5673),
            ("amqp://u:p@[::1]:5672/%2f", "::1", 5672),
            ("amqp://broker.example/%2f", "broker.example", 5672),
        ] {
            let config = BusConfig {
                url: url.into(),
                ..BusConfig::default()
            };
            let uri = config.amqp_uri().unwrap();
            assert_eq!(
                (uri.authority.host.as_str(), uri.authority.port),
                (host, port),
                "{url}"
            );
        }
    }

    #[test]
    fn bad_url_is_refused_without_the_password() {
        let config = BusConfig {
            url: "http://u:topsecret@h/".into(),
            ..BusConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(matches!(err, BusError::Invalid { field: "url", .. }));
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[test]
    fn publishes_in_flight_is_bounded() {
        assert!(BusConfig::default().validate().is_ok());
        for n in [0, crate::PUBLISHES_IN_FLIGHT_LIMIT + 1] {
            let config = BusConfig {
                max_publishes_in_flight: n,
                ..BusConfig::default()
            };
            let err = config.validate().unwrap_err();
            assert!(
                matches!(
                    err,
                    BusError::Invalid {
                        field: "max_publishes_in_flight",
                        ..
                    }
                ),
                "{n}: {err}"
            );
        }
    }
}
