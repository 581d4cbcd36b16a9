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

use common::{free_port, tail, Agent, Node, Proxy};
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
    let _ports = ports_lock();
    let raft_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = raft_ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    start_cluster_with(&raft_ports, |_| peers.clone())
}

/// Held from picking free ports until they are bound (and while a restarted node's ports are
/// free): the tests of this binary run side by side, and one test's proxies or nodes must not take
/// a port another test picked but has not bound yet.
fn ports_lock() -> std::sync::MutexGuard<'static, ()> {
    static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PORTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`start_cluster`] with the Raft ports `raft_ports` and node `id`'s peer list from `peers_of(id)`.
fn start_cluster_with(
    raft_ports: &[u16],
    peers_of: impl Fn(usize) -> String,
) -> (Vec<Node>, comodit_testkit::PgDatabase) {
    let (pg_url, db) = comodit_testkit::fresh_pg_database();
    let prefix = comodit_testkit::unique_prefix();
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
            ("COMODIT_CLUSTER_PEERS", peers_of(id)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    // One after the other: the first bootstraps the shared store (and writes the admin token).
    let first = Node::start_with(&prefix, env(1));
    assert!(!first.token.is_empty(), "the first node writes the token");
    let mut nodes = vec![first];
    for id in 2..=raft_ports.len() {
        let mut n = Node::start_with(&prefix, env(id));
        n.token = nodes[0].token.clone();
        nodes.push(n);
    }

    (nodes, db)
}

/// The environment of a node that joins the cluster of `nodes` (through node 1's Raft address).
fn joiner_env(
    nodes: &[Node],
    id: usize,
    raft_port: u16,
    member_raft: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = nodes[0]
        .env
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "COMODIT_CLUSTER_PEERS" | "COMODIT_CLUSTER_ID" | "COMODIT_CLUSTER_LISTEN"
            )
        })
        .cloned()
        .collect();
    env.push(("COMODIT_CLUSTER_ID".into(), id.to_string()));
    env.push((
        "COMODIT_CLUSTER_LISTEN".into(),
        format!("127.0.0.1:{raft_port}"),
    ));
    env.push(("COMODIT_CLUSTER_JOIN".into(), member_raft.to_owned()));
    env
}

/// Runs submitted one after the other through one member, each appending its sequence number to
/// a per-host file on the agent's machine: the agents' own record of what they executed.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Runs accepted so far.
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Vec<(String, u64, String)>>>,
    dir: std::path::PathBuf,
    hosts: Vec<String>,
}

