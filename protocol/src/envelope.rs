//! Envelopes: commands (node → agent), replies and events (agent → node), enrollment.
//!
//! Every envelope carries `"v": 1` and rejects unknown fields. Parsing goes through
//! [`Command::decode`] and [`Up::decode`], which check the size limit first and run
//! [`validate`](Command::validate) after serde, so a value of these types is always within limits.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{validate_abs_path, Collection, CommandId, Epoch, HostId, ResourceRef};
use crate::limits::*;
use crate::resource::Resource;
use crate::ProtocolError;

/// The protocol version, `1`. Deserializing any other number fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(1)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v == 1 {
            Ok(V1)
        } else {
            Err(serde::de::Error::custom(format!(
                "unsupported protocol version {v} (this side speaks 1)"
            )))
        }
    }
}

/// `enforce` changes the host; `dry_run` only reports what would change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    #[default]
    Enforce,
    DryRun,
}

/// A command to one agent, published on `comodit.down` with the host id as routing key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub v: V1,
    pub id: CommandId,
    pub host: HostId,
    /// The epoch of the shard assignment of the node that sent it (fencing, DESIGN §4).
    pub epoch: Epoch,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub body: Body,
}

/// What a command asks for (`"op"` on the wire).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Body {
    /// Apply an ordered list of resources; stop at the first failure.
    Apply {
        #[serde(default)]
        mode: ApplyMode,
        /// Also add these resources to the monitored baseline (replacing same refs).
        #[serde(default)]
        monitor: bool,
        resources: Vec<Resource>,
    },
    /// Make resources absent (delete the file, uninstall the package, ...) and drop them from the
    /// monitored baseline.
    Remove {
        #[serde(default)]
        mode: ApplyMode,
        refs: Vec<ResourceRef>,
    },
    /// The current state of one resource, in its spec's shape.
    Read {
        r#ref: ResourceRef,
    },
    /// The ids of one collection on the host. For path collections, the entries directly under
    /// `under` (required).
    List {
        collection: Collection,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        under: Option<String>,
    },
    /// Run a program (argv, never a shell unless argv names one).
    Run(RunSpec),
    Facts {},
    /// Run compliance now and answer with the drift found.
    Check {},
    Ping {},
    /// Replace the monitored baseline.
    SetDesired {
        resources: Vec<Resource>,
    },
}

impl Body {
    pub fn op(&self) -> &'static str {
        match self {
            Body::Apply { .. } => "apply",
            Body::Remove { .. } => "remove",
            Body::Read { .. } => "read",
            Body::List { .. } => "list",
            Body::Run(_) => "run",
            Body::Facts {} => "facts",
            Body::Check {} => "check",
            Body::Ping {} => "ping",
            Body::SetDesired { .. } => "set_desired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Killed (the whole process group) after this many seconds.
    pub timeout_s: u64,
    /// Send output as `output` events while it runs, besides the capped copy in the reply.
    #[serde(default)]
    pub stream: bool,
}

impl Command {
    /// Parses and validates a command. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Command, ProtocolError> {
        check_size(bytes)?;
        let cmd: Command =
            serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        cmd.validate()?;
        Ok(cmd)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands always serialize")
    }

    /// Limits serde does not express.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.expires_at < self.issued_at {
            return Err(ProtocolError::invalid(
                "expires_at",
                "expires before it was issued",
            ));
        }
        let count = |n: usize| {
            if n > MAX_RESOURCES_PER_COMMAND {
                Err(ProtocolError::TooLarge {
                    what: "resources",
                    size: n,
                    limit: MAX_RESOURCES_PER_COMMAND,
                })
            } else {
                Ok(())
            }
        };
        match &self.body {
            Body::Apply { resources, .. } | Body::SetDesired { resources } => {
                count(resources.len())
            }
            Body::Remove { refs, .. } => count(refs.len()),
            Body::List { collection, under } => match (collection.is_path(), under) {
                (true, Some(u)) => validate_abs_path("under", u),
                (true, None) => Err(ProtocolError::invalid(
                    "under",
                    "required to list a path collection",
                )),
                (false, Some(_)) => Err(ProtocolError::invalid(
                    "under",
                    "only path collections take 'under'",
                )),
                (false, None) => Ok(()),
            },
            Body::Run(run) => run.validate(),
            Body::Read { .. } | Body::Facts {} | Body::Check {} | Body::Ping {} => Ok(()),
        }
    }
}

