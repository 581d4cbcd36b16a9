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
    assert_eq!(SCHEMA_VERSION, 1);
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
    assert!(msg.contains("schema version 2 is newer"), "{msg}");
    assert!(msg.contains("store.redb"), "names the file: {msg}");

    // Refusing wrote nothing: put the version back and everything is there.
    set_schema_version(&path, SCHEMA_VERSION);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(host));
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
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _store = EmbeddedStore::open(&path).unwrap();
    let msg = backend_error(EmbeddedStore::open(&path));
    assert!(msg.contains("already open"), "{msg}");
}
