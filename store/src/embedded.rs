//! The embedded backend: the whole store in one [redb] file, no server. The single-node default.
//!
//! # Layout
//!
//! Every table maps bytes to bytes. Keys are built from fixed-width big-endian parts (UUIDs, shard
//! numbers, sequence numbers, timestamps) and NUL-terminated names, so the byte order of keys is the
//! order listings need, and every operation is a point lookup or a range scan of one key prefix:
//!
//! | table                 | key                             | value                   |
//! |-----------------------|---------------------------------|-------------------------|
//! | `meta`                | `"schema_version"`, `"magic"`   | u64                     |
//! | `orgs`                | org                             | [`Organization`] (JSON) |
//! | `org_names`           | name                            | org                     |
//! | `envs`                | env                             | [`Environment`]         |
//! | `env_names`           | org, name                       | env                     |
//! | `hosts`               | host                            | [`Host`]                |
//! | `hosts_by_org`        | org, host                       | —                       |
//! | `hosts_by_env`        | env, host                       | —                       |
//! | `hosts_by_shard`      | shard, host                     | —                       |
//! | `hosts_by_label`      | key NUL value NUL, host         | —                       |
//! | `runtime`             | host                            | [`HostRuntime`]         |
//! | `fences`              | host                            | highest epoch written   |
//! | `changes`             | host, seq                       | [`Change`]              |
//! | `change_ids`          | host, change                    | seq                     |
//! | `pending`             | shard, host, seq                | —                       |
//! | `enroll_tokens`       | token                           | [`EnrollmentToken`]     |
//! | `enroll_by_secret`    | sha256                          | token                   |
//! | `enroll_by_org`       | org, created_at, token          | —                       |
//! | `api_tokens`          | token                           | [`ApiToken`]            |
//! | `api_by_secret`       | sha256                          | token                   |
//! | `audit`               | seq                             | [`AuditEntry`]          |
//! | `apps`                | org, name NUL version           | [`Application`]         |
//! | `settings`            | scope kind, scope id, key       | [`Setting`]             |
//! | `jobs`                | job                             | [`Job`]                 |
//! | `jobs_by_org`         | org, created_at, job            | —                       |
//! | `job_results`         | job, host                       | [`JobResult`]           |
//! | `job_results_by_host` | host, job                       | —                       |
//! | `job_counts`          | job                             | [`JobCounts`]           |
//! | `idempotency`         | token, key                      | [`IdempotencyRecord`]   |
//! | `idempotency_by_expiry` | expires_at, token, key        | —                       |
//!
//! Every host listing walks one index whose keys end with the host id (the most selective of the
//! filters given: environment, label, organization, shard, else all hosts), so every page is in
//! host-id order whichever index serves it; the other filters are checked per candidate, and the
//! walk goes on until the page is full. Cursors are the hex of the last key suffix returned: a
//! listing resumes strictly after it, so it stays stable while records are inserted.
//!
//! # Fencing
//!
//! `fences` keeps, per host, the highest epoch that any fenced write (runtime, change append,
//! change update) carried. A fenced write with a lower epoch is refused. Keeping it apart from the
//! runtime record means a new owner that only appended a change already shuts out the old owner.
//!
//! # Concurrency and durability
//!
//! redb is synchronous: each call runs on tokio's blocking pool, in one read transaction (a
//! consistent snapshot that never blocks writers) or one write transaction. redb runs one write
//! transaction at a time, so every mutating call is serializable, and checks such as "is this token
//! used up" and the use that follows cannot interleave. Commits use redb's default durability
//! (`Immediate`): when a mutating call returns `Ok`, its transaction is on disk (fsync'd) and survives
//! a crash or power loss.
//! Each commit syncs the file, which bounds the write rate: on the 2-core development VM (ext4 on
//! virtio) sequential `put_runtime` calls ran at 1,700–2,700 commits/s, `create_host` (five index
//! writes) at 500–2,000/s, and eight concurrent writers did no better (no group commit).
//!
//! # Schema versions
//!
//! `meta` holds a magic number and the schema version. [`EmbeddedStore::open`] initializes a new
//! file, migrates an older version step by step ([`MIGRATIONS`]), and refuses a version newer than
//! this build knows, or a redb file that is not a comodit store. The open also checks every page's
//! checksum, so a file damaged outside redb is refused with an error rather than trusted.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use comodit_protocol::{Epoch, HostId, Reply};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::*;
use crate::{Result, Store, StoreError};

/// The schema version this build writes: 1 + the number of migrations.
pub const SCHEMA_VERSION: u64 = 1 + MIGRATIONS.len() as u64;

/// One migration step: upgrades a file from the schema version at its index + 1 to the next one,
/// inside the transaction that then records the new version.
pub type Migration = fn(&WriteTransaction) -> Result<()>;

/// `MIGRATIONS[i]` upgrades schema version `i + 1` to `i + 2`. Version 1 is the first.
pub const MIGRATIONS: &[Migration] = &[index_jobs_by_org];

/// Version 1 → 2: jobs listed per organization, newest first (`jobs_by_org`, filled from `jobs`).
fn index_jobs_by_org(txn: &WriteTransaction) -> Result<()> {
    let jobs = txn.open_table(JOBS)?;
    let mut by_org = txn.open_table(JOBS_BY_ORG)?;
    for entry in jobs.iter()? {
        let (_, v) = entry?;
        let job: Job = dec("job", v.value())?;
        mark(&mut by_org, &job_org_key(&job))?;
    }
    Ok(())
}

fn job_org_key(job: &Job) -> Vec<u8> {
    cat(&[
        job.org.0.as_bytes(),
        &time_key(job.created_at),
        job.id.0.as_bytes(),
    ])
}

/// Marks a redb file as a comodit store ("comodit" in ASCII), so another program's redb file is
/// refused instead of being written into.
const MAGIC: u64 = 0x00_63_6f_6d_6f_64_69_74;

/// Most bytes of one stored record (JSON). Larger writes are refused as `Invalid`; the largest
/// legitimate record is a change carrying a full command (the protocol caps a message at 8 MiB).
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Most settings in one scope, so `list_settings` stays bounded.
pub const MAX_SETTINGS_PER_SCOPE: usize = 1024;

type Bytes = &'static [u8];
type Def = TableDefinition<'static, Bytes, Bytes>;

const META: TableDefinition<'static, &'static str, u64> = TableDefinition::new("meta");
const ORGS: Def = TableDefinition::new("orgs");
const ORG_NAMES: Def = TableDefinition::new("org_names");
const ENVS: Def = TableDefinition::new("envs");
const ENV_NAMES: Def = TableDefinition::new("env_names");
const HOSTS: Def = TableDefinition::new("hosts");
const HOSTS_BY_ORG: Def = TableDefinition::new("hosts_by_org");
const HOSTS_BY_ENV: Def = TableDefinition::new("hosts_by_env");
const HOSTS_BY_SHARD: Def = TableDefinition::new("hosts_by_shard");
const HOSTS_BY_LABEL: Def = TableDefinition::new("hosts_by_label");
const RUNTIME: Def = TableDefinition::new("runtime");
const FENCES: Def = TableDefinition::new("fences");
const CHANGES: Def = TableDefinition::new("changes");
const CHANGE_IDS: Def = TableDefinition::new("change_ids");
const PENDING: Def = TableDefinition::new("pending");
const ENROLL_TOKENS: Def = TableDefinition::new("enroll_tokens");
const ENROLL_BY_SECRET: Def = TableDefinition::new("enroll_by_secret");
const ENROLL_BY_ORG: Def = TableDefinition::new("enroll_by_org");
const API_TOKENS: Def = TableDefinition::new("api_tokens");
const API_BY_SECRET: Def = TableDefinition::new("api_by_secret");
const AUDIT: Def = TableDefinition::new("audit");
const APPS: Def = TableDefinition::new("apps");
const SETTINGS: Def = TableDefinition::new("settings");
const JOBS: Def = TableDefinition::new("jobs");
const JOBS_BY_ORG: Def = TableDefinition::new("jobs_by_org");
const JOB_RESULTS: Def = TableDefinition::new("job_results");
const JOB_RESULTS_BY_HOST: Def = TableDefinition::new("job_results_by_host");
const JOB_COUNTS: Def = TableDefinition::new("job_counts");
const IDEMPOTENCY: Def = TableDefinition::new("idempotency");
const IDEMPOTENCY_BY_EXPIRY: Def = TableDefinition::new("idempotency_by_expiry");

const ALL_TABLES: &[Def] = &[
    ORGS,
    ORG_NAMES,
    ENVS,
    ENV_NAMES,
    HOSTS,
    HOSTS_BY_ORG,
    HOSTS_BY_ENV,
    HOSTS_BY_SHARD,
    HOSTS_BY_LABEL,
    RUNTIME,
    FENCES,
    CHANGES,
    CHANGE_IDS,
    PENDING,
    ENROLL_TOKENS,
    ENROLL_BY_SECRET,
    ENROLL_BY_ORG,
    API_TOKENS,
    API_BY_SECRET,
    AUDIT,
    APPS,
    SETTINGS,
    JOBS,
    JOBS_BY_ORG,
    JOB_RESULTS,
    JOB_RESULTS_BY_HOST,
    JOB_COUNTS,
    IDEMPOTENCY,
    IDEMPOTENCY_BY_EXPIRY,
];

