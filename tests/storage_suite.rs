//! Integration tests of the storage module: openraft's conformance suite on both stores, restart
//! recovery from LMDB, a single-node raft running on LMDB across a restart, and error reporting.
//! All data dirs are fresh temporary directories.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfunk::storage::memory::in_memory_for_tests;
use clusterfunk::storage::{
    LmdbStore, LogStore, StateMachineApp, StateMachineStore, StorageError, StoreOptions,
};
use futures_util::future::join_all;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

/// A command of the test application: add to a named counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds `by` to counter `key`.
    Add {
        /// Counter name.
        key: String,
        /// Amount added.
        by: u64,
    },
}

/// The test application's response: the counter's new value, if the entry was a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// New value of the counter.
    pub value: Option<u64>,
}

openraft::declare_raft_types!(
    /// Raft types of the storage tests.
    pub TestConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
);

type Counters = BTreeMap<String, u64>;

/// Named counters; counts `on_applied` calls so tests can see the hook fire.
#[derive(Default, Clone)]
struct CounterApp {
    on_applied_calls: Arc<AtomicUsize>,
}

impl StateMachineApp<TestConfig> for CounterApp {
    type State = Counters;

    fn apply(&self, state: &mut Counters, _log_id: &LogId<u64>, request: &Command) -> Response {
        match request {
            Command::Add { key, by } => {
                let value = state.entry(key.clone()).or_default();
                *value += by;
                Response {
                    value: Some(*value),
                }
            }
        }
    }

    fn empty_response(&self) -> Response {
        Response::default()
    }

    fn on_applied(&self, _state: &Counters) {
        self.on_applied_calls.fetch_add(1, Ordering::Relaxed);
    }
}

type TestLogStore = LogStore<TestConfig>;
type TestStateMachine = StateMachineStore<TestConfig, CounterApp>;

fn options() -> StoreOptions {
    StoreOptions {
        // Small, to show the option works; the tests write far less.
        map_size_bytes: 64 << 20,
        ..StoreOptions::default()
    }
}

fn open(dir: &Path) -> (LmdbStore, TestLogStore, TestStateMachine) {
    open_with(dir, options())
}

fn open_with(dir: &Path, options: StoreOptions) -> (LmdbStore, TestLogStore, TestStateMachine) {
    let store = LmdbStore::open(dir, options).expect("open LMDB store");
    let log = store.log_store();
    let state_machine = store
        .state_machine(CounterApp::default())
        .expect("open state machine");
    (store, log, state_machine)
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn add(term: u64, index: u64, key: &str, by: u64) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::Add {
            key: key.to_owned(),
            by,
        }),
    }
}

fn membership(term: u64, index: u64) -> Entry<TestConfig> {
    let members = BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]);
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::from(members)),
    }
}

struct LmdbBuilder;

impl StoreBuilder<TestConfig, TestLogStore, TestStateMachine, TempDir> for LmdbBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, TestLogStore, TestStateMachine), openraft::StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let store = LmdbStore::open(dir.path(), options())?;
        let log = store.log_store();
        let state_machine = store.state_machine(CounterApp::default())?;
        Ok((dir, log, state_machine))
    }
}

struct MemoryBuilder;

impl StoreBuilder<TestConfig, TestLogStore, TestStateMachine> for MemoryBuilder {
    async fn build(
        &self,
    ) -> Result<((), TestLogStore, TestStateMachine), openraft::StorageError<u64>> {
        let (log, state_machine) = in_memory_for_tests(CounterApp::default());
        Ok(((), log, state_machine))
    }
}

// Goal: the LMDB store meets every requirement openraft states for storage-v2 implementations.
// Method: openraft's own conformance suite, one fresh temp dir per store it builds.
#[test]
fn lmdb_store_passes_openraft_conformance_suite() {
    if let Err(error) = Suite::test_all(LmdbBuilder) {
        panic!("conformance suite failed on the LMDB store: {error}");
    }
}

// Goal: the test-only in-memory store behaves exactly like the durable one towards openraft.
// Method: the same conformance suite.
#[test]
fn in_memory_store_passes_openraft_conformance_suite() {
    if let Err(error) = Suite::test_all(MemoryBuilder) {
        panic!("conformance suite failed on the in-memory store: {error}");
    }
}

