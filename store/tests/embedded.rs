//! The embedded backend: the conformance suite on a fresh temporary file per check, plus what only
//! a file-backed store has (restarts, schema versions, files that are not a store).

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{Duration, Utc};
use comodit_protocol::{CommandId, Epoch, HostId};
use comodit_store::embedded::{EmbeddedStore, SCHEMA_VERSION};
use comodit_store::*;
use redb::{ReadableDatabase, TableDefinition};

async fn fixture() -> conformance::Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open store");
    conformance::Fixture::new(store, dir)
}

comodit_store::conformance_tests!(fixture);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn backend_error(result: Result<EmbeddedStore>) -> String {
    match result {
        Err(StoreError::Backend(msg)) => msg,
        Err(other) => panic!("expected a backend error, got {other:?}"),
        Ok(_) => panic!("the store opened"),
    }
}

/// Writes one of each record kind and returns what a reopened store must give back.
async fn populate(store: &EmbeddedStore) -> (Host, Change, EnrollmentToken, u64) {
    let now = Utc::now();
    let org = Organization {
        id: OrgId::random(),
        name: "acme".into(),
        created_at: now,
        version: 0,
    };
    store.create_org(&org).await.unwrap();
    let env = Environment {
        id: EnvId::random(),
        org: org.id,
        name: "prod".into(),
        created_at: now,
        version: 0,
    };
    store.create_env(&env).await.unwrap();
    let id = HostId::random();
    let host = store
        .create_host(&Host {
            id,
            org: org.id,
            env: env.id,
            name: "web-1".into(),
            labels: BTreeMap::from([("role".into(), "web".into())]),
            created_at: now,
            enrolled_at: now,
            shard: id.shard(256).0,
            version: 0,
        })
        .await
        .unwrap();
    store
        .put_runtime(&HostRuntime {
            host: id,
            epoch: Epoch(7),
            online: true,
            last_seen: Some(now),
            facts: None,
            desired_digest: Some("abc".into()),
            drift: vec![],
            updated_at: now,
        })
        .await
        .unwrap();
    let change = store
        .append_change(&Change {
            id: ChangeId::random(),
            host: id,
            seq: 0,
            request: serde_json::json!({"op": "facts"}),
            status: ChangeStatus::Queued,
            command_id: CommandId::random(),
            epoch: Epoch(7),
            requested_by: "tester".into(),
            created_at: now,
            updated_at: now,
            expires_at: now + Duration::hours(1),
            reply: None,
            job: None,
        })
        .await
        .unwrap();
    let token = EnrollmentToken {
        id: TokenId::random(),
        org: org.id,
        env: env.id,
        description: "rack 4".into(),
        secret_sha256: "ab".repeat(32),
        expires_at: now + Duration::hours(1),
        max_uses: Some(3),
        uses: 0,
        revoked: false,
        created_at: now,
        created_by: "tester".into(),
    };
    store.create_enrollment_token(&token).await.unwrap();
    let used = store
        .use_enrollment_token(&token.secret_sha256, now)
        .await
        .unwrap();
    let seq = store
        .append_audit(&AuditEntry {
            seq: 0,
            at: now,
            actor: "tester".into(),
            action: "enroll".into(),
            target: id.to_string(),
            outcome: "ok".into(),
        })
        .await
        .unwrap();
    (host, change, used, seq)
}