/// The store in one redb file. Cheap to clone; every clone shares the open database and its
/// writer thread.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: Arc<Writer>,
}

/// Most writes committed together (see [`Writer`]).
const MAX_BATCH: usize = 256;

/// One write waiting for the writer thread.
trait WriteOp: Send {
    /// Runs the write in `txn`; false if it failed (its transaction must not commit).
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Hands the caller its result, given how the transaction that ran it ended.
    fn finish(self: Box<Self>, commit: Result<()>);
}

struct WriteJob<T, F> {
    f: F,
    result: Option<Result<T>>,
    reply: tokio::sync::oneshot::Sender<Result<T>>,
}

impl<T: Send, F: Fn(&WriteTransaction) -> Result<T> + Send> WriteOp for WriteJob<T, F> {
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let r = (self.f)(txn);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(mut self: Box<Self>, commit: Result<()>) {
        let out = match (commit, self.result.take()) {
            (Ok(()), Some(r)) => r,
            (Err(e), Some(Ok(_))) | (Err(e), None) => Err(e),
            (_, Some(Err(e))) => Err(e),
            (Ok(()), None) => Err(StoreError::Backend("write was not run".into())),
        };
        let _ = self.reply.send(out);
    }
}

/// Group commit. redb makes every commit durable (an fsync) and does not group concurrent
/// commits, so one write per transaction caps the store at about 2,000 writes a second however
/// many callers wait. One thread takes every write queued at the moment (up to [`MAX_BATCH`]),
/// runs them one after the other in a single transaction and commits once; each caller learns
/// its result only after that commit, so "durable on return" still holds. The writes of a batch
/// see each other in queue order, as if they had run one by one. If one of them fails, the batch
/// is aborted and every write of it runs again alone, so a failed write never takes back or
/// leaks into the others (hence `Fn`, not `FnOnce`: a write may run twice, the first run undone).
struct Writer {
    queue: Mutex<Option<std::sync::mpsc::Sender<Box<dyn WriteOp>>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    fn start(db: Arc<Database>) -> Writer {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn WriteOp>>();
        let thread = std::thread::Builder::new()
            .name("comodit-store-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    run_batch(&db, batch);
                }
            })
            .expect("spawn the store writer thread");
        Writer {
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        }
    }

    fn submit(&self, job: Box<dyn WriteOp>) -> Result<()> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match queue.as_ref().map(|q| q.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(StoreError::Backend("the store is closed".into())),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Close the queue, then wait for the writes already queued: the file is free on return.
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn run_batch(db: &Database, mut batch: Vec<Box<dyn WriteOp>>) {
    metrics::histogram!("comodit_store_write_batch_size").record(batch.len() as f64);
    let txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => {
            let e = backend(e);
            for job in batch {
                job.finish(Err(e.clone()));
            }
            return;
        }
    };
    let all_ok = batch.iter_mut().all(|job| job.run(&txn));
    if all_ok {
        let commit = txn.commit().map_err(backend);
        for job in batch {
            job.finish(commit.clone());
        }
        return;
    }
    drop(txn);
    // One failed: run each alone, so that its failure undoes only itself.
    for mut job in batch {
        let result = match db.begin_write() {
            Ok(txn) => {
                if job.run(&txn) {
                    txn.commit().map_err(backend)
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(backend(e)),
        };
        job.finish(result);
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store file at `path`, creating it if missing. Checks the file's integrity and its
    /// schema version, and migrates an older schema. Fails if another process has it open, if it is
    /// not a comodit store, if it is damaged, or if its schema is newer than this build.
    ///
    /// Blocking: the integrity check reads the whole file. Call it at startup or from
    /// `spawn_blocking`.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        let shown = path.display();
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                    "store file {shown} is already open (by another process?)"
                )),
                e => StoreError::Backend(format!("cannot open store file {shown}: {e}")),
            })?;
        let txn = db.begin_write()?;
        let version = prepare_schema(&txn, MIGRATIONS).map_err(|e| match e {
            StoreError::Backend(m) => StoreError::Backend(format!("store file {shown}: {m}")),
            e => e,
        })?;
        txn.commit()?;
        tracing::debug!(path = %shown, schema_version = version, "store opened");
        let db = Arc::new(db);
        Ok(EmbeddedStore {
            writer: Arc::new(Writer::start(db.clone())),
            db,
        })
    }

    /// A point read (a few keys, bounded work): runs on the caller's thread. A redb read
    /// transaction never waits for the writer, and handing a read of some microseconds to the
    /// blocking pool costs more in thread wake-ups than the read itself (two per read, on the
    /// path of every change). Scans and listings go through [`Self::read`].
    fn lookup<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_read()?;
        f(&txn)
    }

    /// A read of unbounded size (a listing, a scan), on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            f(&txn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// Changes one enrollment token in place; NotFound if there is no such token.
    async fn update_enrollment_token(
        &self,
        id: TokenId,
        change: impl Fn(&mut EnrollmentToken) + Send + 'static,
    ) -> Result<()> {
        self.write(move |txn| {
            let mut tokens = txn.open_table(ENROLL_TOKENS)?;
            let mut token: EnrollmentToken =
                get_json(&tokens, "enrollment token", id.0.as_bytes())?
                    .ok_or_else(|| StoreError::NotFound(format!("enrollment token {id}")))?;
            change(&mut token);
            put_json(&mut tokens, "enrollment token", id.0.as_bytes(), &token)
        })
        .await
    }

    /// Runs `f` in a write transaction (shared with the writes queued at the same moment, see
    /// [`Writer`]), durable on return; nothing of it is kept if it fails.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T> + Send + 'static,
    {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.writer.submit(Box::new(WriteJob {
            f,
            result: None,
            reply,
        }))?;
        result
            .await
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))?
    }
}

/// Creates the tables of a new file or checks and migrates an existing one, up to the version
/// that `migrations` lead to (`1 + migrations.len()`); returns that version.
fn prepare_schema(txn: &WriteTransaction, migrations: &[Migration]) -> Result<u64> {
    let current = 1 + migrations.len() as u64;
    let had_tables = txn.list_tables()?.next().is_some();
    let (magic, version) = {
        let meta = txn.open_table(META).map_err(|e| {
            StoreError::Backend(format!("not a comodit store (its meta table: {e})"))
        })?;
        let magic = meta.get("magic")?.map(|g| g.value());
        let version = meta.get("schema_version")?.map(|g| g.value());
        (magic, version)
    };
    match (magic, version) {
        (None, None) if !had_tables => {
            let mut meta = txn.open_table(META)?;
            meta.insert("magic", MAGIC)?;
            meta.insert("schema_version", current)?;
        }
        (Some(MAGIC), Some(v)) if v > current => {
            return Err(StoreError::Backend(format!(
                "schema version {v} is newer than this build knows ({current}): \
                 refusing to open it (run a newer comodit, or restore a backup)"
            )))
        }
        (Some(MAGIC), Some(v)) if v >= 1 => {
            for from in v..current {
                migrate(txn, from, migrations)?;
            }
        }
        (Some(MAGIC), v) => {
            return Err(StoreError::Backend(format!(
                "not a valid comodit store (schema version {v:?})"
            )))
        }
        _ => {
            return Err(StoreError::Backend(
                "not a comodit store (a redb file of another program)".into(),
            ))
        }
    }
    for def in ALL_TABLES {
        txn.open_table(*def)?;
    }
    Ok(current)
}

/// Upgrades the schema from version `from` to `from + 1` and records the new version. Part of the
/// open's transaction: if a later step fails, the file stays at the version it had.
fn migrate(txn: &WriteTransaction, from: u64, migrations: &[Migration]) -> Result<()> {
    let step = usize::try_from(from - 1)
        .ok()
        .and_then(|i| migrations.get(i))
        .ok_or_else(|| StoreError::Backend(format!("no migration from schema version {from}")))?;
    tracing::info!(from, to = from + 1, "migrating store schema");
    step(txn).map_err(|e| {
        StoreError::Backend(format!("migrating schema {from} to {}: {e}", from + 1))
    })?;
    txn.open_table(META)?.insert("schema_version", from + 1)?;
    Ok(())
}

// --- errors ----------------------------------------------------------------------------------

macro_rules! backend_errors {
    ($($ty:ty),*) => {
        $(impl From<$ty> for StoreError {
            fn from(e: $ty) -> Self {
                StoreError::Backend(format!("redb: {e}"))
            }
        })*
    };
}
backend_errors!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

// --- encoding --------------------------------------------------------------------------------

fn enc<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(v)
        .map_err(|e| StoreError::Backend(format!("cannot encode {what}: {e}")))?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what} is {} bytes, more than the {MAX_RECORD_BYTES} a record may hold",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn dec<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Backend(format!("corrupt {what} record: {e}")))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn be64(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read64(what: &str, bytes: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Backend(format!("corrupt {what}: not 8 bytes")))?;
    Ok(u64::from_be_bytes(arr))
}

fn read_uuid(what: &str, bytes: &[u8]) -> Result<uuid::Uuid> {
    uuid::Uuid::from_slice(bytes).map_err(|_| StoreError::Backend(format!("corrupt {what} key")))
}

/// A timestamp as 8 bytes that sort like the time (microseconds, sign bit flipped).
fn time_key(t: DateTime<Utc>) -> [u8; 8] {
    ((t.timestamp_micros() as u64) ^ (1 << 63)).to_be_bytes()
}