// Goal: everything raft needs after a crash comes back from the data dir (protocol rule 7).
// Method: write vote, log, committed id, purge marker, apply entries and build a snapshot, drop
// every handle, reopen the same dir and read it all back.
#[tokio::test]
async fn reopened_store_restores_vote_log_committed_purge_marker_and_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let entries = vec![
        membership(1, 1),
        add(1, 2, "a", 1),
        add(1, 3, "b", 2),
        add(1, 4, "a", 3),
        add(2, 5, "a", 4),
    ];
    {
        let (_store, mut log, mut state_machine) = open(dir.path());
        log.save_vote(&Vote::new(2, 1)).await.expect("save vote");
        log.blocking_append(entries.clone()).await.expect("append");
        log.save_committed(Some(log_id(2, 5)))
            .await
            .expect("save committed");
        let responses = state_machine
            .apply(entries[..4].to_vec())
            .await
            .expect("apply");
        assert_eq!(responses[3], Response { value: Some(4) });
        let snapshot = state_machine
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build snapshot");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 4)));
        log.purge(log_id(1, 2)).await.expect("purge");
        // The entry at index 5 is committed but not applied: openraft re-applies it at start-up.
    }

    let (_store, mut log, mut state_machine) = open(dir.path());
    assert_eq!(
        log.read_vote().await.expect("read vote"),
        Some(Vote::new(2, 1))
    );
    assert_eq!(
        log.read_committed().await.expect("read committed"),
        Some(log_id(2, 5))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    let stored = log.try_get_log_entries(0..).await.expect("read log");
    assert_eq!(stored, entries[2..].to_vec());

    let (last_applied, stored_membership) =
        state_machine.applied_state().await.expect("applied state");
    assert_eq!(last_applied, Some(log_id(1, 4)));
    assert_eq!(stored_membership.log_id(), &Some(log_id(1, 1)));
    let applied = state_machine.applied();
    assert_eq!(
        applied.state,
        Counters::from([("a".into(), 4), ("b".into(), 2)])
    );
    assert_eq!(
        state_machine.app().on_applied_calls.load(Ordering::Relaxed),
        1,
        "restore notifies once"
    );
    let current = state_machine
        .get_current_snapshot()
        .await
        .expect("current snapshot")
        .expect("a snapshot was stored");
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 4)));
}

// Goal: two stores on one dir in one process would corrupt raft state; the second open is
// refused with an error that says what to do.
// Method: open a dir twice; then drop the first store and open again, which must work at once.
#[test]
fn second_open_of_the_same_dir_is_refused_until_the_first_store_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (first, log, state_machine) = open(dir.path());
    let error = LmdbStore::open(dir.path(), options()).expect_err("second open must fail");
    assert!(matches!(error, StorageError::AlreadyOpen { .. }), "{error}");
    assert!(
        error.to_string().contains("drop the other LmdbStore"),
        "{error}"
    );
    drop((first, log, state_machine));
    LmdbStore::open(dir.path(), options()).expect("reopen after drop");
}

// Goal: bad options are refused before anything touches the disk, with advice.
// Method: a map size below the minimum.
#[test]
fn tiny_map_size_is_refused_with_advice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let error = LmdbStore::open(
        dir.path(),
        StoreOptions {
            map_size_bytes: 4096,
            ..StoreOptions::default()
        },
    )
    .expect_err("tiny map");
    assert!(error.to_string().contains("raise it"), "{error}");
}

// Goal: a snapshot that does not decode into the application state is refused and changes
// nothing, instead of installing garbage.
// Method: install a snapshot whose bytes are not an encoded state.
#[tokio::test]
async fn undecodable_snapshot_is_refused_and_state_is_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_store, _log, mut state_machine) = open(dir.path());
    state_machine
        .apply(vec![add(1, 1, "a", 7)])
        .await
        .expect("apply");
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(3, 30)),
        last_membership: StoredMembership::default(),
        snapshot_id: "garbage".into(),
    };
    let result = state_machine
        .install_snapshot(&meta, Box::new(Cursor::new(vec![0xff; 16])))
        .await;
    assert!(result.is_err());
    assert_eq!(state_machine.applied().last_applied, Some(log_id(1, 1)));
    assert!(state_machine
        .get_current_snapshot()
        .await
        .expect("read")
        .is_none());
}

// Goal: other components (the router) see every applied batch through the watch channel.
// Method: subscribe, apply two batches, check the receiver's values.
#[tokio::test]
async fn subscribers_see_each_applied_batch() {
    let (_log, mut state_machine) = in_memory_for_tests::<TestConfig, _>(CounterApp::default());
    let mut applied = state_machine.subscribe();
    state_machine
        .apply(vec![add(1, 1, "a", 1)])
        .await
        .expect("apply");
    applied.changed().await.expect("changed");
    assert_eq!(applied.borrow_and_update().state.get("a"), Some(&1));
    state_machine
        .apply(vec![add(1, 2, "a", 1), membership(1, 3)])
        .await
        .expect("apply");
    applied.changed().await.expect("changed");
    let value = applied.borrow_and_update().clone();
    assert_eq!(value.state.get("a"), Some(&2));
    assert_eq!(value.last_applied, Some(log_id(1, 3)));
    assert_eq!(value.membership.log_id(), &Some(log_id(1, 3)));
}

/// A network for a one-node cluster: there is nobody to talk to.
struct NoPeers;

impl RaftNetworkFactory<TestConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> Self::Network {
        NoPeers
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
        "single-node test cluster",
    )))
}

impl RaftNetwork<TestConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TestConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TestConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }
}

fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshot and purge along the way, so the restart goes through a snapshot plus log.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(50),
        max_in_snapshot_log_to_keep: 10,
        ..openraft::Config::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

