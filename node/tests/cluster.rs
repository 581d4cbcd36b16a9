//! Three real `comodit-node` processes form a Raft cluster over one PostgreSQL database and one
//! broker prefix: they agree on a leader and share the 12 shards 4 each; after one is killed with
//! SIGKILL, its shards move to the two survivors with larger epochs. Everything is read through
//! `GET /api/v1/cluster`; every wait has a deadline.
//!
//! With real agents enrolled: a change submitted through any member's API reaches the actor of the
//! node that owns the host's shard (ARCHITECTURE §15), and after that owner is killed a survivor's
//! API reaches the host again once the shard moved.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{free_port, tail, Agent, Node};
use serde_json::{json, Value};

const N_SHARDS: usize = 12;
/// Election, lease expiry (6 s + drift) and the handoff fit well within this.
const DEADLINE: Duration = Duration::from_secs(60);

/// Polls every node in `nodes` until `check` accepts all their views; panics with the last views
/// and the logs at the deadline.
fn wait_views(
    what: &str,
    nodes: &[&Node],
    mut check: impl FnMut(&[Value]) -> Result<(), String>,
) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let views: Vec<Value> = nodes
            .iter()
            .map(|n| {
                let (status, body) = n.api("GET", "/cluster", None);
                assert_eq!(status, 200, "{body}");
                body
            })
            .collect();
        let verdict = check(&views);
        if verdict.is_ok() {
            return views;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| tail(&n.log())).collect();
            panic!(
                "timed out waiting for {what}: {}\nviews: {views:#?}\nlogs:\n{}",
                verdict.unwrap_err(),
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `owner → shards` of a view's shard table (unowned shards under 0).
fn owners(view: &Value) -> BTreeMap<u64, Vec<u64>> {
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in view["shards"].as_array().into_iter().flatten() {
        out.entry(s["owner"].as_u64().unwrap_or(0))
            .or_default()
            .push(s["shard"].as_u64().unwrap());
    }
    out
}

fn epochs(view: &Value) -> Vec<u64> {
    view["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["epoch"].as_u64().unwrap())
        .collect()
}

/// All views name the same leader among `ids`.
fn same_leader(views: &[Value], ids: &[u64]) -> Result<u64, String> {
    let leaders: Vec<Option<u64>> = views.iter().map(|v| v["leader"].as_u64()).collect();
    match leaders[0] {
        Some(l) if ids.contains(&l) && leaders.iter().all(|x| *x == Some(l)) => Ok(l),
        _ => Err(format!("leaders {leaders:?}")),
    }
}

/// Three members on a fresh PostgreSQL database and one broker prefix, started one after the other
/// (the first bootstraps the shared store and writes the admin token every node then uses).
fn start_cluster() -> (Vec<Node>, comodit_testkit::PgDatabase) {
    let (pg_url, db) = comodit_testkit::fresh_pg_database();
    let prefix = comodit_testkit::unique_prefix();
    let raft_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = raft_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let env = |id: usize| -> Vec<(String, String)> {
        [
            ("COMODIT_STORE", "postgres".to_owned()),
            ("COMODIT_POSTGRES_URL", pg_url.clone()),
            ("COMODIT_N_SHARDS", N_SHARDS.to_string()),
            ("COMODIT_CLUSTER_ID", id.to_string()),
            (
                "COMODIT_CLUSTER_LISTEN",
                format!("127.0.0.1:{}", raft_ports[id - 1]),
            ),
            (
                "COMODIT_CLUSTER_SECRET",
                "test-cluster-secret-0123".to_owned(),
            ),
            ("COMODIT_CLUSTER_PEERS", peers.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    // One after the other: the first bootstraps the shared store (and writes the admin token).
    let first = Node::start_with(&prefix, env(1));
    assert!(!first.token.is_empty(), "the first node writes the token");
    let mut nodes = vec![first];
    for id in 2..=3 {
        let mut n = Node::start_with(&prefix, env(id));
        n.token = nodes[0].token.clone();
        nodes.push(n);
    }

    (nodes, db)
}

/// Waits until all `nodes` agree on a leader, 4 shards each, every lease valid.
fn wait_balanced(nodes: &[&Node]) -> Vec<Value> {
    wait_views("a leader and 4 shards per node", nodes, |views| {
        same_leader(views, &[1, 2, 3])?;
        for v in views {
            let counts: Vec<(u64, usize)> = owners(v).iter().map(|(k, s)| (*k, s.len())).collect();
            if counts != [(1, 4), (2, 4), (3, 4)] {
                return Err(format!("node {} sees owners {counts:?}", v["id"]));
            }
        }
        match views.iter().find(|v| v["lease_valid"] != true) {
            Some(v) => Err(format!("node {} has no valid lease", v["id"])),
            None => Ok(()),
        }
    })
}

/// Two real agents enrolled (through different members: the enrollment service is one queue) and
/// online as every member sees them.
fn two_agents(nodes: &[Node]) -> Vec<Agent> {
    let token = nodes[0].enrollment_token(2);
    let mut agents = vec![
        Agent::enroll(&nodes[1], &token),
        Agent::enroll(&nodes[2], &token),
    ];
    for (a, n) in agents.iter_mut().zip(nodes) {
        a.start(n);
    }
    for a in &agents {
        for n in nodes {
            n.wait_for("host online", || n.online(&a.host).then_some(()));
        }
    }
    agents
}

/// The member (1-based id) that owns `host`'s shard in `node`'s view of the table.
fn owner_of(node: &Node, host: &str) -> u64 {
    let shard = node.host(host)["shard"].as_u64().expect("shard");
    let (status, view) = node.api("GET", "/cluster", None);
    assert_eq!(status, 200, "{view}");
    view["shards"][shard as usize]["owner"]
        .as_u64()
        .unwrap_or_else(|| panic!("shard {shard} unowned: {view}"))
}

#[test]
fn three_nodes_share_the_shards_and_take_over_a_killed_one() {
    let (mut nodes, _db) = start_cluster();
    let all: Vec<&Node> = nodes.iter().collect();
    let views = wait_views("a leader and 4 shards per node", &all, |views| {
        same_leader(views, &[1, 2, 3])?;
        for v in views {
            let o = owners(v);
            let counts: Vec<(u64, usize)> = o.iter().map(|(k, s)| (*k, s.len())).collect();
            if counts != [(1, 4), (2, 4), (3, 4)] {
                return Err(format!("node {} sees owners {counts:?}", v["id"]));
            }
            // The per-node listing agrees with the shard table.
            for n in v["nodes"].as_array().into_iter().flatten() {
                let id = n["id"].as_u64().unwrap();
                let listed: Vec<u64> = n["shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_u64().unwrap())
                    .collect();
                if o.get(&id).cloned().unwrap_or_default() != listed {
                    return Err(format!("node {id}'s shard list disagrees with the table"));
                }
            }
        }
        // Every member holds a valid lease (it acts for its shards).
        if let Some(v) = views.iter().find(|v| v["lease_valid"] != true) {
            return Err(format!("node {} has no valid lease", v["id"]));
        }
        Ok(())
    });
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v["id"], (i + 1) as u64, "each node reports its own id");
        assert_eq!(v["shards"].as_array().unwrap().len(), N_SHARDS);
    }
    let leader = same_leader(&views, &[1, 2, 3]).unwrap();
    let before = views[0].clone();
    let before_epochs = epochs(&before);

    // Kill a follower with SIGKILL: no goodbye, its lease just lapses.
    let victim = [1u64, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let victim_shards = owners(&before)[&victim].clone();
    nodes[victim as usize - 1]
        .proc
        .take()
        .expect("running")
        .kill9();
    let survivors: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != victim)
        .map(|(_, n)| n)
        .collect();
    let survivor_ids: Vec<u64> = [1u64, 2, 3].into_iter().filter(|&i| i != victim).collect();

    let views = wait_views(
        "the killed node's shards on the survivors",
        &survivors,
        |views| {
            same_leader(views, &survivor_ids)?;
            for v in views {
                let o = owners(v);
                if !o.keys().all(|k| survivor_ids.contains(k)) {
                    return Err(format!("node {} sees owners {:?}", v["id"], o.keys()));
                }
                let e = epochs(v);
                for &s in &victim_shards {
                    if e[s as usize] <= before_epochs[s as usize] {
                        return Err(format!("shard {s} still at epoch {}", e[s as usize]));
                    }
                }
            }
            Ok(())
        },
    );
    for v in &views {
        let o = owners(v);
        assert_eq!(
            o.values().map(Vec::len).sum::<usize>(),
            N_SHARDS,
            "every shard owned: {v}"
        );
        assert!(
            survivor_ids
                .iter()
                .all(|id| o.get(id).is_some_and(|s| !s.is_empty())),
            "both survivors own shards: {v}"
        );
    }
}

#[test]
fn any_member_applies_a_change_on_any_host() {
    let (nodes, _db) = start_cluster();
    wait_balanced(&nodes.iter().collect::<Vec<_>>());
    let agents = two_agents(&nodes);
    let dir = tempfile::tempdir().unwrap();
    let mut non_owner_submits = 0;
    for a in &agents {
        let owner = owner_of(&nodes[0], &a.host);
        for (i, n) in nodes.iter().enumerate() {
            let path = dir.path().join(format!("{}-via-{}", a.host, i + 1));
            let content = format!("from node {} for {}\n", i + 1, a.host);
            let (status, body) = n.api(
                "PUT",
                &format!("/hosts/{}/resources/files{}", a.host, path.display()),
                Some(json!({"spec": {"content": content, "mode": "0644"}})),
            );
            assert_eq!(
                status,
                200,
                "PUT through node {} (owner {owner}): {body}\n{}",
                i + 1,
                tail(&n.log())
            );
            assert_eq!(body["status"], "applied", "{body}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
            if i as u64 + 1 != owner {
                non_owner_submits += 1;
            }
        }
    }
    // Each host has one owner: the two others reached it from outside.
    assert_eq!(non_owner_submits, 4);
}

#[test]
fn a_survivor_reaches_the_host_after_its_owner_is_killed() {
    let (mut nodes, _db) = start_cluster();
    wait_balanced(&nodes.iter().collect::<Vec<_>>());
    let agents = two_agents(&nodes);
    let host = agents[0].host.clone();
    let run = |n: &Node| {
        n.api(
            "POST",
            &format!("/hosts/{host}/run?wait_s=2"),
            Some(json!({"argv": ["echo", "ok"]})),
        )
    };
    // Before: a run through any member works.
    let (status, body) = run(&nodes[0]);
    assert_eq!(status, 200, "{body}");

    let victim = owner_of(&nodes[0], &host);
    nodes[victim as usize - 1]
        .proc
        .take()
        .expect("running")
        .kill9();
    let killed = Instant::now();
    let survivor = nodes
        .iter()
        .enumerate()
        .find(|(i, _)| *i as u64 + 1 != victim)
        .map(|(_, n)| n)
        .unwrap();
    let last = loop {
        let (status, body) = run(survivor);
        if status == 200 && body["status"] == "applied" {
            assert_eq!(body["result"]["data"]["stdout"], "ok\n", "{body}");
            break body;
        }
        assert!(
            killed.elapsed() < DEADLINE,
            "no run through node {} within {DEADLINE:?} after node {victim} died: {status} {body}\n{}",
            survivor.port,
            tail(&survivor.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("failover: {} ms", killed.elapsed().as_millis());
    assert_ne!(owner_of(survivor, &host), victim, "{last}");
}
