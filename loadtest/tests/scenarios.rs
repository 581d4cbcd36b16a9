//! Small versions of every scenario (200 simulated hosts, seconds long) against the real broker
//! and real `comodit-node` processes: each must end by itself, write its report, and count every
//! host. Speed is never asserted here; the figures are for docs/performance.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const HOSTS: usize = 200;
/// A small run takes seconds; this bounds a stuck one.
const DEADLINE: Duration = Duration::from_secs(150);

/// `target/<profile>`, where cargo put the workspace's binaries.
fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_comodit-loadtest"))
        .parent()
        .expect("target dir")
        .to_owned()
}

/// Runs `comodit-loadtest <args> --hosts 200 --out <tmp>` and returns its report.
fn run(args: &[&str]) -> (Value, tempfile::TempDir) {
    let node = bin_dir().join("comodit-node");
    assert!(
        node.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        node.display()
    );
    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("loadtest.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_comodit-loadtest"))
        .args(args)
        .args(["--hosts", &HOSTS.to_string(), "--hosts-per-conn", "64"])
        .arg("--out")
        .arg(out.path())
        .arg("--node-bin")
        .arg(&node)
        .args(["--n-shards", "4", "--deadline-s", "120"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("comodit-loadtest starts");
    let until = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not end within {DEADLINE:?}:\n{}", read(&log));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "{args:?} failed ({status}):\n{}",
        read(&log)
    );
    let report: Value = serde_json::from_slice(
        &std::fs::read(out.path().join("report.json")).expect("report.json written"),
    )
    .expect("report.json is JSON");
    check_structure(&report, out.path());
    (report, out)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// What every report has: its scenario, the machine, figures, counts, Markdown and the plots it
/// names.
fn check_structure(r: &Value, dir: &Path) {
    assert!(r["scenario"].is_string(), "{r}");
    assert_eq!(
        r["machine"]["cpus"].as_u64().map(|n| n > 0),
        Some(true),
        "{r}"
    );
    assert!(r["machine"]["rabbitmq"].is_string(), "{}", r["machine"]);
    assert!(!r["figures"].as_array().unwrap().is_empty(), "no figures");
    // One answer per host and wave.
    let waves = r["params"]["common"]["waves"]
        .as_u64()
        .expect("waves in the parameters");
    assert_eq!(
        r["counts"]["expected"],
        HOSTS as u64 * waves,
        "{}",
        r["counts"]
    );
    assert!(!r["samples"].as_array().unwrap().is_empty(), "no samples");
    let md = read(&dir.join("report.md"));
    assert!(md.contains("## Figures"), "{md}");
    for p in r["plots"].as_array().unwrap() {
        let file = p["file"].as_str().unwrap();
        let svg = read(&dir.join(file));
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{file}");
        assert!(md.contains(file), "report.md does not show {file}");
    }
    assert!(
        !md.contains("FAILED"),
        "the report says the run failed:\n{md}"
    );
}

fn figure<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("no figure {name:?} in {}", r["figures"]))
}

/// The entry of the report's `list` whose `key` is `name`.
fn named<'a>(r: &'a Value, list: &str, key: &str, name: &str) -> &'a Value {
    r[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[key] == name)
        .unwrap_or_else(|| panic!("no {key} {name:?} in {}", r[list]))
}

fn phase<'a>(r: &'a Value, name: &str) -> &'a Value {
    named(r, "phases", "phase", name)
}

fn wave<'a>(r: &'a Value, name: &str) -> &'a Value {
    named(r, "waves", "name", name)
}

#[test]
fn bare_counts_every_host_in_unicast_and_broadcast() {
    // Heartbeats every second: the bare fleet beats like the fleet scenarios' own.
    let (r, _dir) = run(&["bare", "--heartbeat-s", "1"]);
    assert_eq!(r["counts"]["counted"], HOSTS);
    for name in ["bare_unicast", "bare_broadcast"] {
        let w = wave(&r, name);
        assert_eq!(w["answered"], HOSTS, "{w}");
        assert_eq!(w["latency_ms"]["count"], HOSTS, "{w}");
        assert!(
            w["latency_ms"]["p99"].as_f64().unwrap() <= w["latency_ms"]["max"].as_f64().unwrap()
        );
    }
    assert!(figure(&r, "broadcast: time").get("ratio").is_some());
    let bare = phase(&r, "bare");
    assert_eq!(bare["heartbeat_s"], 1, "{bare}");
    assert!(bare["heartbeats"].as_u64().unwrap() > 0, "{bare}");
}

