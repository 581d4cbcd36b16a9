//! `FileLogStore` behaves as `MemLogStore` (the reference the simulator checks Raft against), and
//! keeps everything across a reopen.

use comodit_cluster::log_store::FileLogStore;
use comodit_cluster::raft_node::{
    discard_logger, LogStore, MemLogStore, RaftNode, RaftNodeConfig, StoreError,
};
use comodit_cluster::state::Command;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("e{index}t{term}").into_bytes().into(),
        ..Entry::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn snapshot(index: u64, term: u64, voters: &[u64]) -> Snapshot {
    let mut s = Snapshot {
        data: format!("state@{index}").into_bytes().into(),
        ..Snapshot::default()
    };
    s.mut_metadata().index = index;
    s.mut_metadata().term = term;
    s.mut_metadata().mut_conf_state().voters = voters.to_vec();
    s
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Entry>),
    Hard(u64, u64, u64),
    Commit(u64),
    Install(Snapshot),
    Compact(Snapshot),
}

fn run(store: &mut impl LogStore, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::Append(es) => store.append(es),
        Op::Hard(term, vote, commit) => store.set_hard_state(&HardState {
            term: *term,
            vote: *vote,
            commit: *commit,
            ..HardState::default()
        }),
        Op::Commit(c) => store.set_commit(*c),
        Op::Install(s) => store.apply_snapshot(s.clone()),
        Op::Compact(s) => store.compact(s.clone()),
    }
}

/// Everything raft can observe of a store, for comparing two of them.
fn observe(store: &impl LogStore) -> String {
    let first = store.first_index().unwrap();
    let last = store.last_index().unwrap();
    let state = store.initial_state().unwrap();
    let mut out = format!(
        "first={first} last={last} hs={:?} cs={:?} snap={:?}\n",
        state.hard_state,
        state.conf_state,
        store.latest_snapshot()
    );
    for idx in first.saturating_sub(2)..=last + 1 {
        out += &format!("term({idx})={:?}\n", store.term(idx));
    }
    out += &format!(
        "entries={:?}\n",
        store.entries(first, last + 1, None, GetEntriesContext::empty(false))
    );
    out += &format!(
        "below={:?} beyond={:?}\n",
        store.entries(
            first.saturating_sub(1),
            last + 1,
            None,
            GetEntriesContext::empty(false)
        ),
        store.entries(first, last + 2, None, GetEntriesContext::empty(false))
    );
    out += &format!(
        "limited={:?}\n",
        store
            .entries(first, last + 1, Some(1), GetEntriesContext::empty(false))
            .map(|v| v.len())
    );
    out
}

/// A named sequence of operations and what each must return.
type Case = (&'static str, Vec<Op>, Vec<Result<(), StoreError>>);

fn cases() -> Vec<Case> {
    use Op::*;
    let ok = Ok(());
    vec![
        ("append", vec![Append(entries(1..=3, 1))], vec![ok.clone()]),
        (
            "conflicting suffix replaced",
            vec![Append(entries(1..=5, 1)), Append(entries(3..=4, 2))],
            vec![ok.clone(), ok.clone()],
        ),
        (
            "gap refused",
            vec![Append(entries(1..=2, 1)), Append(entries(4..=5, 1))],
            vec![ok.clone(), Err(StoreError::Gap { last: 2, first: 4 })],
        ),
        (
            "compact, then old index refused",
            vec![
                Append(entries(1..=6, 1)),
                Compact(snapshot(4, 1, &[1, 2])),
                Append(entries(2..=3, 2)),
                Compact(snapshot(9, 1, &[1, 2])),
                Compact(snapshot(2, 1, &[1, 2])),
                Append(entries(7..=8, 2)),
            ],
            vec![
                ok.clone(),
                ok.clone(),
                Err(StoreError::Compacted { index: 2, first: 5 }),
                Err(StoreError::BeyondLast { index: 9, last: 6 }),
                Err(StoreError::Compacted { index: 2, first: 5 }),
                ok.clone(),
            ],
        ),
        (
            "snapshot install replaces the log",
            vec![
                Append(entries(1..=3, 1)),
                Hard(1, 1, 2),
                Install(snapshot(10, 3, &[1, 2, 3])),
                Append(entries(11..=12, 3)),
                Install(snapshot(5, 1, &[1])),
            ],
            vec![
                ok.clone(),
                ok.clone(),
                ok.clone(),
                ok.clone(),
                Err(StoreError::Compacted {
                    index: 5,
                    first: 11,
                }),
            ],
        ),
        (
            "hard state and commit",
            vec![Append(entries(1..=4, 2)), Hard(2, 3, 1), Commit(4)],
            vec![ok.clone(), ok.clone(), ok.clone()],
        ),
        (
            "empty append is a no-op",
            vec![Append(vec![]), Append(entries(1..=1, 1)), Append(vec![])],
            vec![ok.clone(), ok.clone(), ok],
        ),
    ]
}

#[test]
fn file_store_matches_mem_store_and_survives_reopen() {
    for (name, ops, expected) in cases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let mut mem = MemLogStore::bootstrap(&[1, 2]);
        let mut file = FileLogStore::bootstrap(&path, &[1, 2]).unwrap();
        assert_eq!(observe(&file), observe(&mem), "{name}: initial");
        for (i, (op, want)) in ops.iter().zip(&expected).enumerate() {
            let m = run(&mut mem, op);
            let f = run(&mut file, op);
            assert_eq!(&m, want, "{name}: op {i} on the mem store");
            assert_eq!(&f, want, "{name}: op {i} on the file store");
            assert_eq!(observe(&file), observe(&mem), "{name}: after op {i}");
        }
        let before = observe(&file);
        drop(file);
        let reopened = FileLogStore::open(&path).unwrap();
        assert_eq!(observe(&reopened), before, "{name}: after reopen");
        assert_eq!(reopened.log_entries(), mem.log_entries(), "{name}");
        drop(reopened);
        // A restart of a founder must not overwrite its state with the founding membership.
        let rebooted = FileLogStore::bootstrap(&path, &[7]).unwrap();
        assert_eq!(
            observe(&rebooted),
            before,
            "{name}: bootstrap on an existing file"
        );
    }
}