#[tokio::test]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let (host, change, token, audit_seq) = populate(&store).await;
    drop(store);

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(host.clone()));
    let rt = store.get_runtime(host.id).await.unwrap().unwrap();
    assert_eq!(rt.epoch, Epoch(7));
    assert_eq!(
        store.get_change(host.id, change.id).await.unwrap(),
        Some(change.clone())
    );
    assert_eq!(
        store.pending_changes(host.id).await.unwrap(),
        vec![change.clone()]
    );
    assert_eq!(
        store.hosts_with_pending_changes(host.shard).await.unwrap(),
        vec![host.id]
    );
    assert_eq!(
        store.get_enrollment_token(token.id).await.unwrap(),
        Some(token.clone())
    );
    assert_eq!(token.uses, 1);
    // The fence survives too: a stale writer is still refused after the restart.
    let stale = store
        .update_change(host.id, change.id, ChangeStatus::Applied, None, Epoch(6))
        .await;
    assert_eq!(
        stale,
        Err(StoreError::StaleEpoch {
            given: Epoch(6),
            stored: Epoch(7)
        })
    );
    // Sequences go on where they stopped.
    let next = store
        .append_change(&Change {
            id: ChangeId::random(),
            seq: 0,
            ..change.clone()
        })
        .await
        .unwrap();
    assert_eq!(next.seq, change.seq + 1);
    let page = store.list_audit(&Page::first(10)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].seq, audit_seq);
}

#[tokio::test]
async fn a_new_file_records_the_current_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    drop(EmbeddedStore::open(&path).unwrap());
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let version = meta.get("schema_version").unwrap().unwrap().value();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 2);
}

fn set_schema_version(path: &Path, version: u64) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("schema_version", version)
        .unwrap();
    txn.commit().unwrap();
}

#[tokio::test]
async fn a_newer_schema_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let (host, ..) = populate(&store).await;
    drop(store);
    set_schema_version(&path, SCHEMA_VERSION + 1);

    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("schema version 3 is newer"), "{msg}");
    assert!(msg.contains("store.redb"), "names the file: {msg}");

    // Refusing wrote nothing: put the version back and everything is there.
    set_schema_version(&path, SCHEMA_VERSION);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(host));
}

#[tokio::test]
async fn a_file_made_before_the_idempotency_tables_gets_them_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let (host, ..) = populate(&store).await;
    drop(store);
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        for name in ["idempotency", "idempotency_by_expiry"] {
            let def: TableDefinition<&[u8], &[u8]> = TableDefinition::new(name);
            assert!(txn.delete_table(def).unwrap(), "{name} existed");
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(host));
    conformance::idempotency_keys(&store).await;
}

#[tokio::test]
async fn a_version_1_file_gets_its_jobs_listed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let (host, ..) = populate(&store).await;
    let job = conformance::job_record(host.org, chrono::Utc::now());
    store.create_job(&job).await.unwrap();
    drop(store);
    // As a file written before the index: no `jobs_by_org`, schema version 1.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let def: TableDefinition<&[u8], &[u8]> = TableDefinition::new("jobs_by_org");
        assert!(txn.delete_table(def).unwrap());
        txn.commit().unwrap();
    }
    set_schema_version(&path, 1);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        conformance::listed_job_ids(&store, host.org).await,
        vec![job.id]
    );
    drop(store);
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    assert_eq!(meta.get("schema_version").unwrap().unwrap().value(), 2);
}

#[tokio::test]
async fn schema_version_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    drop(EmbeddedStore::open(&path).unwrap());
    set_schema_version(&path, 0);
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("not a valid comodit store"), "{msg}");
}

#[tokio::test]
async fn a_redb_file_of_another_program_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let other: TableDefinition<&str, &str> = TableDefinition::new("things");
        txn.open_table(other).unwrap().insert("a", "b").unwrap();
        txn.commit().unwrap();
    }
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("not a comodit store"), "{msg}");

    // Nor is one whose `meta` table has another shape.
    let path = dir.path().join("meta.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let meta: TableDefinition<&str, &str> = TableDefinition::new("meta");
        txn.open_table(meta).unwrap().insert("a", "b").unwrap();
        txn.commit().unwrap();
    }
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("not a comodit store"), "{msg}");
}

#[tokio::test]
async fn a_file_that_is_not_redb_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    std::fs::write(
        &path,
        b"this is not a database, just some text ".repeat(200),
    )
    .unwrap();
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("garbage.redb"), "{msg}");
    // And the file was not overwritten.
    assert!(std::fs::read(&path).unwrap().starts_with(b"this is not"));
}