#[test]
fn enroll_counts_every_host_at_the_node() {
    let (r, _dir) = run(&["enroll", "--enroll-rate", "400"]);
    assert_eq!(r["counts"]["counted"], HOSTS, "{}", r["counts"]);
    assert_eq!(
        r["counts"]["node_enroll_total"], HOSTS as f64,
        "{}",
        r["counts"]
    );
    let f = figure(&r, "enrollment rate");
    assert!(f["value"].as_f64().unwrap() > 0.0);
    assert!(
        f["bare"].as_f64().is_some(),
        "no bare figure beside it: {f}"
    );
    // Paced at 400/s, 200 hosts cannot take less than half a second.
    let enroll = phase(&r, "enroll");
    assert!(enroll["elapsed_s"].as_f64().unwrap() >= 0.49, "{enroll}");
}

#[test]
fn apply_answers_every_host_through_the_api_and_counts_injected_failures() {
    let (r, _dir) = run(&["apply", "--fail-fraction", "0.1"]);
    let c = &r["counts"];
    assert_eq!(c["counted"], HOSTS, "{c}");
    assert_eq!(c["unanswered"], 0, "{c}");
    assert_eq!(c["hosts_that_replied"], HOSTS, "{c}");
    let failed = c["failed"].as_u64().unwrap();
    // 10 % of 200 fail on purpose; that they come back as failures shows the path is counted.
    assert!(failed > 0 && failed < 100, "{c}");
    assert_eq!(
        c["answered_ok"].as_u64().unwrap() + failed,
        HOSTS as u64,
        "{c}"
    );
    let f = figure(&r, "time until the last host answered");
    assert!(f["ratio"].as_f64().is_some(), "{f}");
    assert_eq!(wave(&r, "api_apply")["answered"], HOSTS);
    assert_eq!(wave(&r, "bare_unicast")["answered"], HOSTS);
}

#[test]
fn run_answers_every_host_through_the_api_in_every_wave() {
    // Also the node on a CPU of its own (`taskset -c`), as docs/performance.md does, and two
    // waves on the same hosts.
    let (r, _dir) = run(&[
        "run",
        "--slow-fraction",
        "0.05",
        "--slow-ms",
        "200",
        "--node-cpus",
        "0",
        "--waves",
        "2",
    ]);
    let notes = r["notes"].to_string();
    assert!(notes.contains("node 1 ran on CPUs 0\""), "{notes}");
    assert!(notes.contains("2 API waves"), "{notes}");
    let c = &r["counts"];
    assert_eq!(c["expected"], 2 * HOSTS, "{c}");
    assert_eq!(c["counted"], 2 * HOSTS, "{c}");
    assert_eq!(c["answered_ok"], 2 * HOSTS, "{c}");
    assert_eq!(c["hosts_that_replied"], HOSTS, "{c}");
    assert_eq!(c["duplicated_commands"], 0, "{c}");
    let mut max = 0.0f64;
    for name in ["api_run 1/2", "api_run 2/2"] {
        let w = wave(&r, name);
        assert_eq!(w["answered"], HOSTS, "{w}");
        max = max.max(w["latency_ms"]["max"].as_f64().unwrap());
        // The CPU each process spent on the wave, per answer.
        let cpu = &w["cpu_ms_per_answer"];
        assert!(cpu["node_ms"].as_f64().unwrap() > 0.0, "{w}");
        assert!(cpu["loadtest_ms"].is_number(), "{w}");
    }
    for name in ["bare_unicast 1/2", "bare_unicast 2/2"] {
        let w = wave(&r, name);
        assert_eq!(w["answered"], HOSTS);
        // No node in a bare wave.
        assert!(w["cpu_ms_per_answer"]["node_ms"].is_null(), "{w}");
        assert!(w["cpu_ms_per_answer"]["loadtest_ms"].is_number(), "{w}");
    }
    // A 200 ms slow answer is in the tail.
    assert!(max >= 200.0, "max {max} ms");
    let cpu = figure(&r, "node CPU per answer")["value"].as_f64().unwrap();
    assert!(cpu > 0.0, "node CPU per answer {cpu} ms");
}