impl RunSpec {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(ProtocolError::invalid("argv", "empty"));
        }
        if self.argv.len() > MAX_ARGV_ITEMS {
            return Err(ProtocolError::TooLarge {
                what: "argv",
                size: self.argv.len(),
                limit: MAX_ARGV_ITEMS,
            });
        }
        let bytes: usize = self.argv.iter().map(|a| a.len()).sum();
        if bytes > MAX_ARGV_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "argv bytes",
                size: bytes,
                limit: MAX_ARGV_BYTES,
            });
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(ProtocolError::invalid("argv", "contains NUL"));
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(ProtocolError::TooLarge {
                what: "env",
                size: self.env.len(),
                limit: MAX_ENV_VARS,
            });
        }
        for (k, v) in &self.env {
            let key_ok = !k.is_empty()
                && k.len() <= 256
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.starts_with(|c: char| c.is_ascii_digit());
            if !key_ok || v.contains('\0') || v.len() > MAX_TEXT_BYTES {
                return Err(ProtocolError::invalid("env", format!("bad variable {k:?}")));
            }
        }
        if let Some(cwd) = &self.cwd {
            validate_abs_path("cwd", cwd)?;
        }
        if self.timeout_s == 0 || self.timeout_s > MAX_RUN_TIMEOUT_S {
            return Err(ProtocolError::invalid(
                "timeout_s",
                format!("must be 1..={MAX_RUN_TIMEOUT_S}"),
            ));
        }
        Ok(())
    }
}

fn check_size(bytes: &[u8]) -> Result<(), ProtocolError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge {
            what: "message",
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    Ok(())
}

/// The outcome of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Failed,
    /// Not executed: malformed, stale epoch, wrong host, unsupported. `reason` says why.
    Rejected,
    /// Not executed: received after `expires_at`.
    Expired,
}

/// One field that differs between the desired and the actual state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldDiff {
    pub field: String,
    pub from: serde_json::Value,
    pub to: serde_json::Value,
}

/// What one resource of a command did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceResult {
    pub r#ref: ResourceRef,
    /// In `dry_run`, whether it would change.
    pub changed: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<FieldDiff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set on a resource that was not attempted because an earlier one failed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// The agent's answer to a command (kind `reply`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub v: V1,
    /// The command id this answers; nil when the command could not even be parsed.
    pub re: Option<CommandId>,
    pub host: HostId,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<ResourceResult>,
    /// What `read`, `list`, `run`, `facts` and `check` return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ReplyData>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplyData {
    /// The actual state of a resource in its spec's shape (`ensure: absent` when missing).
    Read {
        r#ref: ResourceRef,
        state: serde_json::Value,
    },
    List {
        collection: Collection,
        ids: Vec<String>,
    },
    Run(RunResult),
    Facts(Box<Facts>),
    Check {
        drift: Vec<DriftReport>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunResult {
    /// Exit code; absent when killed by a signal.
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// Output beyond [`MAX_RUN_OUTPUT_BYTES`] was dropped.
    pub truncated: bool,
    pub duration_ms: u64,
}

/// What the agent knows of its host, sent in `hello` and answered to `facts`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    pub hostname: String,
    /// `debian`, `rhel`, `suse`, `alpine`, `arch`, or `unknown` (from `ID`/`ID_LIKE`).
    pub os_family: String,
    /// `ID` of `/etc/os-release`.
    pub os_distribution: String,
    pub os_version: String,
    pub kernel: String,
    pub architecture: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub addresses: Vec<String>,
    pub uptime_s: u64,
    /// `apt`, `dnf`, `yum`, `zypper`, `apk`, or absent.
    pub package_manager: Option<String>,
    /// `systemd`, `openrc`, `sysv`, or absent.
    pub init_system: Option<String>,
    pub agent_version: String,
    /// Collections and ops this agent serves on this host.
    pub capabilities: Vec<String>,
}

/// Events an agent sends besides replies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub v: V1,
    pub host: HostId,
    pub facts: Facts,
    /// sha256 of the canonical JSON of the local monitored baseline (empty baseline: of `[]`).
    pub desired_digest: String,
    /// Highest epoch the agent has accepted, so a node can tell it is behind.
    pub epoch: Epoch,
    pub sent_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub v: V1,
    pub host: HostId,
    pub sent_at: DateTime<Utc>,
    /// Resources currently drifted.
    pub drifted: u32,
}

/// How one monitored resource differs from its baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftReport {
    pub r#ref: ResourceRef,
    pub diff: Vec<FieldDiff>,
    pub since: DateTime<Utc>,
    /// Policy `enforce`: the agent re-applied the resource; `repair_error` says if that failed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repaired: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair_error: Option<String>,
}

