//! Memory per idle host actor, measured by hand (DESIGN §8 aims at ≤ 2 KiB with 10,000 hosts):
//!
//! ```text
//! cargo test --release -p comodit-actors --test memory -- --ignored --nocapture
//! COMODIT_BENCH_HOSTS=50000 cargo test --release -p comodit-actors --test memory -- --ignored --nocapture
//! ```
//!
//! It fills a store with hosts whose runtime says online (so the node starts an actor for each at
//! start-up, as after a restart), reads every host once (warming the store's cache, the blocking
//! pool and the allocator's arenas, which are not the actors' memory), starts the orchestrator,
//! waits for every actor to be loaded, and reports: the heap the actors hold (bytes allocated
//! while they live and freed when they stop, counted by this binary's allocator) and the growth
//! of the process's RSS over the start.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comodit_protocol::{Epoch, HostId};
use comodit_store::{Host, HostRuntime};

/// Counts the bytes in use on the heap.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = IN_USE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        IN_USE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn heap() -> isize {
    IN_USE.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by hand, see the module doc"]
async fn memory_per_idle_host_actor() {
    init_logs();
    let n: usize = std::env::var("COMODIT_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut node = Node::new(|_| {}).await;
    node.stop_orchestrator().await;

    let t = Instant::now();
    let store = node.store().clone();
    let (org, env, n_shards) = (node.org, node.env, node.n_shards);
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut hosts: Vec<HostId> = Vec::new();
            for _ in 0..(n / 8 + usize::from(chunk < n % 8)) {
                let host = HostId::random();
                let now = Utc::now();
                store
                    .create_host(&Host {
                        id: host,
                        org,
                        env,
                        name: "bench".into(),
                        labels: BTreeMap::new(),
                        created_at: now,
                        enrolled_at: now,
                        shard: host.shard(n_shards).0,
                        version: 1,
                    })
                    .await
                    .unwrap();
                store
                    .put_runtime(&HostRuntime {
                        host,
                        epoch: Epoch(1),
                        online: true,
                        last_seen: Some(now),
                        facts: None,
                        desired_digest: None,
                        drift: Vec::new(),
                        updated_at: now,
                    })
                    .await
                    .unwrap();
                hosts.push(host);
            }
            hosts
        }));
    }
    let mut hosts = Vec::new();
    for t in tasks {
        hosts.extend(t.await.unwrap());
    }
    println!(
        "filled the store with {n} online hosts in {:?}",
        t.elapsed()
    );

    // Warm up what is not the actors' own memory: the store's page cache, the blocking pool's
    // threads and the allocator's arenas, by reading what each actor reads when it loads.
    for chunk in hosts.chunks(256) {
        let reads = chunk.iter().map(|&h| {
            let store = store.clone();
            tokio::spawn(async move {
                store.get_runtime(h).await.unwrap();
                store.pending_changes(h).await.unwrap();
            })
        });
        for r in futures_util::future::join_all(reads).await {
            r.unwrap();
        }
    }
    drop(store);
    drop(hosts);

    let (rss0, heap0) = (rss_kib(), heap());
    PEAK.store(heap0, Ordering::Relaxed);
    let t = Instant::now();
    node.start().await;
    let orch = node.orch().clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    while orch.host_actor_count() < n {
        assert!(Instant::now() < deadline, "actors not started in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Loading is done when the heap stops moving (bounded poll of a benchmark).
    let mut last = heap();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = heap();
        if (now - last).abs() < 16 * 1024 || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let (rss1, heap1) = (rss_kib(), heap());
    let peak = PEAK.load(Ordering::Relaxed);
    println!(
        "{} actors started and loaded in {:?}",
        orch.host_actor_count(),
        t.elapsed()
    );
    node.stop_orchestrator().await;
    let heap2 = heap();
    let per_actor_heap = (heap1 - heap2) as f64 / n as f64;
    let per_actor_rss = (rss1 - rss0) as f64 * 1024.0 / n as f64;
    println!(
        "heap held by the running actors (freed at stop): {per_actor_heap:.0} B per host actor"
    );
    println!(
        "RSS growth from start to all loaded: {:.1} MiB, {per_actor_rss:.0} B per host actor \
         (includes the store's cache and allocator slack)",
        (rss1 - rss0) as f64 / 1024.0
    );
    println!(
        "heap growth from start to all loaded: {:.0} B per host actor",
        (heap1 - heap0) as f64 / n as f64
    );
    println!(
        "heap peak while starting: {:.1} MiB above the start ({:.0} B per host actor)",
        (peak - heap0) as f64 / 1048576.0,
        (peak - heap0) as f64 / n as f64
    );
    node.finish().await;
}
