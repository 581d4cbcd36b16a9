//! The JSON shapes of the API: request bodies (strict: unknown fields are refused) and responses.
//!
//! Responses are views of the store's records, not the records themselves, so that the store can
//! change its model without changing the API, and so that nothing secret (token hashes, password
//! hashes inside change requests) ever leaves the node.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use comodit_protocol::{Policy, ResourceRef};
use comodit_store::{
    ApiToken, AuditEntry, Change, EnrollmentToken, Environment, Host, HostRuntime, Organization,
    Role, Scope,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// One page of a listing. Pass `next` as `cursor` to get the following page; it is absent on the
/// last page.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PageView<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Pagination of every listing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next` of the previous page.
    pub cursor: Option<String>,
    /// Items per page (default 100, at most 1000).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrgView {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub version: u64,
}

impl From<Organization> for OrgView {
    fn from(o: Organization) -> Self {
        OrgView {
            id: o.id.0,
            name: o.name,
            created_at: o.created_at,
            version: o.version,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvView {
    pub id: Uuid,
    pub org: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub version: u64,
}

impl From<Environment> for EnvView {
    fn from(e: Environment) -> Self {
        EnvView {
            id: e.id.0,
            org: e.org.0,
            name: e.name,
            created_at: e.created_at,
            version: e.version,
        }
    }
}

/// Creates an organization or an environment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNamed {
    /// `[a-z0-9][a-z0-9-]{0,62}`, not shaped like a uuid (paths accept an id or a name).
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: Uuid,
    pub org: Uuid,
    pub env: Uuid,
    /// A label for people (the hostname at enrollment); not unique.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub enrolled_at: DateTime<Utc>,
    pub shard: u32,
    /// Also the `ETag` of `GET /hosts/{id}` (`"v<version>"`).
    pub version: u64,
}

impl From<Host> for HostView {
    fn from(h: Host) -> Self {
        HostView {
            id: h.id.0,
            org: h.org.0,
            env: h.env.0,
            name: h.name,
            labels: h.labels,
            created_at: h.created_at,
            enrolled_at: h.enrolled_at,
            shard: h.shard,
            version: h.version,
        }
    }
}

/// A host with what its node knows of it now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostDetail {
    #[serde(flatten)]
    pub host: HostView,
    pub runtime: RuntimeView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuntimeView {
    pub online: bool,
    pub last_seen: Option<DateTime<Utc>>,
    /// A few facts from the last report; all of them at `GET /hosts/{id}/facts`.
    pub facts: Option<FactsSummary>,
    /// Monitored resources currently drifted; the list at `GET /hosts/{id}/compliance`.
    pub drift_count: usize,
    /// Digest of the agent's local baseline, from its last hello.
    pub desired_digest: Option<String>,
    /// When the runtime record was last written; absent if the host never reported.
    pub updated_at: Option<DateTime<Utc>>,
}

impl RuntimeView {
    pub fn of(rt: Option<HostRuntime>) -> Self {
        match rt {
            None => RuntimeView {
                online: false,
                last_seen: None,
                facts: None,
                drift_count: 0,
                desired_digest: None,
                updated_at: None,
            },
            Some(rt) => RuntimeView {
                online: rt.online,
                last_seen: rt.last_seen,
                facts: rt.facts.map(|f| FactsSummary {
                    hostname: f.hostname,
                    os_family: f.os_family,
                    os_distribution: f.os_distribution,
                    os_version: f.os_version,
                    kernel: f.kernel,
                    architecture: f.architecture,
                    agent_version: f.agent_version,
                }),
                drift_count: rt.drift.len(),
                desired_digest: rt.desired_digest,
                updated_at: Some(rt.updated_at),
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FactsSummary {
    pub hostname: String,
    pub os_family: String,
    pub os_distribution: String,
    pub os_version: String,
    pub kernel: String,
    pub architecture: String,
    pub agent_version: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FactsView {
    pub host: Uuid,
    /// The agent's facts (hostname, OS, kernel, CPUs, memory, addresses, capabilities, ...);
    /// absent until the agent has reported.
    #[schema(value_type = Option<Object>)]
    pub facts: Option<Value>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ComplianceView {
    pub host: Uuid,
    /// No monitored resource is drifted (as last reported).
    pub compliant: bool,
    pub drift_count: usize,
    /// Per drifted resource: `ref`, `diff` (`field`, `from` = actual, `to` = desired), `since`,
    /// and whether policy `enforce` repaired it.
    #[schema(value_type = Vec<Object>)]
    pub drift: Vec<Value>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Changes the name and labels of a host (a JSON merge patch: a label set to `null` is removed,
/// labels not named are kept).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchHost {
    pub name: Option<String>,
    #[schema(value_type = Option<BTreeMap<String, Option<String>>>)]
    pub labels: Option<BTreeMap<String, Option<String>>>,
}

/// One entry of a host's change log: what was asked of the host and what came of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChangeView {
    pub id: Uuid,
    pub host: Uuid,
    /// Position in the host's log, from 1.
    pub seq: u64,
    /// The command's op: `apply`, `remove`, `read`, `list`, `run`, ...
    pub op: String,
    /// `queued`, `dispatched`, `applied`, `failed`, `expired` or `cancelled`. A change is shown
    /// `dispatched` once it was sent and has waited 2 s for its answer; one answered sooner goes
    /// from `queued` straight to its final status.
    #[schema(example = "applied")]
    pub status: String,
    /// The command body as sent to the agent (password hashes redacted).
    #[schema(value_type = Object)]
    pub request: Value,
    pub command_id: Uuid,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The agent's reply once there is one: `status` (`ok`, `failed`, `rejected`, `expired`),
    /// `reason`, `results` (per resource: `ref`, `changed`, `diff`, `error`), `data` (what `read`,
    /// `list` and `run` return), `started_at`, `finished_at`.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

impl From<Change> for ChangeView {
    fn from(c: Change) -> Self {
        let mut request = c.request;
        redact(&mut request);
        let op = request
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        let result = c.reply.map(|r| {
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                for k in ["v", "re", "host"] {
                    m.remove(k);
                }
            }
            redact(&mut v);
            v
        });
        let status = serde_json::to_value(c.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        ChangeView {
            id: c.id.0,
            host: c.host.0,
            seq: c.seq,
            op,
            status,
            request,
            command_id: c.command_id.0,
            requested_by: c.requested_by,
            created_at: c.created_at,
            updated_at: c.updated_at,
            expires_at: c.expires_at,
            result,
        }
    }
}

/// Replaces every `password_hash` value with `<redacted>`: secrets never leave in API output.
pub(crate) fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "password_hash" && !x.is_null() {
                    *x = Value::String(comodit_protocol::Secret::REDACTED.to_owned());
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The desired state of one resource: `PUT /hosts/{id}/resources/{collection}/{resource_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutResource {
    /// The resource's spec in its collection's shape (e.g. for `files`: `ensure`, `content` or
    /// `source`, `mode`, `owner`, `group`). Unknown fields are refused.
    #[schema(value_type = Object)]
    pub spec: Value,
    /// `report` (default) or `enforce`: what compliance does when the resource drifts.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "report")]
    pub policy: Option<Policy>,
    /// Services refreshed (restart or reload) when this resource changed:
    /// `[{"collection": "services", "id": "nginx"}]`.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub notify: Vec<ResourceRef>,
    /// Add the resource to the host's monitored baseline (default true).
    #[serde(default)]
    pub monitor: Option<bool>,
}

/// A program to run on the host: `POST /hosts/{id}/run`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// The program and its arguments; no shell unless `argv` names one.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory.
    pub cwd: Option<String>,
    /// Killed (with its process group) after this many seconds (default 60, at most 86400).
    pub timeout_s: Option<u64>,
    /// Also stream the output as `output` events on `GET /events`.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenView {
    pub id: Uuid,
    pub org: Uuid,
    pub env: Uuid,
    pub description: String,
    pub expires_at: DateTime<Utc>,
    /// Enrollments allowed; absent = unlimited until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked: bool,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

impl From<EnrollmentToken> for EnrollmentTokenView {
    fn from(t: EnrollmentToken) -> Self {
        EnrollmentTokenView {
            id: t.id.0,
            org: t.org.0,
            env: t.env.0,
            description: t.description,
            expires_at: t.expires_at,
            max_uses: t.max_uses,
            uses: t.uses,
            revoked: t.revoked,
            created_at: t.created_at,
            created_by: t.created_by,
        }
    }
}

/// A new token and its secret. The secret is shown only in this response: the node keeps only
/// its sha256.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedEnrollmentToken {
    #[serde(flatten)]
    pub token: EnrollmentTokenView,
    pub secret: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    /// Lifetime in seconds (default 3600, at most 30 days).
    pub expires_in_s: Option<u64>,
    /// Enrollments allowed (at least 1); absent = unlimited until it expires.
    pub max_uses: Option<u32>,
    /// Free text, at most 256 bytes.
    pub description: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoleView {
    Admin,
    Operator,
    Viewer,
}

impl From<Role> for RoleView {
    fn from(r: Role) -> Self {
        match r {
            Role::Admin => RoleView::Admin,
            Role::Operator => RoleView::Operator,
            Role::Viewer => RoleView::Viewer,
        }
    }
}

impl From<RoleView> for Role {
    fn from(r: RoleView) -> Self {
        match r {
            RoleView::Admin => Role::Admin,
            RoleView::Operator => Role::Operator,
            RoleView::Viewer => Role::Viewer,
        }
    }
}

/// Where a role applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScopeView {
    /// A struct variant, not a unit one: serde ignores extra fields next to the tag of a unit
    /// variant, and unknown fields must be refused.
    Global {},
    Org {
        org: Uuid,
    },
    Env {
        org: Uuid,
        env: Uuid,
    },
}

impl From<Scope> for ScopeView {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Global => ScopeView::Global {},
            Scope::Org { org } => ScopeView::Org { org: org.0 },
            Scope::Env { org, env } => ScopeView::Env {
                org: org.0,
                env: env.0,
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenView {
    pub id: Uuid,
    pub name: String,
    pub role: RoleView,
    pub scope: ScopeView,
    pub revoked: bool,
    pub created_at: DateTime<Utc>,
}

impl From<ApiToken> for ApiTokenView {
    fn from(t: ApiToken) -> Self {
        ApiTokenView {
            id: t.id.0,
            name: t.name,
            role: t.role.into(),
            scope: t.scope.into(),
            revoked: t.revoked,
            created_at: t.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiToken {
    #[serde(flatten)]
    pub token: ApiTokenView,
    /// The bearer secret, shown only in this response.
    pub secret: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiToken {
    /// Who uses it (the actor in the audit log): `[A-Za-z0-9._@-]{1,64}`.
    pub name: String,
    pub role: RoleView,
    /// Must be `global` for admins.
    pub scope: ScopeView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// The token name.
    pub actor: String,
    /// `<METHOD> <route template>`, e.g. `PUT /api/v1/hosts/{id}/resources/{collection}/{*resource_id}`.
    pub action: String,
    /// The request path.
    pub target: String,
    /// `ok`, `ok (idempotent replay)`, `denied`, or `failed: <status> <title>`.
    pub outcome: String,
}

impl From<AuditEntry> for AuditView {
    fn from(a: AuditEntry) -> Self {
        AuditView {
            seq: a.seq,
            at: a.at,
            actor: a.actor,
            action: a.action,
            target: a.target,
            outcome: a.outcome,
        }
    }
}

/// What one node knows of the control-plane cluster (`GET /api/v1/cluster`). A single node is a
/// cluster of one: it leads, its lease never lapses and it owns every shard at epoch 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    /// The node that answered.
    pub id: u64,
    /// The leader it knows of, if any.
    pub leader: Option<u64>,
    /// Raft term.
    pub term: u64,
    /// Raft commit index.
    pub commit: u64,
    /// Whether the answering node's lease is valid now (it acts for its shards only then).
    pub lease_valid: bool,
    /// The node table, with the shards each node owns.
    pub nodes: Vec<ClusterNodeView>,
    /// The shard table, index = shard number.
    pub shards: Vec<ShardView>,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterNodeView {
    pub id: u64,
    /// Address of its Raft transport, as recorded in the node table.
    pub addr: String,
    /// `active`, `leaving` or `left`.
    #[schema(example = "active")]
    pub state: String,
    /// Its Raft role: `leader`, `voter`, `learner`, or `none` (not in the configuration: joining
    /// or left).
    #[schema(example = "voter")]
    pub role: String,
    /// The shards it owns.
    pub shards: Vec<u32>,
}

/// The shard table alone (`GET /api/v1/cluster/shards`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShardsView {
    /// The node that answered.
    pub id: u64,
    /// Index = shard number.
    pub shards: Vec<ShardView>,
}

/// A node to admit into the cluster (`POST /api/v1/cluster/nodes`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinNode {
    /// Its Raft id: positive, never used before in this cluster.
    pub id: u64,
    /// The `ip:port` its Raft transport listens on.
    #[schema(example = "10.0.0.4:7000")]
    pub addr: String,
}

/// A member's address (the answer to a join).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
}

/// What a membership request started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MembershipAccepted {
    /// `joining` or `leaving`: follow `GET /api/v1/cluster` for the rest.
    #[schema(example = "joining")]
    pub status: String,
    pub node: u64,
    /// The members the node should contact (for a join).
    pub members: Vec<MemberView>,
}

/// One shard of the shard table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShardView {
    pub shard: u32,
    /// Its owner, if any (none while it is handed off).
    pub owner: Option<u64>,
    /// The epoch its owner acts with (grows with every change of owner).
    pub epoch: u64,
}

impl ClusterView {
    /// The cluster of one: node 1 leads and owns every shard at epoch 1.
    pub fn single_node(n_shards: u32) -> ClusterView {
        ClusterView {
            id: 1,
            leader: Some(1),
            term: 1,
            commit: 0,
            lease_valid: true,
            nodes: vec![ClusterNodeView {
                id: 1,
                addr: String::new(),
                state: "active".into(),
                role: "leader".into(),
                shards: (0..n_shards).collect(),
            }],
            shards: (0..n_shards)
                .map(|shard| ShardView {
                    shard,
                    owner: Some(1),
                    epoch: 1,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn password_hashes_are_redacted_everywhere() {
        let mut v = json!({"op": "apply", "resources": [
            {"collection": "users", "id": "alice", "spec": {"password_hash": "$6$x$y", "uid": 1000}},
            {"collection": "users", "id": "bob", "spec": {"password_hash": null}}
        ]});
        redact(&mut v);
        assert_eq!(v["resources"][0]["spec"]["password_hash"], "<redacted>");
        assert_eq!(v["resources"][0]["spec"]["uid"], 1000);
        assert!(v["resources"][1]["spec"]["password_hash"].is_null());
        assert!(!v.to_string().contains("$6$x$y"));
    }
}