/// A monitored resource no longer matches its baseline (sent once per transition).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drift {
    pub v: V1,
    pub host: HostId,
    pub report: DriftReport,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftCleared {
    pub v: V1,
    pub host: HostId,
    pub r#ref: ResourceRef,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A chunk of a streamed `run`'s output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub v: V1,
    pub host: HostId,
    pub re: CommandId,
    /// Chunk number, from 0, per command.
    pub seq: u64,
    pub stream: Stream,
    pub data: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bye {
    pub v: V1,
    pub host: HostId,
    pub reason: String,
}

/// A node-internal notice about a host ("its change log has new work"), published by a node on the
/// up exchange with the host's routing key so it reaches the owning node in order with the host's own
/// messages (DESIGN §5). Only accepted from a node's broker user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kick {
    pub v: V1,
    pub host: HostId,
    /// A change of the host to cancel (if it was never sent): how a node that does not own the
    /// host's shard asks the owner to cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<uuid::Uuid>,
}

/// The kind of an upward message: the last part of its routing key and its AMQP `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpKind {
    Reply,
    Hello,
    Heartbeat,
    Drift,
    DriftCleared,
    Output,
    Bye,
    Kick,
}

impl UpKind {
    pub const ALL: [UpKind; 8] = [
        UpKind::Reply,
        UpKind::Hello,
        UpKind::Heartbeat,
        UpKind::Drift,
        UpKind::DriftCleared,
        UpKind::Output,
        UpKind::Bye,
        UpKind::Kick,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            UpKind::Reply => "reply",
            UpKind::Hello => "hello",
            UpKind::Heartbeat => "heartbeat",
            UpKind::Drift => "drift",
            UpKind::DriftCleared => "drift_cleared",
            UpKind::Output => "output",
            UpKind::Bye => "bye",
            UpKind::Kick => "kick",
        }
    }

    pub fn parse(s: &str) -> Option<UpKind> {
        UpKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Any message an agent sends; the kind comes from the routing key, the body is the JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum Up {
    Reply(Reply),
    Hello(Hello),
    Heartbeat(Heartbeat),
    Drift(Drift),
    DriftCleared(DriftCleared),
    Output(Output),
    Bye(Bye),
    Kick(Kick),
}

impl Up {
    pub fn kind(&self) -> UpKind {
        match self {
            Up::Reply(_) => UpKind::Reply,
            Up::Hello(_) => UpKind::Hello,
            Up::Heartbeat(_) => UpKind::Heartbeat,
            Up::Drift(_) => UpKind::Drift,
            Up::DriftCleared(_) => UpKind::DriftCleared,
            Up::Output(_) => UpKind::Output,
            Up::Bye(_) => UpKind::Bye,
            Up::Kick(_) => UpKind::Kick,
        }
    }

    /// The host the message is about, to compare with the routing key and the broker's `user_id`.
    pub fn host(&self) -> HostId {
        match self {
            Up::Reply(m) => m.host,
            Up::Hello(m) => m.host,
            Up::Heartbeat(m) => m.host,
            Up::Drift(m) => m.host,
            Up::DriftCleared(m) => m.host,
            Up::Output(m) => m.host,
            Up::Bye(m) => m.host,
            Up::Kick(m) => m.host,
        }
    }

    /// Parses an upward message of `kind`. Never panics, whatever the bytes.
    pub fn decode(kind: UpKind, bytes: &[u8]) -> Result<Up, ProtocolError> {
        check_size(bytes)?;
        fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, ProtocolError> {
            serde_json::from_slice(b).map_err(|e| ProtocolError::Malformed(e.to_string()))
        }
        let up = match kind {
            UpKind::Reply => Up::Reply(parse(bytes)?),
            UpKind::Hello => Up::Hello(parse(bytes)?),
            UpKind::Heartbeat => Up::Heartbeat(parse(bytes)?),
            UpKind::Drift => Up::Drift(parse(bytes)?),
            UpKind::DriftCleared => Up::DriftCleared(parse(bytes)?),
            UpKind::Output => {
                let o: Output = parse(bytes)?;
                if o.data.len() > MAX_OUTPUT_CHUNK_BYTES {
                    return Err(ProtocolError::TooLarge {
                        what: "output chunk",
                        size: o.data.len(),
                        limit: MAX_OUTPUT_CHUNK_BYTES,
                    });
                }
                Up::Output(o)
            }
            UpKind::Bye => Up::Bye(parse(bytes)?),
            UpKind::Kick => Up::Kick(parse(bytes)?),
        };
        Ok(up)
    }

    pub fn encode(&self) -> Vec<u8> {
        let r = match self {
            Up::Reply(m) => serde_json::to_vec(m),
            Up::Hello(m) => serde_json::to_vec(m),
            Up::Heartbeat(m) => serde_json::to_vec(m),
            Up::Drift(m) => serde_json::to_vec(m),
            Up::DriftCleared(m) => serde_json::to_vec(m),
            Up::Output(m) => serde_json::to_vec(m),
            Up::Bye(m) => serde_json::to_vec(m),
            Up::Kick(m) => serde_json::to_vec(m),
        };
        r.expect("upward messages always serialize")
    }
}

/// Enrollment request (agent → `comodit.enroll`, reply through direct reply-to).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub v: V1,
    pub token: crate::resource::Secret,
    pub facts: Facts,
    /// The host id this agent had, to re-enroll it (with `force`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostId>,
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollReply {
    pub v: V1,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostId>,
    /// Broker password for the user named by the host id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<crate::resource::Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_shards: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command_json() -> serde_json::Value {
        json!({ "v": 1, "id": "0f8fad5b-d9cb-469f-a165-70867728950e",
                "host": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "epoch": 1234,
                "issued_at": "2026-11-28T10:00:00Z", "expires_at": "2026-11-28T10:10:00Z",
                "body": { "op": "apply", "mode": "enforce", "monitor": true,
                          "resources": [ { "collection": "files", "id": "/etc/motd",
                                           "spec": { "ensure": "present", "content": "hi\n", "mode": "0644",
                                                     "owner": "root", "group": "root" } } ] } })
    }

    #[test]
    fn design_example_parses() {
        let bytes = serde_json::to_vec(&command_json()).unwrap();
        let cmd = Command::decode(&bytes).unwrap();
        assert_eq!(cmd.epoch, Epoch(1234));
        assert_eq!(cmd.body.op(), "apply");
        assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
    }

    #[test]
    fn wrong_version_unknown_op_and_fields_are_rejected() {
        let mut v = command_json();
        v["v"] = json!(2);
        let err = Command::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");

        let mut v = command_json();
        v["body"]["op"] = json!("format_disk");
        assert!(Command::decode(&serde_json::to_vec(&v).unwrap()).is_err());

        let mut v = command_json();
        v["extra"] = json!(true);
        assert!(Command::decode(&serde_json::to_vec(&v).unwrap()).is_err());

        let mut v = command_json();
        v["body"]["surprise"] = json!(true);
        assert!(Command::decode(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn message_size_limit_is_exact() {
        let at = vec![b' '; MAX_MESSAGE_BYTES];
        // At the limit the size check passes and JSON parsing fails (blank input).
        assert!(matches!(
            Command::decode(&at),
            Err(ProtocolError::Malformed(_))
        ));
        let over = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            Command::decode(&over),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    fn run(argv: Vec<String>) -> RunSpec {
        RunSpec {
            argv,
            env: Default::default(),
            cwd: None,
            timeout_s: 10,
            stream: false,
        }
    }

    #[test]
    fn argv_limits_are_exact() {
        let at = run(vec!["x".to_string(); MAX_ARGV_ITEMS]);
        at.validate().unwrap();
        let over = run(vec!["x".to_string(); MAX_ARGV_ITEMS + 1]);
        assert!(over.validate().is_err());
        let big = run(vec!["y".repeat(MAX_ARGV_BYTES)]);
        big.validate().unwrap();
        let bigger = run(vec!["y".repeat(MAX_ARGV_BYTES), "z".into()]);
        assert!(bigger.validate().is_err());
        assert!(run(vec![]).validate().is_err());
        let mut t = run(vec!["true".into()]);
        t.timeout_s = MAX_RUN_TIMEOUT_S + 1;
        assert!(t.validate().is_err());
    }

    #[test]
    fn output_chunk_limit_is_exact() {
        let mk = |n: usize| Output {
            v: V1,
            host: HostId::random(),
            re: CommandId::random(),
            seq: 0,
            stream: Stream::Stdout,
            data: "o".repeat(n),
        };
        let ok = Up::Output(mk(MAX_OUTPUT_CHUNK_BYTES));
        Up::decode(UpKind::Output, &ok.encode()).unwrap();
        let bad = Up::Output(mk(MAX_OUTPUT_CHUNK_BYTES + 1));
        assert!(Up::decode(UpKind::Output, &bad.encode()).is_err());
    }

    #[test]
    fn list_of_paths_needs_under() {
        let mut v = command_json();
        v["body"] = json!({"op": "list", "collection": "files"});
        assert!(Command::decode(&serde_json::to_vec(&v).unwrap()).is_err());
        v["body"] = json!({"op": "list", "collection": "files", "under": "/etc"});
        Command::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
        v["body"] = json!({"op": "list", "collection": "packages"});
        Command::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    }
}
