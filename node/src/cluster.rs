//! The node as a member of a Raft cluster (DESIGN §7). With `cluster_id` set, [`run`](crate::run)
//! starts a [`ClusterNode`] (its log under `<data_dir>/raft`) and hands the actors a
//! [`ClusterOwnership`] instead of the single node's `SingleNode`: the actors then act only for the
//! shards the cluster gave this node, and only while its lease is valid. [`status_view`] is what
//! `GET /api/v1/cluster` answers on a member.
//!
//! The timing is fixed here rather than configured: a 100 ms Raft tick, a 6 s lease renewed every
//! second, and clocks assumed to drift at most 0.1% — the same on every node, as the lease rules
//! require.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use comodit_actors::ownership::Ownership;
use comodit_api::views::{ClusterNodeView, ClusterView, ShardView};
use comodit_api::{ClusterControl, ClusterOpError};
use comodit_cluster::lease::LeaseConfig;
use comodit_cluster::runtime::{ClusterConfig, ClusterNode, ClusterStatus, MembershipError};
use comodit_cluster::state::NodeState;
use comodit_cluster::NodeId;
use comodit_protocol::{Epoch, Shard};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Membership};

/// Raft tick period.
pub const TICK_MS: u64 = 100;

/// The lease every member holds on its shards (see `comodit_cluster::lease`).
pub const LEASE: LeaseConfig = LeaseConfig {
    lease_ms: 3_000,
    max_drift_ppm: 1_000,
    renew_every_ms: 500,
};

/// Parses `cluster_peers`: `id=host:port` entries separated by commas (whitespace around entries
/// is ignored). Ids are positive and unique.
pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, SocketAddr>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "cluster_peers",
        reason,
    };
    let mut peers = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, addr) = entry
            .split_once('=')
            .ok_or_else(|| invalid(format!("{entry:?} is not id=host:port")))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| invalid(format!("{entry:?}: the id is not a number")))?;
        if id == 0 {
            return Err(invalid(format!("{entry:?}: id 0 is reserved")));
        }
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .map_err(|_| invalid(format!("{entry:?}: the address is not ip:port")))?;
        if peers.insert(id, addr).is_some() {
            return Err(invalid(format!("node {id} is listed twice")));
        }
    }
    if peers.is_empty() {
        return Err(invalid("no peers".into()));
    }
    Ok(peers)
}

/// Parses `cluster_join`: `host:port` Raft addresses of members, separated by commas.
pub fn parse_join(text: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "cluster_join",
        reason,
    };
    let mut out = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let addr: SocketAddr = entry
            .parse()
            .map_err(|_| invalid(format!("{entry:?} is not ip:port")))?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(invalid("no member address".into()));
    }
    Ok(out)
}

/// The settings of this member, from the node's configuration (already validated).
pub fn cluster_config(m: &Membership, data_dir: &Path, n_shards: u32) -> ClusterConfig {
    ClusterConfig {
        id: m.id,
        listen: m.listen,
        cluster_secret: m.secret.clone(),
        data_dir: data_dir.join("raft"),
        peers: m.peers.clone(),
        join: m.join.clone(),
        n_shards,
        tick_ms: TICK_MS,
        lease: LEASE,
    }
}

/// [`Ownership`] backed by a running [`ClusterNode`]: the shards it owns while its lease is valid.
pub struct ClusterOwnership {
    node: ClusterNode,
    n_shards: u32,
}

impl ClusterOwnership {
    pub fn new(node: ClusterNode, n_shards: u32) -> Self {
        assert!(n_shards > 0);
        ClusterOwnership { node, n_shards }
    }
}

impl Ownership for ClusterOwnership {
    fn n_shards(&self) -> u32 {
        self.n_shards
    }

    fn owned(&self) -> Vec<(Shard, Epoch)> {
        self.node
            .owned()
            .into_iter()
            // A table of another size than this node's configuration: act only for what we route.
            .filter(|&(s, _)| s < self.n_shards)
            .map(|(s, e)| (Shard(s), Epoch(e)))
            .collect()
    }

    fn epoch(&self, shard: Shard) -> Option<Epoch> {
        self.owned()
            .into_iter()
            .find(|&(s, _)| s == shard)
            .map(|(_, e)| e)
    }

