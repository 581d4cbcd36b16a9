//! `ClusterNode` for real: three members on 127.0.0.1 with their Raft logs in temp dirs, small
//! ticks and leases. Every wait polls a condition with a deadline; every node is stopped by its
//! token at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use comodit_cluster::lease::LeaseConfig;
use comodit_cluster::runtime::{ClusterConfig, ClusterNode, MembershipError, MAX_VOTERS};
use comodit_cluster::state::NodeState;
use comodit_cluster::NodeId;
use tokio_util::sync::CancellationToken;

const N_SHARDS: u32 = 12;
const DEADLINE: Duration = Duration::from_secs(30);

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(id: NodeId, peers: &BTreeMap<NodeId, SocketAddr>, dir: &Path) -> ClusterConfig {
    ClusterConfig {
        id,
        listen: peers[&id],
        cluster_secret: "test-secret".into(),
        data_dir: dir.join(format!("node-{id}")),
        peers: peers.clone(),
        join: Vec::new(),
        n_shards: N_SHARDS,
        tick_ms: 20,
        lease: LeaseConfig {
            lease_ms: 1_000,
            max_drift_ppm: 1_000,
            renew_every_ms: 200,
        },
    }
}

struct Member {
    node: ClusterNode,
    stop: CancellationToken,
}