#[tokio::test]
async fn a_damaged_file_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    populate(&store).await;
    drop(store);

    // Flip every byte past the header: the pages' checksums no longer match.
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8192, "the file has pages past its header");
    for b in &mut bytes[4096..] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    backend_error(EmbeddedStore::open(&path));

    // A file cut short (a copy that stopped halfway) is refused too.
    let path = dir.path().join("truncated.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    populate(&store).await;
    drop(store);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("truncated"), "{msg}");
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _store = EmbeddedStore::open(&path).unwrap();
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("already open"), "{msg}");
}

#[tokio::test]
async fn records_and_setting_counts_are_bounded() {
    use comodit_store::embedded::{MAX_RECORD_BYTES, MAX_SETTINGS_PER_SCOPE};
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    let (host, change, ..) = populate(&store).await;

    // One record past the limit is refused, and nothing of it is stored.
    let mut huge = change.clone();
    huge.id = ChangeId::random();
    huge.request = serde_json::json!({ "blob": "x".repeat(MAX_RECORD_BYTES) });
    let refused = store.append_change(&huge).await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    assert_eq!(store.get_change(host.id, huge.id).await.unwrap(), None);
    let mut near = change.clone();
    near.id = ChangeId::random();
    near.request = serde_json::json!({ "blob": "x".repeat(MAX_RECORD_BYTES - 4096) });
    store.append_change(&near).await.unwrap();

    let scope = SettingScope::Host { host: host.id };
    let setting = |key: String| Setting {
        scope: scope.clone(),
        key,
        value: serde_json::json!(1),
        secret: false,
        updated_at: Utc::now(),
    };
    for i in 0..MAX_SETTINGS_PER_SCOPE {
        store.put_setting(&setting(format!("k{i}"))).await.unwrap();
    }
    let refused = store.put_setting(&setting("one-more".into())).await;
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "{refused:?}"
    );
    // Replacing one at the limit is fine.
    store.put_setting(&setting("k0".into())).await.unwrap();
    let listed = store.list_settings(&scope).await.unwrap();
    assert_eq!(listed.len(), MAX_SETTINGS_PER_SCOPE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_commit_together_and_a_failing_one_takes_nothing_back() {
    // Many writers at once share commits (group commit); among them, creates of the same name:
    // exactly one of each pair wins, every other write lands, and a reopened file has them all.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let org = Organization {
                id: OrgId::random(),
                // Two writers per name.
                name: format!("org-{}", i / 2),
                created_at: Utc::now(),
                version: 0,
            };
            store.create_org(&org).await.map(|()| org.id)
        }));
    }
    let (mut won, mut conflicts) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(id) => won.push(id),
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((won.len(), conflicts), (200, 200));
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    for id in &won {
        assert!(
            store.get_org(*id).await.unwrap().is_some(),
            "org {id:?} lost"
        );
    }
    let all = store
        .list_orgs(&Page::first(Page::MAX_LIMIT))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 200);
}

