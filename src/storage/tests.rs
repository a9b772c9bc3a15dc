//! Unit tests that need the module's insides: damaged records written straight through heed, the
//! not-yet-committed entry table, and the fail-stop behaviour after a failed write.

use std::collections::BTreeMap;
// `declare_raft_types!` names `Cursor` for the default snapshot data type.
use std::io::Cursor;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, Vote,
};
use tokio::sync::oneshot;

use super::lmdb::{lock, SNAPSHOT_KEY, VOTE_KEY};
use super::{LmdbStore, LogStore, StateMachineApp, StorageError, StoreOptions, Table};

openraft::declare_raft_types!(
    /// Raft types of the unit tests: commands are strings.
    pub UnitConfig:
        D = String,
        R = usize,
        NodeId = u64,
        Node = BasicNode,
);

/// Keeps every command; answers with how many it has.
struct Recorder;

impl StateMachineApp<UnitConfig> for Recorder {
    type State = Vec<String>;

    fn apply(&self, state: &mut Vec<String>, _log_id: &LogId<u64>, request: &String) -> usize {
        state.push(request.clone());
        state.len()
    }

    fn empty_response(&self) -> usize {
        0
    }
}

fn entry(index: u64, command: &str) -> Entry<UnitConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(command.to_owned()),
    }
}

fn open(dir: &std::path::Path) -> (LmdbStore, LogStore<UnitConfig>) {
    let store = LmdbStore::open(dir, StoreOptions::default()).expect("open");
    let log = store.log_store();
    (store, log)
}

/// Writes `value` under `key` in the log database, bypassing the store (as a disk fault would).
fn put_raw_log(store: &LmdbStore, key: u64, value: &[u8]) {
    let env = store.lmdb.env();
    let mut txn = env.write_txn().expect("write txn");
    store
        .lmdb
        .databases()
        .log
        .put(&mut txn, &key, value)
        .expect("put");
    txn.commit().expect("commit");
}

#[tokio::test]
async fn garbage_bytes_in_a_log_entry_are_a_corrupt_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, mut log) = open(dir.path());
    log.blocking_append([entry(1, "a"), entry(2, "b"), entry(3, "c")])
        .await
        .expect("append");
    put_raw_log(&store, 2, &[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);

    let error = log
        .try_get_log_entries(0..)
        .await
        .expect_err("corrupt entry");
    let message = error.to_string();
    assert!(
        message.contains("corrupt record in the raft log"),
        "{message}"
    );
    assert!(message.contains("at key 2"), "{message}");
    // The entries before the damage are still readable.
    let first = log
        .try_get_log_entries(1..2)
        .await
        .expect("entry 1 is intact");
    assert_eq!(first, vec![entry(1, "a")]);

    // The last entry is decoded by get_log_state: damage there is an error too.
    put_raw_log(&store, 3, &[]);
    let error = log.get_log_state().await.expect_err("corrupt last entry");
    assert!(error.to_string().contains("record is empty"), "{error}");
}

#[tokio::test]
async fn log_entry_stored_under_another_index_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, mut log) = open(dir.path());
    log.blocking_append([entry(1, "a")]).await.expect("append");
    let bytes = super::codec::encode(&entry(1, "a")).expect("encode");
    put_raw_log(&store, 5, &bytes);
    let error = log.try_get_log_entries(5..6).await.expect_err("wrong key");
    assert!(
        error.to_string().contains("not the one of its key"),
        "{error}"
    );
}

#[tokio::test]
async fn garbage_vote_is_a_corrupt_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, mut log) = open(dir.path());
    log.save_vote(&Vote::new(1, 1)).await.expect("save vote");
    {
        let env = store.lmdb.env();
        let mut txn = env.write_txn().expect("write txn");
        store
            .lmdb
            .databases()
            .meta
            .put(&mut txn, VOTE_KEY, &[9, 9])
            .expect("put");
        txn.commit().expect("commit");
    }
    let error = log.read_vote().await.expect_err("corrupt vote");
    assert!(error.to_string().contains("format version 9"), "{error}");
}