impl Load {
    fn start(node: &Node, hosts: &[String], dir: &std::path::Path) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url_port, token) = (node.port, node.token.clone());
        let hosts_t = hosts.to_vec();
        let dir_t = dir.to_path_buf();
        let stop_t = stop.clone();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count_t = count.clone();
        let thread = std::thread::spawn(move || {
            // A client of its own (the rig's `Node` is not shared across threads).
            let http: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into();
            let mut accepted = Vec::new();
            let mut seq = 0u64;
            while !stop_t.load(std::sync::atomic::Ordering::Relaxed) {
                for h in &hosts_t {
                    seq += 1;
                    let file = dir_t.join(format!("{h}.log"));
                    let body = json!({"argv": ["/bin/sh", "-c", format!("echo {seq} >> {}", file.display())]});
                    let url = format!("http://127.0.0.1:{url_port}/api/v1/hosts/{h}/run?wait_s=1");
                    let Ok(res) = http
                        .post(&url)
                        .header("Authorization", &format!("Bearer {token}"))
                        .send_json(body)
                    else {
                        continue;
                    };
                    let status = res.status().as_u16();
                    let text = res.into_body().read_to_string().unwrap_or_default();
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    // Accepted: recorded as a change (answered or not yet).
                    if matches!(status, 200 | 202) {
                        if let Some(id) = v["id"].as_str() {
                            accepted.push((h.clone(), seq, id.to_owned()));
                            count_t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            accepted
        });
        Load {
            stop,
            count,
            thread: Some(thread),
            dir: dir.to_path_buf(),
            hosts: hosts.to_vec(),
        }
    }

    /// Stops submitting, waits for every accepted change to end, and checks the agents' records:
    /// every applied change ran exactly once, none ran twice, nothing ran that was not accepted.
    /// Returns (accepted, applied).
    fn finish(mut self, via: &Node) -> (usize, usize) {
        // Enough runs to say something, however fast the scenario went.
        via.wait_for("20 runs accepted", || {
            (self.count.load(std::sync::atomic::Ordering::Relaxed) >= 20).then_some(())
        });
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let accepted = self.thread.take().unwrap().join().unwrap();
        let mut statuses = Vec::new();
        for (host, seq, id) in &accepted {
            let status = via.wait_for("the change to end", || {
                let (code, v) = via.api("GET", &format!("/hosts/{host}/changes/{id}"), None);
                assert_eq!(code, 200, "{v}");
                let s = v["status"].as_str().unwrap_or("").to_owned();
                (s != "queued" && s != "dispatched").then_some(s)
            });
            statuses.push((host.clone(), *seq, status));
        }
        let mut runs: BTreeMap<(String, u64), usize> = BTreeMap::new();
        for h in &self.hosts {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{h}.log"))).unwrap_or_default();
            for line in text.lines() {
                *runs
                    .entry((h.clone(), line.trim().parse().unwrap()))
                    .or_default() += 1;
            }
        }
        let accepted_keys: std::collections::BTreeSet<(String, u64)> =
            statuses.iter().map(|(h, s, _)| (h.clone(), *s)).collect();
        for (key, n) in &runs {
            assert_eq!(*n, 1, "{key:?} ran {n} times");
            assert!(
                accepted_keys.contains(key),
                "{key:?} ran but was never accepted"
            );
        }
        let mut applied = 0;
        for (h, seq, status) in &statuses {
            let ran = runs.get(&(h.clone(), *seq)).copied().unwrap_or(0);
            if status == "applied" {
                applied += 1;
                assert_eq!(ran, 1, "{h} #{seq} applied but ran {ran} times");
            }
        }
        (accepted.len(), applied)
    }
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
        Agent::enroll(&nodes[2 % nodes.len()], &token),
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
    let survivor_index = (0..nodes.len()).find(|&i| i as u64 + 1 != victim).unwrap();
    // Runs through the survivor on both hosts, before, during and after the failover.
    let hosts: Vec<String> = agents.iter().map(|a| a.host.clone()).collect();
    let records = tempfile::tempdir().unwrap();
    let load = Load::start(&nodes[survivor_index], &hosts, records.path());
    std::thread::sleep(Duration::from_millis(300));
    nodes[victim as usize - 1]
        .proc
        .take()
        .expect("running")
        .kill9();
    let killed = Instant::now();
    let survivor = &nodes[survivor_index];
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
    // The agents' records: nothing ran twice, every applied run ran once (runs that expired while
    // the shard had no owner did not run).
    std::thread::sleep(Duration::from_millis(500));
    let (accepted, applied) = load.finish(survivor);
    eprintln!("kill -9 under load: {accepted} runs accepted, {applied} applied, none twice");
    assert!(applied >= 2, "{applied} of {accepted} applied");
}

/// Views of `nodes` sampled one after the other.
fn sample(nodes: &[&Node]) -> Vec<Value> {
    nodes
        .iter()
        .map(|n| {
            let (status, body) = n.api("GET", "/cluster", None);
            assert_eq!(status, 200, "{body}");
            body
        })
        .collect()
}

#[test]
fn a_cut_off_node_stops_acting_before_its_shards_are_reassigned() {
    // One proxy per directed link: `links[(from, to)]` is what `from` dials to reach `to`.
    let ports = ports_lock();
    let raft_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut links: BTreeMap<(usize, usize), Proxy> = BTreeMap::new();
    for from in 1..=3 {
        for to in (1..=3).filter(|&t| t != from) {
            let upstream = format!("127.0.0.1:{}", raft_ports[to - 1]).parse().unwrap();
            links.insert((from, to), Proxy::start(upstream));
        }
    }
    let peers_of = |id: usize| -> String {
        (1..=3)
            .map(|to| {
                let addr = if to == id {
                    format!("127.0.0.1:{}", raft_ports[to - 1])
                } else {
                    links[&(id, to)].addr.to_string()
                };
                format!("{to}={addr}")
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let (nodes, _db) = start_cluster_with(&raft_ports, peers_of);
    drop(ports);
    let all: Vec<&Node> = nodes.iter().collect();
    let views = wait_balanced(&all);
    let leader = same_leader(&views, &[1, 2, 3]).unwrap();
    let x = [1u64, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let x_shards = owners(&views[0])[&x].clone();
    let x_node = &nodes[x as usize - 1];
    let majority: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != x)
        .map(|(_, n)| n)
        .collect();

    // Cut X off: every link into it and out of it.
    for ((from, to), p) in &links {
        if *from as u64 == x || *to as u64 == x {
            p.set(false);
        }
    }
    let cut = Instant::now();

    // The majority's view is sampled before X's: a reassignment seen at t1 must find X already
    // without a lease at t2 > t1.
    let mut x_stopped: Option<Duration> = None;
    let mut reassigned: Option<Duration> = None;
    let mut samples = 0u32;
    while reassigned.is_none() {
        let m = sample(&majority);
        let xv = sample(&[x_node]).remove(0);
        let at = cut.elapsed();
        samples += 1;
        let moved: Vec<u64> = m
            .iter()
            .flat_map(|v| {
                x_shards
                    .iter()
                    .filter(|&&s| v["shards"][s as usize]["owner"].as_u64() != Some(x))
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        let x_valid = xv["lease_valid"] == true;
        if !x_valid && x_stopped.is_none() {
            x_stopped = Some(at);
        }
        assert!(
            !x_valid || moved.is_empty(),
            "at {at:?} the majority reassigned {moved:?} while node {x} still holds a valid lease:\n{xv:#}\n{m:#?}"
        );
        if !moved.is_empty() {
            reassigned = Some(at);
            assert!(
                x_stopped.is_some_and(|s| s < at),
                "node {x} stopped at {x_stopped:?}, not strictly before its shards moved at {at:?}"
            );
        }
        assert!(
            at < DEADLINE,
            "no reassignment within {DEADLINE:?}: X {xv:#}\nmajority {m:#?}\n{}",
            tail(&x_node.log())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (stopped, moved) = (x_stopped.unwrap(), reassigned.unwrap());
    eprintln!(
        "partition of node {x}: lease invalid at {} ms, first shard reassigned at {} ms \
         (gap {} ms, {samples} samples)",
        stopped.as_millis(),
        moved.as_millis(),
        (moved - stopped).as_millis()
    );
    // While cut off, X never gets its lease back.
    let xv = sample(&[x_node]).remove(0);
    assert_eq!(xv["lease_valid"], false, "{xv:#}");

    // Heal: X catches up and, after rebalance, owns shards again under a valid lease.
    for p in links.values() {
        p.set(true);
    }
    let healed = Instant::now();
    let views = wait_views("the healed node owning shards again", &all, |views| {
        same_leader(views, &[1, 2, 3])?;
        let xv = &views[x as usize - 1];
        if xv["lease_valid"] != true {
            return Err(format!("node {x} has no valid lease"));
        }
        for v in views {
            if owners(v).get(&x).is_none_or(|s| s.is_empty()) {
                return Err(format!("node {} sees no shard on node {x}", v["id"]));
            }
        }
        Ok(())
    });
    eprintln!(
        "healed node {x} owns {:?} again after {} ms",
        owners(&views[x as usize - 1])[&x],
        healed.elapsed().as_millis()
    );
    drop(nodes);
    drop(links);
}

#[test]
fn a_restarted_follower_rejoins_from_its_raft_state() {
    let (mut nodes, _db) = start_cluster();
    let views = wait_balanced(&nodes.iter().collect::<Vec<_>>());
    let leader = same_leader(&views, &[1, 2, 3]).unwrap();
    let f = [1u64, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let before_epochs = epochs(&views[0]);

    // Its ports stay free from the stop to the restart: no other test may pick them meanwhile.
    let ports = ports_lock();
    nodes[f as usize - 1].stop();
    // Its shards leave it first, so whatever it gets back is a new grant.
    {
        let survivors: Vec<&Node> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 + 1 != f)
            .map(|(_, n)| n)
            .collect();
        wait_views("the stopped node's shards moved", &survivors, |views| {
            for v in views {
                if owners(v).contains_key(&f) {
                    return Err(format!("node {} still sees shards on node {f}", v["id"]));
                }
            }
            Ok(())
        });
    }
    let raft_dir = nodes[f as usize - 1].dir.path().join("data/raft");
    assert!(raft_dir.exists(), "{} kept", raft_dir.display());
    nodes[f as usize - 1].spawn();
    drop(ports);
    let restarted = Instant::now();

    let all: Vec<&Node> = nodes.iter().collect();
    let views = wait_views("the restarted node owning shards again", &all, |views| {
        let l = same_leader(views, &[1, 2, 3])?;
        if l != leader {
            return Err(format!("leader {l}, was {leader}"));
        }
        let v = &views[f as usize - 1];
        if v["lease_valid"] != true {
            return Err(format!("node {f} has no valid lease"));
        }
        let mine = owners(v).get(&f).cloned().unwrap_or_default();
        if mine.is_empty() {
            return Err(format!("node {f} owns nothing"));
        }
        Ok(())
    });
    let v = &views[f as usize - 1];
    let mine = owners(v)[&f].clone();
    let after = epochs(v);
    for &s in &mine {
        assert!(
            after[s as usize] > before_epochs[s as usize],
            "shard {s}: epoch {} after the restart, {} before",
            after[s as usize],
            before_epochs[s as usize]
        );
    }
    eprintln!(
        "restarted node {f}: leader {leader} kept, owns {mine:?} after {} ms",
        restarted.elapsed().as_millis()
    );
}

#[test]
fn a_joining_node_takes_its_share_and_a_decommissioned_one_hands_off_then_exits() {
    // Two founders, then node 3 joins through node 1's Raft address.
    let ports = ports_lock();
    let raft_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = format!(
        "1=127.0.0.1:{},2=127.0.0.1:{}",
        raft_ports[0], raft_ports[1]
    );
    let (mut nodes, _db) = start_cluster_with(&raft_ports[..2], |_| peers.clone());
    let two: Vec<&Node> = nodes.iter().collect();
    wait_views("two founders with 6 shards each", &two, |views| {
        same_leader(views, &[1, 2])?;
        let counts: Vec<(u64, usize)> = owners(&views[0])
            .iter()
            .map(|(k, s)| (*k, s.len()))
            .collect();
        (counts == [(1, 6), (2, 6)])
            .then_some(())
            .ok_or(format!("{counts:?}"))
    });
    let agents = two_agents(&nodes);
    let hosts: Vec<String> = agents.iter().map(|a| a.host.clone()).collect();
    let records = tempfile::tempdir().unwrap();
    let load = Load::start(&nodes[0], &hosts, records.path());

    let env = joiner_env(
        &nodes,
        3,
        raft_ports[2],
        &format!("127.0.0.1:{}", raft_ports[0]),
    );
    let mut third = Node::start_with(&nodes[0].prefix, env);
    drop(ports);
    third.token = nodes[0].token.clone();
    nodes.push(third);
    let all: Vec<&Node> = nodes.iter().collect();
    let views = wait_balanced(&all);
    for v in &views {
        let roles: Vec<&str> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].as_str().unwrap())
            .collect();
        assert!(roles.iter().all(|r| *r == "leader" || *r == "voter"), "{v}");
    }

    // Decommission the newcomer through the API of node 2.
    let (status, body) = nodes[1].api("POST", "/cluster/nodes/3/decommission", None);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "leaving");
    let started = Instant::now();
    // Its process exits by itself, with success, once it handed everything off.
    let exit = loop {
        let p = nodes[2].proc.as_mut().unwrap();
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() >= DEADLINE {
            let interesting: Vec<String> = nodes
                .iter()
                .map(|n| {
                    n.log()
                        .lines()
                        .filter(|l| {
                            [
                                "left",
                                "leaving",
                                "membership",
                                "decommission",
                                "leading",
                                "admission",
                                "peer=3",
                                "peer refused",
                                "queue full",
                                "unknown peer",
                                "to=3",
                                "node=3",
                            ]
                            .iter()
                            .any(|w| l.contains(w))
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!(
                "node 3 still running after its decommission:\n{}\n=====\n{}",
                tail(&nodes[2].log()),
                interesting.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}\n{}", tail(&nodes[2].log()));
    eprintln!(
        "decommission: node 3 exited after {} ms",
        started.elapsed().as_millis()
    );
    nodes[2].proc = None;
    let two: Vec<&Node> = nodes[..2].iter().collect();
    wait_views("node 3 left, its shards on 1 and 2", &two, |views| {
        same_leader(views, &[1, 2])?;
        for v in views {
            let counts: Vec<(u64, usize)> = owners(v).iter().map(|(k, s)| (*k, s.len())).collect();
            if counts != [(1, 6), (2, 6)] {
                return Err(format!("owners {counts:?}"));
            }
            let n3 = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["id"] == 3)
                .cloned();
            match n3 {
                Some(n) if n["state"] == "left" && n["role"] == "none" => {}
                other => return Err(format!("node 3: {other:?}")),
            }
        }
        Ok(())
    });

    // Every command accepted meanwhile ran exactly once on its agent.
    let (accepted, applied) = load.finish(&nodes[0]);
    eprintln!("join + decommission under load: {accepted} runs accepted, {applied} applied");
    assert!(
        accepted >= 20 && applied * 10 >= accepted * 9,
        "{applied} of {accepted} applied"
    );
}

#[test]
fn any_member_cancels_a_queued_change_through_the_owner() {
    let (nodes, _db) = start_cluster();
    wait_balanced(&nodes.iter().collect::<Vec<_>>());
    let mut agents = two_agents(&nodes);
    let host = agents[0].host.clone();
    let owner = owner_of(&nodes[0], &host);
    agents[0].stop();
    let others: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != owner)
        .map(|(_, n)| n)
        .collect();
    // Without its queue, what the owner sends comes back unroutable: the change stays queued.
    comodit_testkit::delete_queue(&format!("{}.agent.{host}", nodes[0].prefix));
    let (status, queued) = others[0].api(
        "POST",
        &format!("/hosts/{host}/run?async=true"),
        Some(json!({"argv": ["true"]})),
    );
    assert_eq!(status, 202, "{queued}");
    let change = queued["id"].as_str().unwrap().to_owned();
    let (_, c) = nodes[0].api("GET", &format!("/hosts/{host}/changes/{change}"), None);
    assert_eq!(c["status"], "queued", "{c}");
    // Cancelled through the other non-owner: the owner's actor does it, the store tells.
    let (status, body) = others[1].api(
        "POST",
        &format!("/hosts/{host}/changes/{change}/cancel"),
        None,
    );
    assert_eq!(status, 200, "{body}\n{}", tail(&others[1].log()));
    assert_eq!(body["status"], "cancelled", "{body}");
    let (_, seen) =
        nodes[owner as usize - 1].api("GET", &format!("/hosts/{host}/changes/{change}"), None);
    assert_eq!(seen["status"], "cancelled", "{seen}");
    // Once final, a second cancel through a non-owner is a conflict.
    let (status, body) = others[0].api(
        "POST",
        &format!("/hosts/{host}/changes/{change}/cancel"),
        None,
    );
    assert_eq!(status, 409, "{body}");
    // An unknown change: not found.
    let (status, body) = others[0].api(
        "POST",
        &format!("/hosts/{host}/changes/{}/cancel", uuid_like()),
        None,
    );
    assert_eq!(status, 404, "{body}");
}

fn uuid_like() -> String {
    "6f1c2a4e-8d7b-4c3a-9e2f-0a1b2c3d4e5f".into()
}

// ---------------------------------------------------------------------------------------------
// Figures (benchmarks, ignored): run on purpose, with release binaries:
//   COMODIT_TEST_PG_URL=postgres://comodit:comodit@127.0.0.1:5432/postgres \
//     cargo test --release -p comodit-node --test cluster figure -- --ignored --nocapture --test-threads 1

fn median_max(mut ms: Vec<u128>) -> (u128, u128) {
    ms.sort_unstable();
    (ms[ms.len() / 2], *ms.last().unwrap())
}

/// `kill -9` of a member, ten times: the time until every host whose shard it owned answers a
/// `run` through a survivor. The victim is restarted from its Raft state between runs.
#[test]
#[ignore = "figure: run with --ignored --nocapture"]
fn failover_figure() {
    let (mut nodes, _db) = start_cluster();
    wait_balanced(&nodes.iter().collect::<Vec<_>>());
    let token = nodes[0].enrollment_token(9);
    let mut agents: Vec<Agent> = (0..9)
        .map(|i| Agent::enroll(&nodes[i % 3], &token))
        .collect();
    for (i, a) in agents.iter_mut().enumerate() {
        a.start(&nodes[i % 3]);
    }
    for a in &agents {
        nodes[0].wait_for("host online", || nodes[0].online(&a.host).then_some(()));
    }
    let mut samples = Vec::new();
    for run in 0..10 {
        // Rotate the victim over the members that own at least one host.
        let owners: Vec<(String, u64)> = agents
            .iter()
            .map(|a| (a.host.clone(), owner_of(&nodes[0], &a.host)))
            .collect();
        let mut candidates: Vec<u64> = owners.iter().map(|(_, o)| *o).collect();
        candidates.sort_unstable();
        candidates.dedup();
        let victim = candidates[run % candidates.len()];
        let lost: Vec<String> = owners
            .iter()
            .filter(|(_, o)| *o == victim)
            .map(|(h, _)| h.clone())
            .collect();
        let survivor = (0..3).find(|&i| i as u64 + 1 != victim).unwrap();
        let ports = ports_lock();
        nodes[victim as usize - 1].proc.take().unwrap().kill9();
        let killed = Instant::now();
        let mut waiting = lost.clone();
        while !waiting.is_empty() {
            waiting.retain(|h| {
                let (status, body) = nodes[survivor].api(
                    "POST",
                    &format!("/hosts/{h}/run?wait_s=1"),
                    Some(json!({"argv": ["true"]})),
                );
                !(status == 200 && body["status"] == "applied")
            });
            assert!(
                killed.elapsed() < DEADLINE,
                "hosts {waiting:?} never answered"
            );
        }
        let ms = killed.elapsed().as_millis();
        eprintln!(
            "run {run}: node {victim} killed, its {} hosts answer again after {ms} ms",
            lost.len()
        );
        samples.push(ms);
        nodes[victim as usize - 1].spawn();
        drop(ports);
        wait_balanced(&nodes.iter().collect::<Vec<_>>());
    }
    let (median, max) = median_max(samples);
    eprintln!("FIGURE failover (kill -9 → every host of the lost node answers), 10 runs: median {median} ms, max {max} ms");
}

/// The timestamp of the first line of `log` that contains `phrase` and has every one of `fields`
/// as a whole word (ANSI colours stripped), as microseconds of the day.
fn log_time(log: &str, phrase: &str, fields: &[&str]) -> Option<u64> {
    log.lines().find_map(|line| {
        let mut plain = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        let words: Vec<&str> = plain.split_whitespace().collect();
        if !plain.contains(phrase) || !fields.iter().all(|f| words.contains(f)) {
            return None;
        }
        // 2026-11-28T11:28:05.855121Z
        let t = plain.split_whitespace().next()?.split('T').nth(1)?;
        let t = t.trim_end_matches('Z');
        let (hms, frac) = t.split_once('.')?;
        let mut it = hms.split(':').map(|x| x.parse::<u64>().ok());
        let (h, m, s) = (it.next()??, it.next()??, it.next()??);
        let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
        Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
    })
}

/// A planned handoff of one shard holding 1,000 (online) hosts, five times: the owner is
/// decommissioned, and the shard goes to the other member through the two-step handoff. Measured
/// from the old owner's logs and the new owner's (same clock): the old owner stops acting → the
/// new owner resumed its 1,000 host actors.
#[test]
#[ignore = "figure: run with --ignored --nocapture"]
fn planned_handoff_figure() {
    use comodit_protocol::{Epoch, HostId};
    use comodit_store::{Host, HostRuntime, Store};
    const HOSTS: usize = 1_000;
    let mut samples = Vec::new();
    for run in 0..5 {
        let ports = ports_lock();
        let raft_ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
        let peers = format!(
            "1=127.0.0.1:{},2=127.0.0.1:{}",
            raft_ports[0], raft_ports[1]
        );
        let (nodes, _db) = start_cluster_with(&raft_ports, |_| peers.clone());
        drop(ports);
        let two: Vec<&Node> = nodes.iter().collect();
        let views = wait_views("two founders with 6 shards each", &two, |views| {
            same_leader(views, &[1, 2])?;
            let counts: Vec<usize> = owners(&views[0]).values().map(Vec::len).collect();
            (counts == [6, 6])
                .then_some(())
                .ok_or(format!("{counts:?}"))
        });
        // The shard: the first one of node 2.
        let shard = owners(&views[0])[&2][0] as u32;
        let url = nodes[0]
            .env
            .iter()
            .find(|(k, _)| k == "COMODIT_POSTGRES_URL")
            .unwrap()
            .1
            .clone();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = comodit_store::postgres::PgStore::connect(&url, 8)
                .await
                .unwrap();
            let org = store.get_org_by_name("default").await.unwrap().unwrap();
            let env = store
                .get_env_by_name(org.id, "default")
                .await
                .unwrap()
                .unwrap();
            let mut made = 0;
            while made < HOSTS {
                let id = HostId::random();
                if id.shard(N_SHARDS as u32).0 != shard {
                    continue;
                }
                let now = chrono::Utc::now();
                store
                    .create_host(&Host {
                        id,
                        org: org.id,
                        env: env.id,
                        name: format!("sim-{made}"),
                        labels: Default::default(),
                        created_at: now,
                        enrolled_at: now,
                        shard,
                        version: 0,
                    })
                    .await
                    .unwrap();
                store
                    .put_runtime(&HostRuntime {
                        host: id,
                        epoch: Epoch(0),
                        online: true,
                        last_seen: Some(now),
                        facts: None,
                        desired_digest: None,
                        drift: Vec::new(),
                        updated_at: now,
                    })
                    .await
                    .unwrap();
                made += 1;
            }
        });
        let asked = Instant::now();
        let (status, body) = nodes[0].api("POST", "/cluster/nodes/2/decommission", None);
        assert_eq!(status, 202, "{body}");
        let field = format!("shard={shard}");
        let resumed = nodes[0].wait_for("the new owner to resume the shard", || {
            log_time(
                &nodes[0].log(),
                "shard resumed",
                &[&field, &format!("actors={HOSTS}")],
            )
        });
        let stopped = log_time(&nodes[1].log(), "no longer owned", &[&field])
            .expect("the old owner logged the release");
        let ms = resumed.saturating_sub(stopped) as f64 / 1000.0;
        eprintln!(
            "run {run}: shard {shard} with {HOSTS} hosts: old owner stopped → new owner resumed in {ms:.0} ms ({} ms after the API call)",
            asked.elapsed().as_millis()
        );
        samples.push(ms as u128);
    }
    let (median, max) = median_max(samples);
    eprintln!(
        "FIGURE planned handoff of a {HOSTS}-host shard, 5 runs: median {median} ms, max {max} ms"
    );
}