#[test]
fn a_job_reaches_every_host_once_and_counts_injected_failures() {
    // One request for the whole fleet, keyed, in two waves (two jobs on the same hosts).
    // Paced: at most 64 of the 200 hosts pending at once, the rest released as hosts answer.
    let (r, _dir) = run(&[
        "job",
        "--fail-fraction",
        "0.1",
        "--waves",
        "2",
        "--idempotency-keys",
        "--max-concurrency",
        "64",
    ]);
    assert_eq!(r["params"]["max_concurrency"], 64, "{}", r["params"]);
    let c = &r["counts"];
    assert_eq!(c["expected"], 2 * HOSTS, "{c}");
    assert_eq!(c["counted"], 2 * HOSTS, "{c}");
    assert_eq!(c["unanswered"], 0, "{c}");
    assert_eq!(c["hosts_that_replied"], HOSTS, "{c}");
    // One command per host and job, never a second.
    assert_eq!(c["duplicated_commands"], 0, "{c}");
    let failed = c["failed"].as_u64().unwrap();
    assert!(failed > 0 && failed < 2 * HOSTS as u64 / 2, "{c}");
    for name in ["api_job 1/2", "api_job 2/2"] {
        let w = wave(&r, name);
        assert_eq!(w["answered"], HOSTS, "{w}");
        assert!(
            w["cpu_ms_per_answer"]["node_ms"].as_f64().unwrap() > 0.0,
            "{w}"
        );
    }
    let f = figure(&r, "time until the last host answered");
    assert!(f["ratio"].as_f64().is_some(), "{f}");
}

#[test]
fn a_job_with_its_bare_ceiling_interleaved_on_the_same_fleet() {
    // The bare waves on the node's own fleet, the node stopped for each and started again.
    let (r, _dir) = run(&["job", "--waves", "2", "--interleave-bare"]);
    let c = &r["counts"];
    assert_eq!(c["expected"], 2 * HOSTS, "{c}");
    assert_eq!(c["counted"], 2 * HOSTS, "{c}");
    assert_eq!(c["answered_ok"], 2 * HOSTS, "{c}");
    assert_eq!(c["hosts_that_replied"], HOSTS, "{c}");
    // Two job commands, two bare unicasts and one broadcast per host, none twice.
    assert_eq!(c["duplicated_commands"], 0, "{c}");
    for name in ["api_job 1/2", "api_job 2/2"] {
        let w = wave(&r, name);
        assert_eq!(w["answered"], HOSTS, "{w}");
        // The restarted node's CPU is measured too.
        assert!(
            w["cpu_ms_per_answer"]["node_ms"].as_f64().unwrap() > 0.0,
            "{w}"
        );
        // Underneath: one command per host reached the fleet (the node's restart before the
        // wave sent none), the node sent each once, and the broker was read.
        let u = &w["underneath"];
        assert_eq!(u["fleet"]["commands"], HOSTS, "{u}");
        assert_eq!(u["fleet"]["duplicates"], 0, "{u}");
        assert_eq!(u["fleet"]["connects"], 0, "{u}");
        assert_eq!(u["node"]["dispatched_first"], HOSTS, "{u}");
        assert_eq!(u["node"]["dispatched_resend"], 0, "{u}");
        assert_eq!(u["node"]["replies_ok"], HOSTS, "{u}");
        assert!(
            u["broker"]["memory_mib"]["total_rss"].as_f64().unwrap() > 0.0,
            "{u}"
        );
    }
    for name in ["bare_unicast 1/2", "bare_unicast 2/2", "bare_broadcast"] {
        let w = wave(&r, name);
        assert_eq!(w["answered"], HOSTS, "{w}");
        assert!(w["cpu_ms_per_answer"]["node_ms"].is_null(), "{w}");
        let u = &w["underneath"];
        assert_eq!(u["fleet"]["commands"], HOSTS, "{u}");
        assert_eq!(u["fleet"]["replies"], HOSTS, "{u}");
        assert!(u.get("node").is_none(), "{u}");
    }
    let bare = phase(&r, "bare");
    assert_eq!(bare["interleaved"], true, "{bare}");
    let pairs = bare["pair_ratios"].as_array().expect("pair ratios");
    assert_eq!(pairs.len(), 2, "{bare}");
    assert!(pairs.iter().all(|p| p.as_f64().unwrap() > 0.0), "{bare}");
    let notes = r["notes"].to_string();
    assert!(notes.contains("bare ceiling interleaved"), "{notes}");
    let f = figure(&r, "time until the last host answered");
    assert!(f["ratio"].as_f64().is_some(), "{f}");
}