fn label_prefix(key: &str, value: &str) -> Vec<u8> {
    cat(&[key.as_bytes(), &[0], value.as_bytes(), &[0]])
}

fn app_suffix(name: &str, version: &str) -> Vec<u8> {
    cat(&[name.as_bytes(), &[0], version.as_bytes()])
}

fn scope_key(scope: &SettingScope) -> [u8; 17] {
    let (kind, id) = match scope {
        SettingScope::Org { org } => (0u8, org.0),
        SettingScope::Env { env } => (1u8, env.0),
        SettingScope::Host { host } => (2u8, host.0),
    };
    let mut out = [0u8; 17];
    out[0] = kind;
    out[1..].copy_from_slice(id.as_bytes());
    out
}

/// The smallest key greater than every key that starts with `prefix` (None: no such bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

// --- table helpers ---------------------------------------------------------------------------

/// Writes a job's result for one host and moves its count from the result it replaces.
fn record_job_result(txn: &WriteTransaction, result: &JobResult) -> Result<()> {
    let (job, host) = (result.job.0.as_bytes(), result.host.0.as_bytes());
    let key = cat(&[job, host]);
    let mut results = txn.open_table(JOB_RESULTS)?;
    let before: Option<JobResult> = get_json(&results, "job result", &key)?;
    put_json(&mut results, "job result", &key, result)?;
    if before.is_none() {
        // Written with the first result; rewritten on each update it would only copy its page.
        mark(
            &mut txn.open_table(JOB_RESULTS_BY_HOST)?,
            &cat(&[host, job]),
        )?;
    }
    count_job_result(
        &mut txn.open_table(JOB_COUNTS)?,
        result.job,
        before.map(|b| b.status),
        Some(result.status),
    )
}

/// Moves one host of `job` from the count of `from` to that of `to` (either may be none).
fn count_job_result(
    counts: &mut Table<Bytes, Bytes>,
    job: JobId,
    from: Option<ChangeStatus>,
    to: Option<ChangeStatus>,
) -> Result<()> {
    if from == to {
        return Ok(());
    }
    let key = job.0.as_bytes();
    let mut now: JobCounts = get_json(counts, "job counts", key)?.unwrap_or_default();
    if let Some(from) = from {
        let slot = now.slot(from);
        *slot = slot.saturating_sub(1);
    }
    if let Some(to) = to {
        *now.slot(to) += 1;
    }
    put_json(counts, "job counts", key, &now)
}

fn get_json<T: DeserializeOwned>(
    t: &impl ReadableTable<Bytes, Bytes>,
    what: &str,
    key: &[u8],
) -> Result<Option<T>> {
    match t.get(key)? {
        Some(g) => dec(what, g.value()).map(Some),
        None => Ok(None),
    }
}

fn get_bytes(t: &impl ReadableTable<Bytes, Bytes>, key: &[u8]) -> Result<Option<Vec<u8>>> {
    Ok(t.get(key)?.map(|g| g.value().to_vec()))
}

fn exists(t: &impl ReadableTable<Bytes, Bytes>, key: &[u8]) -> Result<bool> {
    Ok(t.get(key)?.is_some())
}

fn put_json<T: Serialize>(
    t: &mut Table<Bytes, Bytes>,
    what: &str,
    key: &[u8],
    v: &T,
) -> Result<()> {
    let bytes = enc(what, v)?;
    t.insert(key, bytes.as_slice())?;
    Ok(())
}

fn mark(t: &mut Table<Bytes, Bytes>, key: &[u8]) -> Result<()> {
    t.insert(key, [].as_slice())?;
    Ok(())
}

/// Entries whose key starts with `prefix`, between `after` and `before` (exclusive, as key
/// suffixes), in key order.
fn prefix_range<'t>(
    t: &'t impl ReadableTable<Bytes, Bytes>,
    prefix: &[u8],
    after: Option<&[u8]>,
    before: Option<&[u8]>,
) -> Result<redb::Range<'t, Bytes, Bytes>> {
    let lower = match after {
        Some(s) => Bound::Excluded(cat(&[prefix, s])),
        None => Bound::Included(prefix.to_vec()),
    };
    let upper = match before {
        Some(s) => Bound::Excluded(cat(&[prefix, s])),
        None => match prefix_end(prefix) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        },
    };
    // An empty range (cursor past the end) would make redb panic on inverted bounds.
    if let (Bound::Excluded(lo) | Bound::Included(lo), Bound::Excluded(hi)) = (&lower, &upper) {
        if lo >= hi {
            let empty = prefix.to_vec();
            return Ok(t.range::<&[u8]>(empty.as_slice()..empty.as_slice())?);
        }
    }
    let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (
        lower.as_ref().map(|v| v.as_slice()),
        upper.as_ref().map(|v| v.as_slice()),
    );
    Ok(t.range::<&[u8]>(bounds)?)
}

fn first_with_prefix(
    t: &impl ReadableTable<Bytes, Bytes>,
    prefix: &[u8],
) -> Result<Option<Vec<u8>>> {
    match prefix_range(t, prefix, None, None)?.next() {
        Some(entry) => Ok(Some(entry?.0.value().to_vec())),
        None => Ok(None),
    }
}

fn keys_with_prefix(t: &impl ReadableTable<Bytes, Bytes>, prefix: &[u8]) -> Result<Vec<Vec<u8>>> {
    prefix_range(t, prefix, None, None)?
        .map(|entry| Ok(entry?.0.value().to_vec()))
        .collect()
}

fn remove_prefix(t: &mut Table<Bytes, Bytes>, prefix: &[u8]) -> Result<()> {
    for key in keys_with_prefix(t, prefix)? {
        t.remove(key.as_slice())?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Order {
    Ascending,
    Descending,
}

pub(crate) fn check_page(page: &Page) -> Result<Option<Vec<u8>>> {
    if page.limit == 0 || page.limit > Page::MAX_LIMIT {
        return Err(StoreError::Invalid(format!(
            "page limit must be between 1 and {}, not {}",
            Page::MAX_LIMIT,
            page.limit
        )));
    }
    match &page.cursor {
        None => Ok(None),
        Some(c) => hex::decode(c)
            .ok()
            .filter(|b| !b.is_empty() && b.len() <= 1024)
            .map(Some)
            .ok_or_else(|| StoreError::Invalid(format!("not a cursor of this listing: {c:?}"))),
    }
}

/// One page of the entries under `prefix`, after the page's cursor, keeping those `take` maps to
/// `Some`. Scans on past non-matching entries until the page is full; looks one match ahead so
/// that the last page has no `next`.
fn page_scan<T>(
    t: &impl ReadableTable<Bytes, Bytes>,
    prefix: &[u8],
    page: &Page,
    order: Order,
    mut take: impl FnMut(&[u8], &[u8]) -> Result<Option<T>>,
) -> Result<Paged<T>> {
    let cursor = check_page(page)?;
    let limit = page.limit as usize;
    let range = match order {
        Order::Ascending => prefix_range(t, prefix, cursor.as_deref(), None)?,
        Order::Descending => prefix_range(t, prefix, None, cursor.as_deref())?,
    };
    let iter: Box<dyn Iterator<Item = _>> = match order {
        Order::Ascending => Box::new(range),
        Order::Descending => Box::new(range.rev()),
    };
    let mut items = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let mut more = false;
    for entry in iter {
        let (k, v) = entry?;
        let suffix = &k.value()[prefix.len()..];
        if let Some(item) = take(suffix, v.value())? {
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(item);
            last = Some(suffix.to_vec());
        }
    }
    Ok(Paged {
        items,
        next: if more { last.map(hex::encode) } else { None },
    })
}

// --- validation ------------------------------------------------------------------------------

/// Longest host name, in bytes.
pub const MAX_HOST_NAME_BYTES: usize = 255;
/// Most labels on one host.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Longest application name, setting key or token name, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Longest application version, in bytes.
pub const MAX_VERSION_BYTES: usize = 64;
/// Longest free text (descriptions), in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Organization and environment names: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} name {name:?} must match [a-z0-9][a-z0-9-]{{0,62}}"
        )))
    }
}

