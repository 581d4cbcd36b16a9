//! [`FileLogStore`]: the durable [`LogStore`] of a real node, in one redb file.
//!
//! DESIGN §7: "Raft log and hard state persist locally, fsync'd before messages that depend on
//! them are sent". The split of that duty:
//!
//! - **this store** makes every mutating call durable before it returns: each one is a single redb
//!   write transaction committed with `Durability::Immediate` (redb's default, which fsyncs);
//! - **the driver** ([`crate::raft_node::RaftNode::ready`]) calls the store *before* it hands out
//!   the messages that depend on what was written (votes, append acks), and the caller must send
//!   only the messages `ready` returned, after it returned.
//!
//! Reads never touch the disk: the store keeps a [`MemLogStore`] mirror of the file and serves
//! raft's [`Storage`] queries from it, so the validation rules (gap, compacted, beyond last) are
//! exactly the in-memory store's. Each mutation is first checked and applied on the mirror, then
//! written to the file.
//!
//! **Layout.** Table `raft_entries`: log index → protobuf-encoded `Entry`. Table `raft_meta`:
//! `"hard_state"` and `"snapshot"` → protobuf-encoded `HardState` / `Snapshot` (the snapshot's
//! metadata carries the conf state the node restarts with, as in [`MemLogStore`]). These bytes
//! come from our own disk, never from the network, so decoding them with protobuf is not the
//! RUSTSEC-2024-0437 exposure the transport guards against.
//!
//! **Write failures.** [`StoreError`] (shared with the simulator's store) has no variant for an
//! IO failure, and raft cannot continue after a lost write anyway: a failed commit panics with the
//! file and the operation named. Opening the file returns [`FileStoreError`] instead.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{RaftState, Storage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::raft_node::{LogStore, MemLogStore, StoreError};
use crate::NodeId;

const ENTRIES: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const SNAPSHOT: &str = "snapshot";

/// Opening or reading back the store file failed.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    /// redb could not open or read the file.
    #[error("raft log file {path}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The file holds something this store did not write.
    #[error("raft log file {path} is damaged: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What did not fit.
        detail: String,
    },
}

/// A [`LogStore`] persisted in a redb file. See the module doc.
pub struct FileLogStore {
    db: Database,
    path: PathBuf,
    mem: MemLogStore,
}

impl std::fmt::Debug for FileLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLogStore")
            .field("path", &self.path)
            .field("first", &self.mem.first_index().ok())
            .field("last", &self.mem.last_index().ok())
            .finish()
    }
}

