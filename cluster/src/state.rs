//! The replicated state machine of the control plane (DESIGN §7).
//!
//! Every node holds one [`ClusterState`] and changes it only by applying the [`Command`]s that Raft
//! committed, in log order, through [`ClusterState::apply`]. Applying is a pure function of the
//! state, the log index and the command, so every node that applied the same prefix of the log holds
//! the same state; the simulator (`crate::sim`) checks exactly that.
//!
//! **Epochs.** Every change of a shard's owner sets the shard's epoch to the log index of the entry
//! that made it. Log indexes only grow, so epochs only grow, and two different ownerships of one
//! shard never share an epoch: the epoch is the fencing token host-state writes carry (DESIGN §12).
//!
//! **Rejections.** A command that does not fit the current state (a release from a node that does not
//! own the shard any more, an assignment to an unknown node, limits exceeded) is *rejected*: it
//! changes nothing and every node rejects it the same way. Raft already committed it, so rejection
//! is an outcome reported to the proposer, not an error of the log.
//!
//! **Encoding.** Commands and snapshots are serialized with `bincode` 1.x (fixed-int little-endian,
//! with a size limit on decode). They travel only inside the Raft log and Raft snapshots, which come
//! from authenticated peers; the limit still keeps a corrupt entry from allocating without bound.

use std::collections::BTreeMap;

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// Most shards a cluster may be initialized with.
pub const MAX_SHARDS: u32 = 4096;
/// Most nodes (in any state, tombstones included) the node table may hold.
pub const MAX_NODES: usize = 1024;
/// Longest node address, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;
/// Most cluster settings.
pub const MAX_SETTINGS: usize = 256;
/// Longest setting key, in bytes.
pub const MAX_SETTING_KEY_BYTES: usize = 128;
/// Longest setting value, in bytes.
pub const MAX_SETTING_VALUE_BYTES: usize = 4096;
/// Largest encoded command accepted by [`Command::decode`], in bytes.
pub const MAX_COMMAND_BYTES: u64 = 256 * 1024;
/// Largest encoded state accepted by [`ClusterState::decode`], in bytes.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024;

/// Where a node is in its life in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Member; may own shards.
    Active,
    /// Handing its shards off; gets no new ones.
    Leaving,
    /// Gone for good. Kept as a tombstone so the id is never reused.
    Left,
}

/// A node of the node table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Address peers and clients reach the node at (transport comes later).
    pub addr: String,
    /// Life-cycle state.
    pub state: NodeState,
}

/// One row of the shard table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The node that owns the shard, if any.
    pub owner: Option<NodeId>,
    /// Log index of the entry that last changed `owner` (0: never owned).
    pub epoch: u64,
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Number of shards; 0 until [`Command::Init`] is applied, then fixed.
    pub n_shards: u32,
    /// Node table (tombstones of nodes that left included).
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Shard table, `n_shards` rows.
    pub shards: Vec<ShardEntry>,
    /// Cluster-wide settings (key → value).
    pub settings: BTreeMap<String, String>,
    /// Log index of the last entry applied (commands and Raft-internal entries alike); a snapshot
    /// carries it so a restored state knows where replay resumes.
    pub applied_index: u64,
    /// The current lease number of each node (absent: 0). [`Command::RevokeLease`] bumps it, so a
    /// renewal naming an older number, sent before the revocation, is rejected (crate::lease,
    /// obligation 1).
    pub lease_seqs: BTreeMap<NodeId, u64>,
}