/// Benchmark (ignored): durable writes per second with many writers at once, and the CPU each
/// write costs the process (all threads), also when writes arrive at a steady rate (as during an
/// API wave, where CPU is what the node shares with the broker).
/// `cargo test --release -p comodit-store --test embedded writes_per_second -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn writes_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    let write = |store: EmbeddedStore, name: String| async move {
        let org = Organization {
            id: OrgId::random(),
            name,
            created_at: Utc::now(),
            version: 0,
        };
        store.create_org(&org).await.unwrap();
    };
    for writers in [1usize, 16, 256] {
        let n = 20_000 / (if writers == 1 { 10 } else { 1 });
        let (started, cpu) = (std::time::Instant::now(), cpu_seconds());
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(writers));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let w = write(store.clone(), format!("bench-{writers}-{i}"));
            tasks.push(tokio::spawn(async move {
                w.await;
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let per = (cpu_seconds() - cpu) / n as f64 * 1e6;
        eprintln!("{writers} writers: {rate:.0} durable writes/s, {per:.0} µs of CPU per write");
    }
    for rate in [500u64, 2_000] {
        let n = rate as usize * 4;
        let cpu = cpu_seconds();
        let mut tick = tokio::time::interval(std::time::Duration::from_micros(1_000_000 / rate));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tick.tick().await;
            tasks.push(tokio::spawn(write(
                store.clone(),
                format!("paced-{rate}-{i}"),
            )));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let per = (cpu_seconds() - cpu) / n as f64 * 1e6;
        eprintln!("{rate} writes/s offered: {per:.0} µs of CPU per write");
    }
}

/// CPU time used by this process so far (user + system, all threads), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Benchmark (ignored): the CPU a job costs the store per host, as the node writes it: one
/// `append_change` per host at submit (many at once), then one `update_change` per answer
/// carrying the agent's `run` reply (256 at once, as the shard queues' prefetch allows).
/// `cargo test --release -p comodit-store --test embedded job_writes_cpu -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn job_writes_cpu() {
    use comodit_protocol::{Reply, ReplyData, RunResult, Status, V1};
    const HOSTS: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    let (host, _, _, _) = populate(&store).await;
    let hosts: Vec<Host> = (0..HOSTS)
        .map(|i| {
            let id = HostId::random();
            Host {
                id,
                name: format!("web-{i}"),
                shard: id.shard(256).0,
                version: 0,
                ..host.clone()
            }
        })
        .collect();
    for chunk in hosts.chunks(512) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|h| {
                let (store, h) = (store.clone(), h.clone());
                tokio::spawn(async move { store.create_host(&h).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    for round in 1..=3 {
        let job = conformance::job_record(host.org, Utc::now());
        store.create_job(&job).await.unwrap();
        let changes: Vec<Change> = hosts
            .iter()
            .map(|h| Change {
                id: ChangeId::random(),
                host: h.id,
                seq: 0,
                request: serde_json::json!({"op": "run", "argv": ["/bin/true"], "timeout_s": 30}),
                status: ChangeStatus::Queued,
                command_id: CommandId::random(),
                epoch: Epoch(1),
                requested_by: "token:bench".into(),
                created_at: Utc::now(),
                updated_at: Utc::now(),
                expires_at: Utc::now() + Duration::hours(1),
                reply: None,
                job: Some(job.id),
            })
            .collect();
        let (started, cpu) = (std::time::Instant::now(), cpu_seconds());
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(1024));
        let mut tasks = Vec::with_capacity(HOSTS);
        for c in &changes {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (store, c) = (store.clone(), c.clone());
            tasks.push(tokio::spawn(async move {
                store.append_change(&c).await.unwrap();
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let append = (cpu_seconds() - cpu) / HOSTS as f64 * 1e6;
        let append_s = started.elapsed().as_secs_f64();
        let (started, cpu) = (std::time::Instant::now(), cpu_seconds());
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = Vec::with_capacity(HOSTS);
        for c in &changes {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (store, c) = (store.clone(), c.clone());
            tasks.push(tokio::spawn(async move {
                let reply = Reply {
                    v: V1,
                    re: Some(c.command_id),
                    host: c.host,
                    status: Status::Ok,
                    reason: None,
                    results: vec![],
                    data: Some(ReplyData::Run(RunResult {
                        exit_code: Some(0),
                        signal: None,
                        timed_out: false,
                        stdout: "ok\n".into(),
                        stderr: String::new(),
                        truncated: false,
                        duration_ms: 0,
                    })),
                    started_at: Utc::now(),
                    finished_at: Utc::now(),
                };
                store
                    .update_change(c.host, c.id, ChangeStatus::Applied, Some(reply), Epoch(1))
                    .await
                    .unwrap();
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let update = (cpu_seconds() - cpu) / HOSTS as f64 * 1e6;
        let update_s = started.elapsed().as_secs_f64();
        let counts = store.job_counts(job.id).await.unwrap();
        assert_eq!(counts.applied, HOSTS as u64, "{counts:?}");
        eprintln!(
            "round {round}: append_change {append:.0} µs CPU each ({:.0}/s), update_change {update:.0} µs CPU each ({:.0}/s)",
            HOSTS as f64 / append_s,
            HOSTS as f64 / update_s
        );
    }
}