impl FileLogStore {
    /// Open (or create) the store at `path` and restore the hard state, the latest snapshot and
    /// the entries after it. Blocking (reads the whole log): call it at startup.
    pub fn open(path: &Path) -> Result<Self, FileStoreError> {
        let io = |e: &dyn std::fmt::Display| FileStoreError::Io {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let corrupt = |detail: String| FileStoreError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let db = Database::builder().create(path).map_err(|e| io(&e))?;
        // Create the tables on a fresh file so that reads find them.
        let txn = db.begin_write().map_err(|e| io(&e))?;
        txn.open_table(ENTRIES).map_err(|e| io(&e))?;
        txn.open_table(META).map_err(|e| io(&e))?;
        txn.commit().map_err(|e| io(&e))?;

        let txn = db.begin_read().map_err(|e| io(&e))?;
        let meta = txn.open_table(META).map_err(|e| io(&e))?;
        let hard_state = match meta.get(HARD_STATE).map_err(|e| io(&e))? {
            Some(g) => HardState::parse_from_bytes(g.value())
                .map_err(|e| corrupt(format!("hard state: {e}")))?,
            None => HardState::default(),
        };
        let snapshot = match meta.get(SNAPSHOT).map_err(|e| io(&e))? {
            Some(g) => Snapshot::parse_from_bytes(g.value())
                .map_err(|e| corrupt(format!("snapshot: {e}")))?,
            None => Snapshot::default(),
        };
        let mut entries = Vec::new();
        let table = txn.open_table(ENTRIES).map_err(|e| io(&e))?;
        for row in table.iter().map_err(|e| io(&e))? {
            let (k, v) = row.map_err(|e| io(&e))?;
            let entry = Entry::parse_from_bytes(v.value())
                .map_err(|e| corrupt(format!("entry {}: {e}", k.value())))?;
            if entry.index != k.value() {
                return Err(corrupt(format!(
                    "entry under key {} has index {}",
                    k.value(),
                    entry.index
                )));
            }
            entries.push(entry);
        }
        drop((meta, table, txn));

        // Rebuild the mirror through its public API, which re-checks the log is contiguous.
        let mut mem = MemLogStore::new();
        mem.apply_snapshot(snapshot)
            .map_err(|e| corrupt(format!("snapshot: {e}")))?;
        mem.append(&entries)
            .map_err(|e| corrupt(format!("entries: {e}")))?;
        mem.set_hard_state(&hard_state)
            .map_err(|e| corrupt(format!("hard state: {e}")))?;
        tracing::debug!(
            path = %path.display(),
            snapshot_index = mem.latest_snapshot().get_metadata().index,
            entries = entries.len(),
            term = hard_state.term,
            "raft log opened"
        );
        Ok(FileLogStore {
            db,
            path: path.to_path_buf(),
            mem,
        })
    }

    /// Open the store of a founding voter: on a fresh file, record the founding membership
    /// (every founder starts with the same one); on a file that already holds state (a restart),
    /// keep what is there.
    pub fn bootstrap(path: &Path, voters: &[NodeId]) -> Result<Self, FileStoreError> {
        let mut store = Self::open(path)?;
        let fresh = store.mem.latest_snapshot().get_metadata().index == 0
            && store.mem.log_entries().is_empty()
            && *store.mem.hard_state() == HardState::default()
            && store
                .mem
                .latest_snapshot()
                .get_metadata()
                .get_conf_state()
                .voters
                .is_empty();
        if fresh {
            let mut snap = Snapshot::default();
            snap.mut_metadata().mut_conf_state().voters = voters.to_vec();
            store
                .mem
                .apply_snapshot(snap.clone())
                .map_err(|e| FileStoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
            store.write("bootstrap", |txn| put_meta(txn, SNAPSHOT, &snap));
        }
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved hard state.
    pub fn hard_state(&self) -> &HardState {
        self.mem.hard_state()
    }

    /// The entries still in the log (after the snapshot).
    pub fn log_entries(&self) -> &[Entry] {
        self.mem.log_entries()
    }

    /// One durable write transaction; see the module doc for why a failure panics.
    fn write(&self, op: &str, f: impl FnOnce(&WriteTransaction) -> Result<(), redb::Error>) {
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            f(&txn)?;
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            panic!(
                "raft log file {}: {op} could not be made durable: {e}; raft cannot continue \
                 after a lost write",
                self.path.display()
            );
        }
    }
}

fn put_meta(
    txn: &WriteTransaction,
    key: &str,
    msg: &dyn protobuf::Message,
) -> Result<(), redb::Error> {
    let bytes = msg
        .write_to_bytes()
        .map_err(|e| redb::Error::Corrupted(format!("encoding {key}: {e}")))?;
    txn.open_table(META)?.insert(key, bytes.as_slice())?;
    Ok(())
}

impl Storage for FileLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.mem.snapshot(request_index, to)
    }
}

impl LogStore for FileLogStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        self.mem.append(entries)?;
        let from = head.index;
        self.write("append", |txn| {
            let mut table = txn.open_table(ENTRIES)?;
            // The conflicting suffix, if any, goes.
            table.retain_in(from.., |_, _| false)?;
            for e in entries {
                let bytes = e
                    .write_to_bytes()
                    .map_err(|err| redb::Error::Corrupted(format!("encoding entry: {err}")))?;
                table.insert(e.index, bytes.as_slice())?;
            }
            Ok(())
        });
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.mem.set_hard_state(hs)?;
        self.write("set_hard_state", |txn| put_meta(txn, HARD_STATE, hs));
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        self.mem.set_commit(commit)?;
        let hs = self.mem.hard_state().clone();
        self.write("set_commit", |txn| put_meta(txn, HARD_STATE, &hs));
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.mem.apply_snapshot(snapshot)?;
        let hs = self.mem.hard_state().clone();
        let snap = self.mem.latest_snapshot().clone();
        self.write("apply_snapshot", |txn| {
            txn.open_table(ENTRIES)?.retain(|_, _| false)?;
            put_meta(txn, SNAPSHOT, &snap)?;
            put_meta(txn, HARD_STATE, &hs)
        });
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let index = snapshot.get_metadata().index;
        self.mem.compact(snapshot)?;
        let snap = self.mem.latest_snapshot().clone();
        self.write("compact", |txn| {
            txn.open_table(ENTRIES)?.retain_in(..=index, |_, _| false)?;
            put_meta(txn, SNAPSHOT, &snap)
        });
        Ok(())
    }

    fn latest_snapshot(&self) -> &Snapshot {
        self.mem.latest_snapshot()
    }
}