#[test]
fn steady_measures_both_liveness_modes_over_the_whole_fleet() {
    let (r, _dir) = run(&[
        "steady",
        "--duration-s",
        "3",
        "--steps",
        "2",
        "--heartbeat-s",
        "1",
    ]);
    let c = &r["counts"];
    assert_eq!(c["counted"], HOSTS, "{c}");
    assert!(
        c["node_host_actors"].as_f64().unwrap() >= HOSTS as f64,
        "{c}"
    );
    let routed = phase(&r, "routed heartbeats");
    let quiet = phase(&r, "connection-level liveness only");
    // 200 hosts beating every second (± 20 %): far more than nothing.
    assert!(
        routed["heartbeats_per_s"].as_f64().unwrap() > 50.0,
        "{routed}"
    );
    // Only the few already in flight when the period was set to 0.
    assert!(
        quiet["heartbeats_per_s"].as_f64().unwrap() < 10.0,
        "{quiet}"
    );
    figure(&r, "node memory per idle host");
    let plots: Vec<&str> = r["plots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["file"].as_str())
        .collect();
    assert!(plots.contains(&"memory-over-fleet.svg"), "{plots:?}");
}

#[test]
fn failover_counts_every_host_after_a_member_is_killed() {
    let (pg, _db) = comodit_testkit::fresh_pg_database();
    let (r, _dir) = run(&[
        "failover",
        "--postgres-url",
        &pg,
        "--kill-after",
        "0.3",
        "--idempotency-keys",
    ]);
    let c = &r["counts"];
    assert_eq!(c["counted"], HOSTS, "{c}");
    assert_eq!(c["unanswered"], 0, "{c}");
    assert!(c["duplicated"].is_u64(), "{c}");
    // Requests sent again after the kill carried their keys: each joined its first change.
    assert_eq!(c["idempotency_keys_sent"], true, "{c}");
    assert_eq!(c["second_command_same_host"], 0, "{c}");
    let f = figure(&r, "from the kill until the last host answered");
    assert!(f["value"].as_f64().unwrap() >= 0.0, "{f}");
}

#[test]
fn cleanup_deletes_the_named_runs_queues_and_no_other() {
    // Two "runs" that left a queue each: only the named one goes.
    let prefixes: Vec<String> = (0..2)
        .map(|_| format!("lt{:08x}", rand::random::<u32>()))
        .collect();
    let queues: Vec<String> = prefixes
        .iter()
        .map(|p| format!("{p}.agent.{}", uuid::Uuid::new_v4()))
        .collect();
    for q in &queues {
        comodit_testkit::declare_queue(q);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_comodit-loadtest"))
        .args(["cleanup", "--prefix", &prefixes[0]])
        .output()
        .expect("comodit-loadtest cleanup runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cleanup {}: ", prefixes[0])),
        "{stderr}"
    );
    assert!(
        comodit_testkit::queue_info(&queues[0]).is_none(),
        "{stderr}"
    );
    assert!(
        comodit_testkit::queue_info(&queues[1]).is_some(),
        "{stderr}"
    );
    // Not a run's prefix: refused, nothing deleted.
    let out = Command::new(env!("CARGO_BIN_EXE_comodit-loadtest"))
        .args(["cleanup", "--prefix", "comodit"])
        .output()
        .expect("comodit-loadtest cleanup runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a load-test run's prefix"));
    assert!(comodit_testkit::queue_info(&queues[1]).is_some());
    comodit_testkit::delete_queue(&queues[1]);
}
