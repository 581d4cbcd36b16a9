//! The agent's local state: what must survive a restart of the agent.
//!
//! Lives in the state directory (mode 0700):
//! - `credentials.json` (0600): the host id and its broker password, written at enrollment;
//! - `agent.redb`: an embedded store with the highest epoch accepted, the de-duplication window of
//!   recent command ids with their replies, the monitored baseline, and the current drift.
//!
//! Every write is a redb transaction, durable when the call returns: a reply is recorded before it is
//! published and the delivery acked, so a redelivered command is answered from here, not re-run.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use comodit_protocol::{
    CommandId, DriftReport, Epoch, HostId, Reply, Resource, ResourceRef, Secret,
};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("local store: {0}")]
    Store(String),
}

impl From<redb::Error> for StateError {
    fn from(e: redb::Error) -> Self {
        StateError::Store(e.to_string())
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self {
                StateError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// The host's identity and broker secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub host: HostId,
    pub password: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ host: {}, password: <redacted> }}",
            self.host
        )
    }
}

/// Creates `dir` (and parents) if needed and forces mode 0700 on it.
pub fn ensure_state_dir(dir: &Path) -> Result<(), StateError> {
    let err = |source| StateError::Dir {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}

pub fn credentials_path(dir: &Path) -> PathBuf {
    dir.join("credentials.json")
}

/// Writes the credentials atomically with mode 0600.
pub fn write_credentials(dir: &Path, creds: &Credentials) -> Result<(), StateError> {
    ensure_state_dir(dir)?;
    let path = credentials_path(dir);
    let tmp = dir.join(".credentials.json.tmp");
    let err = |source| StateError::Dir {
        path: path.clone(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&serde_json::to_vec_pretty(creds).expect("credentials serialize"))
        .map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    Ok(())
}

/// Reads the credentials; refuses a file others can read.
pub fn read_credentials(dir: &Path) -> Result<Credentials, StateError> {
    let path = credentials_path(dir);
    let bad = |reason: String| StateError::Credentials {
        path: path.clone(),
        reason,
    };
    let meta = fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others read it; expected 0600",
            meta.permissions().mode() & 0o777
        )));
    }
    let bytes = fs::read(&path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))
}

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// command id → (sequence, reply JSON; empty while the command is executing)
const DEDUP: TableDefinition<&[u8], (u64, &[u8])> = TableDefinition::new("dedup");
/// sequence → command id, to evict the oldest entries
const DEDUP_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_order");
/// "collection:id" → drift report JSON
const DRIFT: TableDefinition<&str, &[u8]> = TableDefinition::new("drift");

const KEY_EPOCH: &str = "epoch";
const KEY_BASELINE: &str = "baseline";
const KEY_SCHEMA: &str = "schema";
const SCHEMA_VERSION: &[u8] = b"1";

/// What the de-duplication window knows of a command id.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    New,
    /// Started but no reply was recorded: the agent stopped while executing it.
    Interrupted,
    Done(Box<Reply>),
}

/// The embedded local store.
pub struct LocalStore {
    db: Database,
    dedup_window: usize,
}