/// A change proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Fix the number of shards (once).
    Init {
        /// Number of shards, `1..=MAX_SHARDS`.
        n_shards: u32,
    },
    /// Add a node as `Active` (a no-op if it already is, with the same address).
    AddNode {
        /// The node's Raft id.
        id: NodeId,
        /// Its address.
        addr: String,
    },
    /// Mark an active node as leaving: it keeps its shards until they are reassigned.
    NodeLeaving {
        /// The node.
        id: NodeId,
    },
    /// Mark a node as left; the shards it still owned become unowned (new epoch).
    RemoveNode {
        /// The node.
        id: NodeId,
    },
    /// Set the owner of every shard (usually computed by the leader with
    /// [`ClusterState::plan_allocation`]). Shards whose owner changes get a new epoch.
    AssignShards {
        /// One entry per shard; every `Some` owner must be an `Active` node.
        owners: Vec<Option<NodeId>>,
    },
    /// The owner gives a shard up (planned handoff); rejected if `from` no longer owns it.
    ReleaseShard {
        /// Shard number.
        shard: u32,
        /// The node releasing it.
        from: NodeId,
    },
    /// Set a cluster setting.
    SetSetting {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// A node renews its lease number `lease_seq`; rejected unless that is still the node's
    /// current lease (see [`ClusterState::lease_seqs`]) and the node is active or leaving.
    RenewLease {
        /// The holder.
        node: NodeId,
        /// The lease it renews.
        lease_seq: u64,
        /// The holder's tag for this proposal: it matches the commit with its own send time.
        renewal: u64,
        /// The holder's applied index when it sent the renewal: everything up to it is reflected
        /// in what the holder acts on (the leader's handoff waits for it).
        applied: u64,
    },
    /// The leader gives up on lease `lease_seq` of `node` (it surely expired): the node's lease
    /// number moves on, so renewals of the old one are rejected from now on.
    RevokeLease {
        /// The holder.
        node: NodeId,
        /// The lease revoked; rejected if it is no longer the current one.
        lease_seq: u64,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed (or the command was an idempotent repeat).
    Applied,
    /// The command did not fit the state; nothing changed.
    Rejected(Rejection),
}

/// Why a command was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// `Init` on an initialized cluster.
    #[error("cluster already initialized with {0} shards")]
    AlreadyInitialized(u32),
    /// A shard command before `Init`.
    #[error("cluster not initialized")]
    NotInitialized,
    /// `n_shards` outside `1..=MAX_SHARDS`.
    #[error("n_shards {0} outside 1..={MAX_SHARDS}")]
    BadShardCount(u32),
    /// The node is not in the table.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The node id is 0 (reserved by raft-rs).
    #[error("node id 0 is reserved")]
    ReservedNodeId,
    /// The node already left; its id may not be reused.
    #[error("node {0} left the cluster; its id may not be reused")]
    NodeLeft(NodeId),
    /// `AddNode` for a member with another address.
    #[error("node {0} is already a member with another address")]
    AddressConflict(NodeId),
    /// The command needs an `Active` node.
    #[error("node {0} is not active")]
    NotActive(NodeId),
    /// `AssignShards` with the wrong number of rows.
    #[error("assignment has {got} rows, cluster has {want} shards")]
    WrongShardCount {
        /// Rows given.
        got: usize,
        /// Shards in the cluster.
        want: u32,
    },
    /// Shard number out of range.
    #[error("shard {0} does not exist")]
    NoSuchShard(u32),
    /// `ReleaseShard` from a node that does not own the shard (stale).
    #[error("shard {shard} is not owned by node {from}")]
    NotOwner {
        /// Shard number.
        shard: u32,
        /// The node that tried to release it.
        from: NodeId,
    },
    /// A size or count limit.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
    /// A lease command naming a lease that was already revoked.
    #[error("lease {lease_seq} of node {node} was revoked (current: {current})")]
    StaleLease {
        /// The holder.
        node: NodeId,
        /// The lease named.
        lease_seq: u64,
        /// The node's current lease.
        current: u64,
    },
}

/// A command or snapshot could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("cluster state codec: {0}")]
pub struct CodecError(#[from] bincode::Error);

fn codec(limit: u64) -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(limit)
}

impl Command {
    /// Encode for a Raft entry.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Ok(codec(MAX_COMMAND_BYTES).serialize(self)?)
    }

    /// Decode a Raft entry's data.
    pub fn decode(bytes: &[u8]) -> Result<Command, CodecError> {
        Ok(codec(MAX_COMMAND_BYTES).deserialize(bytes)?)
    }
}

