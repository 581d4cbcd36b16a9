//! The RabbitMQ management API, for what AMQP cannot do: broker users and their permissions, and
//! closing a user's connections (DESIGN §5, "Per-agent credentials").
//!
//! [`BrokerAdmin`] speaks HTTP with `ureq` on tokio's blocking pool; every call is bounded by a
//! timeout. Its errors say whether the broker certainly did not do it ([`AdminError::Refused`],
//! [`AdminError::Unreachable`]) or whether the outcome is unknown ([`AdminError::Unknown`]:
//! timeout, connection reset, server error), so the caller can undo or retry. Every write here
//! is idempotent (`PUT` of the whole record, `DELETE` where 404 counts as done), so the usual way
//! to resolve an unknown outcome is to do it again.
//!
//! What a host's user may do is [`Names::agent_permissions`]: its own queue, publishing on
//! `<p>.up` with its own routing keys only, nothing else. The enrollment user
//! ([`BrokerAdmin::ensure_enroll_user`]) is shared by agents that have no identity yet and may
//! only publish on `<p>.enroll` (its answer comes through direct reply-to, which needs no
//! permission on RabbitMQ 3.10).
//!
//! Passwords travel only in request bodies; no url, log line or error carries one.

use std::sync::Arc;
use std::time::Duration;

use comodit_protocol::{HostId, Names};
use serde_json::{json, Value};
use tracing::{debug, info};

/// How long one management call may take, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest answer read; a listing of one user's connections is a few hundred bytes each.
const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
/// How much of an error answer is kept in [`AdminError::Refused`].
const MAX_REASON_CHARS: usize = 300;

/// Why a management call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The API answered 4xx: the broker certainly did not do it.
    #[error("management API refused {operation}: HTTP {status}: {reason}")]
    Refused {
        operation: String,
        status: u16,
        reason: String,
    },
    /// The API could not be reached (connection refused, unknown host, connect timeout): the
    /// request was certainly not sent.
    #[error("management API unreachable for {operation}: {reason}")]
    Unreachable { operation: String, reason: String },
    /// The request may have reached the broker but no complete answer came back (timeout,
    /// connection reset, 5xx): it may or may not have taken effect. Every call here is
    /// idempotent: do it again to resolve it.
    #[error("outcome unknown for {operation}: {reason}")]
    Unknown { operation: String, reason: String },
    /// A value given to the client is unusable (bad url, empty name).
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl AdminError {
    /// True only when the call may have taken effect without the caller knowing.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, AdminError::Unknown { .. })
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            AdminError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of the management API of one vhost. Cheap to clone.
#[derive(Clone)]
pub struct BrokerAdmin {
    inner: Arc<Inner>,
}

struct Inner {
    /// `http(s)://host:port`, no trailing slash, no credentials.
    base: String,
    /// The vhost, percent-encoded for paths (`%2F` for `/`).
    vhost_path: String,
    vhost: String,
    /// `Basic <base64(user:password)>`.
    authorization: String,
    user: String,
    http: ureq::Agent,
}

impl std::fmt::Debug for BrokerAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAdmin")
            .field("url", &self.inner.base)
            .field("user", &self.inner.user)
            .field("password", &"***")
            .field("vhost", &self.inner.vhost)
            .finish()
    }
}

impl BrokerAdmin {
    /// A client for `url` (`http://127.0.0.1:15672`; credentials are given apart, not in the
    /// url) acting on `vhost` with [`DEFAULT_TIMEOUT`] per call.
    pub fn new(url: &str, user: &str, password: &str, vhost: &str) -> Result<Self, AdminError> {
        Self::with_timeout(url, user, password, vhost, DEFAULT_TIMEOUT)
    }