impl LocalStore {
    /// Opens (or creates) `agent.redb` in `dir`. `dedup_window` bounds the remembered command ids.
    pub fn open(dir: &Path, dedup_window: usize) -> Result<Self, StateError> {
        ensure_state_dir(dir)?;
        // A small cache: the agent's store is tiny and its memory budget is a few MiB.
        let db = Database::builder()
            .set_cache_size(1 << 20)
            .create(dir.join("agent.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let schema = meta.get(KEY_SCHEMA)?.map(|v| v.value().to_vec());
            match schema {
                None => {
                    meta.insert(KEY_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(StateError::Store(format!(
                        "unknown schema version {:?}; this agent reads version 1",
                        String::from_utf8_lossy(&v)
                    )))
                }
            }
            txn.open_table(DEDUP)?;
            txn.open_table(DEDUP_ORDER)?;
            txn.open_table(DRIFT)?;
        }
        txn.commit()?;
        Ok(LocalStore {
            db,
            dedup_window: dedup_window.max(1),
        })
    }

    pub fn epoch(&self) -> Result<Epoch, StateError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(match meta.get(KEY_EPOCH)? {
            Some(v) => Epoch(u64::from_be_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| StateError::Store("corrupt epoch".into()))?,
            )),
            None => Epoch(0),
        })
    }

    /// Accepts `epoch` if it is not lower than the highest seen, and records it.
    /// Returns the highest epoch seen before on refusal.
    pub fn accept_epoch(&self, epoch: Epoch) -> Result<Result<(), Epoch>, StateError> {
        let txn = self.db.begin_write()?;
        let outcome;
        {
            let mut meta = txn.open_table(META)?;
            let current = match meta.get(KEY_EPOCH)? {
                Some(v) => u64::from_be_bytes(
                    v.value()
                        .try_into()
                        .map_err(|_| StateError::Store("corrupt epoch".into()))?,
                ),
                None => 0,
            };
            if epoch.0 < current {
                outcome = Err(Epoch(current));
            } else {
                if epoch.0 > current {
                    meta.insert(KEY_EPOCH, epoch.0.to_be_bytes().as_slice())?;
                }
                outcome = Ok(());
            }
        }
        txn.commit()?;
        Ok(outcome)
    }

    pub fn seen(&self, id: CommandId) -> Result<Seen, StateError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DEDUP)?;
        let Some(entry) = t.get(id.0.as_bytes().as_slice())? else {
            return Ok(Seen::New);
        };
        let (_, reply) = entry.value();
        if reply.is_empty() {
            return Ok(Seen::Interrupted);
        }
        Ok(Seen::Done(Box::new(serde_json::from_slice(reply)?)))
    }

    /// Records that `id` is about to execute (so a crash mid-way is known after restart).
    pub fn mark_started(&self, id: CommandId) -> Result<(), StateError> {
        self.record(id, &[])
    }

    /// Records the reply of `id`, evicting the oldest ids beyond the window.
    pub fn record_reply(&self, id: CommandId, reply: &Reply) -> Result<(), StateError> {
        self.record(id, &serde_json::to_vec(reply)?)
    }

    fn record(&self, id: CommandId, reply: &[u8]) -> Result<(), StateError> {
        let key = id.0.as_bytes().as_slice();
        let txn = self.db.begin_write()?;
        {
            let mut dedup = txn.open_table(DEDUP)?;
            let mut order = txn.open_table(DEDUP_ORDER)?;
            let existing = dedup.get(key)?.map(|e| e.value().0);
            let seq = match existing {
                Some(seq) => seq,
                None => {
                    let next = order.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
                    order.insert(next, key)?;
                    next
                }
            };
            dedup.insert(key, (seq, reply))?;
            while order.len()? as usize > self.dedup_window {
                let Some((_, oldest)) = order.pop_first()? else {
                    break;
                };
                dedup.remove(oldest.value())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Number of command ids remembered.
    pub fn dedup_len(&self) -> Result<usize, StateError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(DEDUP)?.len()? as usize)
    }

    /// The monitored baseline, in order.
    pub fn baseline(&self) -> Result<Vec<Resource>, StateError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        match meta.get(KEY_BASELINE)? {
            Some(v) => Ok(serde_json::from_slice(v.value())?),
            None => Ok(Vec::new()),
        }
    }

    pub fn set_baseline(&self, resources: &[Resource]) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(resources)?;
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert(KEY_BASELINE, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn drift(&self) -> Result<Vec<DriftReport>, StateError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DRIFT)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    pub fn set_drift(&self, report: &DriftReport) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(report)?;
        let key = report.r#ref.to_string();
        let txn = self.db.begin_write()?;
        txn.open_table(DRIFT)?
            .insert(key.as_str(), bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn clear_drift(&self, r: &ResourceRef) -> Result<(), StateError> {
        let key = r.to_string();
        let txn = self.db.begin_write()?;
        txn.open_table(DRIFT)?.remove(key.as_str())?;
        txn.commit()?;
        Ok(())
    }
}

/// The digest of a baseline sent in `hello`: sha256 of its canonical JSON.
pub fn baseline_digest(resources: &[Resource]) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(resources).expect("resources serialize");
    hex::encode(sha2::Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use comodit_protocol::{Status, V1};

    fn reply(id: CommandId) -> Reply {
        Reply {
            v: V1,
            re: Some(id),
            host: HostId::random(),
            status: Status::Ok,
            reason: None,
            results: vec![],
            data: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
        }
    }

    #[test]
    fn epochs_only_grow_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LocalStore::open(dir.path(), 10).unwrap();
            assert_eq!(s.epoch().unwrap(), Epoch(0));
            assert_eq!(s.accept_epoch(Epoch(5)).unwrap(), Ok(()));
            assert_eq!(s.accept_epoch(Epoch(5)).unwrap(), Ok(()));
            assert_eq!(s.accept_epoch(Epoch(4)).unwrap(), Err(Epoch(5)));
        }
        let s = LocalStore::open(dir.path(), 10).unwrap();
        assert_eq!(s.epoch().unwrap(), Epoch(5));
        assert_eq!(s.accept_epoch(Epoch(3)).unwrap(), Err(Epoch(5)));
    }

    #[test]
    fn dedup_window_is_bounded_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<CommandId> = (0..5).map(|_| CommandId::random()).collect();
        {
            let s = LocalStore::open(dir.path(), 3).unwrap();
            for id in &ids {
                assert_eq!(s.seen(*id).unwrap(), Seen::New);
                s.mark_started(*id).unwrap();
                assert_eq!(s.seen(*id).unwrap(), Seen::Interrupted);
                s.record_reply(*id, &reply(*id)).unwrap();
            }
            // Exactly at the limit: the 3 newest are kept.
            assert_eq!(s.dedup_len().unwrap(), 3);
        }
        let s = LocalStore::open(dir.path(), 3).unwrap();
        assert_eq!(s.seen(ids[0]).unwrap(), Seen::New);
        assert_eq!(s.seen(ids[1]).unwrap(), Seen::New);
        for id in &ids[2..] {
            assert!(matches!(s.seen(*id).unwrap(), Seen::Done(r) if r.re == Some(*id)));
        }
    }

    #[test]
    fn credentials_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let creds = Credentials {
            host: HostId::random(),
            password: Secret::new("s3cret"),
        };
        write_credentials(&state, &creds).unwrap();
        let mode = fs::metadata(credentials_path(&state))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(read_credentials(&state).unwrap().host, creds.host);
        assert!(!format!("{creds:?}").contains("s3cret"));
        fs::set_permissions(credentials_path(&state), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_credentials(&state).is_err());
    }
}