#[test]
fn garbage_snapshot_record_makes_state_machine_open_fail() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (store, _log) = open(dir.path());
        let env = store.lmdb.env();
        let mut txn = env.write_txn().expect("write txn");
        store
            .lmdb
            .databases()
            .snapshot
            .put(&mut txn, SNAPSHOT_KEY, &[1, 2, 3])
            .expect("put");
        txn.commit().expect("commit");
    }
    let (store, _log) = open(dir.path());
    let error = store
        .state_machine::<UnitConfig, _>(Recorder)
        .err()
        .expect("corrupt snapshot");
    assert!(
        matches!(
            error,
            StorageError::Corrupt {
                table: Table::Snapshot,
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn appended_entries_are_readable_before_their_commit_and_in_lmdb_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, mut log) = open(dir.path());
    // Hold the storage thread inside a completion so the next job waits in the queue.
    let (release, released) = std::sync::mpsc::channel::<()>();
    store
        .lmdb
        .submit(
            Vec::new(),
            Box::new(move |_| {
                let _ = released.recv();
            }),
        )
        .await
        .expect("submit blocker");

    let (flushed, was_flushed) = oneshot::channel();
    log.append_then([entry(1, "a"), entry(2, "b")], move |result| {
        let _ = flushed.send(result);
    })
    .await
    .expect("append");

    let read = log.try_get_log_entries(0..).await.expect("read");
    assert_eq!(
        read,
        vec![entry(1, "a"), entry(2, "b")],
        "readable before the commit"
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id.map(|id| id.index), Some(2));
    {
        let txn = store.lmdb.read_txn().expect("read txn");
        let stored = store.lmdb.databases().log.len(&txn).expect("len");
        assert_eq!(stored, 0, "not in LMDB yet");
    }

    release.send(()).expect("release the storage thread");
    was_flushed
        .await
        .expect("completion ran")
        .expect("commit succeeded");
    assert!(
        lock(&store.lmdb.unflushed).last().is_none(),
        "unflushed table emptied"
    );
    let txn = store.lmdb.read_txn().expect("read txn");
    assert_eq!(store.lmdb.databases().log.len(&txn).expect("len"), 2);
}

#[tokio::test]
async fn full_map_fails_the_write_with_advice_and_stops_later_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LmdbStore::open(
        dir.path(),
        StoreOptions {
            map_size_bytes: 1 << 20,
            ..StoreOptions::default()
        },
    )
    .expect("open");
    let mut log: LogStore<UnitConfig> = store.log_store();
    let (flushed, was_flushed) = oneshot::channel();
    let big = "x".repeat(2 << 20);
    log.append_then([entry(1, &big)], move |result| {
        let _ = flushed.send(result);
    })
    .await
    .expect("queued");
    let error = was_flushed
        .await
        .expect("completion ran")
        .expect_err("map full");
    assert!(
        error.to_string().contains("raise it and restart"),
        "{error}"
    );
    // The failed entry is not readable, and nothing written afterwards is accepted.
    assert!(log.try_get_log_entries(0..).await.expect("read").is_empty());
    let later = log.save_vote(&Vote::new(1, 1)).await.expect_err("stopped");
    assert!(later.to_string().contains("restart the node"), "{later}");
}

#[tokio::test]
async fn in_memory_store_truncates_and_purges_like_lmdb() {
    // The in-memory backend follows the same rules as LMDB for purge and truncate.
    let (mut log, _state_machine) = super::memory::in_memory_for_tests::<UnitConfig, _>(Recorder);
    assert!(!log.is_durable());
    log.blocking_append((1..=5).map(|i| entry(i, "x")))
        .await
        .expect("append");
    log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
        .await
        .expect("truncate");
    log.purge(LogId::new(CommittedLeaderId::new(1, 1), 1))
        .await
        .expect("purge");
    let indexes: Vec<u64> = log
        .try_get_log_entries(0..)
        .await
        .expect("read")
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(indexes, vec![2, 3]);
}

#[tokio::test]
async fn membership_entries_update_the_applied_membership() {
    use openraft::storage::RaftStateMachine;
    let (_log, mut state_machine) = super::memory::in_memory_for_tests::<UnitConfig, _>(Recorder);
    let members = BTreeMap::from([(1, BasicNode::new("a")), (2, BasicNode::new("b"))]);
    let responses = state_machine
        .apply([
            entry(1, "one"),
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
                payload: EntryPayload::Membership(Membership::from(members)),
            },
        ])
        .await
        .expect("apply");
    assert_eq!(responses, vec![1, 0]);
    let applied = state_machine.applied();
    assert_eq!(applied.state, vec!["one".to_owned()]);
    assert_eq!(applied.membership.log_id().map(|id| id.index), Some(2));
}