    pub fn with_timeout(
        url: &str,
        user: &str,
        password: &str,
        vhost: &str,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let base = url.trim_end_matches('/');
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .ok_or_else(|| invalid("url", "must start with http:// or https://"))?;
        if rest.is_empty() || rest.contains('@') || rest.contains('/') {
            return Err(invalid(
                "url",
                "must be scheme://host[:port], without credentials or path",
            ));
        }
        if user.is_empty() {
            return Err(invalid("user", "empty"));
        }
        if vhost.is_empty() {
            return Err(invalid("vhost", "empty"));
        }
        if timeout.is_zero() {
            return Err(invalid("timeout", "must be positive"));
        }
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(5))))
            .http_status_as_error(false)
            .max_redirects(0)
            // Callers make many calls at once (the node's enrollment workers): keep their
            // connections alive rather than open one per call.
            .max_idle_connections(64)
            .max_idle_connections_per_host(64)
            .user_agent(concat!("comodit/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(BrokerAdmin {
            inner: Arc::new(Inner {
                base: base.to_owned(),
                vhost_path: encode(vhost),
                vhost: vhost.to_owned(),
                authorization: basic_auth(user, password),
                user: user.to_owned(),
                http,
            }),
        })
    }

    /// The vhost this client acts on.
    pub fn vhost(&self) -> &str {
        &self.inner.vhost
    }

    /// Creates (or updates) the broker user of `host` with `password` and exactly the
    /// permissions of [`Names::agent_permissions`]: three calls (user without tags, vhost
    /// permissions, topic permissions on `<p>.up`). Idempotent; on an unknown outcome, call it
    /// again. Until the second call succeeds the user can do nothing; the caller hands out the
    /// password only after all three succeeded.
    pub async fn create_agent_user(
        &self,
        names: &Names,
        host: HostId,
        password: &str,
    ) -> Result<(), AdminError> {
        let user = host.to_string();
        let perms = names.agent_permissions(host);
        self.put_user(&user, password, "").await?;
        self.put_permissions(&user, &perms.configure, &perms.write, &perms.read)
            .await?;
        let path = format!(
            "/api/topic-permissions/{}/{}",
            self.inner.vhost_path,
            encode(&user)
        );
        self.call(
            "PUT",
            path,
            Some(json!({
                "exchange": perms.topic_exchange,
                "write": perms.topic_write,
                "read": perms.topic_read,
            })),
        )
        .await?;
        debug!(host_id = %host, "broker user created");
        Ok(())
    }

    /// [`BrokerAdmin::create_agent_user`] for many hosts in one call: a single
    /// `POST /api/definitions` carrying every user (password, no tags), its vhost permissions
    /// and its topic permissions. Each import makes RabbitMQ 3.10 garbage-collect every process
    /// of the broker eleven times, about 3 s of broker CPU with 50,000 host queues, whatever the
    /// import's size; three calls cost about 4 ms. So this pays only for a crowd of users (the
    /// node's enrollment uses it from 1,024 hosts waiting together, ARCHITECTURE §21).
    /// Idempotent; the import is not atomic, so on any error some users may exist: delete them
    /// or call again.
    pub async fn create_agent_users(
        &self,
        names: &Names,
        hosts: &[(HostId, &str)],
    ) -> Result<(), AdminError> {
        if hosts.is_empty() {
            return Ok(());
        }
        let vhost = &self.inner.vhost;
        let mut users = Vec::with_capacity(hosts.len());
        let mut permissions = Vec::with_capacity(hosts.len());
        let mut topic_permissions = Vec::with_capacity(hosts.len());
        for (host, password) in hosts {
            if password.is_empty() {
                return Err(invalid("password", "empty"));
            }
            let user = host.to_string();
            let perms = names.agent_permissions(*host);
            users.push(json!({ "name": user, "password": password, "tags": "" }));
            permissions.push(json!({
                "user": user, "vhost": vhost,
                "configure": perms.configure, "write": perms.write, "read": perms.read,
            }));
            topic_permissions.push(json!({
                "user": user, "vhost": vhost, "exchange": perms.topic_exchange,
                "write": perms.topic_write, "read": perms.topic_read,
            }));
        }
        self.call(
            "POST",
            "/api/definitions".into(),
            Some(json!({
                "users": users,
                "permissions": permissions,
                "topic_permissions": topic_permissions,
            })),
        )
        .await?;
        info!(users = hosts.len(), "broker users created in one import");
        Ok(())
    }

    /// Replaces the password of an existing user, keeping its tags and permissions. Refused
    /// (404) if there is no such user. Live connections stay open: close them with
    /// [`BrokerAdmin::close_connections`].
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), AdminError> {
        let path = format!("/api/users/{}", encode(user));
        let current = self.call("GET", path, None).await?;
        let tags = match &current["tags"] {
            // 3.10 answers a list; older versions a comma-separated string.
            Value::Array(tags) => tags
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            Value::String(tags) => tags.clone(),
            _ => String::new(),
        };
        self.put_user(user, password, &tags).await?;
        debug!(user, "broker password replaced");
        Ok(())
    }

    /// Deletes a user; RabbitMQ then closes its connections. A user that does not exist is
    /// fine: returns whether it existed.
    pub async fn delete_user(&self, user: &str) -> Result<bool, AdminError> {
        let path = format!("/api/users/{}", encode(user));
        match self.call("DELETE", path, None).await {
            Ok(_) => {
                info!(user, "broker user deleted");
                Ok(true)
            }
            Err(AdminError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether a user exists.
    pub async fn user_exists(&self, user: &str) -> Result<bool, AdminError> {
        let path = format!("/api/users/{}", encode(user));
        match self.call("GET", path, None).await {
            Ok(_) => Ok(true),
            Err(AdminError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The names of the connections `user` has open. Read from the broker's connection
    /// tracking (`/api/connections/username/..`), which knows a connection as soon as it is
    /// open, unlike the statistics behind `/api/connections`.
    pub async fn connections_of(&self, user: &str) -> Result<Vec<String>, AdminError> {
        let path = format!("/api/connections/username/{}", encode(user));
        let operation = format!("GET {path}");
        let listed = self.call("GET", path, None).await?;
        let Value::Array(items) = listed else {
            return Err(AdminError::Unknown {
                operation,
                reason: "the answer is not a JSON array".into(),
            });
        };
        Ok(items
            .iter()
            .filter(|c| c["user"].as_str() == Some(user))
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// Closes every connection of `user` (`reason` is shown to the client) and returns how
    /// many it had just before. The broker closes them through its connection tracking, so a
    /// connection opened a moment ago is closed too; one opened after this call is not.
    pub async fn close_connections(&self, user: &str, reason: &str) -> Result<usize, AdminError> {
        let open = self.connections_of(user).await?.len();
        let path = format!("/api/connections/username/{}", encode(user));
        self.call_with_reason("DELETE", path, None, Some(reason))
            .await?;
        if open > 0 {
            info!(user, open, "broker connections closed");
        }
        Ok(open)
    }

    /// Creates (or updates) the shared enrollment user: no tags; configure nothing, read
    /// nothing, write only `<p>.enroll`. That is enough to publish an enrollment request and to
    /// receive its reply through direct reply-to (`amq.rabbitmq.reply-to` is not a queue and
    /// RabbitMQ checks no permission to consume from it), and it cannot publish on `<p>.up` or
    /// `<p>.down`, nor consume or declare any queue.
    ///
    /// The user is per vhost, so one enrollment user serves one prefix: a second prefix on the
    /// same vhost needs its own user name.
    pub async fn ensure_enroll_user(
        &self,
        names: &Names,
        user: &str,
        password: &str,
    ) -> Result<(), AdminError> {
        if user.parse::<HostId>().is_ok() {
            // A host's user would lose its own permissions.
            return Err(invalid("enroll user", "must not be a host id"));
        }
        self.put_user(user, password, "").await?;
        let write = format!("^{}$", regex_escape(&names.enroll()));
        self.put_permissions(user, "^$", &write, "^$").await?;
        info!(user, "enrollment broker user ensured");
        Ok(())
    }

    /// Creates (or updates) a shared *fleet* user for load tests (never for production agents):
    /// many simulated hosts share one connection, so they cannot each log in as themselves.
    /// It gets the `impersonator` tag, so it may publish with any host's `user_id` (the node
    /// trusts that property: DESIGN §5), and permissions bounded to the prefix: configure
    /// nothing, write only `<p>.up`, read only `<p>.agent.*`, and on `<p>.up` only the routing
    /// keys of agents' own kinds — never `kick`, which the node accepts from its own user only.
    /// Delete it when the run ends ([`BrokerAdmin::delete_user`]).
    pub async fn ensure_fleet_user(
        &self,
        names: &Names,
        user: &str,
        password: &str,
    ) -> Result<(), AdminError> {
        if user.parse::<HostId>().is_ok() {
            return Err(invalid("fleet user", "must not be a host id"));
        }
        self.put_user(user, password, "impersonator").await?;
        let p = regex_escape(names.prefix());
        self.put_permissions(
            user,
            "^$",
            &format!("^{p}\\.up$"),
            &format!("^{p}\\.agent\\..+$"),
        )
        .await?;
        let kinds = comodit_protocol::UpKind::ALL
            .iter()
            .filter(|k| **k != comodit_protocol::UpKind::Kick)
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join("|");
        let path = format!(
            "/api/topic-permissions/{}/{}",
            self.inner.vhost_path,
            encode(user)
        );
        self.call(
            "PUT",
            path,
            Some(json!({
                "exchange": names.up_exchange(),
                "write": format!("^up\\.[0-9]+\\.[0-9a-f-]{{36}}\\.({kinds})$"),
                "read": "^$",
            })),
        )
        .await?;
        info!(user, "fleet broker user ensured");
        Ok(())
    }

    /// Deletes many users in one call (`POST /api/users/bulk-delete`); users that do not exist
    /// are skipped by the broker. RabbitMQ closes their connections.
    pub async fn delete_users(&self, users: &[String]) -> Result<(), AdminError> {
        if users.is_empty() {
            return Ok(());
        }
        self.call(
            "POST",
            "/api/users/bulk-delete".into(),
            Some(json!({ "users": users })),
        )
        .await
        .map(|_| ())
    }

    async fn put_user(&self, user: &str, password: &str, tags: &str) -> Result<(), AdminError> {
        if user.is_empty() {
            return Err(invalid("user", "empty"));
        }
        let path = format!("/api/users/{}", encode(user));
        self.call(
            "PUT",
            path,
            Some(json!({ "password": password, "tags": tags })),
        )
        .await
        .map(|_| ())
    }

    async fn put_permissions(
        &self,
        user: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), AdminError> {
        let path = format!(
            "/api/permissions/{}/{}",
            self.inner.vhost_path,
            encode(user)
        );
        self.call(
            "PUT",
            path,
            Some(json!({ "configure": configure, "write": write, "read": read })),
        )
        .await
        .map(|_| ())
    }

    async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<Value>,
    ) -> Result<Value, AdminError> {
        self.call_with_reason(method, path, body, None).await
    }

    /// One request on the blocking pool. 2xx → the JSON answer (`Null` when empty).
    async fn call_with_reason(
        &self,
        method: &'static str,
        path: String,
        body: Option<Value>,
        reason: Option<&str>,
    ) -> Result<Value, AdminError> {
        let inner = self.inner.clone();
        let reason = reason.map(str::to_owned);
        let operation = format!("{method} {path}");
        let op = operation.clone();
        let joined =
            tokio::task::spawn_blocking(move || inner.blocking_call(method, &path, body, reason))
                .await;
        match joined {
            Ok(r) => r,
            Err(e) => Err(AdminError::Unknown {
                operation: op,
                reason: format!("the request task failed: {e}"),
            }),
        }
        .inspect_err(|e| debug!(%operation, error = %e, "management call failed"))
    }
}

impl Inner {
    fn blocking_call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
        reason: Option<String>,
    ) -> Result<Value, AdminError> {
        let url = format!("{}{}", self.base, path);
        let operation = || format!("{method} {path}");
        let sent = match method {
            "GET" => self.request_without_body(self.http.get(&url), reason),
            "DELETE" => self.request_without_body(self.http.delete(&url), reason),
            "PUT" | "POST" => {
                let req = if method == "PUT" {
                    self.http.put(&url)
                } else {
                    self.http.post(&url)
                }
                .header("Authorization", &self.authorization);
                match body {
                    Some(body) => req.send_json(body),
                    None => req.send_empty(),
                }
            }
            _ => unreachable!("only GET, PUT, POST and DELETE are used"),
        };
        let mut response = sent.map_err(|e| classify(operation(), e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string()
            .map_err(|e| AdminError::Unknown {
                operation: operation(),
                reason: format!("HTTP {status}, reading the answer: {e}"),
            });
        match status {
            200..=299 => {
                let text = text?;
                if text.trim().is_empty() {
                    Ok(Value::Null)
                } else {
                    serde_json::from_str(&text).map_err(|e| AdminError::Unknown {
                        operation: operation(),
                        reason: format!("HTTP {status} with an answer that is not JSON: {e}"),
                    })
                }
            }
            400..=499 => Err(AdminError::Refused {
                operation: operation(),
                status,
                reason: error_reason(&text.unwrap_or_default()),
            }),
            _ => Err(AdminError::Unknown {
                operation: operation(),
                reason: format!("HTTP {status}: {}", error_reason(&text.unwrap_or_default())),
            }),
        }
    }

    fn request_without_body(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
        reason: Option<String>,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = req.header("Authorization", &self.authorization);
        if let Some(reason) = reason {
            // Header values must be visible ASCII; the reason is a label, not data.
            let clean: String = reason
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(200)
                .collect();
            req = req.header("X-Reason", clean);
        }
        req.call()
    }
}

/// Transport errors: those before anything was sent are certain failures, the rest unknown.
fn classify(operation: String, e: ureq::Error) -> AdminError {
    use std::io::ErrorKind;
    let certain = match &e {
        ureq::Error::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::AddrNotAvailable | ErrorKind::NotFound
        ),
        ureq::Error::Timeout(t) => {
            matches!(t, ureq::Timeout::Resolve | ureq::Timeout::Connect)
        }
        ureq::Error::HostNotFound
        | ureq::Error::BadUri(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Http(_) => true,
        _ => false,
    };
    let reason = e.to_string();
    if certain {
        AdminError::Unreachable { operation, reason }
    } else {
        AdminError::Unknown { operation, reason }
    }
}

/// The `reason` (or `error`) of a management API error answer, else the start of the text.
fn error_reason(text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let reason = parsed
        .as_ref()
        .and_then(|v| v["reason"].as_str().or_else(|| v["error"].as_str()))
        .unwrap_or(text);
    reason.chars().take(MAX_REASON_CHARS).collect()
}

fn invalid(field: &'static str, reason: &str) -> AdminError {
    AdminError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes a name for a RabbitMQ permission regex (the same rule as the protocol's).
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

/// The `Authorization` header value of HTTP basic authentication (RFC 7617).
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(TABLE[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(
            encode("127.0.0.1:40706 -> 127.0.0.1:5672"),
            "127.0.0.1%3A40706%20-%3E%20127.0.0.1%3A5672"
        );
        assert_eq!(encode("comodit-enroll"), "comodit-enroll");
    }

    #[test]
    fn bad_settings_are_refused_and_debug_hides_the_password() {
        for url in [
            "127.0.0.1:15672",
            "http://u:p@127.0.0.1:15672",
            "http://h/api",
            "http://",
        ] {
            assert!(
                matches!(
                    BrokerAdmin::new(url, "u", "p", "/"),
                    Err(AdminError::Invalid { field: "url", .. })
                ),
                "{url}"
            );
        }
        assert!(BrokerAdmin::new("http://h", "", "p", "/").is_err());
        assert!(BrokerAdmin::new("http://h", "u", "p", "").is_err());
        let admin = BrokerAdmin::new("http://127.0.0.1:15672/", "admin", "s3cr3t", "/").unwrap();
        let shown = format!("{admin:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains(&base64(b"admin:s3cr3t")), "{shown}");
        assert!(shown.contains("http://127.0.0.1:15672\""), "{shown}");
    }

    #[test]
    fn error_reasons_are_extracted_and_bounded() {
        assert_eq!(
            error_reason(r#"{"error":"Object Not Found","reason":"Not Found"}"#),
            "Not Found"
        );
        assert_eq!(error_reason(r#"{"error":"bad_request"}"#), "bad_request");
        assert_eq!(error_reason("plain"), "plain");
        assert_eq!(error_reason(&"x".repeat(1000)).len(), MAX_REASON_CHARS);
    }

    #[tokio::test]
    async fn an_unreachable_api_is_a_certain_failure() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let admin = BrokerAdmin::new("http://127.0.0.1:1", "u", "p", "/").unwrap();
        let err = admin.user_exists("x").await.unwrap_err();
        assert!(matches!(err, AdminError::Unreachable { .. }), "{err:?}");
        assert!(!err.is_outcome_unknown());
    }

    #[tokio::test]
    async fn a_silent_server_is_an_unknown_outcome() {
        // Accepts the connection, reads the request, never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
            // Hold the socket until the client gave up.
            let _ = std::io::Read::read(&mut s, &mut buf);
        });
        let admin = BrokerAdmin::with_timeout(
            &format!("http://127.0.0.1:{port}"),
            "u",
            "p",
            "/",
            Duration::from_millis(300),
        )
        .unwrap();
        let err = admin.delete_user("x").await.unwrap_err();
        assert!(err.is_outcome_unknown(), "{err:?}");
        server.join().unwrap();
    }
}
