//! # comodit-cluster (being built)
//!
//! The control plane of DESIGN §7: which node owns which shard, at which epoch, under which lease.
//! Sans-IO cores first: [`allocator`] (shard allocation, a pure function) and [`lease`] (lease rules
//! over an injected clock); the Raft driver and its simulated-network harness follow.

pub mod allocator;
pub mod lease;
pub mod lease_sim;
pub mod log_store;
pub mod raft_node;
pub mod runtime;
pub mod sim;
pub mod state;
pub mod transport;

/// A node of the cluster (Raft peer id; never 0, which raft-rs reserves).
pub type NodeId = u64;
