//! Which shards this node acts for (DESIGN §4, §7). A node acts for a shard only while it owns it
//! and its lease is valid; every command and fenced write carries the shard's epoch.
//!
//! The cluster issue backs [`Ownership`] with Raft; [`SingleNode`] is the cluster of one: it owns
//! every shard at epoch 1 with a lease that never expires.

use comodit_protocol::{Epoch, Shard};
use tokio::sync::watch;

pub trait Ownership: Send + Sync + 'static {
    fn n_shards(&self) -> u32;
    /// The shards this node owns now, with their epochs (only while the lease is valid).
    fn owned(&self) -> Vec<(Shard, Epoch)>;
    /// The epoch to act with for `shard`, if this node owns it and its lease is valid now.
    fn epoch(&self, shard: Shard) -> Option<Epoch>;
    /// The epoch of `shard`'s current assignment in the replicated table, whoever owns it (this
    /// node or another); `None` when unknown or unassigned. A non-owner appends a change with it
    /// (the store's fence accepts the owner's current epoch) and kicks the host's stream, which the
    /// owner consumes. A cluster of one knows only its own shards.
    fn table_epoch(&self, shard: Shard) -> Option<Epoch> {
        self.epoch(shard)
    }
    /// Ticks whenever ownership or lease validity changes.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// A cluster of one node.
pub struct SingleNode {
    n_shards: u32,
    epoch: Epoch,
    changes: watch::Sender<u64>,
}

impl SingleNode {
    pub fn new(n_shards: u32) -> Self {
        assert!(n_shards > 0);
        SingleNode {
            n_shards,
            epoch: Epoch(1),
            changes: watch::channel(0).0,
        }
    }
}

impl Ownership for SingleNode {
    fn n_shards(&self) -> u32 {
        self.n_shards
    }

    fn owned(&self) -> Vec<(Shard, Epoch)> {
        (0..self.n_shards).map(|s| (Shard(s), self.epoch)).collect()
    }

    fn epoch(&self, shard: Shard) -> Option<Epoch> {
        (shard.0 < self.n_shards).then_some(self.epoch)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