    fn table_epoch(&self, shard: Shard) -> Option<Epoch> {
        if shard.0 >= self.n_shards {
            return None;
        }
        self.node
            .shard_table()
            .get(shard.0 as usize)
            .filter(|s| s.owner.is_some() && s.epoch > 0)
            .map(|s| Epoch(s.epoch))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.node.changes()
    }
}

/// Stops the node (`shutdown`) once the cluster removed it after a decommission: its shards were
/// handed off before, so stopping loses nothing.
pub async fn exit_when_decommissioned(node: ClusterNode, shutdown: CancellationToken) {
    let mut changes = node.changes();
    loop {
        if node.finished() {
            tracing::info!("decommissioned: every shard handed off, leaving the cluster; stopping");
            shutdown.cancel();
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            // `finished` also turns true after a while without a change.
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// What `GET /api/v1/cluster` answers on a member.
pub fn status_view(node: &ClusterNode) -> ClusterView {
    let status = node.status();
    let table = node.shard_table();
    let mut by_node: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
    for (i, s) in table.iter().enumerate() {
        if let Some(owner) = s.owner {
            by_node.entry(owner).or_default().push(i as u32);
        }
    }
    let mut nodes: Vec<ClusterNodeView> = status
        .nodes
        .iter()
        .map(|n| ClusterNodeView {
            id: n.id,
            addr: n.addr.clone(),
            state: state_name(&n.state).into(),
            role: role_name(&status, n.id).into(),
            shards: by_node.remove(&n.id).unwrap_or_default(),
        })
        .collect();
    // Owners missing from the node table (not expected) still show.
    let listed: BTreeSet<NodeId> = nodes.iter().map(|n| n.id).collect();
    for (id, shards) in by_node {
        if !listed.contains(&id) {
            nodes.push(ClusterNodeView {
                id,
                addr: String::new(),
                state: "unknown".into(),
                role: role_name(&status, id).into(),
                shards,
            });
        }
    }
    ClusterView {
        id: status.id,
        leader: status.leader,
        term: status.term,
        commit: status.commit,
        lease_valid: status.lease_valid,
        nodes,
        shards: table
            .iter()
            .enumerate()
            .map(|(i, s)| ShardView {
                shard: i as u32,
                owner: s.owner,
                epoch: s.epoch,
            })
            .collect(),
    }
}

fn role_name(status: &ClusterStatus, id: NodeId) -> &'static str {
    if status.leader == Some(id) {
        "leader"
    } else if status.voters.contains(&id) {
        "voter"
    } else if status.learners.contains(&id) {
        "learner"
    } else {
        "none"
    }
}

/// [`ClusterControl`] over a running member: what the cluster routes of the API call.
pub struct ClusterApi(pub ClusterNode);

fn op_error(e: MembershipError) -> ClusterOpError {
    match e {
        MembershipError::Invalid(why) => ClusterOpError::Invalid(why),
        MembershipError::Unavailable(why) => ClusterOpError::Unavailable(why),
    }
}

#[async_trait::async_trait]
impl ClusterControl for ClusterApi {
    fn view(&self) -> ClusterView {
        status_view(&self.0)
    }

    async fn add_node(&self, id: u64, addr: String) -> Result<Vec<(u64, String)>, ClusterOpError> {
        self.0.add_node(id, addr).await.map_err(op_error)
    }

    async fn decommission(&self, id: u64) -> Result<(), ClusterOpError> {
        self.0.decommission(id).await.map_err(op_error)
    }
}

fn state_name(state: &NodeState) -> &'static str {
    match state {
        NodeState::Active => "active",
        NodeState::Leaving => "leaving",
        NodeState::Left => "left",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_bad_entries_are_named() {
        let p = parse_peers(" 1=127.0.0.1:7001, 2=127.0.0.1:7002,3=[::1]:7003 ").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&3], "[::1]:7003".parse().unwrap());
        for (bad, needle) in [
            ("1=127.0.0.1:7001,1=127.0.0.1:7002", "twice"),
            ("0=127.0.0.1:7001", "reserved"),
            ("x=127.0.0.1:7001", "not a number"),
            ("1=localhost", "ip:port"),
            ("127.0.0.1:7001", "id=host:port"),
            ("", "no peers"),
        ] {
            let err = parse_peers(bad).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("cluster_peers"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_lease_setting_is_safe() {
        LEASE.validate().unwrap();
    }
}