/// Free-form text of `min..=max` bytes without control characters (NUL separates key parts).
pub(crate) fn validate_text(what: &str, s: &str, min: usize, max: usize) -> Result<()> {
    if s.len() < min || s.len() > max {
        return Err(StoreError::Invalid(format!(
            "{what} must be {min} to {max} bytes long, not {}",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(())
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(StoreError::Invalid(format!(
            "a host has at most {MAX_LABELS} labels, not {}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        validate_text("label key", k, 1, MAX_LABEL_KEY_BYTES)?;
        validate_text(&format!("label {k:?}"), v, 0, MAX_LABEL_VALUE_BYTES)?;
    }
    Ok(())
}

pub(crate) fn validate_host(host: &Host) -> Result<()> {
    validate_text("host name", &host.name, 1, MAX_HOST_NAME_BYTES)?;
    validate_labels(&host.labels)
}

/// 64 lowercase hex digits: a sha256 as the store keeps them.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

pub(crate) fn validate_secret_sha256(s: &str) -> Result<()> {
    if is_sha256_hex(s) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "secret_sha256 must be 64 lowercase hex digits".into(),
        ))
    }
}

/// The checks every backend makes on an idempotency key and its request's fingerprint.
pub(crate) fn validate_idempotency(key: &str, fingerprint: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(StoreError::Invalid(format!(
            "an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
        )));
    }
    if !is_sha256_hex(fingerprint) {
        return Err(StoreError::Invalid(
            "a request fingerprint must be 64 lowercase hex digits".into(),
        ));
    }
    Ok(())
}

/// The record of a new claim on `key` of `token` (checked as [`validate_idempotency`] does), in
/// progress until `lease_until`.
pub(crate) fn claim_record(
    token: TokenId,
    key: &str,
    fingerprint: &str,
    lease_until: DateTime<Utc>,
) -> Result<IdempotencyRecord> {
    validate_idempotency(key, fingerprint)?;
    Ok(IdempotencyRecord {
        token,
        key: key.to_owned(),
        fingerprint: fingerprint.to_owned(),
        expires_at: lease_until,
        response: None,
    })
}

fn idempotency_key(token: TokenId, key: &str) -> Vec<u8> {
    cat(&[token.0.as_bytes(), key.as_bytes()])
}

/// Writes `record` under `id` (token, key), replacing `old` and its expiry index entry.
fn put_idempotency(
    txn: &WriteTransaction,
    id: &[u8],
    old: Option<&IdempotencyRecord>,
    record: Option<&IdempotencyRecord>,
) -> Result<()> {
    let mut records = txn.open_table(IDEMPOTENCY)?;
    let mut by_expiry = txn.open_table(IDEMPOTENCY_BY_EXPIRY)?;
    if let Some(old) = old {
        by_expiry.remove(cat(&[&time_key(old.expires_at), id]).as_slice())?;
    }
    match record {
        Some(r) => {
            put_json(&mut records, "idempotency record", id, r)?;
            mark(&mut by_expiry, &cat(&[&time_key(r.expires_at), id]))?;
        }
        None => {
            records.remove(id)?;
        }
    }
    Ok(())
}

// --- records by key --------------------------------------------------------------------------

fn load_host(t: &impl ReadableTable<Bytes, Bytes>, id: HostId) -> Result<Option<Host>> {
    get_json(t, "host", id.0.as_bytes())
}

fn need_host(t: &impl ReadableTable<Bytes, Bytes>, id: HostId) -> Result<Host> {
    load_host(t, id)?.ok_or_else(|| StoreError::NotFound(format!("host {id}")))
}

fn fence(t: &impl ReadableTable<Bytes, Bytes>, host: HostId) -> Result<Epoch> {
    Ok(match get_bytes(t, host.0.as_bytes())? {
        Some(b) => Epoch(read64("fence", &b)?),
        None => Epoch(0),
    })
}

fn check_fence(given: Epoch, stored: Epoch) -> Result<()> {
    if given < stored {
        Err(StoreError::StaleEpoch { given, stored })
    } else {
        Ok(())
    }
}

fn raise_fence(
    t: &mut Table<Bytes, Bytes>,
    host: HostId,
    stored: Epoch,
    given: Epoch,
) -> Result<()> {
    if given > stored {
        t.insert(host.0.as_bytes().as_slice(), be64(given.0).as_slice())?;
    }
    Ok(())
}

fn label_keys(host: &Host) -> Vec<Vec<u8>> {
    host.labels
        .iter()
        .map(|(k, v)| cat(&[&label_prefix(k, v), host.id.0.as_bytes()]))
        .collect()
}

/// Whether `facts` has the top-level field `name` equal to `want`, compared as strings (a list
/// matches if one of its items does).
pub(crate) fn fact_matches(facts: &comodit_protocol::Facts, name: &str, want: &str) -> bool {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(facts) else {
        return false;
    };
    let same = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s == want,
        serde_json::Value::Null => false,
        other => serde_json::to_string(other).is_ok_and(|s| s == want),
    };
    match map.get(name) {
        Some(serde_json::Value::Array(items)) => items.iter().any(same),
        Some(v) => same(v),
        None => false,
    }
}

// --- the trait -------------------------------------------------------------------------------

#[async_trait]
impl Store for EmbeddedStore {
    // --- organizations and environments -------------------------------------------------------

    async fn create_org(&self, org: &Organization) -> Result<()> {
        validate_name("organization", &org.name)?;
        let mut org = org.clone();
        org.version = 1;
        self.write(move |txn| {
            let mut orgs = txn.open_table(ORGS)?;
            let mut names = txn.open_table(ORG_NAMES)?;
            if exists(&names, org.name.as_bytes())? {
                return Err(StoreError::Conflict(format!(
                    "organization name {:?} is taken",
                    org.name
                )));
            }
            if exists(&orgs, org.id.0.as_bytes())? {
                return Err(StoreError::Conflict(format!(
                    "organization {} exists",
                    org.id
                )));
            }
            put_json(&mut orgs, "organization", org.id.0.as_bytes(), &org)?;
            names.insert(org.name.as_bytes(), org.id.0.as_bytes().as_slice())?;
            Ok(())
        })
        .await
    }

    async fn get_org(&self, id: OrgId) -> Result<Option<Organization>> {
        self.lookup(move |txn| get_json(&txn.open_table(ORGS)?, "organization", id.0.as_bytes()))
    }

    async fn get_org_by_name(&self, name: &str) -> Result<Option<Organization>> {
        let name = name.to_owned();
        self.lookup(move |txn| {
            let Some(id) = get_bytes(&txn.open_table(ORG_NAMES)?, name.as_bytes())? else {
                return Ok(None);
            };
            get_json(&txn.open_table(ORGS)?, "organization", &id)
        })
    }

    async fn list_orgs(&self, page: &Page) -> Result<Paged<Organization>> {
        let page = page.clone();
        self.read(move |txn| {
            let orgs = txn.open_table(ORGS)?;
            page_scan(
                &txn.open_table(ORG_NAMES)?,
                &[],
                &page,
                Order::Ascending,
                |_, id| {
                    get_json(&orgs, "organization", id)?
                        .map(Some)
                        .ok_or_else(|| StoreError::Backend("org_names index is dangling".into()))
                },
            )
        })
        .await
    }

    async fn delete_org(&self, id: OrgId) -> Result<()> {
        self.write(move |txn| {
            let mut orgs = txn.open_table(ORGS)?;
            let org: Organization = get_json(&orgs, "organization", id.0.as_bytes())?
                .ok_or_else(|| StoreError::NotFound(format!("organization {id}")))?;
            if first_with_prefix(&txn.open_table(ENV_NAMES)?, id.0.as_bytes())?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "organization {:?} still has environments",
                    org.name
                )));
            }
            orgs.remove(id.0.as_bytes().as_slice())?;
            txn.open_table(ORG_NAMES)?.remove(org.name.as_bytes())?;
            // What only made sense inside the organization goes with it.
            remove_prefix(
                &mut txn.open_table(SETTINGS)?,
                &scope_key(&SettingScope::Org { org: id }),
            )?;
            remove_prefix(&mut txn.open_table(APPS)?, id.0.as_bytes())?;
            let mut by_org = txn.open_table(ENROLL_BY_ORG)?;
            let mut tokens = txn.open_table(ENROLL_TOKENS)?;
            let mut by_secret = txn.open_table(ENROLL_BY_SECRET)?;
            for key in keys_with_prefix(&by_org, id.0.as_bytes())? {
                let token_id = &key[key.len() - 16..];
                if let Some(token) =
                    get_json::<EnrollmentToken>(&tokens, "enrollment token", token_id)?
                {
                    by_secret.remove(token.secret_sha256.as_bytes())?;
                }
                tokens.remove(token_id)?;
                by_org.remove(key.as_slice())?;
            }
            Ok(())
        })
        .await
    }

    async fn create_env(&self, env: &Environment) -> Result<()> {
        validate_name("environment", &env.name)?;
        let mut env = env.clone();
        env.version = 1;
        self.write(move |txn| {
            if !exists(&txn.open_table(ORGS)?, env.org.0.as_bytes())? {
                return Err(StoreError::NotFound(format!("organization {}", env.org)));
            }
            let mut envs = txn.open_table(ENVS)?;
            let mut names = txn.open_table(ENV_NAMES)?;
            let name_key = cat(&[env.org.0.as_bytes(), env.name.as_bytes()]);
            if exists(&names, &name_key)? {
                return Err(StoreError::Conflict(format!(
                    "environment name {:?} is taken in organization {}",
                    env.name, env.org
                )));
            }
            if exists(&envs, env.id.0.as_bytes())? {
                return Err(StoreError::Conflict(format!(
                    "environment {} exists",
                    env.id
                )));
            }
            put_json(&mut envs, "environment", env.id.0.as_bytes(), &env)?;
            names.insert(name_key.as_slice(), env.id.0.as_bytes().as_slice())?;
            Ok(())
        })
        .await
    }

    async fn get_env(&self, id: EnvId) -> Result<Option<Environment>> {
        self.lookup(move |txn| get_json(&txn.open_table(ENVS)?, "environment", id.0.as_bytes()))
    }

    async fn get_env_by_name(&self, org: OrgId, name: &str) -> Result<Option<Environment>> {
        let key = cat(&[org.0.as_bytes(), name.as_bytes()]);
        self.lookup(move |txn| {
            let Some(id) = get_bytes(&txn.open_table(ENV_NAMES)?, &key)? else {
                return Ok(None);
            };
            get_json(&txn.open_table(ENVS)?, "environment", &id)
        })
    }

    async fn list_envs(&self, org: OrgId, page: &Page) -> Result<Paged<Environment>> {
        let page = page.clone();
        self.read(move |txn| {
            let envs = txn.open_table(ENVS)?;
            page_scan(
                &txn.open_table(ENV_NAMES)?,
                org.0.as_bytes(),
                &page,
                Order::Ascending,
                |_, id| {
                    get_json(&envs, "environment", id)?
                        .map(Some)
                        .ok_or_else(|| StoreError::Backend("env_names index is dangling".into()))
                },
            )
        })
        .await
    }

    async fn delete_env(&self, id: EnvId) -> Result<()> {
        self.write(move |txn| {
            let mut envs = txn.open_table(ENVS)?;
            let env: Environment = get_json(&envs, "environment", id.0.as_bytes())?
                .ok_or_else(|| StoreError::NotFound(format!("environment {id}")))?;
            if first_with_prefix(&txn.open_table(HOSTS_BY_ENV)?, id.0.as_bytes())?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "environment {:?} still has hosts",
                    env.name
                )));
            }
            envs.remove(id.0.as_bytes().as_slice())?;
            txn.open_table(ENV_NAMES)?
                .remove(cat(&[env.org.0.as_bytes(), env.name.as_bytes()]).as_slice())?;
            remove_prefix(
                &mut txn.open_table(SETTINGS)?,
                &scope_key(&SettingScope::Env { env: id }),
            )?;
            Ok(())
        })
        .await
    }

    // --- hosts --------------------------------------------------------------------------------

    async fn create_host(&self, host: &Host) -> Result<Host> {
        validate_host(host)?;
        let mut host = host.clone();
        host.version = 1;
        self.write(move |txn| {
            let mut hosts = txn.open_table(HOSTS)?;
            if exists(&hosts, host.id.0.as_bytes())? {
                return Err(StoreError::Conflict(format!("host {} exists", host.id)));
            }
            let env: Environment =
                get_json(&txn.open_table(ENVS)?, "environment", host.env.0.as_bytes())?
                    .ok_or_else(|| StoreError::NotFound(format!("environment {}", host.env)))?;
            if env.org != host.org {
                return Err(StoreError::Invalid(format!(
                    "environment {} belongs to organization {}, not {}",
                    env.id, env.org, host.org
                )));
            }
            let id = host.id.0.as_bytes();
            put_json(&mut hosts, "host", id, &host)?;
            mark(
                &mut txn.open_table(HOSTS_BY_ORG)?,
                &cat(&[host.org.0.as_bytes(), id]),
            )?;
            mark(
                &mut txn.open_table(HOSTS_BY_ENV)?,
                &cat(&[host.env.0.as_bytes(), id]),
            )?;
            mark(
                &mut txn.open_table(HOSTS_BY_SHARD)?,
                &cat(&[&host.shard.to_be_bytes(), id]),
            )?;
            let mut by_label = txn.open_table(HOSTS_BY_LABEL)?;
            for key in label_keys(&host) {
                mark(&mut by_label, &key)?;
            }
            Ok(host.clone())
        })
        .await
    }

    async fn get_host(&self, id: HostId) -> Result<Option<Host>> {
        self.lookup(move |txn| load_host(&txn.open_table(HOSTS)?, id))
    }

    async fn update_host(&self, host: &Host, expected_version: u64) -> Result<Host> {
        validate_host(host)?;
        let host = host.clone();
        self.write(move |txn| {
            let mut hosts = txn.open_table(HOSTS)?;
            let stored = need_host(&hosts, host.id)?;
            if stored.version != expected_version {
                return Err(StoreError::VersionMismatch {
                    expected: expected_version,
                    found: stored.version,
                });
            }
            let updated = Host {
                name: host.name.clone(),
                labels: host.labels.clone(),
                version: stored.version + 1,
                ..stored.clone()
            };
            let mut by_label = txn.open_table(HOSTS_BY_LABEL)?;
            for key in label_keys(&stored) {
                by_label.remove(key.as_slice())?;
            }
            for key in label_keys(&updated) {
                mark(&mut by_label, &key)?;
            }
            put_json(&mut hosts, "host", updated.id.0.as_bytes(), &updated)?;
            Ok(updated)
        })
        .await
    }

    async fn delete_host(&self, id: HostId) -> Result<()> {
        self.write(move |txn| {
            let mut hosts = txn.open_table(HOSTS)?;
            let host = need_host(&hosts, id)?;
            let hid = id.0.as_bytes();
            hosts.remove(hid.as_slice())?;
            txn.open_table(HOSTS_BY_ORG)?
                .remove(cat(&[host.org.0.as_bytes(), hid]).as_slice())?;
            txn.open_table(HOSTS_BY_ENV)?
                .remove(cat(&[host.env.0.as_bytes(), hid]).as_slice())?;
            txn.open_table(HOSTS_BY_SHARD)?
                .remove(cat(&[&host.shard.to_be_bytes(), hid]).as_slice())?;
            let mut by_label = txn.open_table(HOSTS_BY_LABEL)?;
            for key in label_keys(&host) {
                by_label.remove(key.as_slice())?;
            }
            txn.open_table(RUNTIME)?.remove(hid.as_slice())?;
            txn.open_table(FENCES)?.remove(hid.as_slice())?;
            remove_prefix(&mut txn.open_table(CHANGES)?, hid)?;
            remove_prefix(&mut txn.open_table(CHANGE_IDS)?, hid)?;
            remove_prefix(
                &mut txn.open_table(PENDING)?,
                &cat(&[&host.shard.to_be_bytes(), hid]),
            )?;
            let mut results = txn.open_table(JOB_RESULTS)?;
            let mut results_by_host = txn.open_table(JOB_RESULTS_BY_HOST)?;
            let mut counts = txn.open_table(JOB_COUNTS)?;
            for key in keys_with_prefix(&results_by_host, hid)? {
                let gone = results.remove(cat(&[&key[16..], hid]).as_slice())?;
                if let Some(gone) = gone {
                    let gone: JobResult = dec("job result", gone.value())?;
                    count_job_result(&mut counts, gone.job, Some(gone.status), None)?;
                }
                results_by_host.remove(key.as_slice())?;
            }
            remove_prefix(
                &mut txn.open_table(SETTINGS)?,
                &scope_key(&SettingScope::Host { host: id }),
            )?;
            Ok(())
        })
        .await
    }

    async fn list_hosts(&self, filter: &HostFilter, page: &Page) -> Result<Paged<Host>> {
        if let Some((k, v)) = &filter.label {
            validate_text("label key", k, 1, MAX_LABEL_KEY_BYTES)?;
            validate_text(&format!("label {k:?}"), v, 0, MAX_LABEL_VALUE_BYTES)?;
        }
        let filter = filter.clone();
        let page = page.clone();
        self.read(move |txn| {
            let hosts = txn.open_table(HOSTS)?;
            let runtime = txn.open_table(RUNTIME)?;
            // The most selective index given; each one's keys end with the host id.
            let (index, prefix) = if let Some(env) = filter.env {
                (HOSTS_BY_ENV, env.0.as_bytes().to_vec())
            } else if let Some((k, v)) = &filter.label {
                (HOSTS_BY_LABEL, label_prefix(k, v))
            } else if let Some(org) = filter.org {
                (HOSTS_BY_ORG, org.0.as_bytes().to_vec())
            } else if let Some(shard) = filter.shard {
                (HOSTS_BY_SHARD, shard.to_be_bytes().to_vec())
            } else {
                (HOSTS, Vec::new())
            };
            let index = txn.open_table(index)?;
            page_scan(&index, &prefix, &page, Order::Ascending, |suffix, _| {
                let id = HostId(read_uuid("host index", suffix)?);
                let host = load_host(&hosts, id)?
                    .ok_or_else(|| StoreError::Backend(format!("host index names missing {id}")))?;
                let f = &filter;
                if f.org.is_some_and(|o| o != host.org)
                    || f.env.is_some_and(|e| e != host.env)
                    || f.shard.is_some_and(|s| s != host.shard)
                {
                    return Ok(None);
                }
                if let Some((k, v)) = &f.label {
                    if host.labels.get(k) != Some(v) {
                        return Ok(None);
                    }
                }
                if f.online.is_some() || f.fact.is_some() {
                    let rt: Option<HostRuntime> = get_json(&runtime, "runtime", suffix)?;
                    let online = rt.as_ref().is_some_and(|r| r.online);
                    if f.online.is_some_and(|want| want != online) {
                        return Ok(None);
                    }
                    if let Some((name, want)) = &f.fact {
                        let facts = rt.as_ref().and_then(|r| r.facts.as_ref());
                        if !facts.is_some_and(|facts| fact_matches(facts, name, want)) {
                            return Ok(None);
                        }
                    }
                }
                Ok(Some(host))
            })
        })
        .await
    }

    // --- host runtime (fenced) ----------------------------------------------------------------

    async fn put_runtime(&self, rt: &HostRuntime) -> Result<()> {
        let rt = rt.clone();
        self.write(move |txn| {
            need_host(&txn.open_table(HOSTS)?, rt.host)?;
            let mut fences = txn.open_table(FENCES)?;
            let stored = fence(&fences, rt.host)?;
            check_fence(rt.epoch, stored)?;
            put_json(
                &mut txn.open_table(RUNTIME)?,
                "runtime",
                rt.host.0.as_bytes(),
                &rt,
            )?;
            raise_fence(&mut fences, rt.host, stored, rt.epoch)
        })
        .await
    }

    async fn get_runtime(&self, host: HostId) -> Result<Option<HostRuntime>> {
        self.lookup(move |txn| get_json(&txn.open_table(RUNTIME)?, "runtime", host.0.as_bytes()))
    }

    // --- change log ---------------------------------------------------------------------------

    async fn append_change(&self, change: &Change) -> Result<Change> {
        let change = change.clone();
        self.write(move |txn| {
            let host = need_host(&txn.open_table(HOSTS)?, change.host)?;
            let mut fences = txn.open_table(FENCES)?;
            let stored = fence(&fences, host.id)?;
            check_fence(change.epoch, stored)?;
            let hid = host.id.0.as_bytes();
            let mut ids = txn.open_table(CHANGE_IDS)?;
            let id_key = cat(&[hid, change.id.0.as_bytes()]);
            if exists(&ids, &id_key)? {
                return Err(StoreError::Conflict(format!(
                    "change {} of host {} exists",
                    change.id, host.id
                )));
            }
            let mut changes = txn.open_table(CHANGES)?;
            let mut change = change.clone();
            change.seq = match prefix_range(&changes, hid, None, None)?.next_back() {
                Some(entry) => read64("change key", &entry?.0.value()[16..])? + 1,
                None => 1,
            };
            let seq = be64(change.seq);
            if let Some(job) = change.job {
                if !exists(&txn.open_table(JOBS)?, job.0.as_bytes())? {
                    return Err(StoreError::NotFound(format!("job {job}")));
                }
                record_job_result(txn, &JobResult::of(&change, job))?;
            }
            put_json(&mut changes, "change", &cat(&[hid, &seq]), &change)?;
            ids.insert(id_key.as_slice(), seq.as_slice())?;
            if change.status.is_pending() {
                mark(
                    &mut txn.open_table(PENDING)?,
                    &cat(&[&host.shard.to_be_bytes(), hid, &seq]),
                )?;
            }
            raise_fence(&mut fences, host.id, stored, change.epoch)?;
            Ok(change)
        })
        .await
    }

    async fn get_change(&self, host: HostId, id: ChangeId) -> Result<Option<Change>> {
        self.lookup(move |txn| {
            let hid = host.0.as_bytes();
            let Some(seq) = get_bytes(&txn.open_table(CHANGE_IDS)?, &cat(&[hid, id.0.as_bytes()]))?
            else {
                return Ok(None);
            };
            get_json(&txn.open_table(CHANGES)?, "change", &cat(&[hid, &seq]))
        })
    }

    async fn update_change(
        &self,
        host: HostId,
        id: ChangeId,
        status: ChangeStatus,
        reply: Option<Reply>,
        epoch: Epoch,
    ) -> Result<Change> {
        self.write(move |txn| {
            let hid = host.0.as_bytes();
            let seq = get_bytes(&txn.open_table(CHANGE_IDS)?, &cat(&[hid, id.0.as_bytes()]))?
                .ok_or_else(|| StoreError::NotFound(format!("change {id} of host {host}")))?;
            let key = cat(&[hid, &seq]);
            let mut changes = txn.open_table(CHANGES)?;
            let mut change: Change = get_json(&changes, "change", &key)?
                .ok_or_else(|| StoreError::Backend(format!("change_ids names missing {id}")))?;
            let mut fences = txn.open_table(FENCES)?;
            let fenced = fence(&fences, host)?;
            check_fence(epoch, fenced.max(change.epoch))?;
            let shard = need_host(&txn.open_table(HOSTS)?, host)?.shard;
            let pending_key = cat(&[&shard.to_be_bytes(), hid, &seq]);
            let mut pending = txn.open_table(PENDING)?;
            match (change.status.is_pending(), status.is_pending()) {
                (true, false) => {
                    pending.remove(pending_key.as_slice())?;
                }
                (false, true) => mark(&mut pending, &pending_key)?,
                _ => {}
            }
            change.status = status;
            if reply.is_some() {
                change.reply = reply.clone();
            }
            change.epoch = epoch;
            change.updated_at = Utc::now();
            put_json(&mut changes, "change", &key, &change)?;
            raise_fence(&mut fences, host, fenced, epoch)?;
            if let Some(job) = change.job {
                record_job_result(txn, &JobResult::of(&change, job))?;
            }
            Ok(change)
        })
        .await
    }

    async fn list_changes(&self, host: HostId, page: &Page) -> Result<Paged<Change>> {
        let page = page.clone();
        self.read(move |txn| {
            page_scan(
                &txn.open_table(CHANGES)?,
                host.0.as_bytes(),
                &page,
                Order::Descending,
                |_, v| dec("change", v).map(Some),
            )
        })
        .await
    }

    async fn pending_changes(&self, host: HostId) -> Result<Vec<Change>> {
        self.lookup(move |txn| {
            let Some(h) = load_host(&txn.open_table(HOSTS)?, host)? else {
                return Ok(Vec::new());
            };
            let hid = host.0.as_bytes();
            let changes = txn.open_table(CHANGES)?;
            let pending = txn.open_table(PENDING)?;
            let prefix = cat(&[&h.shard.to_be_bytes(), hid]);
            let mut out = Vec::new();
            for entry in prefix_range(&pending, &prefix, None, None)? {
                let (k, _) = entry?;
                let seq = &k.value()[prefix.len()..];
                let change = get_json(&changes, "change", &cat(&[hid, seq]))?.ok_or_else(|| {
                    StoreError::Backend(format!("pending index names a missing change of {host}"))
                })?;
                out.push(change);
            }
            Ok(out)
        })
    }

    async fn hosts_with_pending_changes(&self, shard: u32) -> Result<Vec<HostId>> {
        self.read(move |txn| {
            let pending = txn.open_table(PENDING)?;
            let prefix = shard.to_be_bytes();
            let mut out = Vec::new();
            let mut after: Option<Vec<u8>> = None;
            // One seek per host, skipping the rest of its pending changes.
            while let Some(entry) = prefix_range(&pending, &prefix, after.as_deref(), None)?.next()
            {
                let (k, _) = entry?;
                let host = &k.value()[4..20];
                out.push(HostId(read_uuid("pending key", host)?));
                after = Some(cat(&[host, &[0xff; 8]]));
            }
            Ok(out)
        })
        .await
    }

    // --- enrollment tokens --------------------------------------------------------------------

    async fn create_enrollment_token(&self, token: &EnrollmentToken) -> Result<()> {
        validate_secret_sha256(&token.secret_sha256)?;
        validate_text("description", &token.description, 0, MAX_TEXT_BYTES)?;
        if token.max_uses == Some(0) {
            return Err(StoreError::Invalid(
                "max_uses must be at least 1 (or absent for unlimited)".into(),
            ));
        }
        let token = token.clone();
        self.write(move |txn| {
            let env: Environment = get_json(
                &txn.open_table(ENVS)?,
                "environment",
                token.env.0.as_bytes(),
            )?
            .ok_or_else(|| StoreError::NotFound(format!("environment {}", token.env)))?;
            if env.org != token.org {
                return Err(StoreError::Invalid(format!(
                    "environment {} belongs to organization {}, not {}",
                    env.id, env.org, token.org
                )));
            }
            let mut tokens = txn.open_table(ENROLL_TOKENS)?;
            let mut by_secret = txn.open_table(ENROLL_BY_SECRET)?;
            if exists(&tokens, token.id.0.as_bytes())? {
                return Err(StoreError::Conflict(format!(
                    "enrollment token {} exists",
                    token.id
                )));
            }
            if exists(&by_secret, token.secret_sha256.as_bytes())? {
                return Err(StoreError::Conflict(
                    "an enrollment token with this secret exists".into(),
                ));
            }
            let id = token.id.0.as_bytes();
            put_json(&mut tokens, "enrollment token", id, &token)?;
            by_secret.insert(token.secret_sha256.as_bytes(), id.as_slice())?;
            mark(
                &mut txn.open_table(ENROLL_BY_ORG)?,
                &cat(&[token.org.0.as_bytes(), &time_key(token.created_at), id]),
            )
        })
        .await
    }

    async fn get_enrollment_token(&self, id: TokenId) -> Result<Option<EnrollmentToken>> {
        self.lookup(move |txn| {
            get_json(
                &txn.open_table(ENROLL_TOKENS)?,
                "enrollment token",
                id.0.as_bytes(),
            )
        })
    }

    async fn list_enrollment_tokens(
        &self,
        org: OrgId,
        page: &Page,
    ) -> Result<Paged<EnrollmentToken>> {
        let page = page.clone();
        self.read(move |txn| {
            let tokens = txn.open_table(ENROLL_TOKENS)?;
            page_scan(
                &txn.open_table(ENROLL_BY_ORG)?,
                org.0.as_bytes(),
                &page,
                Order::Descending,
                |suffix, _| {
                    let id = suffix.get(8..).unwrap_or_default();
                    get_json(&tokens, "enrollment token", id)?
                        .map(Some)
                        .ok_or_else(|| {
                            StoreError::Backend("enroll_by_org index is dangling".into())
                        })
                },
            )
        })
        .await
    }

    async fn use_enrollment_token(
        &self,
        secret_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<EnrollmentToken> {
        let secret = secret_sha256.to_owned();
        self.write(move |txn| {
            let not_found = || StoreError::NotFound("enrollment token".into());
            let id = get_bytes(&txn.open_table(ENROLL_BY_SECRET)?, secret.as_bytes())?
                .ok_or_else(not_found)?;
            let mut tokens = txn.open_table(ENROLL_TOKENS)?;
            let mut token: EnrollmentToken =
                get_json(&tokens, "enrollment token", &id)?.ok_or_else(not_found)?;
            if token.revoked {
                return Err(StoreError::TokenUnusable(format!(
                    "enrollment token {} is revoked",
                    token.id
                )));
            }
            if now >= token.expires_at {
                return Err(StoreError::TokenUnusable(format!(
                    "enrollment token {} expired at {}",
                    token.id, token.expires_at
                )));
            }
            if let Some(max) = token.max_uses {
                if token.uses >= max {
                    return Err(StoreError::TokenUnusable(format!(
                        "enrollment token {} is used up ({max} uses)",
                        token.id
                    )));
                }
            }
            if !exists(&txn.open_table(ENVS)?, token.env.0.as_bytes())? {
                return Err(StoreError::TokenUnusable(format!(
                    "the environment of enrollment token {} no longer exists",
                    token.id
                )));
            }
            token.uses += 1;
            put_json(&mut tokens, "enrollment token", &id, &token)?;
            Ok(token)
        })
        .await
    }

    async fn release_enrollment_token_use(&self, id: TokenId) -> Result<()> {
        self.update_enrollment_token(id, |t| t.uses = t.uses.saturating_sub(1))
            .await
    }

    async fn revoke_enrollment_token(&self, id: TokenId) -> Result<()> {
        self.update_enrollment_token(id, |t| t.revoked = true).await
    }

    // --- API tokens ---------------------------------------------------------------------------

    async fn create_api_token(&self, token: &ApiToken) -> Result<()> {
        validate_secret_sha256(&token.secret_sha256)?;
        validate_text("token name", &token.name, 1, MAX_KEY_BYTES)?;
        let token = token.clone();
        self.write(move |txn| {
            let mut tokens = txn.open_table(API_TOKENS)?;
            let mut by_secret = txn.open_table(API_BY_SECRET)?;
            if exists(&tokens, token.id.0.as_bytes())? {
                return Err(StoreError::Conflict(format!(
                    "API token {} exists",
                    token.id
                )));
            }
            if exists(&by_secret, token.secret_sha256.as_bytes())? {
                return Err(StoreError::Conflict(
                    "an API token with this secret exists".into(),
                ));
            }
            put_json(&mut tokens, "API token", token.id.0.as_bytes(), &token)?;
            by_secret.insert(
                token.secret_sha256.as_bytes(),
                token.id.0.as_bytes().as_slice(),
            )?;
            Ok(())
        })
        .await
    }

    async fn find_api_token(&self, secret_sha256: &str) -> Result<Option<ApiToken>> {
        let secret = secret_sha256.to_owned();
        self.lookup(move |txn| {
            let Some(id) = get_bytes(&txn.open_table(API_BY_SECRET)?, secret.as_bytes())? else {
                return Ok(None);
            };
            let token: Option<ApiToken> = get_json(&txn.open_table(API_TOKENS)?, "API token", &id)?;
            Ok(token.filter(|t| !t.revoked))
        })
    }

    async fn list_api_tokens(&self, page: &Page) -> Result<Paged<ApiToken>> {
        let page = page.clone();
        self.read(move |txn| {
            page_scan(
                &txn.open_table(API_TOKENS)?,
                &[],
                &page,
                Order::Ascending,
                |_, v| dec("API token", v).map(Some),
            )
        })
        .await
    }

    async fn revoke_api_token(&self, id: TokenId) -> Result<()> {
        self.write(move |txn| {
            let mut tokens = txn.open_table(API_TOKENS)?;
            let mut token: ApiToken = get_json(&tokens, "API token", id.0.as_bytes())?
                .ok_or_else(|| StoreError::NotFound(format!("API token {id}")))?;
            token.revoked = true;
            put_json(&mut tokens, "API token", id.0.as_bytes(), &token)
        })
        .await
    }

    // --- idempotency keys ---------------------------------------------------------------------

    async fn claim_idempotency_key(
        &self,
        token: TokenId,
        key: &str,
        fingerprint: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<IdempotencyClaim> {
        let record = claim_record(token, key, fingerprint, lease_until)?;
        self.write(move |txn| {
            let id = idempotency_key(token, &record.key);
            let old: Option<IdempotencyRecord> =
                get_json(&txn.open_table(IDEMPOTENCY)?, "idempotency record", &id)?;
            if let Some(verdict) = old
                .as_ref()
                .and_then(|o| o.verdict(&record.fingerprint, now))
            {
                return Ok(verdict);
            }
            put_idempotency(txn, &id, old.as_ref(), Some(&record))?;
            Ok(IdempotencyClaim::Claimed)
        })
        .await
    }

    async fn finish_idempotency_key(
        &self,
        token: TokenId,
        key: &str,
        fingerprint: &str,
        response: Option<KeptResponse>,
        keep_until: DateTime<Utc>,
    ) -> Result<()> {
        validate_idempotency(key, fingerprint)?;
        let (key, fingerprint) = (key.to_owned(), fingerprint.to_owned());
        self.write(move |txn| {
            let id = idempotency_key(token, &key);
            let old: Option<IdempotencyRecord> =
                get_json(&txn.open_table(IDEMPOTENCY)?, "idempotency record", &id)?;
            let Some(old) = old.filter(|o| o.fingerprint == fingerprint && o.response.is_none())
            else {
                return Ok(());
            };
            let kept = response.clone().map(|r| IdempotencyRecord {
                expires_at: keep_until,
                response: Some(r),
                ..old.clone()
            });
            put_idempotency(txn, &id, Some(&old), kept.as_ref())
        })
        .await
    }

    async fn purge_idempotency_keys(&self, now: DateTime<Utc>) -> Result<u64> {
        let end = time_key(now);
        self.write(move |txn| {
            let mut by_expiry = txn.open_table(IDEMPOTENCY_BY_EXPIRY)?;
            let mut records = txn.open_table(IDEMPOTENCY)?;
            let lapsed: Vec<Vec<u8>> = by_expiry
                .range(..end.as_slice())?
                .map(|e| e.map(|(k, _)| k.value().to_vec()))
                .collect::<std::result::Result<_, _>>()?;
            for k in &lapsed {
                by_expiry.remove(k.as_slice())?;
                records.remove(&k[8..])?;
            }
            Ok(lapsed.len() as u64)
        })
        .await
    }

    // --- audit log ----------------------------------------------------------------------------

    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64> {
        let entry = entry.clone();
        self.write(move |txn| {
            let mut entry = entry.clone();
            let mut audit = txn.open_table(AUDIT)?;
            let last = audit.last()?.map(|(k, _)| read64("audit key", k.value()));
            entry.seq = match last {
                Some(seq) => seq? + 1,
                None => 1,
            };
            put_json(&mut audit, "audit entry", &be64(entry.seq), &entry)?;
            Ok(entry.seq)
        })
        .await
    }

    async fn list_audit(&self, page: &Page) -> Result<Paged<AuditEntry>> {
        let page = page.clone();
        self.read(move |txn| {
            page_scan(
                &txn.open_table(AUDIT)?,
                &[],
                &page,
                Order::Descending,
                |_, v| dec("audit entry", v).map(Some),
            )
        })
        .await
    }

    // --- applications, settings, jobs ---------------------------------------------------------

    async fn put_application(&self, app: &Application) -> Result<()> {
        validate_text("application name", &app.name, 1, MAX_KEY_BYTES)?;
        validate_text("application version", &app.version, 1, MAX_VERSION_BYTES)?;
        let app = app.clone();
        self.write(move |txn| {
            if !exists(&txn.open_table(ORGS)?, app.org.0.as_bytes())? {
                return Err(StoreError::NotFound(format!("organization {}", app.org)));
            }
            let mut apps = txn.open_table(APPS)?;
            let key = cat(&[app.org.0.as_bytes(), &app_suffix(&app.name, &app.version)]);
            if exists(&apps, &key)? {
                return Err(StoreError::Conflict(format!(
                    "application {:?} version {:?} exists (versions are immutable)",
                    app.name, app.version
                )));
            }
            put_json(&mut apps, "application", &key, &app)
        })
        .await
    }

    async fn get_application(
        &self,
        org: OrgId,
        name: &str,
        version: &str,
    ) -> Result<Option<Application>> {
        let key = cat(&[org.0.as_bytes(), &app_suffix(name, version)]);
        self.read(move |txn| get_json(&txn.open_table(APPS)?, "application", &key))
            .await
    }

    async fn list_applications(&self, org: OrgId, page: &Page) -> Result<Paged<Application>> {
        let page = page.clone();
        self.read(move |txn| {
            page_scan(
                &txn.open_table(APPS)?,
                org.0.as_bytes(),
                &page,
                Order::Ascending,
                |_, v| dec("application", v).map(Some),
            )
        })
        .await
    }

    async fn put_setting(&self, setting: &Setting) -> Result<()> {
        validate_text("setting key", &setting.key, 1, MAX_KEY_BYTES)?;
        let setting = setting.clone();
        self.write(move |txn| {
            let (table, id, what) = match setting.scope {
                SettingScope::Org { org } => (ORGS, org.0, "organization"),
                SettingScope::Env { env } => (ENVS, env.0, "environment"),
                SettingScope::Host { host } => (HOSTS, host.0, "host"),
            };
            if !exists(&txn.open_table(table)?, id.as_bytes())? {
                return Err(StoreError::NotFound(format!("{what} {id}")));
            }
            let scope = scope_key(&setting.scope);
            let key = cat(&[&scope, setting.key.as_bytes()]);
            let mut settings = txn.open_table(SETTINGS)?;
            if !exists(&settings, &key)? {
                let count = prefix_range(&settings, &scope, None, None)?
                    .take(MAX_SETTINGS_PER_SCOPE)
                    .count();
                if count >= MAX_SETTINGS_PER_SCOPE {
                    return Err(StoreError::Invalid(format!(
                        "{what} {id} has {MAX_SETTINGS_PER_SCOPE} settings, the most one scope holds"
                    )));
                }
            }
            put_json(&mut settings, "setting", &key, &setting)
        })
        .await
    }

    async fn get_setting(&self, scope: &SettingScope, key: &str) -> Result<Option<Setting>> {
        let key = cat(&[&scope_key(scope), key.as_bytes()]);
        self.lookup(move |txn| get_json(&txn.open_table(SETTINGS)?, "setting", &key))
    }

    async fn list_settings(&self, scope: &SettingScope) -> Result<Vec<Setting>> {
        let scope = scope_key(scope);
        self.read(move |txn| {
            prefix_range(&txn.open_table(SETTINGS)?, &scope, None, None)?
                .map(|entry| dec("setting", entry?.1.value()))
                .collect()
        })
        .await
    }

    async fn delete_setting(&self, scope: &SettingScope, key: &str) -> Result<()> {
        let shown = format!("setting {key:?}");
        let key = cat(&[&scope_key(scope), key.as_bytes()]);
        self.write(
            move |txn| match txn.open_table(SETTINGS)?.remove(key.as_slice())? {
                Some(_) => Ok(()),
                None => Err(StoreError::NotFound(shown.clone())),
            },
        )
        .await
    }

    async fn create_job(&self, job: &Job) -> Result<()> {
        let mut job = job.clone();
        job.version = 1;
        self.write(move |txn| {
            if !exists(&txn.open_table(ORGS)?, job.org.0.as_bytes())? {
                return Err(StoreError::NotFound(format!("organization {}", job.org)));
            }
            let mut jobs = txn.open_table(JOBS)?;
            if exists(&jobs, job.id.0.as_bytes())? {
                return Err(StoreError::Conflict(format!("job {} exists", job.id)));
            }
            put_json(&mut jobs, "job", job.id.0.as_bytes(), &job)?;
            mark(&mut txn.open_table(JOBS_BY_ORG)?, &job_org_key(&job))
        })
        .await
    }

    async fn list_jobs(&self, org: OrgId, page: &Page) -> Result<Paged<Job>> {
        let page = page.clone();
        self.read(move |txn| {
            let jobs = txn.open_table(JOBS)?;
            page_scan(
                &txn.open_table(JOBS_BY_ORG)?,
                org.0.as_bytes(),
                &page,
                Order::Descending,
                |suffix, _| {
                    let id = suffix.get(8..).unwrap_or_default();
                    get_json(&jobs, "job", id)?
                        .map(Some)
                        .ok_or_else(|| StoreError::Backend("jobs_by_org index is dangling".into()))
                },
            )
        })
        .await
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        self.lookup(move |txn| get_json(&txn.open_table(JOBS)?, "job", id.0.as_bytes()))
    }

    async fn update_job_status(
        &self,
        id: JobId,
        status: JobStatus,
        expected_version: u64,
    ) -> Result<Job> {
        self.write(move |txn| {
            let mut jobs = txn.open_table(JOBS)?;
            let mut job: Job = get_json(&jobs, "job", id.0.as_bytes())?
                .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
            if job.version != expected_version {
                return Err(StoreError::VersionMismatch {
                    expected: expected_version,
                    found: job.version,
                });
            }
            job.status = status;
            job.version += 1;
            put_json(&mut jobs, "job", id.0.as_bytes(), &job)?;
            Ok(job)
        })
        .await
    }

    async fn put_job_result(&self, result: &JobResult) -> Result<()> {
        let result = result.clone();
        self.write(move |txn| {
            if !exists(&txn.open_table(JOBS)?, result.job.0.as_bytes())? {
                return Err(StoreError::NotFound(format!("job {}", result.job)));
            }
            need_host(&txn.open_table(HOSTS)?, result.host)?;
            record_job_result(txn, &result)
        })
        .await
    }

    async fn job_counts(&self, job: JobId) -> Result<JobCounts> {
        self.lookup(move |txn| {
            Ok(
                get_json(&txn.open_table(JOB_COUNTS)?, "job counts", job.0.as_bytes())?
                    .unwrap_or_default(),
            )
        })
    }

    async fn list_job_results(&self, job: JobId, page: &Page) -> Result<Paged<JobResult>> {
        let page = page.clone();
        self.read(move |txn| {
            page_scan(
                &txn.open_table(JOB_RESULTS)?,
                job.0.as_bytes(),
                &page,
                Order::Ascending,
                |_, v| dec("job result", v).map(Some),
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }

    #[test]
    fn time_keys_sort_like_times() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let times = [
            t("1960-01-01T00:00:00Z"),
            t("1969-12-31T23:59:59.999999Z"),
            t("1970-01-01T00:00:00Z"),
            t("2024-05-01T12:00:00.000001Z"),
            t("2024-05-01T12:00:00.000002Z"),
        ];
        for pair in times.windows(2) {
            assert!(time_key(pair[0]) < time_key(pair[1]), "{pair:?}");
        }
    }

    #[test]
    fn names_follow_the_documented_syntax() {
        for ok in ["a", "0", "prod", "eu-west-1", &"a".repeat(63)] {
            validate_name("organization", ok).unwrap();
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(
                matches!(
                    validate_name("organization", bad),
                    Err(StoreError::Invalid(_))
                ),
                "{bad:?} accepted"
            );
        }
    }

    /// Opens `path` with `migrations` as this build's list, like [`EmbeddedStore::open`] does.
    fn open_with(path: &Path, migrations: &[Migration]) -> Result<u64> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        let version = prepare_schema(&txn, migrations)?;
        txn.commit()?;
        Ok(version)
    }

    /// What ran, in order, as recorded by the fake migrations below.
    fn ran(path: &Path) -> Vec<u64> {
        let db = Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let mut out: Vec<(u64, u64)> = ["ran_1", "ran_2"]
            .iter()
            .zip(1..)
            .filter_map(|(key, from)| meta.get(*key).unwrap().map(|g| (g.value(), from)))
            .collect();
        out.sort();
        out.into_iter().map(|(_, from)| from).collect()
    }

    fn record(txn: &WriteTransaction, key: &str) -> Result<()> {
        let mut meta = txn.open_table(META)?;
        let order = meta.len()?;
        meta.insert(key, order)?;
        Ok(())
    }

    fn step_1(txn: &WriteTransaction) -> Result<()> {
        record(txn, "ran_1")
    }

    fn step_2(txn: &WriteTransaction) -> Result<()> {
        record(txn, "ran_2")
    }

    fn failing_step(_: &WriteTransaction) -> Result<()> {
        Err(StoreError::Backend("disk on fire".into()))
    }

    #[test]
    fn migrations_run_in_order_from_the_stored_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        assert_eq!(open_with(&path, &[]).unwrap(), 1);
        // A build two versions ahead runs both steps, in order, once.
        assert_eq!(open_with(&path, &[step_1, step_2]).unwrap(), 3);
        assert_eq!(ran(&path), vec![1, 2]);
        assert_eq!(open_with(&path, &[step_1, step_2]).unwrap(), 3);
        assert_eq!(ran(&path), vec![1, 2]);
        // And the older build now refuses the file.
        let err = open_with(&path, &[]).unwrap_err();
        assert!(
            err.to_string().contains("schema version 3 is newer"),
            "{err}"
        );

        // From version 2, only the second step runs.
        let path = dir.path().join("at-2.redb");
        assert_eq!(open_with(&path, &[step_1]).unwrap(), 2);
        assert!(ran(&path).is_empty());
        assert_eq!(open_with(&path, &[step_1, step_2]).unwrap(), 3);
        assert_eq!(ran(&path), vec![2]);
    }

    #[test]
    fn a_failed_migration_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        assert_eq!(open_with(&path, &[]).unwrap(), 1);
        let err = open_with(&path, &[step_1, failing_step]).unwrap_err();
        assert!(
            err.to_string().contains("migrating schema 2 to 3: "),
            "{err}"
        );
        assert!(ran(&path).is_empty(), "the first step was rolled back too");
        assert_eq!(open_with(&path, &[]).unwrap(), 1);
    }

    #[test]
    fn facts_compare_as_strings() {
        let facts = comodit_protocol::Facts {
            os_family: "debian".into(),
            cpus: 4,
            addresses: vec!["10.0.0.1".into(), "fe80::1".into()],
            ..Default::default()
        };
        assert!(fact_matches(&facts, "os_family", "debian"));
        assert!(!fact_matches(&facts, "os_family", "rhel"));
        assert!(fact_matches(&facts, "cpus", "4"));
        assert!(fact_matches(&facts, "addresses", "fe80::1"));
        assert!(!fact_matches(&facts, "package_manager", "null"));
        assert!(!fact_matches(&facts, "no_such_fact", ""));
    }
}