async fn start_raft(
    log: TestLogStore,
    state_machine: TestStateMachine,
) -> openraft::Raft<TestConfig> {
    openraft::Raft::new(1, raft_config(), NoPeers, log, state_machine)
        .await
        .expect("start raft")
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

// Goal: a real openraft node runs on the LMDB store (append callbacks, commits, snapshots,
// purges) and, after a restart, comes back with the same state without re-bootstrapping.
// Method: one-node cluster, 120 writes (some concurrently, to exercise batched commits), shut
// down, reopen the dir, start raft again and compare the applied state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_raft_on_lmdb_keeps_its_state_across_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = Counters::from([("par".into(), 120), ("seq".into(), 65)]);
    let last_index;
    let closed;
    {
        let (store, log, state_machine) = open(dir.path());
        closed = store.closed();
        let raft = start_raft(log, state_machine.clone()).await;
        raft.initialize(BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]))
            .await
            .expect("initialize");
        raft.wait(WAIT)
            .current_leader(1, "leader elected")
            .await
            .expect("leader");
        for i in 0..60 {
            let response = raft
                .client_write(Command::Add {
                    key: "seq".into(),
                    by: 1,
                })
                .await
                .expect("write");
            assert_eq!(response.data.value, Some(i + 1));
        }
        let writes = (0..60).map(|_| {
            raft.client_write(Command::Add {
                key: "par".into(),
                by: 2,
            })
        });
        for result in join_all(writes).await {
            result.expect("concurrent write");
        }
        // The state machine, not the metrics: metrics are published a moment after responses.
        let snapshot_index = state_machine
            .applied()
            .last_applied
            .as_ref()
            .expect("applied")
            .index;
        raft.trigger().snapshot().await.expect("trigger snapshot");
        raft.wait(WAIT)
            .metrics(
                |metrics| {
                    metrics
                        .snapshot
                        .is_some_and(|snapshot| snapshot.index == snapshot_index)
                },
                "snapshot of the whole log built",
            )
            .await
            .expect("snapshot");
        // Entries after the snapshot: after the restart they come back by re-applying the log.
        for i in 60..65 {
            let response = raft
                .client_write(Command::Add {
                    key: "seq".into(),
                    by: 1,
                })
                .await
                .expect("write");
            assert_eq!(response.data.value, Some(i + 1));
        }
        last_index = state_machine
            .applied()
            .last_applied
            .as_ref()
            .expect("applied")
            .index;
        raft.shutdown().await.expect("shutdown");
        assert_eq!(state_machine.applied().state, expected);
    }
    // openraft's background tasks may still hold store handles just after shutdown.
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("all store handles dropped after shutdown");

    let (_store, log, state_machine) = open(dir.path());
    let restored = state_machine.applied();
    assert!(
        restored
            .last_applied
            .as_ref()
            .is_some_and(|log_id| log_id.index < last_index),
        "restored from the snapshot, before re-applying the log: {restored:?}"
    );
    let raft = start_raft(log, state_machine.clone()).await;
    raft.wait(WAIT)
        .applied_index_at_least(Some(last_index), "committed entries re-applied")
        .await
        .expect("re-applied");
    assert_eq!(state_machine.applied().state, expected);
    raft.wait(WAIT)
        .current_leader(1, "leader again")
        .await
        .expect("leader");
    let response = raft
        .client_write(Command::Add {
            key: "seq".into(),
            by: 1,
        })
        .await
        .expect("write after restart");
    assert_eq!(response.data.value, Some(66));
    raft.shutdown().await.expect("shutdown");
}

// Goal: measure what the LMDB log sustains, with fsync on, sequentially and with many writes in
// flight (group commit). Not a pass/fail test: run with
// `cargo test --test storage_suite -- --ignored --nocapture append_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand"]
async fn append_throughput() {
    for sync in [true, false] {
        let options = StoreOptions {
            sync,
            ..StoreOptions::default()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let (_store, mut log, _state_machine) = open_with(dir.path(), options.clone());
        // fsync costs milliseconds on a VM disk: fewer rounds with sync keep the run short.
        let appends: u64 = if sync { 300 } else { 5_000 };
        let started = Instant::now();
        for index in 1..=appends {
            log.blocking_append([add(1, index, "k", 1)])
                .await
                .expect("append");
        }
        let sequential = appends as f64 / started.elapsed().as_secs_f64();

        let raft_dir = tempfile::tempdir().expect("temp dir");
        let (_raft_store, raft_log, state_machine) = open_with(raft_dir.path(), options);
        let raft = start_raft(raft_log, state_machine).await;
        raft.initialize(BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]))
            .await
            .expect("initialize");
        raft.wait(WAIT)
            .current_leader(1, "leader")
            .await
            .expect("leader");
        let writes: u32 = if sync { 300 } else { 5_000 };
        let started = Instant::now();
        let batch = (0..writes).map(|_| {
            raft.client_write(Command::Add {
                key: "k".into(),
                by: 1,
            })
        });
        for result in join_all(batch).await {
            result.expect("write");
        }
        let raft_rate = writes as f64 / started.elapsed().as_secs_f64();
        raft.shutdown().await.expect("shutdown");
        println!(
            "sync={sync}: {sequential:.0} sequential single-entry appends/s; {raft_rate:.0} raft writes/s with {writes} in flight"
        );
    }
}