#[test]
fn reopen_keeps_hard_state_entries_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let mut s = FileLogStore::bootstrap(&path, &[1, 2, 3]).unwrap();
        s.append(&entries(1..=8, 2)).unwrap();
        s.set_hard_state(&HardState {
            term: 3,
            vote: 2,
            commit: 6,
            ..HardState::default()
        })
        .unwrap();
        s.compact(snapshot(5, 2, &[1, 2, 3])).unwrap();
    }
    let s = FileLogStore::open(&path).unwrap();
    assert_eq!(
        (
            s.hard_state().term,
            s.hard_state().vote,
            s.hard_state().commit
        ),
        (3, 2, 6)
    );
    assert_eq!(s.first_index().unwrap(), 6);
    assert_eq!(s.last_index().unwrap(), 8);
    assert_eq!(s.term(5).unwrap(), 2);
    assert_eq!(s.latest_snapshot().get_data(), b"state@5");
    assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    let got = s
        .entries(6, 9, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(got, entries(6..=8, 2));
}

#[test]
fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    std::fs::write(
        &path,
        b"definitely not a redb file, just some bytes ........",
    )
    .unwrap();
    let err = FileLogStore::open(&path).unwrap_err();
    assert!(err.to_string().contains("raft.redb"), "{err}");
}

#[test]
fn raft_node_restarted_on_a_reopened_store_rebuilds_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let mut config = RaftNodeConfig::new(1);
    // Compact along the way, so the restart goes through a snapshot and a log tail.
    config.snapshot_interval = 3;
    let (term, commit, n_shards);
    {
        let store = FileLogStore::bootstrap(&path, &[1]).unwrap();
        let mut node = RaftNode::new(&config, store, &discard_logger()).unwrap();
        node.campaign().unwrap();
        node.ready().unwrap();
        assert!(node.is_leader());
        node.propose(&Command::Init { n_shards: 16 }).unwrap();
        node.ready().unwrap();
        for _ in 0..5 {
            // Entries that change nothing but move the log on (a second Init is rejected, and
            // rejected commands are still applied entries).
            node.propose(&Command::Init { n_shards: 99 }).unwrap();
            node.ready().unwrap();
        }
        term = node.term();
        commit = node.commit_index();
        n_shards = node.state().n_shards;
        assert_eq!(n_shards, 16);
        assert!(
            node.store().latest_snapshot().get_metadata().index > 0,
            "a snapshot was taken"
        );
        assert!(
            commit > node.store().latest_snapshot().get_metadata().index,
            "a log tail"
        );
    }
    let store = FileLogStore::open(&path).unwrap();
    assert_eq!(store.hard_state().term, term);
    assert_eq!(store.hard_state().commit, commit);
    let mut node = RaftNode::new(&config, store, &discard_logger()).unwrap();
    node.ready().unwrap();
    assert_eq!(node.term(), term);
    assert_eq!(node.commit_index(), commit);
    assert_eq!(
        node.state().applied_index,
        commit,
        "the log tail was re-applied"
    );
    assert_eq!(node.state().n_shards, 16);
    assert_eq!(node.conf_state().voters, vec![1]);
    // And it goes on: elected again in a later term, it commits new entries.
    node.campaign().unwrap();
    node.ready().unwrap();
    assert!(node.is_leader());
    assert!(node.term() > term);
    node.propose(&Command::Init { n_shards: 3 }).unwrap();
    node.ready().unwrap();
    assert!(node.commit_index() > commit);
}
