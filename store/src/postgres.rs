//! The PostgreSQL backend: the store in one PostgreSQL database that every node of a cluster
//! shares (DESIGN §10). It behaves like [`crate::embedded`] — the conformance suite is the judge —
//! and is built so that two nodes writing at once cannot break what the embedded backend gets from
//! running one write at a time.
//!
//! # Layout
//!
//! `store/migrations/*.sql` hold the schema. Every record is kept whole, as the JSON text of its
//! model type, in a `doc` column (text rather than jsonb: jsonb refuses the NUL character a command
//! or a file's content may carry); the columns beside it are the keys that queries use: ids,
//! names (collation "C", so that listings come in byte order), shards, labels (jsonb with a GIN
//! index), and the few fields that change in place (`uses`, `revoked`, `pending`, `fence`).
//! Parents are foreign keys: a record whose parent is missing is refused (NotFound) and the
//! cascading deletes of the conformance suite are `ON DELETE CASCADE`, so a delete racing an
//! insert on another node cannot leave an orphan behind.
//!
//! Every query touches one host, one token, one organization, or walks one listing by keyset
//! pagination (`WHERE key > $cursor ORDER BY key LIMIT n + 1`, never OFFSET); the cursor is the
//! hex of the last key returned, as in the embedded backend.
//!
//! # Fencing and concurrency
//!
//! Transactions run at READ COMMITTED and take row locks where a decision depends on what they
//! read. A fenced write (runtime, change append, change update) locks its host's row
//! (`SELECT fence ... FOR NO KEY UPDATE`), compares its epoch with the host's `fence` (the highest
//! epoch any fenced write carried), writes, and raises the fence, all in one transaction: of two
//! nodes racing, the second waits for the first's commit and then compares against what it wrote.
//! `use_enrollment_token` is one conditional `UPDATE ... WHERE uses < max_uses ... RETURNING`, which
//! PostgreSQL re-checks against the latest row version when writers queue on the row. Serialization
//! failures and deadlocks retry the whole transaction a few times.
//!
//! # Errors
//!
//! Unique violations are `Conflict`, missing parents `NotFound`, and everything else `Backend`. A
//! lost connection is `Backend` too, and then the outcome of a write is unknown: it may have
//! committed.
//!
//! # Connections
//!
//! A small pool of its own: at most `max_connections` clients, behind a semaphore, reused while
//! they stay open. Statements are bounded by `statement_timeout` and lock waits by `lock_timeout`
//! (set at connection). Plain TCP, no TLS.
//!
//! # Schema versions
//!
//! [`PgStore::connect`] applies the migrations the database lacks, in order, inside one transaction
//! holding an advisory lock (nodes starting together migrate once), and records each in
//! `schema_migrations`. A database with a version newer than this build knows is refused.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use comodit_protocol::{Epoch, HostId, Reply};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row};
use uuid::Uuid;

use crate::embedded::{
    check_page, claim_record, fact_matches, validate_host, validate_idempotency, validate_name,
    validate_secret_sha256, validate_text, MAX_KEY_BYTES, MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES, MAX_RECORD_BYTES, MAX_SETTINGS_PER_SCOPE, MAX_TEXT_BYTES,
    MAX_VERSION_BYTES,
};
use crate::model::*;
use crate::{Result, Store, StoreError};

/// One schema step, applied once, in `version` order.
pub struct Migration {
    pub version: u64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every schema step this build knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "idempotency keys",
        sql: include_str!("../migrations/0002_idempotency.sql"),
    },
    Migration {
        version: 3,
        name: "jobs listed per organization",
        sql: include_str!("../migrations/0003_jobs_by_org.sql"),
    },
];

/// The schema version this build writes: the last migration's.
pub const SCHEMA_VERSION: u64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Held (as a transaction-scoped advisory lock) while migrating: "comodit" in ASCII.
const MIGRATION_LOCK: i64 = 0x0063_6f6d_6f64_6974;

/// How many times a transaction runs when it hits a serialization failure or a deadlock.
const MAX_ATTEMPTS: u32 = 4;

/// Longest wait for a free connection of the pool.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Session settings of every connection: statements and lock waits are bounded, and a transaction
/// left open by a vanished client does not hold its locks for ever.
const SESSION_OPTIONS: &str = "-c statement_timeout=30s -c lock_timeout=10s \
                               -c idle_in_transaction_session_timeout=60s";

/// Rows one `list_hosts` query reads when a fact filter (checked here, not in SQL) is given.
const FACT_SCAN_BATCH: i64 = 256;

/// The store in a PostgreSQL database. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`), with
    /// at most `max_connections` connections, and brings its schema up to [`SCHEMA_VERSION`].
    /// Fails if the server does not answer, if the schema is newer than this build, or if a
    /// migration fails (the database then stays as it was).
    pub async fn connect(url: &str, max_connections: usize) -> Result<PgStore> {
        if max_connections == 0 {
            return Err(StoreError::Invalid(
                "max_connections must be at least 1".into(),
            ));
        }
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("not a postgres url: {e}")))?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .application_name("comodit")
            .options(SESSION_OPTIONS);
        let pool = Arc::new(Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(max_connections)),
        });
        let store = PgStore { pool };
        let mut conn = store.pool.get().await?;
        let version = migrate(&mut conn, MIGRATIONS).await?;
        tracing::debug!(schema_version = version, "postgres store ready");
        Ok(store)
    }
}

/// Applies the migrations the database lacks; returns the resulting schema version.
async fn migrate(client: &mut Client, migrations: &[Migration]) -> Result<u64> {
    let current = migrations.last().map_or(0, |m| m.version);
    let t = client.transaction().await.map_err(pg)?;
    t.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    t.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    bigint PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg)?;
    let applied: BTreeSet<i64> = t
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(pg)?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<std::result::Result<_, _>>()
        .map_err(pg)?;
    if let Some(&newest) = applied.last() {
        if newest as u64 > current {
            return Err(StoreError::Backend(format!(
                "schema version {newest} is newer than this build knows ({current}): \
                 refusing to use the database (run a newer comodit, or restore a backup)"
            )));
        }
    }
    for m in migrations {
        let version = m.version as i64;
        if applied.contains(&version) {
            continue;
        }
        tracing::info!(version, name = m.name, "applying store migration");
        t.batch_execute(m.sql).await.map_err(|e| {
            StoreError::Backend(format!(
                "migration {} ({}) failed: {}",
                m.version,
                m.name,
                pg(e)
            ))
        })?;
        t.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &m.name],
        )
        .await
        .map_err(pg)?;
    }
    t.commit().await.map_err(pg)?;
    Ok(current)
}

// --- the pool --------------------------------------------------------------------------------

struct Pool {
    config: Config,
    /// Open connections not in use.
    idle: Mutex<Vec<Client>>,
    /// One permit per connection that may exist.
    permits: Arc<Semaphore>,
}

