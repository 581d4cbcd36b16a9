//! The PostgreSQL backend against the real server (`COMODIT_TEST_PG_URL`, see
//! `deploy/common.sh`'s `ensure_postgres`): the conformance suite on a fresh database per check,
//! plus what only a shared, migrated database has: migrations that run once, a newer schema that is
//! refused, and nodes racing fenced writes on the same host.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, SubsecRound, Utc};
use comodit_protocol::{CommandId, Epoch, HostId};
use comodit_store::postgres::{PgStore, SCHEMA_VERSION};
use comodit_store::*;
use tokio::sync::Barrier;

/// Connections per store in the tests: enough for the suite's concurrent checks.
const POOL: usize = 8;

/// Runtime writes and change appends each racing writer tries.
const WRITES: usize = 20;

async fn fixture() -> conformance::Fixture {
    let (url, db) = tokio::task::spawn_blocking(comodit_testkit::fresh_pg_database)
        .await
        .expect("create database");
    let store = PgStore::connect(&url, POOL).await.expect("connect");
    conformance::Fixture::new(store, db)
}

comodit_store::conformance_tests!(fixture);

/// A plain client on `url`, to look at or tamper with the schema behind the store's back.
async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

async fn applied_versions(url: &str) -> Vec<i64> {
    raw_client(url)
        .await
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// An organization, an environment and one host in it.
async fn one_host(store: &PgStore) -> Host {
    let now = Utc::now().trunc_subsecs(3);
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
    store
        .create_host(&Host {
            id,
            org: org.id,
            env: env.id,
            name: "web-1".into(),
            labels: BTreeMap::new(),
            created_at: now,
            enrolled_at: now,
            shard: id.shard(16).0,
            version: 0,
        })
        .await
        .unwrap()
}

fn runtime(host: HostId, epoch: u64) -> HostRuntime {
    HostRuntime {
        host,
        epoch: Epoch(epoch),
        online: true,
        last_seen: None,
        facts: None,
        desired_digest: Some(format!("written at epoch {epoch}")),
        drift: vec![],
        updated_at: Utc::now().trunc_subsecs(3),
    }
}

fn change(host: HostId, epoch: u64) -> Change {
    let now = Utc::now().trunc_subsecs(3);
    Change {
        id: ChangeId::random(),
        host,
        seq: 0,
        request: serde_json::json!({"op": "facts", "nul": "a\u{0}b"}),
        status: ChangeStatus::Queued,
        command_id: CommandId::random(),
        epoch: Epoch(epoch),
        requested_by: "test".into(),
        created_at: now,
        updated_at: now,
        expires_at: now + Duration::hours(1),
        reply: None,
        job: None,
    }
}

/// Every migration this build has, each applied once.
fn all_versions() -> Vec<i64> {
    (1..=SCHEMA_VERSION as i64).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_at_an_older_version_is_migrated_with_its_data() {
    let (url, _db) = comodit_testkit::fresh_pg_database();
    let first = PgStore::connect(&url, 2).await.unwrap();
    let host = one_host(&first).await;
    let job = conformance::job_record(host.org, chrono::Utc::now());
    first.create_job(&job).await.unwrap();
    drop(first);
    // Back to version 1, as a database made before the idempotency keys and the jobs' listing.
    raw_client(&url)
        .await
        .batch_execute(
            "DROP TABLE idempotency_keys; DROP INDEX jobs_by_org;
             ALTER TABLE jobs DROP COLUMN created_us;
             DELETE FROM schema_migrations WHERE version IN (2, 3)",
        )
        .await
        .unwrap();
    assert_eq!(applied_versions(&url).await, vec![1]);
    let store = PgStore::connect(&url, 2).await.unwrap();
    assert_eq!(applied_versions(&url).await, all_versions());
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(host.clone()));
    // The job made before the column is listed, at its time.
    assert_eq!(
        conformance::listed_job_ids(&store, host.org).await,
        vec![job.id]
    );
    conformance::idempotency_keys(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_and_data_survives_a_reconnect() {
    let (url, _db) = comodit_testkit::fresh_pg_database();
    let first = PgStore::connect(&url, 2).await.unwrap();
    let host = one_host(&first).await;
    drop(first);
    assert_eq!(applied_versions(&url).await, all_versions());

    // Connecting again (another node, a restart) applies nothing and sees the data.
    let (a, b) = tokio::join!(PgStore::connect(&url, 2), PgStore::connect(&url, 2));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(applied_versions(&url).await, all_versions());
    assert_eq!(a.get_host(host.id).await.unwrap(), Some(host.clone()));
    assert_eq!(b.get_host(host.id).await.unwrap(), Some(host));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_on_an_empty_database_are_applied_by_one_of_two_nodes() {
    let (url, _db) = comodit_testkit::fresh_pg_database();
    // Both start at once on an empty database: the advisory lock lets one migrate, the other
    // then finds the schema in place.
    let (a, b) = tokio::join!(PgStore::connect(&url, 2), PgStore::connect(&url, 2));
    a.unwrap();
    b.unwrap();
    assert_eq!(applied_versions(&url).await, all_versions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_version_is_refused() {
    let (url, _db) = comodit_testkit::fresh_pg_database();
    PgStore::connect(&url, 1).await.unwrap();
    let newer = SCHEMA_VERSION as i64 + 1;
    raw_client(&url)
        .await
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from the future')",
            &[&newer],
        )
        .await
        .unwrap();
    match PgStore::connect(&url, 1).await {
        Err(StoreError::Backend(msg)) => assert!(
            msg.contains(&format!("schema version {newer} is newer")),
            "{msg}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing was applied or removed on the way.
    let mut expected = all_versions();
    expected.push(newer);
    assert_eq!(applied_versions(&url).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_backend_error() {
    // Port 1 on loopback: nothing listens there.
    match PgStore::connect("postgres://comodit:comodit@127.0.0.1:1/postgres", 1).await {
        Err(StoreError::Backend(msg)) => {
            assert!(msg.contains("cannot connect"), "{msg}");
            assert!(
                !msg.contains("comodit:comodit"),
                "the password leaked: {msg}"
            );
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert!(matches!(
        PgStore::connect("not a url at all", 1).await,
        Err(StoreError::Invalid(_))
    ));
}

/// Two stores on one database (two nodes) and eight writers with epochs 1..=8, started together,
/// each writing the runtime record and appending a change until it is fenced off. Whatever the
/// interleaving, the highest epoch ends up owning the host, every lower one is refused from then on,
/// and the change log shows that no write ever got in after a higher epoch's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_racing_fenced_writes_end_with_the_highest_epoch() {
    let (url, _db) = comodit_testkit::fresh_pg_database();
    let nodes = [
        PgStore::connect(&url, 4).await.unwrap(),
        PgStore::connect(&url, 4).await.unwrap(),
    ];
    let host = one_host(&nodes[0]).await.id;
    let start = Arc::new(Barrier::new(8));
    let mut tasks = Vec::new();
    for epoch in 1..=8u64 {
        let store = nodes[epoch as usize % 2].clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut refusals = Vec::new();
            for _ in 0..WRITES {
                let outcome = match store.put_runtime(&runtime(host, epoch)).await {
                    Ok(()) => store.append_change(&change(host, epoch)).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => {}
                    Err(StoreError::StaleEpoch { given, stored }) => {
                        refusals.push((given, stored));
                        break;
                    }
                    Err(e) => panic!("epoch {epoch}: {e}"),
                }
            }
            (epoch, refusals)
        }));
    }
    for task in tasks {
        let (epoch, refusals) = task.await.unwrap();
        for (given, stored) in refusals {
            assert_eq!(given, Epoch(epoch));
            assert!(stored > given, "refused {given:?} for {stored:?}");
        }
    }

    let final_rt = nodes[1].get_runtime(host).await.unwrap().unwrap();
    assert_eq!(final_rt.epoch, Epoch(8));
    // Each epoch ran to its end unless fenced off; the highest never is.
    let log = nodes[0]
        .list_changes(host, &Page::first(Page::MAX_LIMIT))
        .await
        .unwrap();
    assert!(log.next.is_none());
    let mut epochs: Vec<u64> = log.items.iter().map(|c| c.epoch.0).collect();
    epochs.reverse(); // oldest first
    assert_eq!(
        epochs.iter().filter(|e| **e == 8).count(),
        WRITES,
        "epoch 8 wrote all its changes"
    );
    for pair in epochs.windows(2) {
        assert!(
            pair[0] <= pair[1],
            "a change at epoch {} was appended after one at epoch {}",
            pair[1],
            pair[0]
        );
    }
    let seqs: Vec<u64> = log.items.iter().rev().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        log.items[0].request,
        serde_json::json!({"op": "facts", "nul": "a\u{0}b"}),
        "a NUL character survives the round trip"
    );

    // From now on every lower epoch is refused, through either node.
    for epoch in 1..8 {
        let node = &nodes[epoch as usize % 2];
        assert_eq!(
            node.put_runtime(&runtime(host, epoch)).await,
            Err(StoreError::StaleEpoch {
                given: Epoch(epoch),
                stored: Epoch(8)
            })
        );
        assert!(matches!(
            node.append_change(&change(host, epoch)).await,
            Err(StoreError::StaleEpoch { .. })
        ));
    }
    assert_eq!(
        nodes[0].get_runtime(host).await.unwrap(),
        Some(final_rt),
        "refused writes changed nothing"
    );
}