impl ClusterState {
    /// Serialize the whole state (snapshot data).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Ok(codec(MAX_SNAPSHOT_BYTES).serialize(self)?)
    }

    /// Restore a state from snapshot data.
    pub fn decode(bytes: &[u8]) -> Result<ClusterState, CodecError> {
        Ok(codec(MAX_SNAPSHOT_BYTES).deserialize(bytes)?)
    }

    /// Nodes that may own shards, in id order.
    pub fn active_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The owners the leader should propose next ([`Command::AssignShards`]): the current table
    /// re-spread over the active nodes.
    pub fn plan_allocation(&self) -> Vec<Option<NodeId>> {
        let current: Vec<Option<NodeId>> = self.shards.iter().map(|s| s.owner).collect();
        crate::allocator::allocate(&self.active_nodes(), &current)
    }

    /// Apply the entry at log `index` (which must be above [`Self::applied_index`]).
    ///
    /// Panics if `index` does not grow: that is a bug of the caller (Raft hands entries out once,
    /// in order), and going on would break the epoch rule.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Outcome {
        self.advance_to(index);
        match self.apply_inner(index, cmd) {
            Ok(()) => Outcome::Applied,
            Err(r) => Outcome::Rejected(r),
        }
    }

    /// Record that the entry at `index` (a Raft no-op or configuration change) was applied.
    pub fn advance_to(&mut self, index: u64) {
        assert!(
            index > self.applied_index,
            "apply at index {index} after {}",
            self.applied_index
        );
        self.applied_index = index;
    }

    fn apply_inner(&mut self, index: u64, cmd: &Command) -> Result<(), Rejection> {
        match cmd {
            Command::Init { n_shards } => {
                if self.n_shards != 0 {
                    return Err(Rejection::AlreadyInitialized(self.n_shards));
                }
                if *n_shards == 0 || *n_shards > MAX_SHARDS {
                    return Err(Rejection::BadShardCount(*n_shards));
                }
                self.n_shards = *n_shards;
                self.shards = vec![ShardEntry::default(); *n_shards as usize];
            }
            Command::AddNode { id, addr } => {
                if *id == 0 {
                    return Err(Rejection::ReservedNodeId);
                }
                if addr.len() > MAX_ADDR_BYTES {
                    return Err(Rejection::Limit("node address too long"));
                }
                match self.nodes.get(id) {
                    Some(n) if n.state == NodeState::Left => return Err(Rejection::NodeLeft(*id)),
                    Some(n) if n.addr != *addr => return Err(Rejection::AddressConflict(*id)),
                    Some(_) => {}
                    None if self.nodes.len() >= MAX_NODES => {
                        return Err(Rejection::Limit("too many nodes"))
                    }
                    None => {
                        self.nodes.insert(
                            *id,
                            NodeInfo {
                                addr: addr.clone(),
                                state: NodeState::Active,
                            },
                        );
                    }
                }
            }
            Command::NodeLeaving { id } => {
                let node = self.nodes.get_mut(id).ok_or(Rejection::UnknownNode(*id))?;
                match node.state {
                    NodeState::Active => node.state = NodeState::Leaving,
                    NodeState::Leaving => {}
                    NodeState::Left => return Err(Rejection::NodeLeft(*id)),
                }
            }
            Command::RemoveNode { id } => {
                let node = self.nodes.get_mut(id).ok_or(Rejection::UnknownNode(*id))?;
                node.state = NodeState::Left;
                for shard in &mut self.shards {
                    if shard.owner == Some(*id) {
                        shard.owner = None;
                        shard.epoch = index;
                    }
                }
            }
            Command::AssignShards { owners } => {
                if self.n_shards == 0 {
                    return Err(Rejection::NotInitialized);
                }
                if owners.len() != self.n_shards as usize {
                    return Err(Rejection::WrongShardCount {
                        got: owners.len(),
                        want: self.n_shards,
                    });
                }
                for owner in owners.iter().flatten() {
                    match self.nodes.get(owner) {
                        None => return Err(Rejection::UnknownNode(*owner)),
                        Some(n) if n.state != NodeState::Active => {
                            return Err(Rejection::NotActive(*owner))
                        }
                        Some(_) => {}
                    }
                }
                for (shard, owner) in self.shards.iter_mut().zip(owners) {
                    if shard.owner != *owner {
                        shard.owner = *owner;
                        shard.epoch = index;
                    }
                }
            }
            Command::ReleaseShard { shard, from } => {
                if self.n_shards == 0 {
                    return Err(Rejection::NotInitialized);
                }
                let entry = self
                    .shards
                    .get_mut(*shard as usize)
                    .ok_or(Rejection::NoSuchShard(*shard))?;
                if entry.owner != Some(*from) {
                    return Err(Rejection::NotOwner {
                        shard: *shard,
                        from: *from,
                    });
                }
                entry.owner = None;
                entry.epoch = index;
            }
            Command::SetSetting { key, value } => {
                if key.len() > MAX_SETTING_KEY_BYTES {
                    return Err(Rejection::Limit("setting key too long"));
                }
                if value.len() > MAX_SETTING_VALUE_BYTES {
                    return Err(Rejection::Limit("setting value too long"));
                }
                if !self.settings.contains_key(key) && self.settings.len() >= MAX_SETTINGS {
                    return Err(Rejection::Limit("too many settings"));
                }
                self.settings.insert(key.clone(), value.clone());
            }
            Command::RenewLease {
                node, lease_seq, ..
            } => {
                match self.nodes.get(node) {
                    None => return Err(Rejection::UnknownNode(*node)),
                    // A leaving node keeps acting for the shards it still has.
                    Some(n) if n.state == NodeState::Left => {
                        return Err(Rejection::NotActive(*node))
                    }
                    Some(_) => {}
                }
                self.check_lease(*node, *lease_seq)?;
            }
            Command::RevokeLease { node, lease_seq } => {
                if !self.nodes.contains_key(node) {
                    return Err(Rejection::UnknownNode(*node));
                }
                self.check_lease(*node, *lease_seq)?;
                self.lease_seqs.insert(*node, lease_seq + 1);
            }
        }
        Ok(())
    }

    /// The node's current lease number (0 until the first revocation).
    pub fn lease_seq(&self, node: NodeId) -> u64 {
        self.lease_seqs.get(&node).copied().unwrap_or(0)
    }

    fn check_lease(&self, node: NodeId, lease_seq: u64) -> Result<(), Rejection> {
        let current = self.lease_seq(node);
        if lease_seq != current {
            return Err(Rejection::StaleLease {
                node,
                lease_seq,
                current,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: NodeId) -> Command {
        Command::AddNode {
            id,
            addr: format!("10.0.0.{id}:7000"),
        }
    }

    fn state_with_nodes(n_shards: u32, nodes: &[NodeId]) -> ClusterState {
        let mut s = ClusterState::default();
        let mut i = 0;
        let mut next = || {
            i += 1;
            i
        };
        assert_eq!(
            s.apply(next(), &Command::Init { n_shards }),
            Outcome::Applied
        );
        for id in nodes {
            assert_eq!(s.apply(next(), &add(*id)), Outcome::Applied);
        }
        s
    }

    #[test]
    fn owner_change_sets_epoch_to_index_and_unchanged_shards_keep_theirs() {
        let mut s = state_with_nodes(3, &[1, 2]);
        let out = s.apply(
            10,
            &Command::AssignShards {
                owners: vec![Some(1), Some(2), None],
            },
        );
        assert_eq!(out, Outcome::Applied);
        assert_eq!(
            s.shards[0],
            ShardEntry {
                owner: Some(1),
                epoch: 10
            }
        );
        assert_eq!(
            s.shards[2],
            ShardEntry {
                owner: None,
                epoch: 0
            }
        );
        s.apply(
            12,
            &Command::AssignShards {
                owners: vec![Some(1), Some(1), None],
            },
        );
        assert_eq!(s.shards[0].epoch, 10, "unchanged owner keeps its epoch");
        assert_eq!(
            s.shards[1],
            ShardEntry {
                owner: Some(1),
                epoch: 12
            }
        );
        assert_eq!(s.applied_index, 12);
    }

    #[test]
    fn stale_release_is_rejected_and_changes_nothing() {
        let mut s = state_with_nodes(2, &[1, 2]);
        s.apply(
            5,
            &Command::AssignShards {
                owners: vec![Some(1), Some(2)],
            },
        );
        let before = s.clone();
        let out = s.apply(6, &Command::ReleaseShard { shard: 0, from: 2 });
        assert_eq!(
            out,
            Outcome::Rejected(Rejection::NotOwner { shard: 0, from: 2 })
        );
        assert_eq!(s.shards, before.shards);
        assert_eq!(
            s.apply(7, &Command::ReleaseShard { shard: 0, from: 1 }),
            Outcome::Applied
        );
        assert_eq!(
            s.shards[0],
            ShardEntry {
                owner: None,
                epoch: 7
            }
        );
        assert_eq!(
            s.apply(8, &Command::ReleaseShard { shard: 9, from: 1 }),
            Outcome::Rejected(Rejection::NoSuchShard(9))
        );
    }

    #[test]
    fn assignment_to_leaving_or_unknown_node_is_rejected() {
        let mut s = state_with_nodes(2, &[1, 2]);
        s.apply(5, &Command::NodeLeaving { id: 2 });
        assert_eq!(
            s.apply(
                6,
                &Command::AssignShards {
                    owners: vec![Some(2), None]
                }
            ),
            Outcome::Rejected(Rejection::NotActive(2))
        );
        assert_eq!(
            s.apply(
                7,
                &Command::AssignShards {
                    owners: vec![Some(9), None]
                }
            ),
            Outcome::Rejected(Rejection::UnknownNode(9))
        );
        assert_eq!(
            s.apply(8, &Command::AssignShards { owners: vec![None] }),
            Outcome::Rejected(Rejection::WrongShardCount { got: 1, want: 2 })
        );
        assert_eq!(s.plan_allocation(), vec![Some(1), Some(1)]);
    }

    #[test]
    fn removed_node_loses_its_shards_and_its_id() {
        let mut s = state_with_nodes(2, &[1, 2]);
        s.apply(
            5,
            &Command::AssignShards {
                owners: vec![Some(1), Some(2)],
            },
        );
        assert_eq!(s.apply(6, &Command::RemoveNode { id: 2 }), Outcome::Applied);
        assert_eq!(
            s.shards[1],
            ShardEntry {
                owner: None,
                epoch: 6
            }
        );
        assert_eq!(s.shards[0].epoch, 5);
        assert_eq!(
            s.apply(7, &add(2)),
            Outcome::Rejected(Rejection::NodeLeft(2))
        );
        assert_eq!(s.active_nodes(), vec![1]);
    }

    #[test]
    fn init_and_add_node_limits() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(1, &Command::Init { n_shards: 0 }),
            Outcome::Rejected(Rejection::BadShardCount(0))
        );
        assert_eq!(
            s.apply(
                2,
                &Command::Init {
                    n_shards: MAX_SHARDS + 1
                }
            ),
            Outcome::Rejected(Rejection::BadShardCount(MAX_SHARDS + 1))
        );
        assert_eq!(s.apply(3, &Command::Init { n_shards: 4 }), Outcome::Applied);
        assert_eq!(
            s.apply(4, &Command::Init { n_shards: 8 }),
            Outcome::Rejected(Rejection::AlreadyInitialized(4))
        );
        assert_eq!(
            s.apply(
                5,
                &Command::AddNode {
                    id: 0,
                    addr: "a".into()
                }
            ),
            Outcome::Rejected(Rejection::ReservedNodeId)
        );
        let long = "x".repeat(MAX_ADDR_BYTES + 1);
        assert_eq!(
            s.apply(6, &Command::AddNode { id: 1, addr: long }),
            Outcome::Rejected(Rejection::Limit("node address too long"))
        );
        assert_eq!(s.apply(7, &add(1)), Outcome::Applied);
        assert_eq!(
            s.apply(8, &add(1)),
            Outcome::Applied,
            "same address again is a no-op"
        );
        assert_eq!(
            s.apply(
                9,
                &Command::AddNode {
                    id: 1,
                    addr: "elsewhere".into()
                }
            ),
            Outcome::Rejected(Rejection::AddressConflict(1))
        );
    }

    #[test]
    #[should_panic(expected = "apply at index 3 after 3")]
    fn applying_an_index_twice_is_a_bug() {
        let mut s = ClusterState::default();
        s.apply(3, &Command::Init { n_shards: 1 });
        s.apply(3, &Command::Init { n_shards: 1 });
    }

    #[test]
    fn codec_round_trips_and_rejects_garbage() {
        let s = state_with_nodes(3, &[1, 2, 3]);
        let back = ClusterState::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back, s);
        let cmd = Command::ReleaseShard { shard: 2, from: 3 };
        assert_eq!(Command::decode(&cmd.encode().unwrap()).unwrap(), cmd);
        assert!(Command::decode(&[0xff; 3]).is_err());
        let mut trailing = cmd.encode().unwrap();
        trailing.push(0);
        assert!(Command::decode(&trailing).is_err());
        // A length prefix claiming a huge string must fail on the limit, not allocate.
        let mut huge = vec![1u8, 0, 0, 0]; // variant AddNode
        huge.extend_from_slice(&1u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Command::decode(&huge).is_err());
    }

    #[test]
    fn a_renewal_of_a_revoked_lease_is_rejected() {
        let mut s = state_with_nodes(2, &[1]);
        let renew = |seq| Command::RenewLease {
            node: 1,
            lease_seq: seq,
            renewal: 7,
            applied: 3,
        };
        assert_eq!(s.apply(10, &renew(0)), Outcome::Applied);
        let revoke = Command::RevokeLease {
            node: 1,
            lease_seq: 0,
        };
        assert_eq!(s.apply(11, &revoke), Outcome::Applied);
        assert_eq!(s.lease_seq(1), 1);
        // A renewal sent before the revocation but committed after it extends nothing.
        assert_eq!(
            s.apply(12, &renew(0)),
            Outcome::Rejected(Rejection::StaleLease {
                node: 1,
                lease_seq: 0,
                current: 1
            })
        );
        // Revoking twice is stale too: the leader revokes a lease once.
        assert!(matches!(s.apply(13, &revoke), Outcome::Rejected(_)));
        assert_eq!(s.apply(14, &renew(1)), Outcome::Applied);
        assert_eq!(
            s.apply(
                15,
                &Command::RenewLease {
                    node: 9,
                    lease_seq: 0,
                    renewal: 1,
                    applied: 0
                }
            ),
            Outcome::Rejected(Rejection::UnknownNode(9))
        );
        let round_trip = Command::decode(&renew(4).encode().unwrap()).unwrap();
        assert_eq!(round_trip, renew(4));
    }
}