impl Pool {
    async fn get(self: &Arc<Self>) -> Result<Conn> {
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                StoreError::Backend(format!(
                    "no database connection free after {ACQUIRE_TIMEOUT:?}"
                ))
            })?
            .map_err(|_| StoreError::Backend("the connection pool is closed".into()))?;
        let reused = loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                Some(client) if client.is_closed() => continue,
                other => break other,
            }
        };
        let client = match reused {
            Some(client) => client,
            None => self.open().await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self.clone(),
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<Client> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| {
            StoreError::Backend(format!("cannot connect to the postgres store: {e}"))
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres store connection ended");
            }
        });
        Ok(client)
    }
}

/// A connection on loan from the pool; it goes back when dropped, unless it closed. (A transaction
/// dropped unfinished has already queued its ROLLBACK on it.)
struct Conn {
    client: Option<Client>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(client);
            }
        }
    }
}

// --- errors ----------------------------------------------------------------------------------

/// What a transaction body fails with: a decision of ours, or a database error (which may be
/// worth a retry).
enum Fail {
    Store(StoreError),
    Pg(tokio_postgres::Error),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<Fail> for StoreError {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Store(e) => e,
            Fail::Pg(e) => pg(e),
        }
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// The generic mapping of a database error; call sites that know better (which parent is
/// missing, which name is taken) map those cases first with [`on_unique`] and [`on_missing`].
fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let constraint = db.constraint().unwrap_or("?");
        return if *code == SqlState::UNIQUE_VIOLATION {
            StoreError::Conflict(format!("the record exists (constraint {constraint})"))
        } else if *code == SqlState::FOREIGN_KEY_VIOLATION {
            StoreError::NotFound(format!(
                "a record this one refers to (constraint {constraint})"
            ))
        } else if retryable(&e) {
            StoreError::Backend(format!(
                "postgres: {} (after {MAX_ATTEMPTS} attempts)",
                db.message()
            ))
        } else if *code == SqlState::PROGRAM_LIMIT_EXCEEDED {
            StoreError::Invalid(format!("too large for the store: {}", db.message()))
        } else {
            StoreError::Backend(format!("postgres: {}", db.message()))
        };
    }
    if e.is_closed() {
        StoreError::Backend(format!(
            "the postgres store connection was lost (a write's outcome is unknown): {e}"
        ))
    } else {
        StoreError::Backend(format!("postgres: {e}"))
    }
}

/// A unique violation as `Conflict(message(constraint))`; other errors unchanged.
fn on_unique(e: tokio_postgres::Error, message: impl FnOnce(&str) -> String) -> Fail {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::UNIQUE_VIOLATION => {
            Fail::Store(StoreError::Conflict(message(db.constraint().unwrap_or(""))))
        }
        _ => Fail::Pg(e),
    }
}

/// A foreign key violation (a missing parent) as `NotFound(message(constraint))`.
fn on_missing(e: tokio_postgres::Error, message: impl FnOnce(&str) -> String) -> Fail {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::FOREIGN_KEY_VIOLATION => {
            Fail::Store(StoreError::NotFound(message(db.constraint().unwrap_or(""))))
        }
        _ => Fail::Pg(e),
    }
}

/// Runs `$body` in one transaction bound to `$t`, committed if the body gets to its end (an early
/// `return Err(..)` or `?` drops it, which rolls back). Retries the whole body on serialization
/// failures and deadlocks. Evaluates to `Result<T>`.
macro_rules! transaction {
    ($store:expr, |$t:ident| $body:block) => {{
        let pool = &$store.pool;
        let mut attempt = 1;
        loop {
            let outcome: std::result::Result<_, Fail> = async {
                let mut conn = pool.get().await?;
                let $t = conn.transaction().await?;
                let out = $body;
                $t.commit().await?;
                Ok(out)
            }
            .await;
            match outcome {
                Err(Fail::Pg(e)) if retryable(&e) && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "retrying a store transaction");
                    attempt += 1;
                }
                other => break other.map_err(StoreError::from),
            }
        }
    }};
}

// --- encoding --------------------------------------------------------------------------------

fn enc<T: Serialize>(what: &str, v: &T) -> Result<String> {
    let text = serde_json::to_string(v)
        .map_err(|e| StoreError::Backend(format!("cannot encode {what}: {e}")))?;
    if text.len() > MAX_RECORD_BYTES {
        return Err(StoreError::Invalid(format!(
            "{what} is {} bytes, more than the {MAX_RECORD_BYTES} a record may hold",
            text.len()
        )));
    }
    Ok(text)
}

fn dec<T: DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Backend(format!("corrupt {what} record: {e}")))
}

/// Column `i` of `row` as the JSON text of a `T`.
fn doc<T: DeserializeOwned>(what: &str, row: &Row, i: usize) -> Result<T> {
    let text: String = row.try_get(i).map_err(pg)?;
    dec(what, &text)
}

fn col<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(pg)
}

fn unsigned(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("corrupt {what}: {v}")))
}

/// An epoch as the bigint the database keeps; epochs past 2^63 - 1 are refused.
fn epoch_param(e: Epoch) -> Result<i64> {
    i64::try_from(e.0)
        .map_err(|_| StoreError::Invalid(format!("epoch {} is beyond what the store keeps", e.0)))
}

fn check_fence(given: Epoch, stored: Epoch) -> Result<()> {
    if given < stored {
        Err(StoreError::StaleEpoch { given, stored })
    } else {
        Ok(())
    }
}

fn scope_parts(scope: &SettingScope) -> (i16, Uuid, &'static str) {
    match scope {
        SettingScope::Org { org } => (0, org.0, "organization"),
        SettingScope::Env { env } => (1, env.0, "environment"),
        SettingScope::Host { host } => (2, host.0, "host"),
    }
}

// --- pagination ------------------------------------------------------------------------------

/// The validated limit and the cursor's bytes (Invalid if the cursor is not `len` bytes, when
/// a length is given).
fn page_args(page: &Page, len: Option<usize>) -> Result<(i64, Option<Vec<u8>>)> {
    let cursor = check_page(page)?;
    if let (Some(c), Some(len)) = (&cursor, len) {
        if c.len() != len {
            return Err(bad_cursor(page));
        }
    }
    Ok((i64::from(page.limit), cursor))
}

fn bad_cursor(page: &Page) -> StoreError {
    StoreError::Invalid(format!(
        "not a cursor of this listing: {:?}",
        page.cursor.as_deref().unwrap_or_default()
    ))
}

fn uuid_cursor(page: &Page) -> Result<(i64, Option<Uuid>)> {
    let (limit, cursor) = page_args(page, Some(16))?;
    let after = cursor
        .map(|c| Uuid::from_slice(&c).map_err(|_| bad_cursor(page)))
        .transpose()?;
    Ok((limit, after))
}

fn seq_cursor(page: &Page) -> Result<(i64, Option<i64>)> {
    let (limit, cursor) = page_args(page, Some(8))?;
    let after = cursor.map(|c| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&c);
        i64::from_be_bytes(b)
    });
    Ok((limit, after))
}

