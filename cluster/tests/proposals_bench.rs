//! Benchmark, not a test (ignored; run it on purpose): how many shard-table changes per second
//! the Raft group commits and applies on every member, with the real durable log (`FileLogStore`,
//! fsync before dependent messages) on this machine's disk. Messages go from node to node in
//! memory, so the figure is the Raft + disk cost without the network.
//!
//! Each proposal is a `Command::AssignShards` over 256 shards (the largest shard-table command the
//! leader makes). Two shapes: one proposal in flight at a time (what the leader's admin loop does:
//! propose, wait until applied, decide the next), and 64 in flight (the pipeline's ceiling).
//!
//! ```text
//! cargo test --release -p comodit-cluster --test proposals_bench -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use comodit_cluster::log_store::FileLogStore;
use comodit_cluster::raft_node::{discard_logger, RaftNode, RaftNodeConfig};
use comodit_cluster::state::Command;
use comodit_cluster::NodeId;
use raft::eraftpb::Message;

const N_SHARDS: u32 = 256;
const RUN: Duration = Duration::from_secs(5);

struct Group {
    nodes: Vec<RaftNode<FileLogStore>>,
    _dir: tempfile::TempDir,
}

impl Group {
    fn new(n: u64) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let voters: Vec<NodeId> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let store =
                    FileLogStore::bootstrap(&dir.path().join(format!("{id}.redb")), &voters)
                        .unwrap();
                RaftNode::new(&RaftNodeConfig::new(id), store, &discard_logger()).unwrap()
            })
            .collect();
        Group { nodes, _dir: dir }
    }

    /// Runs ready on every node and delivers the messages until nothing moves; returns the number
    /// of commands the leader (node 1) applied meanwhile.
    fn pump(&mut self) -> usize {
        let mut applied = 0;
        loop {
            let mut mail: Vec<Message> = Vec::new();
            for (i, node) in self.nodes.iter_mut().enumerate() {
                let out = node.ready().unwrap();
                if i == 0 {
                    applied += out
                        .applied
                        .iter()
                        .filter(|a| {
                            matches!(a.kind, comodit_cluster::raft_node::AppliedKind::Command(..))
                        })
                        .count();
                }
                mail.extend(out.messages);
            }
            if mail.is_empty() {
                return applied;
            }
            for m in mail {
                let to = m.to as usize - 1;
                let _ = self.nodes[to].step(m);
            }
        }
    }

    fn elect(&mut self) {
        self.nodes[0].campaign().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.nodes[0].is_leader() {
            assert!(Instant::now() < deadline, "no leader");
            self.pump();
        }
        self.nodes[0]
            .propose(&Command::Init { n_shards: N_SHARDS })
            .unwrap();
        for id in 1..=self.nodes.len() as u64 {
            self.nodes[0]
                .propose(&Command::AddNode {
                    id,
                    addr: format!("127.0.0.1:{}", 7000 + id),
                })
                .unwrap();
        }
        self.pump();
    }
}

fn assignment(round: u64, n: u64) -> Command {
    Command::AssignShards {
        owners: (0..N_SHARDS as u64)
            .map(|s| Some(1 + (s + round) % n))
            .collect(),
    }
}

/// Commands applied per second with up to `window` proposals in flight.
fn measure(window: usize) -> f64 {
    let mut g = Group::new(3);
    g.elect();
    let (mut proposed, mut applied) = (0usize, 0usize);
    let started = Instant::now();
    while started.elapsed() < RUN {
        while proposed - applied < window {
            g.nodes[0].propose(&assignment(proposed as u64, 3)).unwrap();
            proposed += 1;
        }
        applied += g.pump();
    }
    let secs = started.elapsed().as_secs_f64();
    // Every member applied the same table.
    let table = g.nodes[0].state().shards.clone();
    for n in &g.nodes[1..] {
        assert_eq!(n.state().shards, table);
    }
    applied as f64 / secs
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn shard_table_proposals_per_second() {
    for window in [1, 64] {
        let rate = measure(window);
        eprintln!(
            "3 voters, fsync'd redb logs, AssignShards over {N_SHARDS} shards, {window} in flight: {rate:.0} proposals/s"
        );
        assert!(rate > 0.0);
    }
}