/// Start a member, retrying while the previous incarnation still holds its port or its log.
async fn start(cfg: ClusterConfig) -> Member {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stop = CancellationToken::new();
        match ClusterNode::start(cfg.clone(), stop.clone()).await {
            Ok(node) => return Member { node, stop },
            Err(e) if Instant::now() < deadline => {
                eprintln!("node {} not started yet: {e}", cfg.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node {} did not start: {e}", cfg.id),
        }
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The shards each node claims; panics if two claim the same shard.
fn claims(nodes: &[&ClusterNode]) -> BTreeMap<u32, (NodeId, u64)> {
    let mut all = BTreeMap::new();
    for n in nodes {
        let id = n.status().id;
        for (shard, epoch) in n.owned() {
            if let Some((other, _)) = all.insert(shard, (id, epoch)) {
                panic!("shard {shard} claimed by both node {other} and node {id}");
            }
        }
    }
    all
}

/// All given nodes agree on a complete table whose owners are exactly `owners`, balanced within
/// one, and their `owned()` partition the shards.
fn settled(nodes: &[&ClusterNode], owners: &BTreeSet<NodeId>) -> bool {
    let table = nodes[0].shard_table();
    if table.len() != N_SHARDS as usize || nodes.iter().any(|n| n.shard_table() != table) {
        return false;
    }
    let mut counts: BTreeMap<NodeId, usize> = BTreeMap::new();
    for s in &table {
        match s.owner {
            Some(o) => *counts.entry(o).or_default() += 1,
            None => return false,
        }
    }
    if counts.keys().copied().collect::<BTreeSet<_>>() != *owners {
        return false;
    }
    let (min, max) = (counts.values().min(), counts.values().max());
    if max.zip(min).is_none_or(|(max, min)| max - min > 1) {
        return false;
    }
    let claimed = claims(nodes);
    claimed.len() == N_SHARDS as usize
        && claimed.iter().all(|(shard, (id, epoch))| {
            table[*shard as usize].owner == Some(*id) && table[*shard as usize].epoch == *epoch
        })
}

async fn three_nodes(dir: &Path) -> (BTreeMap<NodeId, SocketAddr>, BTreeMap<NodeId, Member>) {
    let peers: BTreeMap<NodeId, SocketAddr> = (1..=3).map(|id| (id, free_addr())).collect();
    let mut members = BTreeMap::new();
    for &id in peers.keys() {
        members.insert(id, start(config(id, &peers, dir)).await);
    }
    (peers, members)
}

fn refs(members: &BTreeMap<NodeId, Member>, ids: &[NodeId]) -> Vec<ClusterNode> {
    ids.iter().map(|id| members[id].node.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_partition_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (_peers, members) = three_nodes(dir.path()).await;
    let nodes = refs(&members, &[1, 2, 3]);
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    let ids: BTreeSet<NodeId> = [1, 2, 3].into();

    wait_for("one leader known to all three", || {
        let leaders: BTreeSet<_> = all.iter().map(|n| n.status().leader).collect();
        leaders.len() == 1 && leaders.iter().all(|l| l.is_some())
    })
    .await;
    wait_for("a balanced shard table partitioned by owned()", || {
        settled(&all, &ids)
    })
    .await;
    for n in &all {
        let st = n.status();
        assert!(st.lease_valid, "{st:?}");
        assert_eq!(
            st.nodes.iter().map(|n| n.id).collect::<BTreeSet<_>>(),
            ids,
            "{st:?}"
        );
        assert_eq!(n.owned().len(), 4, "12 shards over 3 nodes");
    }
    for m in members.values() {
        m.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_follower_loses_its_shards_after_its_lease_and_rejoins_after_restart() {
    crash_and_rejoin(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_loses_its_shards_after_its_lease_and_rejoins_after_restart() {
    crash_and_rejoin(true).await;
}

async fn crash_and_rejoin(victim_is_leader: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (peers, mut members) = three_nodes(dir.path()).await;
    let nodes = refs(&members, &[1, 2, 3]);
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_for("a settled table over three nodes", || {
        settled(&all, &[1, 2, 3].into())
    })
    .await;

    // Crash a node (from the others' view: it just goes silent).
    let leader = nodes[0].status().leader.unwrap();
    let victim = *peers
        .keys()
        .find(|&&id| (id == leader) == victim_is_leader)
        .unwrap();
    let survivors: Vec<NodeId> = peers.keys().copied().filter(|&id| id != victim).collect();
    let before: BTreeMap<u32, u64> = members[&victim].node.owned().into_iter().collect();
    assert!(!before.is_empty());
    members[&victim].stop.cancel();
    let stopped_at = Instant::now();

    // Sample every node's claims (the victim's included: its lease runs out on its own clock)
    // until the survivors own everything; `claims` panics on any double claim.
    let victim_node = members[&victim].node.clone();
    let surv = refs(&members, &survivors);
    let surv_refs: Vec<&ClusterNode> = surv.iter().collect();
    let mut sampled: Vec<&ClusterNode> = surv_refs.clone();
    sampled.push(&victim_node);
    wait_for("the victim's shards to move to the survivors", || {
        claims(&sampled);
        settled(&surv_refs, &survivors.iter().copied().collect())
    })
    .await;
    assert!(
        stopped_at.elapsed() >= Duration::from_millis(800),
        "shards moved before the lease could have expired: {:?}",
        stopped_at.elapsed()
    );
    assert!(victim_node.owned().is_empty());
    let table = surv[0].shard_table();
    for (shard, old_epoch) in &before {
        let now = table[*shard as usize];
        assert!(survivors.contains(&now.owner.unwrap()));
        assert!(
            now.epoch > *old_epoch,
            "shard {shard}: epoch {} not above {old_epoch}",
            now.epoch
        );
    }

    // Restart it from its data dir: it catches up and gets shards again, handed off without
    // any instant at which two nodes claim one shard.
    let restarted = start(config(victim, &peers, dir.path())).await;
    let old = members.insert(victim, restarted).unwrap();
    drop(old);
    let nodes = refs(&members, &[1, 2, 3]);
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_for("the restarted node to own shards again", || {
        claims(&all);
        settled(&all, &[1, 2, 3].into())
    })
    .await;
    let rejoined = members[&victim].node.clone();
    assert!(rejoined.status().lease_valid);
    assert_eq!(rejoined.owned().len(), 4);
    for m in members.values() {
        m.stop.cancel();
    }
}

/// A node that is not a founder: it starts empty and asks `contacts` to let it in.
fn joiner_config(id: NodeId, contacts: Vec<SocketAddr>, dir: &Path) -> ClusterConfig {
    let listen = free_addr();
    let mut cfg = config(id, &[(id, listen)].into(), dir);
    cfg.peers = BTreeMap::new();
    cfg.join = contacts;
    cfg
}

fn voters_everywhere(nodes: &[&ClusterNode], voters: &[NodeId], learners: &[NodeId]) -> bool {
    nodes.iter().all(|n| {
        let st = n.status();
        st.voters == voters && st.learners == learners
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_nodes_get_their_share_and_become_voters_up_to_five_then_learners() {
    let dir = tempfile::tempdir().unwrap();
    let (peers, mut members) = three_nodes(dir.path()).await;
    let founders = refs(&members, &[1, 2, 3]);
    let f: Vec<&ClusterNode> = founders.iter().collect();
    wait_for("a settled table over three nodes", || {
        settled(&f, &[1, 2, 3].into())
    })
    .await;

    // Node 4 knows only node 2 (a follower or the leader: either forwards the admission).
    members.insert(
        4,
        start(joiner_config(4, vec![peers[&2]], dir.path())).await,
    );
    let nodes = refs(&members, &[1, 2, 3, 4]);
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_for(
        "node 4 to own its share, no shard ever claimed twice",
        || {
            claims(&all);
            settled(&all, &[1, 2, 3, 4].into())
        },
    )
    .await;
    wait_for("node 4 promoted to voter everywhere", || {
        voters_everywhere(&all, &[1, 2, 3, 4], &[])
    })
    .await;

    // Two more: the fifth voter, then a learner (at most five voters).
    for id in [5, 6] {
        let contacts = vec![peers[&1], peers[&3]];
        members.insert(id, start(joiner_config(id, contacts, dir.path())).await);
    }
    let nodes = refs(&members, &[1, 2, 3, 4, 5, 6]);
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_for("six owners, two shards each", || {
        claims(&all);
        settled(&all, &(1..=6).collect())
    })
    .await;
    wait_for("five voters and one learner", || {
        let st = all[0].status();
        st.voters.len() == MAX_VOTERS && st.learners.len() == 1
    })
    .await;
    for n in &all {
        assert!(n.status().lease_valid);
        assert_eq!(n.owned().len(), 2);
    }
    for m in members.values() {
        m.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_node_hands_every_shard_off_before_it_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (peers, mut members) = three_nodes(dir.path()).await;
    // A fourth node as a learner-to-be, so that a voter leaving has someone to be replaced by.
    members.insert(
        4,
        start(joiner_config(4, vec![peers[&1]], dir.path())).await,
    );
    let nodes = refs(&members, &[1, 2, 3, 4]);
    let all: Vec<&ClusterNode> = nodes.iter().collect();
    wait_for("a settled table over four nodes", || {
        claims(&all);
        settled(&all, &[1, 2, 3, 4].into())
    })
    .await;

    // Bad requests change nothing.
    assert!(matches!(
        nodes[0].decommission(9).await,
        Err(MembershipError::Invalid(_))
    ));
    assert!(matches!(
        nodes[0].add_node(7, "0.0.0.0:1".into()).await,
        Err(MembershipError::Invalid(_))
    ));
    assert!(matches!(
        nodes[0].add_node(2, "127.0.0.1:1".into()).await,
        Err(MembershipError::Invalid(why)) if why.contains("is a member at")
    ));

    // Decommission the leader itself, through another member: the hardest case (its shards
    // move, leadership moves, then it leaves the configuration).
    let leader = nodes[0].status().leader.unwrap();
    let via = nodes.iter().find(|n| n.status().id != leader).unwrap();
    via.decommission(leader).await.unwrap();
    let stayers: Vec<NodeId> = (1..=4).filter(|&id| id != leader).collect();
    let stay = refs(&members, &stayers);
    let stay_refs: Vec<&ClusterNode> = stay.iter().collect();
    let leaving = members[&leader].node.clone();
    wait_for(
        "the leaving node to own nothing while the others own all",
        || {
            claims(&all);
            settled(&stay_refs, &stayers.iter().copied().collect())
        },
    )
    .await;
    wait_for("the leaving node removed from the configuration", || {
        claims(&all);
        stay_refs.iter().all(|n| {
            let st = n.status();
            !st.voters.contains(&leader)
                && !st.learners.contains(&leader)
                && st.voters.len() == 3
                && st
                    .nodes
                    .iter()
                    .any(|x| x.id == leader && x.state == NodeState::Left)
        })
    })
    .await;
    wait_for("the leaving node to learn it may stop", || {
        leaving.finished()
    })
    .await;
    assert!(leaving.owned().is_empty());
    let new_leader = stay[0].status().leader.unwrap();
    assert_ne!(new_leader, leader);

    // Its id is never reused, and the last active node cannot leave.
    assert!(matches!(
        stay[0].add_node(leader, peers[&leader].to_string()).await,
        Err(MembershipError::Invalid(why)) if why.contains("never reused")
    ));
    for id in stayers.iter().skip(1) {
        stay[0].decommission(*id).await.unwrap();
    }
    wait_for("one node left with every shard", || {
        settled(&[&stay[0]], &[stayers[0]].into())
    })
    .await;
    assert!(matches!(
        stay[0].decommission(stayers[0]).await,
        Err(MembershipError::Invalid(why)) if why.contains("last active node")
    ));
    for m in members.values() {
        m.stop.cancel();
    }
}