fn text_cursor(page: &Page) -> Result<(i64, Option<String>)> {
    let (limit, cursor) = page_args(page, None)?;
    let after = cursor
        .map(|c| String::from_utf8(c).map_err(|_| bad_cursor(page)))
        .transpose()?;
    Ok((limit, after))
}

/// The page from `items` (read with `LIMIT limit + 1`): the extra item, if there, means more.
fn paged<T>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> Vec<u8>) -> Paged<T> {
    let limit = limit as usize;
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more {
        items.last().map(|last| hex::encode(key(last)))
    } else {
        None
    };
    Paged { items, next }
}

fn docs<T: DeserializeOwned>(what: &str, rows: &[Row]) -> Result<Vec<T>> {
    rows.iter().map(|row| doc(what, row, 0)).collect()
}

// --- tokens ----------------------------------------------------------------------------------

/// An enrollment token from `doc, uses, revoked`.
fn enrollment_token(row: &Row) -> Result<EnrollmentToken> {
    let mut token: EnrollmentToken = doc("enrollment token", row, 0)?;
    let uses: i64 = col(row, 1)?;
    token.uses = u32::try_from(uses)
        .map_err(|_| StoreError::Backend(format!("corrupt enrollment token uses: {uses}")))?;
    token.revoked = col(row, 2)?;
    Ok(token)
}

/// An API token from `doc, revoked`.
fn api_token(row: &Row) -> Result<ApiToken> {
    let mut token: ApiToken = doc("API token", row, 0)?;
    token.revoked = col(row, 1)?;
    Ok(token)
}

// --- the trait -------------------------------------------------------------------------------

impl PgStore {
    async fn conn(&self) -> Result<Conn> {
        self.pool.get().await
    }

    async fn one<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>> {
        let conn = self.conn().await?;
        match conn.query_opt(sql, params).await.map_err(pg)? {
            Some(row) => doc(what, &row, 0).map(Some),
            None => Ok(None),
        }
    }

    async fn all(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let conn = self.conn().await?;
        conn.query(sql, params).await.map_err(pg)
    }

    /// Runs `sql`, an UPDATE or DELETE of the one row whose id is `$1`; NotFound(`what`) if
    /// there is none.
    async fn change_one(&self, sql: &str, id: Uuid, what: String) -> Result<()> {
        let conn = self.conn().await?;
        let n = conn.execute(sql, &[&id]).await.map_err(pg)?;
        if n == 0 {
            return Err(StoreError::NotFound(what));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for PgStore {
    // --- organizations and environments -------------------------------------------------------

    async fn create_org(&self, org: &Organization) -> Result<()> {
        validate_name("organization", &org.name)?;
        let org = Organization {
            version: 1,
            ..org.clone()
        };
        let text = enc("organization", &org)?;
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO orgs (id, name, doc) VALUES ($1, $2, $3)",
            &[&org.id.0, &org.name, &text],
        )
        .await
        .map_err(|e| {
            on_unique(e, |c| match c {
                "orgs_name_key" => format!("organization name {:?} is taken", org.name),
                _ => format!("organization {} exists", org.id),
            })
        })?;
        Ok(())
    }

    async fn get_org(&self, id: OrgId) -> Result<Option<Organization>> {
        self.one(
            "organization",
            "SELECT doc FROM orgs WHERE id = $1",
            &[&id.0],
        )
        .await
    }

    async fn get_org_by_name(&self, name: &str) -> Result<Option<Organization>> {
        self.one(
            "organization",
            "SELECT doc FROM orgs WHERE name = $1",
            &[&name],
        )
        .await
    }

    async fn list_orgs(&self, page: &Page) -> Result<Paged<Organization>> {
        let (limit, after) = text_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc FROM orgs WHERE $1::text IS NULL OR name > $1
                 ORDER BY name LIMIT $2",
                &[&after, &(limit + 1)],
            )
            .await?;
        Ok(paged(
            docs("organization", &rows)?,
            limit,
            |o: &Organization| o.name.as_bytes().to_vec(),
        ))
    }

    async fn delete_org(&self, id: OrgId) -> Result<()> {
        transaction!(self, |t| {
            let row = t
                .query_opt("SELECT doc FROM orgs WHERE id = $1 FOR UPDATE", &[&id.0])
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("organization {id}")))?;
            let org: Organization = doc("organization", &row, 0)?;
            let has_envs: bool = t
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM envs WHERE org = $1)",
                    &[&id.0],
                )
                .await?
                .try_get(0)?;
            if has_envs {
                return Err(StoreError::Conflict(format!(
                    "organization {:?} still has environments",
                    org.name
                ))
                .into());
            }
            // Applications, enrollment tokens and settings go with it (ON DELETE CASCADE).
            t.execute("DELETE FROM orgs WHERE id = $1", &[&id.0])
                .await?;
        })
    }

    async fn create_env(&self, env: &Environment) -> Result<()> {
        validate_name("environment", &env.name)?;
        let env = Environment {
            version: 1,
            ..env.clone()
        };
        let text = enc("environment", &env)?;
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO envs (id, org, name, doc) VALUES ($1, $2, $3, $4)",
            &[&env.id.0, &env.org.0, &env.name, &text],
        )
        .await
        .map_err(|e| {
            let e = on_missing(e, |_| format!("organization {}", env.org));
            match e {
                Fail::Pg(e) => on_unique(e, |c| match c {
                    "envs_org_name_key" => format!(
                        "environment name {:?} is taken in organization {}",
                        env.name, env.org
                    ),
                    _ => format!("environment {} exists", env.id),
                }),
                other => other,
            }
        })?;
        Ok(())
    }

    async fn get_env(&self, id: EnvId) -> Result<Option<Environment>> {
        self.one(
            "environment",
            "SELECT doc FROM envs WHERE id = $1",
            &[&id.0],
        )
        .await
    }

    async fn get_env_by_name(&self, org: OrgId, name: &str) -> Result<Option<Environment>> {
        self.one(
            "environment",
            "SELECT doc FROM envs WHERE org = $1 AND name = $2",
            &[&org.0, &name],
        )
        .await
    }

    async fn list_envs(&self, org: OrgId, page: &Page) -> Result<Paged<Environment>> {
        let (limit, after) = text_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc FROM envs WHERE org = $1 AND ($2::text IS NULL OR name > $2)
                 ORDER BY name LIMIT $3",
                &[&org.0, &after, &(limit + 1)],
            )
            .await?;
        Ok(paged(
            docs("environment", &rows)?,
            limit,
            |e: &Environment| e.name.as_bytes().to_vec(),
        ))
    }

    async fn delete_env(&self, id: EnvId) -> Result<()> {
        transaction!(self, |t| {
            let row = t
                .query_opt("SELECT doc FROM envs WHERE id = $1 FOR UPDATE", &[&id.0])
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("environment {id}")))?;
            let env: Environment = doc("environment", &row, 0)?;
            let has_hosts: bool = t
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM hosts WHERE env = $1)",
                    &[&id.0],
                )
                .await?
                .try_get(0)?;
            if has_hosts {
                return Err(StoreError::Conflict(format!(
                    "environment {:?} still has hosts",
                    env.name
                ))
                .into());
            }
            // Its settings go with it; its enrollment tokens stay, unusable.
            t.execute("DELETE FROM envs WHERE id = $1", &[&id.0])
                .await?;
        })
    }

    // --- hosts --------------------------------------------------------------------------------

    async fn create_host(&self, host: &Host) -> Result<Host> {
        validate_host(host)?;
        let host = Host {
            version: 1,
            ..host.clone()
        };
        let text = enc("host", &host)?;
        let labels = enc("labels", &host.labels)?;
        transaction!(self, |t| {
            // The key-share lock keeps the environment from going away before the commit.
            let env_org: Uuid = t
                .query_opt(
                    "SELECT org FROM envs WHERE id = $1 FOR KEY SHARE",
                    &[&host.env.0],
                )
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("environment {}", host.env)))?
                .try_get(0)?;
            if env_org != host.org.0 {
                return Err(StoreError::Invalid(format!(
                    "environment {} belongs to organization {}, not {}",
                    host.env, env_org, host.org
                ))
                .into());
            }
            t.execute(
                "INSERT INTO hosts (id, org, env, shard, labels, version, doc)
                 VALUES ($1, $2, $3, $4, $5::text::jsonb, 1, $6)",
                &[
                    &host.id.0,
                    &host.org.0,
                    &host.env.0,
                    &i64::from(host.shard),
                    &labels,
                    &text,
                ],
            )
            .await
            .map_err(|e| on_unique(e, |_| format!("host {} exists", host.id)))?;
            host.clone()
        })
    }

    async fn get_host(&self, id: HostId) -> Result<Option<Host>> {
        self.one("host", "SELECT doc FROM hosts WHERE id = $1", &[&id.0])
            .await
    }

    async fn update_host(&self, host: &Host, expected_version: u64) -> Result<Host> {
        validate_host(host)?;
        transaction!(self, |t| {
            let row = t
                .query_opt(
                    "SELECT doc FROM hosts WHERE id = $1 FOR NO KEY UPDATE",
                    &[&host.id.0],
                )
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("host {}", host.id)))?;
            let stored: Host = doc("host", &row, 0)?;
            if stored.version != expected_version {
                return Err(StoreError::VersionMismatch {
                    expected: expected_version,
                    found: stored.version,
                }
                .into());
            }
            let updated = Host {
                name: host.name.clone(),
                labels: host.labels.clone(),
                version: stored.version + 1,
                ..stored
            };
            let version = i64::try_from(updated.version)
                .map_err(|_| StoreError::Backend("host version overflow".into()))?;
            t.execute(
                "UPDATE hosts SET labels = $2::text::jsonb, version = $3, doc = $4 WHERE id = $1",
                &[
                    &host.id.0,
                    &enc("labels", &updated.labels)?,
                    &version,
                    &enc("host", &updated)?,
                ],
            )
            .await?;
            updated
        })
    }

    async fn delete_host(&self, id: HostId) -> Result<()> {
        // Its runtime record, change log, job results and settings go with it (ON DELETE CASCADE).
        self.change_one(
            "DELETE FROM hosts WHERE id = $1",
            id.0,
            format!("host {id}"),
        )
        .await
    }

    async fn list_hosts(&self, filter: &HostFilter, page: &Page) -> Result<Paged<Host>> {
        if let Some((k, v)) = &filter.label {
            validate_text("label key", k, 1, MAX_LABEL_KEY_BYTES)?;
            validate_text(&format!("label {k:?}"), v, 0, MAX_LABEL_VALUE_BYTES)?;
        }
        let (limit, mut after) = uuid_cursor(page)?;
        // Every filter but the fact one is SQL; the fact one is checked here, as the embedded
        // backend does, reading on in batches until the page is full.
        let mut sql = String::from(
            "SELECT h.id, h.doc, r.doc FROM hosts h LEFT JOIN runtime r ON r.host = h.id WHERE true",
        );
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            sql.push_str(&clause.replace('$', &format!("${}", params.len())));
        };
        if let Some(org) = filter.org {
            arg(&mut sql, " AND h.org = $", Box::new(org.0));
        }
        if let Some(env) = filter.env {
            arg(&mut sql, " AND h.env = $", Box::new(env.0));
        }
        if let Some(shard) = filter.shard {
            arg(&mut sql, " AND h.shard = $", Box::new(i64::from(shard)));
        }
        if let Some((k, v)) = &filter.label {
            let one = serde_json::json!({ k: v }).to_string();
            arg(&mut sql, " AND h.labels @> $::text::jsonb", Box::new(one));
        }
        if let Some(online) = filter.online {
            arg(
                &mut sql,
                " AND coalesce(r.online, false) = $",
                Box::new(online),
            );
        }
        let after_at = params.len() + 1;
        let limit_at = params.len() + 2;
        sql.push_str(&format!(
            " AND (${after_at}::uuid IS NULL OR h.id > ${after_at}) ORDER BY h.id LIMIT ${limit_at}"
        ));
        let batch = if filter.fact.is_some() {
            FACT_SCAN_BATCH.max(limit + 1)
        } else {
            limit + 1
        };
        let conn = self.conn().await?;
        let statement = conn.prepare(&sql).await.map_err(pg)?;
        let mut hosts = Vec::new();
        loop {
            let mut refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p.as_ref() as _).collect();
            refs.push(&after);
            refs.push(&batch);
            let rows = conn.query(&statement, &refs).await.map_err(pg)?;
            let exhausted = (rows.len() as i64) < batch;
            for row in &rows {
                after = Some(col(row, 0)?);
                if let Some((name, want)) = &filter.fact {
                    let runtime: Option<String> = col(row, 2)?;
                    let runtime: Option<HostRuntime> =
                        runtime.map(|r| dec("runtime", &r)).transpose()?;
                    let facts = runtime.as_ref().and_then(|r| r.facts.as_ref());
                    if !facts.is_some_and(|facts| fact_matches(facts, name, want)) {
                        continue;
                    }
                }
                hosts.push(doc::<Host>("host", row, 1)?);
                if hosts.len() as i64 > limit {
                    break;
                }
            }
            if exhausted || hosts.len() as i64 > limit {
                break;
            }
        }
        Ok(paged(hosts, limit, |h: &Host| h.id.0.as_bytes().to_vec()))
    }

    // --- host runtime (fenced) ----------------------------------------------------------------

    async fn put_runtime(&self, rt: &HostRuntime) -> Result<()> {
        let epoch = epoch_param(rt.epoch)?;
        let text = enc("runtime", rt)?;
        transaction!(self, |t| {
            let fence = lock_host(&t, rt.host).await?.0;
            check_fence(rt.epoch, fence)?;
            t.execute(
                "INSERT INTO runtime (host, online, doc) VALUES ($1, $2, $3)
                 ON CONFLICT (host) DO UPDATE SET online = excluded.online, doc = excluded.doc",
                &[&rt.host.0, &rt.online, &text],
            )
            .await?;
            raise_fence(&t, rt.host, fence, epoch).await?;
        })
    }

    async fn get_runtime(&self, host: HostId) -> Result<Option<HostRuntime>> {
        self.one(
            "runtime",
            "SELECT doc FROM runtime WHERE host = $1",
            &[&host.0],
        )
        .await
    }

    // --- change log ---------------------------------------------------------------------------

    async fn append_change(&self, change: &Change) -> Result<Change> {
        let epoch = epoch_param(change.epoch)?;
        transaction!(self, |t| {
            let (fence, shard) = lock_host(&t, change.host).await?;
            check_fence(change.epoch, fence)?;
            // The host's row lock makes this the only append to the host's log right now.
            let last: i64 = t
                .query_one(
                    "SELECT coalesce(max(seq), 0) FROM changes WHERE host = $1",
                    &[&change.host.0],
                )
                .await?
                .try_get(0)?;
            let stored = Change {
                seq: unsigned("change seq", last)? + 1,
                ..change.clone()
            };
            t.execute(
                "INSERT INTO changes (host, seq, id, shard, pending, doc)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &change.host.0,
                    &(last + 1),
                    &change.id.0,
                    &shard,
                    &stored.status.is_pending(),
                    &enc("change", &stored)?,
                ],
            )
            .await
            .map_err(|e| {
                on_unique(e, |_| {
                    format!("change {} of host {} exists", change.id, change.host)
                })
            })?;
            if let Some(job) = stored.job {
                put_job_result_in(&t, &JobResult::of(&stored, job)).await?;
            }
            raise_fence(&t, change.host, fence, epoch).await?;
            stored
        })
    }

    async fn get_change(&self, host: HostId, id: ChangeId) -> Result<Option<Change>> {
        self.one(
            "change",
            "SELECT doc FROM changes WHERE host = $1 AND id = $2",
            &[&host.0, &id.0],
        )
        .await
    }

    async fn update_change(
        &self,
        host: HostId,
        id: ChangeId,
        status: ChangeStatus,
        reply: Option<Reply>,
        epoch: Epoch,
    ) -> Result<Change> {
        let epoch_value = epoch_param(epoch)?;
        let not_found = || StoreError::NotFound(format!("change {id} of host {host}"));
        transaction!(self, |t| {
            let fence = match lock_host(&t, host).await {
                Ok((fence, _)) => fence,
                Err(Fail::Store(StoreError::NotFound(_))) => return Err(not_found().into()),
                Err(e) => return Err(e),
            };
            let row = t
                .query_opt(
                    "SELECT seq, doc FROM changes WHERE host = $1 AND id = $2",
                    &[&host.0, &id.0],
                )
                .await?
                .ok_or_else(not_found)?;
            let seq: i64 = col(&row, 0)?;
            let mut change: Change = doc("change", &row, 1)?;
            check_fence(epoch, fence.max(change.epoch))?;
            change.status = status;
            if reply.is_some() {
                change.reply = reply.clone();
            }
            change.epoch = epoch;
            change.updated_at = Utc::now();
            t.execute(
                "UPDATE changes SET pending = $3, doc = $4 WHERE host = $1 AND seq = $2",
                &[
                    &host.0,
                    &seq,
                    &status.is_pending(),
                    &enc("change", &change)?,
                ],
            )
            .await?;
            if let Some(job) = change.job {
                put_job_result_in(&t, &JobResult::of(&change, job)).await?;
            }
            raise_fence(&t, host, fence, epoch_value).await?;
            change
        })
    }

    async fn list_changes(&self, host: HostId, page: &Page) -> Result<Paged<Change>> {
        let (limit, before) = seq_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc FROM changes WHERE host = $1 AND ($2::bigint IS NULL OR seq < $2)
                 ORDER BY seq DESC LIMIT $3",
                &[&host.0, &before, &(limit + 1)],
            )
            .await?;
        Ok(paged(docs("change", &rows)?, limit, |c: &Change| {
            c.seq.to_be_bytes().to_vec()
        }))
    }

    async fn pending_changes(&self, host: HostId) -> Result<Vec<Change>> {
        let rows = self
            .all(
                "SELECT doc FROM changes WHERE host = $1 AND pending ORDER BY seq",
                &[&host.0],
            )
            .await?;
        docs("change", &rows)
    }

    async fn hosts_with_pending_changes(&self, shard: u32) -> Result<Vec<HostId>> {
        let rows = self
            .all(
                "SELECT DISTINCT host FROM changes WHERE shard = $1 AND pending ORDER BY host",
                &[&i64::from(shard)],
            )
            .await?;
        rows.iter().map(|row| col(row, 0).map(HostId)).collect()
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
        let text = enc("enrollment token", token)?;
        transaction!(self, |t| {
            let env_org: Uuid = t
                .query_opt(
                    "SELECT org FROM envs WHERE id = $1 FOR KEY SHARE",
                    &[&token.env.0],
                )
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("environment {}", token.env)))?
                .try_get(0)?;
            if env_org != token.org.0 {
                return Err(StoreError::Invalid(format!(
                    "environment {} belongs to organization {}, not {}",
                    token.env, env_org, token.org
                ))
                .into());
            }
            t.execute(
                "INSERT INTO enroll_tokens (id, org, env, secret_sha256, created_us, expires_us,
                                            max_uses, uses, revoked, doc)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    &token.id.0,
                    &token.org.0,
                    &token.env.0,
                    &token.secret_sha256,
                    &token.created_at.timestamp_micros(),
                    &token.expires_at.timestamp_micros(),
                    &token.max_uses.map(i64::from),
                    &i64::from(token.uses),
                    &token.revoked,
                    &text,
                ],
            )
            .await
            .map_err(|e| {
                on_unique(e, |c| match c {
                    "enroll_tokens_secret_sha256_key" => {
                        "an enrollment token with this secret exists".into()
                    }
                    _ => format!("enrollment token {} exists", token.id),
                })
            })?;
        })
    }

    async fn get_enrollment_token(&self, id: TokenId) -> Result<Option<EnrollmentToken>> {
        let conn = self.conn().await?;
        conn.query_opt(
            "SELECT doc, uses, revoked FROM enroll_tokens WHERE id = $1",
            &[&id.0],
        )
        .await
        .map_err(pg)?
        .map(|row| enrollment_token(&row))
        .transpose()
    }

    async fn list_enrollment_tokens(
        &self,
        org: OrgId,
        page: &Page,
    ) -> Result<Paged<EnrollmentToken>> {
        let (limit, before_at, before_id) = time_id_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc, uses, revoked FROM enroll_tokens
                 WHERE org = $1 AND ($2::bigint IS NULL OR (created_us, id) < ($2, $3::uuid))
                 ORDER BY created_us DESC, id DESC LIMIT $4",
                &[&org.0, &before_at, &before_id, &(limit + 1)],
            )
            .await?;
        let tokens = rows
            .iter()
            .map(enrollment_token)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(tokens, limit, |t: &EnrollmentToken| {
            time_id_key(t.created_at, t.id.0)
        }))
    }

    async fn use_enrollment_token(
        &self,
        secret_sha256: &str,
        now: DateTime<Utc>,
    ) -> Result<EnrollmentToken> {
        let now_us = now.timestamp_micros();
        let conn = self.conn().await?;
        // One statement: writers queue on the row and each re-checks the conditions against the
        // row as the one before it left it, so `uses` never passes `max_uses`.
        let used = conn
            .query_opt(
                "UPDATE enroll_tokens t SET uses = uses + 1
                 WHERE secret_sha256 = $1 AND NOT revoked AND $2 < expires_us
                   AND (max_uses IS NULL OR uses < max_uses)
                   AND EXISTS (SELECT 1 FROM envs e WHERE e.id = t.env)
                 RETURNING doc, uses, revoked",
                &[&secret_sha256, &now_us],
            )
            .await
            .map_err(pg)?;
        if let Some(row) = used {
            return enrollment_token(&row);
        }
        // Refused: say why. (A token only ever becomes less usable, so what is read now explains
        // the refusal.)
        let row = conn
            .query_opt(
                "SELECT doc, uses, revoked, EXISTS (SELECT 1 FROM envs e WHERE e.id = t.env)
                 FROM enroll_tokens t WHERE secret_sha256 = $1",
                &[&secret_sha256],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| StoreError::NotFound("enrollment token".into()))?;
        let token = enrollment_token(&row)?;
        let env_exists: bool = col(&row, 3)?;
        let why = if token.revoked {
            "is revoked".to_string()
        } else if now_us >= token.expires_at.timestamp_micros() {
            format!("expired at {}", token.expires_at)
        } else if token.max_uses.is_some_and(|max| token.uses >= max) {
            format!("is used up ({} uses)", token.uses)
        } else if !env_exists {
            "cannot be used: its environment no longer exists".to_string()
        } else {
            "was not usable at the time of use".to_string()
        };
        Err(StoreError::TokenUnusable(format!(
            "enrollment token {} {why}",
            token.id
        )))
    }

    async fn release_enrollment_token_use(&self, id: TokenId) -> Result<()> {
        self.change_one(
            "UPDATE enroll_tokens SET uses = GREATEST(uses - 1, 0) WHERE id = $1",
            id.0,
            format!("enrollment token {id}"),
        )
        .await
    }

    async fn revoke_enrollment_token(&self, id: TokenId) -> Result<()> {
        self.change_one(
            "UPDATE enroll_tokens SET revoked = true WHERE id = $1",
            id.0,
            format!("enrollment token {id}"),
        )
        .await
    }

    // --- API tokens ---------------------------------------------------------------------------

    async fn create_api_token(&self, token: &ApiToken) -> Result<()> {
        validate_secret_sha256(&token.secret_sha256)?;
        validate_text("token name", &token.name, 1, MAX_KEY_BYTES)?;
        let text = enc("API token", token)?;
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO api_tokens (id, secret_sha256, revoked, doc) VALUES ($1, $2, $3, $4)",
            &[&token.id.0, &token.secret_sha256, &token.revoked, &text],
        )
        .await
        .map_err(|e| {
            on_unique(e, |c| match c {
                "api_tokens_secret_sha256_key" => "an API token with this secret exists".into(),
                _ => format!("API token {} exists", token.id),
            })
        })?;
        Ok(())
    }

    async fn find_api_token(&self, secret_sha256: &str) -> Result<Option<ApiToken>> {
        let conn = self.conn().await?;
        conn.query_opt(
            "SELECT doc, revoked FROM api_tokens WHERE secret_sha256 = $1 AND NOT revoked",
            &[&secret_sha256],
        )
        .await
        .map_err(pg)?
        .map(|row| api_token(&row))
        .transpose()
    }

    async fn list_api_tokens(&self, page: &Page) -> Result<Paged<ApiToken>> {
        let (limit, after) = uuid_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc, revoked FROM api_tokens WHERE $1::uuid IS NULL OR id > $1
                 ORDER BY id LIMIT $2",
                &[&after, &(limit + 1)],
            )
            .await?;
        let tokens = rows.iter().map(api_token).collect::<Result<Vec<_>>>()?;
        Ok(paged(tokens, limit, |t: &ApiToken| {
            t.id.0.as_bytes().to_vec()
        }))
    }

    async fn revoke_api_token(&self, id: TokenId) -> Result<()> {
        self.change_one(
            "UPDATE api_tokens SET revoked = true WHERE id = $1",
            id.0,
            format!("API token {id}"),
        )
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
        let text = enc("idempotency record", &record)?;
        let lease_us = lease_until.timestamp_micros();
        transaction!(self, |t| {
            // A racing claim's insert makes this one wait for its commit, then do nothing.
            let inserted = t
                .execute(
                    "INSERT INTO idempotency_keys (token, key, expires_us, doc)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[&token.0, &key, &lease_us, &text],
                )
                .await?;
            if inserted == 1 {
                IdempotencyClaim::Claimed
            } else {
                let row = t
                    .query_one(
                        "SELECT doc FROM idempotency_keys WHERE token = $1 AND key = $2
                         FOR UPDATE",
                        &[&token.0, &key],
                    )
                    .await?;
                let old: IdempotencyRecord = doc("idempotency record", &row, 0)?;
                match old.verdict(fingerprint, now) {
                    Some(verdict) => verdict,
                    None => {
                        t.execute(
                            "UPDATE idempotency_keys SET expires_us = $3, doc = $4
                             WHERE token = $1 AND key = $2",
                            &[&token.0, &key, &lease_us, &text],
                        )
                        .await?;
                        IdempotencyClaim::Claimed
                    }
                }
            }
        })
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
        let keep_us = keep_until.timestamp_micros();
        transaction!(self, |t| {
            let row = t
                .query_opt(
                    "SELECT doc FROM idempotency_keys WHERE token = $1 AND key = $2 FOR UPDATE",
                    &[&token.0, &key],
                )
                .await?;
            let old: Option<IdempotencyRecord> = match row {
                Some(row) => Some(doc("idempotency record", &row, 0)?),
                None => None,
            };
            let ours = old.filter(|o| o.fingerprint == fingerprint && o.response.is_none());
            match (ours, &response) {
                (None, _) => {}
                (Some(_), None) => {
                    t.execute(
                        "DELETE FROM idempotency_keys WHERE token = $1 AND key = $2",
                        &[&token.0, &key],
                    )
                    .await?;
                }
                (Some(old), Some(r)) => {
                    let kept = IdempotencyRecord {
                        expires_at: keep_until,
                        response: Some(r.clone()),
                        ..old
                    };
                    let text = enc("idempotency record", &kept)?;
                    t.execute(
                        "UPDATE idempotency_keys SET expires_us = $3, doc = $4
                         WHERE token = $1 AND key = $2",
                        &[&token.0, &key, &keep_us, &text],
                    )
                    .await?;
                }
            }
        })
    }

    async fn purge_idempotency_keys(&self, now: DateTime<Utc>) -> Result<u64> {
        let conn = self.conn().await?;
        conn.execute(
            "DELETE FROM idempotency_keys WHERE expires_us < $1",
            &[&now.timestamp_micros()],
        )
        .await
        .map_err(pg)
    }

    // --- audit log ----------------------------------------------------------------------------

    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64> {
        let conn = self.conn().await?;
        // A sequence: concurrent appends get distinct, increasing numbers (an append that fails
        // leaves a gap).
        let seq: i64 = conn
            .query_one("SELECT nextval('audit_seq')", &[])
            .await
            .map_err(pg)?
            .try_get(0)
            .map_err(pg)?;
        let entry = AuditEntry {
            seq: unsigned("audit seq", seq)?,
            ..entry.clone()
        };
        conn.execute(
            "INSERT INTO audit (seq, doc) VALUES ($1, $2)",
            &[&seq, &enc("audit entry", &entry)?],
        )
        .await
        .map_err(pg)?;
        Ok(entry.seq)
    }

    async fn list_audit(&self, page: &Page) -> Result<Paged<AuditEntry>> {
        let (limit, before) = seq_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc FROM audit WHERE $1::bigint IS NULL OR seq < $1
                 ORDER BY seq DESC LIMIT $2",
                &[&before, &(limit + 1)],
            )
            .await?;
        Ok(paged(
            docs("audit entry", &rows)?,
            limit,
            |e: &AuditEntry| e.seq.to_be_bytes().to_vec(),
        ))
    }

    // --- applications, settings, jobs ---------------------------------------------------------

    async fn put_application(&self, app: &Application) -> Result<()> {
        validate_text("application name", &app.name, 1, MAX_KEY_BYTES)?;
        validate_text("application version", &app.version, 1, MAX_VERSION_BYTES)?;
        let text = enc("application", app)?;
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO apps (org, name, version, doc) VALUES ($1, $2, $3, $4)",
            &[&app.org.0, &app.name, &app.version, &text],
        )
        .await
        .map_err(
            |e| match on_missing(e, |_| format!("organization {}", app.org)) {
                Fail::Pg(e) => on_unique(e, |_| {
                    format!(
                        "application {:?} version {:?} exists (versions are immutable)",
                        app.name, app.version
                    )
                }),
                other => other,
            },
        )?;
        Ok(())
    }

    async fn get_application(
        &self,
        org: OrgId,
        name: &str,
        version: &str,
    ) -> Result<Option<Application>> {
        self.one(
            "application",
            "SELECT doc FROM apps WHERE org = $1 AND name = $2 AND version = $3",
            &[&org.0, &name, &version],
        )
        .await
    }

    async fn list_applications(&self, org: OrgId, page: &Page) -> Result<Paged<Application>> {
        let (limit, after) = text_cursor(page)?;
        let after = after
            .map(|c| {
                c.split_once('\0')
                    .map(|(n, v)| (n.to_owned(), v.to_owned()))
                    .ok_or_else(|| bad_cursor(page))
            })
            .transpose()?;
        let (name, version) = (
            after.as_ref().map(|a| a.0.as_str()),
            after.as_ref().map(|a| a.1.as_str()),
        );
        let rows = self
            .all(
                "SELECT doc FROM apps
                 WHERE org = $1 AND ($2::text IS NULL OR (name, version) > ($2, $3::text))
                 ORDER BY name, version LIMIT $4",
                &[&org.0, &name, &version, &(limit + 1)],
            )
            .await?;
        Ok(paged(
            docs("application", &rows)?,
            limit,
            |a: &Application| format!("{}\0{}", a.name, a.version).into_bytes(),
        ))
    }

    async fn put_setting(&self, setting: &Setting) -> Result<()> {
        validate_text("setting key", &setting.key, 1, MAX_KEY_BYTES)?;
        let text = enc("setting", setting)?;
        let (kind, scope, what) = scope_parts(&setting.scope);
        let parent = match kind {
            0 => "SELECT 1 FROM orgs WHERE id = $1 FOR NO KEY UPDATE",
            1 => "SELECT 1 FROM envs WHERE id = $1 FOR NO KEY UPDATE",
            _ => "SELECT 1 FROM hosts WHERE id = $1 FOR NO KEY UPDATE",
        };
        transaction!(self, |t| {
            // Locking the parent serializes the writers of one scope, so the count holds.
            if t.query_opt(parent, &[&scope]).await?.is_none() {
                return Err(StoreError::NotFound(format!("{what} {scope}")).into());
            }
            let exists: bool = t
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM settings WHERE kind = $1 AND scope = $2 AND key = $3)",
                    &[&kind, &scope, &setting.key],
                )
                .await?
                .try_get(0)?;
            if !exists {
                let count: i64 = t
                    .query_one(
                        "SELECT count(*) FROM settings WHERE kind = $1 AND scope = $2",
                        &[&kind, &scope],
                    )
                    .await?
                    .try_get(0)?;
                if count >= MAX_SETTINGS_PER_SCOPE as i64 {
                    return Err(StoreError::Invalid(format!(
                        "{what} {scope} has {MAX_SETTINGS_PER_SCOPE} settings, the most one scope holds"
                    ))
                    .into());
                }
            }
            let (org, env, host) = (
                (kind == 0).then_some(scope),
                (kind == 1).then_some(scope),
                (kind == 2).then_some(scope),
            );
            t.execute(
                "INSERT INTO settings (kind, scope, key, org, env, host, doc)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (kind, scope, key) DO UPDATE SET doc = excluded.doc",
                &[&kind, &scope, &setting.key, &org, &env, &host, &text],
            )
            .await?;
        })
    }

    async fn get_setting(&self, scope: &SettingScope, key: &str) -> Result<Option<Setting>> {
        let (kind, scope, _) = scope_parts(scope);
        self.one(
            "setting",
            "SELECT doc FROM settings WHERE kind = $1 AND scope = $2 AND key = $3",
            &[&kind, &scope, &key],
        )
        .await
    }

    async fn list_settings(&self, scope: &SettingScope) -> Result<Vec<Setting>> {
        let (kind, scope, _) = scope_parts(scope);
        let rows = self
            .all(
                "SELECT doc FROM settings WHERE kind = $1 AND scope = $2 ORDER BY key",
                &[&kind, &scope],
            )
            .await?;
        docs("setting", &rows)
    }

    async fn delete_setting(&self, scope: &SettingScope, key: &str) -> Result<()> {
        let (kind, scope, _) = scope_parts(scope);
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "DELETE FROM settings WHERE kind = $1 AND scope = $2 AND key = $3",
                &[&kind, &scope, &key],
            )
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("setting {key:?}")));
        }
        Ok(())
    }

    async fn create_job(&self, job: &Job) -> Result<()> {
        let job = Job {
            version: 1,
            ..job.clone()
        };
        let text = enc("job", &job)?;
        transaction!(self, |t| {
            // Jobs have no foreign key on their organization (they outlive it); the key-share
            // lock keeps it from going away before the commit.
            if t.query_opt(
                "SELECT 1 FROM orgs WHERE id = $1 FOR KEY SHARE",
                &[&job.org.0],
            )
            .await?
            .is_none()
            {
                return Err(StoreError::NotFound(format!("organization {}", job.org)).into());
            }
            t.execute(
                "INSERT INTO jobs (id, org, version, doc, created_us) VALUES ($1, $2, 1, $3, $4)",
                &[
                    &job.id.0,
                    &job.org.0,
                    &text,
                    &job.created_at.timestamp_micros(),
                ],
            )
            .await
            .map_err(|e| on_unique(e, |_| format!("job {} exists", job.id)))?;
        })
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        self.one("job", "SELECT doc FROM jobs WHERE id = $1", &[&id.0])
            .await
    }

    async fn list_jobs(&self, org: OrgId, page: &Page) -> Result<Paged<Job>> {
        let (limit, before_at, before_id) = time_id_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc FROM jobs
                 WHERE org = $1 AND ($2::bigint IS NULL OR (created_us, id) < ($2, $3::uuid))
                 ORDER BY created_us DESC, id DESC LIMIT $4",
                &[&org.0, &before_at, &before_id, &(limit + 1)],
            )
            .await?;
        Ok(paged(docs("job", &rows)?, limit, |j: &Job| {
            time_id_key(j.created_at, j.id.0)
        }))
    }

    async fn update_job_status(
        &self,
        id: JobId,
        status: JobStatus,
        expected_version: u64,
    ) -> Result<Job> {
        transaction!(self, |t| {
            let row = t
                .query_opt("SELECT doc FROM jobs WHERE id = $1 FOR UPDATE", &[&id.0])
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
            let mut job: Job = doc("job", &row, 0)?;
            if job.version != expected_version {
                return Err(StoreError::VersionMismatch {
                    expected: expected_version,
                    found: job.version,
                }
                .into());
            }
            job.status = status;
            job.version += 1;
            let version = i64::try_from(job.version)
                .map_err(|_| StoreError::Backend("job version overflow".into()))?;
            t.execute(
                "UPDATE jobs SET version = $2, doc = $3 WHERE id = $1",
                &[&id.0, &version, &enc("job", &job)?],
            )
            .await?;
            job
        })
    }

    async fn put_job_result(&self, result: &JobResult) -> Result<()> {
        let conn = self.conn().await?;
        put_job_result_in(&*conn, result)
            .await
            .map_err(StoreError::from)
    }

    async fn job_counts(&self, job: JobId) -> Result<JobCounts> {
        let rows = self
            .all(
                "SELECT (doc::jsonb) ->> 'status', count(*) FROM job_results WHERE job = $1
                 GROUP BY 1",
                &[&job.0],
            )
            .await?;
        let mut counts = JobCounts::default();
        for row in &rows {
            let status: String = col(row, 0)?;
            let n: i64 = col(row, 1)?;
            let status: ChangeStatus = serde_json::from_value(serde_json::Value::String(status))
                .map_err(|e| StoreError::Backend(format!("job result status: {e}")))?;
            *counts.slot(status) = unsigned("job count", n)?;
        }
        Ok(counts)
    }

    async fn list_job_results(&self, job: JobId, page: &Page) -> Result<Paged<JobResult>> {
        let (limit, after) = uuid_cursor(page)?;
        let rows = self
            .all(
                "SELECT doc FROM job_results WHERE job = $1 AND ($2::uuid IS NULL OR host > $2)
                 ORDER BY host LIMIT $3",
                &[&job.0, &after, &(limit + 1)],
            )
            .await?;
        Ok(paged(docs("job result", &rows)?, limit, |r: &JobResult| {
            r.host.0.as_bytes().to_vec()
        }))
    }
}

// --- newest-first listings ---------------------------------------------------------------------

/// The page size and the `(created_us, id)` to list before, of a newest-first listing's page.
fn time_id_cursor(page: &Page) -> Result<(i64, Option<i64>, Option<Uuid>)> {
    let (limit, cursor) = page_args(page, Some(24))?;
    let before = cursor
        .map(|c| {
            let mut at = [0u8; 8];
            at.copy_from_slice(&c[..8]);
            Uuid::from_slice(&c[8..])
                .map(|id| (i64::from_be_bytes(at), id))
                .map_err(|_| bad_cursor(page))
        })
        .transpose()?;
    Ok((limit, before.map(|b| b.0), before.map(|b| b.1)))
}

/// The cursor of a newest-first listing's item: its creation time and id.
fn time_id_key(created_at: DateTime<Utc>, id: Uuid) -> Vec<u8> {
    let mut key = created_at.timestamp_micros().to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

// --- job results -----------------------------------------------------------------------------

/// Writes (or replaces) a job's result for one host, on a connection or in a transaction.
async fn put_job_result_in(
    c: &impl tokio_postgres::GenericClient,
    result: &JobResult,
) -> std::result::Result<(), Fail> {
    c.execute(
        "INSERT INTO job_results (job, host, doc) VALUES ($1, $2, $3)
         ON CONFLICT (job, host) DO UPDATE SET doc = excluded.doc",
        &[&result.job.0, &result.host.0, &enc("job result", result)?],
    )
    .await
    .map_err(|e| {
        on_missing(e, |c| match c {
            "job_results_job_fkey" => format!("job {}", result.job),
            _ => format!("host {}", result.host),
        })
    })?;
    Ok(())
}

// --- fencing ---------------------------------------------------------------------------------

/// Locks the host's row for the rest of the transaction; returns its fence and shard (NotFound
/// if there is no such host).
async fn lock_host(
    t: &tokio_postgres::Transaction<'_>,
    host: HostId,
) -> std::result::Result<(Epoch, i64), Fail> {
    let row = t
        .query_opt(
            "SELECT fence, shard FROM hosts WHERE id = $1 FOR NO KEY UPDATE",
            &[&host.0],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("host {host}")))?;
    let fence: i64 = col(&row, 0)?;
    Ok((Epoch(unsigned("fence", fence)?), col(&row, 1)?))
}

/// Raises the host's fence to `epoch` if that is higher than `stored` (under [`lock_host`]'s lock).
async fn raise_fence(
    t: &tokio_postgres::Transaction<'_>,
    host: HostId,
    stored: Epoch,
    epoch: i64,
) -> std::result::Result<(), Fail> {
    if epoch as u64 > stored.0 {
        t.execute(
            "UPDATE hosts SET fence = $2 WHERE id = $1",
            &[&host.0, &epoch],
        )
        .await?;
    }
    Ok(())
}
