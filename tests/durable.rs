//! Durable handler state in real in-process clusters (issues 17 and 18): fencing of a deposed
//! owner's late write across a freeze and a failover (on a shared memory store and on
//! PostgreSQL), restarts in place on a node-local LMDB store, replies held until their commit
//! with the commits of one shard grouped, a failed commit that answers outcome-unknown and
//! reloads the shard, and an `async on_activate` that runs before the first message.
//!
//! The nodes (see `inproc`) run [`Counters`], a counter per key in a [`DurableMap`]. Their
//! stores are real ones (one [`MemoryStore`] shared by the nodes, a PostgreSQL server of the
//! test's own with a [`PostgresShardStore`] per node, or an [`LmdbShardStore`] per node), each
//! seen through a [`FaultyStore`]: fault injection that can hold one node's commits
//! of one shard at a gate until the test opens it, or fail the next one, and that records every
//! call and its outcome. The tests wait for events (a commit arriving at the gate, a handler
//! completing, a map applied), never for time; every value is read back at the end, and failed
//! requests are counted on the client's side. `CLUSTERFUNK_TEST_LOG=<filter>` turns the nodes'
//! logs on. No test asserts how long anything takes.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod inproc;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clusterfunk::client::{Client, ClientError};
use clusterfunk::persist::{
    Batch, Durable, DurableMap, DurableState, Fence, LmdbShardStore, Loaded, Locality, MemoryStore,
    PostgresOptions, PostgresShardStore, Scope, ShardStore, StoreError,
};
use clusterfunk::prelude::*;
use clusterfunk::shard_map::Epoch;
use clusterfunk::storage::StoreOptions;
use clusterfunk::testing::PostgresServer;
use clusterfunk::{NodeConfig, ServeEventKind};
use futures_util::future::{BoxFuture, FutureExt};
use inproc::{key_of_shard, shards_of, Get, Incr, Put, SendError, Served, TestCluster, DEADLINE};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The nodes' `request_timeout` in the tests that hold commits at a gate: long, so that a
/// request whose commit the test holds is answered by its commit and not by its timeout on a
/// slow machine.
const GATED_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the tests wait for a request held at a gate or sent through a frozen node: above
/// [`GATED_REQUEST_TIMEOUT`], so the node's own answer always comes first.
const HELD_SEND_BOUND: Duration = Duration::from_secs(90);

/// The node id the tests read a store with at the end (no member has it).
const READER: NodeId = 99;

// ---------------------------------------------------------------------------------------------
// The handlers
// ---------------------------------------------------------------------------------------------

/// The durable test handler: a counter per key, in a [`DurableMap`], so every change a message
/// makes is committed to the node's store before the message's reply is sent.
#[derive(Default)]
pub struct Counters {
    /// The value of each key of the shard.
    values: DurableMap<u64>,
}

impl Counters {
    fn served(&self, key: &Key, ctx: &ShardContext) -> Served {
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: self.values.get(key).copied(),
        }
    }
}

#[shard_handler]
impl Counters {
    fn incr(&mut self, key: Key, _msg: Incr, ctx: &mut ShardContext) -> Served {
        *self.values.entry(key.clone()) += 1;
        self.served(&key, ctx)
    }

    fn put(&mut self, key: Key, msg: Put, ctx: &mut ShardContext) -> Served {
        self.values.insert(key.clone(), msg.value);
        self.served(&key, ctx)
    }

    fn get(&mut self, key: Key, _msg: Get, ctx: &mut ShardContext) -> Served {
        self.served(&key, ctx)
    }

    async fn relay(&mut self, key: Key, msg: Relay, ctx: &mut ShardContext) -> Served {
        if let Err(error) = ctx.cluster().send(msg.to.as_str(), Incr).await {
            panic!("the relayed increment of {} failed: {error}", msg.to);
        }
        *self.values.entry(key.clone()) += 1;
        self.served(&key, ctx)
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.values)
    }
}

/// Sends an `Incr` to `to` (a key of another shard) from the handler, then adds one to the
/// key's own counter: a request whose handler sends a message of its own.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct Relay {
    /// The key the handler increments with a send of its own.
    pub to: String,
}

/// The shard whose `on_activate` waits at [`WARM_UP`]; other shards' hooks do not wait.
const WARM_UP_SHARD: ShardId = 11;

/// The gate the `on_activate` of [`WARM_UP_SHARD`] waits at, and the token it reads there.
static WARM_UP: LazyLock<watch::Sender<Option<u64>>> = LazyLock::new(|| watch::channel(None).0);

/// How many `on_activate` hooks of [`WARM_UP_SHARD`] began.
static WARM_UPS_BEGUN: AtomicUsize = AtomicUsize::new(0);

/// A durable handler whose `async on_activate` reads the loaded whole-shard state and waits for
/// a token.
#[derive(Default)]
pub struct WarmedUp {
    /// The durable total, the shard's whole-shard record (loaded before `on_activate` runs).
    total: Durable<u64>,
    /// What `on_activate` found.
    warm: Warm,
}

/// What [`WarmedUp`]'s `on_activate` found, as [`ReadWarmUp`] reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warm {
    /// Whether `on_activate` ran to its end.
    pub done: bool,
    /// The token it read at [`WARM_UP`] (`None` for shards that do not wait there).
    pub token: Option<u64>,
    /// The shard's durable total it saw.
    pub loaded_sum: u64,
}

/// Reads what `on_activate` found.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Warm)]
pub struct ReadWarmUp;

#[shard_handler]
impl WarmedUp {
    async fn on_activate(&mut self, ctx: &mut ShardContext) {
        let loaded_sum = *self.total;
        let token = match ctx.shard() == WARM_UP_SHARD {
            true => {
                WARM_UPS_BEGUN.fetch_add(1, Ordering::AcqRel);
                let mut gate = WARM_UP.subscribe();
                // The sender is a static: it outlives every wait.
                gate.wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|token| *token)
            }
            false => None,
        };
        self.warm = Warm {
            done: true,
            token,
            loaded_sum,
        };
    }

    fn read(&mut self, _key: Key, _msg: ReadWarmUp, _ctx: &mut ShardContext) -> Warm {
        self.warm
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.total)
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection on a real store
// ---------------------------------------------------------------------------------------------

/// A node's view of a real store (every call goes to `inner`) with faults injected: commits of
/// the gated node and shard wait at a gate until the test lets them through, and a commit the
/// test marked fails as a broken database would. Every call is recorded in [`StoreFaults`].
struct FaultyStore {
    /// The real store.
    inner: Arc<dyn ShardStore>,
    /// The node this view belongs to.
    node: NodeId,
    /// The faults and records shared by every node's view.
    faults: Arc<StoreFaults>,
}

/// The faults the test injects into the stores of a cluster, and what those stores saw.
struct StoreFaults {
    /// The rules and the records.
    state: Mutex<FaultState>,
    /// How many gated commits may pass the gate (`usize::MAX`: every one).
    allowance: watch::Sender<usize>,
    /// Whether commits held after the store applied them may return.
    returned: watch::Sender<bool>,
}

/// See [`StoreFaults`].
#[derive(Default)]
struct FaultState {
    /// Commits of this node and shard wait at the gate.
    gated: Option<(NodeId, ShardId)>,
    /// Gated commits that reached the gate since it was set.
    arrived: usize,
    /// The next commit of this node and shard fails without reaching the store.
    fail_next: Option<(NodeId, ShardId)>,
    /// Commits of this node and shard are applied by the store and then held before they
    /// return (the change is durable; the node does not know yet).
    held_after: Option<(NodeId, ShardId)>,
    /// Commits applied and held since `held_after` was set.
    applied_held: usize,
    /// Every commit, in call order.
    commits: Vec<CommitRecord>,
    /// Every activation: the node, the shard and the epoch.
    activations: Vec<(NodeId, ShardId, Epoch)>,
}

/// One commit a node made.
#[derive(Debug, Clone)]
struct CommitRecord {
    /// The committing node.
    node: NodeId,
    /// The shard.
    shard: ShardId,
    /// The activation epoch it committed at.
    epoch: Epoch,
    /// The keys its batch changes, in key order.
    keys: Vec<String>,
    /// Whether it waited at the gate.
    gated: bool,
    /// What it returned; `None` while it is in flight.
    outcome: Option<Result<(), StoreError>>,
}

impl StoreFaults {
    fn new() -> Arc<StoreFaults> {
        Arc::new(StoreFaults {
            state: Mutex::new(FaultState::default()),
            allowance: watch::channel(usize::MAX).0,
            returned: watch::channel(true).0,
        })
    }

    /// From now on, `node`'s commits of `shard` are applied and then held before they return,
    /// until [`let_return`](Self::let_return).
    fn hold_after(&self, node: NodeId, shard: ShardId) {
        let mut state = self.lock();
        state.held_after = Some((node, shard));
        state.applied_held = 0;
        self.returned.send_replace(false);
    }

    /// Lets every commit held after it was applied return.
    fn let_return(&self) {
        self.returned.send_replace(true);
    }

    /// How many commits were applied and held since [`hold_after`](Self::hold_after).
    fn applied_held(&self) -> usize {
        self.lock().applied_held
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// From now on, `node`'s commits of `shard` wait at the gate, which is closed.
    fn gate(&self, node: NodeId, shard: ShardId) {
        let mut state = self.lock();
        state.gated = Some((node, shard));
        state.arrived = 0;
        self.allowance.send_replace(0);
    }

    /// Lets `count` more gated commits through.
    fn allow(&self, count: usize) {
        self.allowance
            .send_modify(|allowed| *allowed = allowed.saturating_add(count));
    }

    /// Lets every gated commit through, now and later.
    fn open(&self) {
        self.allowance.send_replace(usize::MAX);
    }

    /// The next commit of `node` for `shard` fails with a backend error, without reaching the
    /// store.
    fn fail_next(&self, node: NodeId, shard: ShardId) {
        self.lock().fail_next = Some((node, shard));
    }

    /// How many gated commits reached the gate since it was set.
    fn arrived(&self) -> usize {
        self.lock().arrived
    }

    /// Every commit of `node` for `shard`, in call order.
    fn commits_of(&self, node: NodeId, shard: ShardId) -> Vec<CommitRecord> {
        self.lock()
            .commits
            .iter()
            .filter(|commit| commit.node == node && commit.shard == shard)
            .cloned()
            .collect()
    }

    /// The epochs of every activation of `shard` by `node`, in call order.
    fn activations_of(&self, node: NodeId, shard: ShardId) -> Vec<Epoch> {
        self.lock()
            .activations
            .iter()
            .filter(|(n, s, _)| *n == node && *s == shard)
            .map(|(_, _, epoch)| *epoch)
            .collect()
    }
}

impl ShardStore for FaultyStore {
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        self.faults.lock().activations.push((owner, shard, epoch));
        self.inner.activate(shard, owner, epoch, scope)
    }

    fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> BoxFuture<'static, Result<Option<bytes::Bytes>, StoreError>> {
        self.inner.read(shard, epoch, key)
    }

    fn commit(
        &self,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let here = Some((self.node, shard));
        let (index, ticket, fail, hold) = {
            let mut state = self.faults.lock();
            let hold = state.held_after == here;
            let ticket = (state.gated == here).then(|| {
                state.arrived += 1;
                state.arrived - 1
            });
            let fail = state.fail_next == here;
            if fail {
                state.fail_next = None;
            }
            state.commits.push(CommitRecord {
                node: self.node,
                shard,
                epoch,
                keys: batch.records().map(|(key, _)| key.to_string()).collect(),
                gated: ticket.is_some(),
                outcome: None,
            });
            (state.commits.len() - 1, ticket, fail, hold)
        };
        let mut allowance = self.faults.allowance.subscribe();
        let mut returned = self.faults.returned.subscribe();
        let inner = self.inner.clone();
        let faults = self.faults.clone();
        async move {
            if let Some(ticket) = ticket {
                // The sender lives in `faults`, which this future holds: the wait cannot fail.
                let _ = allowance.wait_for(|allowed| *allowed > ticket).await;
            }
            let outcome = match fail {
                true => Err(StoreError::backend(std::io::Error::other(
                    "the test failed this commit",
                ))),
                false => inner.commit(shard, epoch, batch).await,
            };
            if hold {
                faults.lock().applied_held += 1;
                // The sender lives in `faults`, which this future holds: the wait cannot fail.
                let _ = returned.wait_for(|returned| *returned).await;
            }
            faults.lock().commits[index].outcome = Some(outcome.clone());
            outcome
        }
        .boxed()
    }

    fn release(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.release(shard, epoch)
    }

    fn locality(&self) -> Locality {
        self.inner.locality()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The store the nodes of a test share: one [`MemoryStore`], or a PostgreSQL server of the
/// test's own, to which each node connects with a [`PostgresShardStore`] of its own (its own
/// pool and thread, as separate processes would).
enum SharedStore {
    /// One store in memory, shared by clones.
    Memory(MemoryStore),
    /// A throwaway server, and a store of the test's own to look at what the nodes stored.
    Postgres {
        /// The server, stopped when the test ends.
        server: PostgresServer,
        /// The test's own connection.
        observer: PostgresShardStore,
    },
}

impl SharedStore {
    /// A new [`MemoryStore`].
    fn memory() -> Arc<SharedStore> {
        Arc::new(SharedStore::Memory(MemoryStore::new()))
    }

    /// A new PostgreSQL server, with the store's tables created by the test's connection.
    fn postgres() -> Arc<SharedStore> {
        let server = PostgresServer::start()
            .unwrap_or_else(|e| panic!("start a test PostgreSQL server: {e}"));
        let observer = PostgresShardStore::connect(&server.url(), PostgresOptions::default())
            .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()));
        Arc::new(SharedStore::Postgres { server, observer })
    }

    /// A node's store: the shared [`MemoryStore`], or a new connection to the server.
    fn for_node(&self) -> Result<Arc<dyn ShardStore>, String> {
        match self {
            SharedStore::Memory(memory) => Ok(Arc::new(memory.clone())),
            SharedStore::Postgres { server, .. } => {
                PostgresShardStore::connect(&server.url(), PostgresOptions::default())
                    .map(|store| Arc::new(store) as Arc<dyn ShardStore>)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The test's own view of the store.
    fn observer(&self) -> &dyn ShardStore {
        match self {
            SharedStore::Memory(memory) => memory,
            SharedStore::Postgres { observer, .. } => observer,
        }
    }

    /// The shard's fence, as the store recorded it.
    async fn fence(&self, shard: ShardId) -> Option<Fence> {
        match self {
            SharedStore::Memory(memory) => memory.fence(shard),
            SharedStore::Postgres { observer, .. } => observer
                .fence(shard)
                .await
                .unwrap_or_else(|e| panic!("read the fence of shard {shard}: {e}")),
        }
    }
}

/// Starts `nodes` nodes running `H` that share one [`MemoryStore`], each through its
/// [`FaultyStore`]; `configure` adjusts their configuration.
async fn start_shared<H: ShardHandler + Default>(
    name: &str,
    nodes: usize,
    configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
) -> (Arc<TestCluster<H>>, Arc<SharedStore>, Arc<StoreFaults>) {
    start_on(name, nodes, configure, SharedStore::memory()).await
}

/// Starts `nodes` nodes running `H` that share `store`, each through its [`FaultyStore`].
async fn start_on<H: ShardHandler + Default>(
    name: &str,
    nodes: usize,
    configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    store: Arc<SharedStore>,
) -> (Arc<TestCluster<H>>, Arc<SharedStore>, Arc<StoreFaults>) {
    let faults = StoreFaults::new();
    let (shared, injected) = (store.clone(), faults.clone());
    let cluster = TestCluster::<H>::start_with_stores(name, nodes, configure, move |node, _dir| {
        Ok(Arc::new(FaultyStore {
            inner: shared.for_node()?,
            node,
            faults: injected.clone(),
        }) as Arc<dyn ShardStore>)
    })
    .await;
    (cluster, store, faults)
}

/// Holds requests for as long as their commits wait at a gate (see [`GATED_REQUEST_TIMEOUT`]).
fn patient(config: &mut NodeConfig) {
    config.request_timeout = GATED_REQUEST_TIMEOUT;
}

/// Opens an [`LmdbShardStore`] in `dir` (fsync off: a crash of this process loses nothing, the
/// kernel keeps the pages).
fn open_lmdb(_node: NodeId, dir: &std::path::Path) -> Result<Arc<dyn ShardStore>, String> {
    let options = StoreOptions {
        map_size_bytes: 64 << 20,
        sync: false,
    };
    LmdbShardStore::open(dir, options)
        .map(|store| Arc::new(store) as Arc<dyn ShardStore>)
        .map_err(|e| e.to_string())
}

/// Sends `msg` to `key` through node `id` in a task of its own, so the test can look at it
/// while it waits.
fn spawn_send<H, M>(
    cluster: &Arc<TestCluster<H>>,
    id: NodeId,
    key: &str,
    msg: M,
) -> JoinHandle<Result<M::Reply, SendError>>
where
    H: ShardHandler + Default + clusterfunk::shard::Handles<M>,
    M: ShardMessage,
{
    let (cluster, key) = (cluster.clone(), key.to_owned());
    tokio::spawn(async move { cluster.send_within(id, &key, msg, HELD_SEND_BOUND).await })
}

/// Whether the request is still waiting for its reply, at this instant.
fn is_pending<T>(request: &mut JoinHandle<T>) -> bool {
    request.now_or_never().is_none()
}

/// The reply of a request task, failing the test if the task panicked.
async fn reply_of<T>(request: JoinHandle<T>) -> T {
    request.await.expect("the request task panicked")
}

/// Sends `msg()` to `key` through node `id` until it is answered, retrying on errors (the
/// failover may not be complete yet) until [`DEADLINE`]; returns the reply and the errors of the
/// attempts before it. Only for messages whose repetition is harmless (`Put`, `Get`).
async fn send_until_answered<H, M>(
    cluster: &TestCluster<H>,
    id: NodeId,
    key: &str,
    msg: impl Fn() -> M,
) -> (M::Reply, Vec<SendError>)
where
    H: ShardHandler + Default + clusterfunk::shard::Handles<M>,
    M: ShardMessage,
{
    let deadline = Instant::now() + DEADLINE;
    let mut failures = Vec::new();
    loop {
        match cluster.send(id, key, msg()).await {
            Ok(reply) => return (reply, failures),
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "{key} through node {id}: no answer within {DEADLINE:?}; errors: {failures:?}, last {error:?}\n{}",
                    cluster.report()
                );
                failures.push(error);
                // Retry pacing, not synchronisation: the next attempt checks the condition.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Waits until node `node` completed `count` handler runs for `shard` since `since` (so every
/// message the test sent to it so far was handled).
async fn wait_completed<H: ShardHandler + Default>(
    cluster: &TestCluster<H>,
    node: NodeId,
    shard: ShardId,
    since: Instant,
    count: usize,
) {
    cluster
        .wait_until(
            &format!("node {node} completes {count} handler runs for shard {shard}"),
            DEADLINE,
            || async {
                let completed = cluster
                    .recorder()
                    .events()
                    .iter()
                    .filter(|e| {
                        e.kind == ServeEventKind::Completed
                            && e.node == node
                            && e.shard == shard
                            && e.at >= since
                    })
                    .count();
                (completed >= count).then_some(())
            },
        )
        .await;
}

/// Waits until `count` gated commits reached the gate.
async fn wait_arrived<H: ShardHandler + Default>(
    cluster: &TestCluster<H>,
    faults: &StoreFaults,
    count: usize,
) {
    cluster
        .wait_until(
            &format!("{count} gated commits reach the gate"),
            DEADLINE,
            || async { (faults.arrived() >= count).then_some(()) },
        )
        .await;
}

/// Reads `shard`'s records straight from the store, as a [`DurableMap`] of counters. Raises the
/// shard's fence (it activates the shard as [`READER`]): only for the end of a test, once the
/// cluster stopped.
async fn stored_values(store: &SharedStore, shard: ShardId) -> DurableMap<u64> {
    let epoch = store.fence(shard).await.map_or(0, |fence| fence.epoch + 1);
    let loaded = store
        .observer()
        .activate(shard, READER, epoch, Scope::All)
        .await
        .expect("the reader's activation is above the fence");
    let mut values = DurableMap::default();
    values
        .load(&loaded)
        .expect("the stored values decode as counters");
    values
}

// ---------------------------------------------------------------------------------------------
// 1. Fencing across a freeze and a failover
// ---------------------------------------------------------------------------------------------

/// When the old owner's held commit is let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LateCommit {
    /// Before the old owner thaws: it writes before it hears of any newer map.
    BeforeThaw,
    /// Once the thawed old owner applied the map that gave its shard to another node.
    AfterNewMap,
}

/// Goal: a deposed owner's late write can never land over its successor's. Method: a 3-node
/// cluster shares one store; the owner of a shard (not the raft leader, so no election is
/// needed) commits a value, then its next commit is held at the gate and the node is frozen
/// with that commit in flight; the others fail the shard over, and its new owner serves and
/// commits a value; then the old owner's commit goes on, before it thaws. The store must refuse
/// it by its fence, the old client must get an error (never `Ok`), and the new owner's value
/// must stand, in the cluster and in the store.
#[tokio::test]
async fn a_frozen_owners_late_commit_is_refused_after_its_shard_failed_over() {
    let store = SharedStore::memory();
    late_commit_after_failover("durable-fenced-frozen", LateCommit::BeforeThaw, store).await;
}

/// Goal: as [`a_frozen_owners_late_commit_is_refused_after_its_shard_failed_over`], with the
/// nodes on PostgreSQL (a server of the test's own, a connection pool per node): the database
/// refuses the deposed owner's late commit by the fence row it locks.
#[tokio::test]
async fn a_frozen_owners_late_commit_is_refused_after_its_shard_failed_over_on_postgres() {
    let store = SharedStore::postgres();
    late_commit_after_failover("durable-pg-fenced-frozen", LateCommit::BeforeThaw, store).await;
}

/// Goal: a deposed owner that already knows the newer map still writes with the epoch of its
/// own activation, and is refused. Method: as
/// [`a_frozen_owners_late_commit_is_refused_after_its_shard_failed_over`], but the held commit
/// goes on only after the thawed old owner applied the map that gave its shard away.
#[tokio::test]
async fn an_old_owner_that_learned_the_new_map_still_commits_at_its_old_epoch_and_is_refused() {
    let store = SharedStore::memory();
    late_commit_after_failover("durable-fenced-learned", LateCommit::AfterNewMap, store).await;
}

/// Goal: as [`an_old_owner_that_learned_the_new_map_still_commits_at_its_old_epoch_and_is_refused`],
/// with the nodes on PostgreSQL.
#[tokio::test]
async fn an_old_owner_that_learned_the_new_map_still_commits_at_its_old_epoch_and_is_refused_on_postgres(
) {
    let store = SharedStore::postgres();
    late_commit_after_failover("durable-pg-fenced-learned", LateCommit::AfterNewMap, store).await;
}

async fn late_commit_after_failover(name: &str, late_commit: LateCommit, store: Arc<SharedStore>) {
    let (cluster, shared, faults) = start_on::<Counters>(name, 3, |_| {}, store).await;
    let leader = cluster.wait_ready().await;
    let (old, others) = cluster.follower_and_others(leader);
    let (_, owners) = cluster.shards(old).await.expect("the old owner has a map");
    let shard = *shards_of(&owners, old)
        .first()
        .expect("every node of a 3-node cluster owns shards");
    let key = cluster.key_of(shard).to_owned();
    println!("{name}: node {old} owns shard {shard} (key {key}); node {leader} leads");

    // The old owner activates the shard and commits a first value.
    let (first, _) = send_until_answered(&cluster, old, &key, || Put { value: 1 }).await;
    assert_eq!(first.node, old, "the owner served the first write");
    let old_fence = shared
        .fence(shard)
        .await
        .expect("the owner activated the shard");
    assert_eq!(old_fence.owner, old, "the store's fence names the owner");
    let old_epoch = old_fence.epoch;

    // Its next commit is held in flight, and the node freezes with it.
    faults.gate(old, shard);
    let mut late = spawn_send(&cluster, old, &key, Put { value: 2 });
    wait_arrived(&cluster, &faults, 1).await;
    assert!(
        is_pending(&mut late),
        "a reply came while its commit was held"
    );
    let frozen = cluster.freeze(old).await.expect("the old owner runs");

    // The others fail the shard over; its new owner serves and commits a value.
    let (new_owner, new_map_epoch) = cluster
        .wait_until(
            &format!("another node takes shard {shard} from the frozen node {old}"),
            DEADLINE,
            || async {
                for &id in &others {
                    if let Some((epoch, owners)) = cluster.shards(id).await {
                        if owners[shard as usize] != old {
                            return Some((owners[shard as usize], epoch));
                        }
                    }
                }
                None
            },
        )
        .await;
    let (written, failed) =
        send_until_answered(&cluster, new_owner, &key, || Put { value: 3 }).await;
    println!(
        "{name}: node {new_owner} took shard {shard} under map epoch {new_map_epoch} and wrote after {} failed attempts: {failed:?}",
        failed.len()
    );
    assert_eq!(written.node, new_owner, "the new owner served the write");
    assert_eq!(written.value, Some(3));
    let new_fence = shared.fence(shard).await.expect("the shard is activated");
    assert_eq!(new_fence.owner, new_owner, "the new owner raised the fence");
    assert!(
        new_fence.epoch > old_epoch && !new_fence.released,
        "the new owner's activation {new_fence:?} is above the old one's epoch {old_epoch}"
    );
    assert_eq!(
        faults
            .commits_of(old, shard)
            .last()
            .map(|c| c.outcome.is_none()),
        Some(true),
        "the old owner's commit is still held"
    );

    // The old owner's commit goes on.
    match late_commit {
        LateCommit::BeforeThaw => {
            faults.open();
            frozen.thaw();
        }
        LateCommit::AfterNewMap => {
            frozen.thaw();
            cluster
                .wait_until(
                    &format!("the thawed node {old} applies a map that gives shard {shard} to node {new_owner}"),
                    DEADLINE,
                    || async {
                        let (epoch, owners) = cluster.shards(old).await?;
                        (epoch >= new_map_epoch && owners[shard as usize] == new_owner)
                            .then_some(())
                    },
                )
                .await;
            assert!(
                is_pending(&mut late),
                "a reply came while its commit was held"
            );
            faults.open();
        }
    }
    let refused = cluster
        .wait_until("the old owner's held commit returns", DEADLINE, || async {
            faults.commits_of(old, shard).last()?.outcome.clone()
        })
        .await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { epoch, fence, .. }) if epoch == old_epoch && fence == new_fence.epoch),
        "the store refuses the old owner's late commit at its epoch {old_epoch} by the fence at {}: got {refused:?}",
        new_fence.epoch
    );
    let late = reply_of(late).await;
    println!("{name}: the old owner's client got {late:?}");
    assert!(late.is_err(), "the late write's client got Ok: {late:?}");

    // At the end, once the cluster healed and converged (the old node may own shards again):
    // at its old epoch the old owner committed once and was refused once, and it never
    // activated the shard at an epoch between its own and its successor's; the new owner's
    // value stands, through every node and in the store.
    cluster.heal_and_check(name).await;
    let old_commits: Vec<CommitRecord> = faults
        .commits_of(old, shard)
        .into_iter()
        .filter(|c| c.epoch == old_epoch)
        .collect();
    assert_eq!(
        old_commits
            .iter()
            .map(|c| (c.gated, c.outcome.as_ref().map(Result::is_ok)))
            .collect::<Vec<_>>(),
        vec![(false, Some(true)), (true, Some(false))],
        "the old owner's commits at its epoch {old_epoch}: {old_commits:?}"
    );
    let old_activations = faults.activations_of(old, shard);
    assert!(
        old_activations.first() == Some(&old_epoch)
            && old_activations
                .iter()
                .all(|&epoch| epoch == old_epoch || epoch > new_fence.epoch),
        "the old owner's activations of shard {shard}: {old_activations:?}"
    );
    for id in cluster.ids() {
        let (read, _) = send_until_answered(&cluster, id, &key, || Get).await;
        assert_eq!(
            read.value,
            Some(3),
            "{key} read through node {id}: {read:?}"
        );
    }
    drop(cluster);
    assert_eq!(stored_values(&shared, shard).await.get(&key), Some(&3));
}

// ---------------------------------------------------------------------------------------------
// 2. Restarts in place on a node-local store
// ---------------------------------------------------------------------------------------------

/// Keys the increments of the single-node restart tests go to (spread over several shards).
const RESTART_KEYS: usize = 12;

/// Tasks sending increments at once.
const SENDERS: usize = 4;

/// The increments each sender sends in the clean restart tests.
const INCREMENTS_PER_SENDER: usize = 50;

/// The lease in the cluster restart test: long enough that a killed node restarts before its
/// lease runs out, so its shards stay its own (a shard that moved would start empty on its new
/// owner, by design of a node-local store).
const LONG_LEASE: Duration = Duration::from_secs(30);

/// What the senders of a restart test saw, per key.
#[derive(Debug, Default)]
struct Tally {
    /// Increments answered `Ok`.
    acknowledged: BTreeMap<String, u64>,
    /// Increments that failed: they may or may not have landed.
    unknown: BTreeMap<String, u64>,
    /// The errors, for messages.
    errors: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        for (key, count) in other.acknowledged {
            *self.acknowledged.entry(key).or_default() += count;
        }
        for (key, count) in other.unknown {
            *self.unknown.entry(key).or_default() += count;
        }
        self.errors.extend(other.errors);
    }
}

/// The keys of the single-node restart tests.
fn restart_keys() -> Vec<String> {
    (0..RESTART_KEYS).map(|i| format!("restart-{i}")).collect()
}

/// Runs [`SENDERS`] tasks sending `Incr` to `keys` through node `via`, each until it sent
/// `per_sender` increments or got its first error (a killed node answers nothing more); counts
/// the acknowledged ones in `acknowledged` as they come.
async fn increment(
    cluster: &Arc<TestCluster<Counters>>,
    via: NodeId,
    keys: &[String],
    per_sender: usize,
    acknowledged: Arc<AtomicU64>,
) -> Tally {
    let senders: Vec<JoinHandle<Tally>> = (0..SENDERS)
        .map(|sender| {
            let (cluster, acknowledged) = (cluster.clone(), acknowledged.clone());
            let keys = keys.to_vec();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for i in 0..per_sender {
                    let key = keys[(sender * 5 + i) % keys.len()].clone();
                    match cluster.send(via, &key, Incr).await {
                        Ok(_) => {
                            *tally.acknowledged.entry(key).or_default() += 1;
                            acknowledged.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(error) => {
                            *tally.unknown.entry(key.clone()).or_default() += 1;
                            tally.errors.push(format!("{key}: {error:?}"));
                            break;
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for sender in senders {
        total.add(reply_of(sender).await);
    }
    total
}

/// Reads every key of `keys` through node `via`.
async fn read_all(
    cluster: &TestCluster<Counters>,
    via: NodeId,
    keys: &[String],
) -> BTreeMap<String, u64> {
    let mut values = BTreeMap::new();
    for key in keys {
        let (read, _) = send_until_answered(cluster, via, key, || Get).await;
        values.insert(key.clone(), read.value.unwrap_or(0));
    }
    values
}

/// Checks that every key holds exactly its acknowledged increments.
fn assert_exactly_acknowledged(values: &BTreeMap<String, u64>, tally: &Tally) {
    for (key, value) in values {
        let acknowledged = tally.acknowledged.get(key).copied().unwrap_or(0);
        assert_eq!(
            *value, acknowledged,
            "{key} after the restart (all: {values:?})"
        );
    }
}

/// Goal: a node restarted in place on its own disk keeps every increment it acknowledged.
/// Method: one node with an [`LmdbShardStore`] in its own directory; [`SENDERS`] tasks send
/// increments at once and count the acknowledged ones per key; once every reply is in, the
/// node is killed (no graceful shutdown) and started again on the same directories; every key
/// read back must hold exactly its acknowledged increments.
#[tokio::test]
async fn a_restart_in_place_keeps_every_acknowledged_increment() {
    let name = "durable-restart";
    let cluster = TestCluster::<Counters>::start_with_stores(name, 1, |_| {}, open_lmdb).await;
    let keys = restart_keys();
    let tally = increment(&cluster, 1, &keys, INCREMENTS_PER_SENDER, Arc::default()).await;
    assert!(
        tally.errors.is_empty(),
        "increments failed on a quiet node: {:?}",
        tally.errors
    );
    cluster.kill(1).await;
    cluster.restart(1).await;
    cluster.wait_ready().await;
    let values = read_all(&cluster, 1, &keys).await;
    assert_exactly_acknowledged(&values, &tally);
    let sum: u64 = values.values().sum();
    assert_eq!(sum, (SENDERS * INCREMENTS_PER_SENDER) as u64);
    println!("{name}: {sum} acknowledged increments, all read back after the restart");
}

/// Goal: a crash in the middle of the traffic loses no acknowledged increment. Method: as
/// [`a_restart_in_place_keeps_every_acknowledged_increment`], but the node is killed while the
/// senders are still sending (once some increments were acknowledged); each sender stops at its
/// first error, whose increment may or may not have landed. Every key read back must hold at
/// least its acknowledged increments and at most those plus its unknown ones.
#[tokio::test]
async fn a_crash_during_increments_keeps_every_acknowledged_one() {
    let name = "durable-crash";
    let cluster = TestCluster::<Counters>::start_with_stores(name, 1, |_| {}, open_lmdb).await;
    let keys = restart_keys();
    let acknowledged = Arc::new(AtomicU64::new(0));
    let senders = tokio::spawn({
        let (cluster, keys, acknowledged) = (cluster.clone(), keys.clone(), acknowledged.clone());
        // Far more than the senders get through before the kill: they end at the kill.
        async move { increment(&cluster, 1, &keys, 100_000, acknowledged).await }
    });
    cluster
        .wait_until(
            "the senders have 200 acknowledged increments",
            DEADLINE,
            || async { (acknowledged.load(Ordering::Acquire) >= 200).then_some(()) },
        )
        .await;
    cluster.kill(1).await;
    let tally = reply_of(senders).await;
    cluster.restart(1).await;
    cluster.wait_ready().await;
    let values = read_all(&cluster, 1, &keys).await;
    for (key, value) in &values {
        let acknowledged = tally.acknowledged.get(key).copied().unwrap_or(0);
        let unknown = tally.unknown.get(key).copied().unwrap_or(0);
        assert!(
            acknowledged <= *value && *value <= acknowledged + unknown,
            "{key} after the crash: {value}, acknowledged {acknowledged}, unknown {unknown} (all: {values:?}; errors: {:?})",
            tally.errors
        );
    }
    let sum: u64 = values.values().sum();
    let acknowledged: u64 = tally.acknowledged.values().sum();
    println!(
        "{name}: {acknowledged} acknowledged increments, {sum} read back after the crash; errors at the kill: {:?}",
        tally.errors
    );
}

/// Goal: in a cluster, a node restarted in place keeps its shards' acknowledged values although
/// the map changed since those shards became its own: a restarted shard activates at the epoch
/// that made the node its owner, not at the newest map's (a node-local store loads its records
/// only for the same activation epoch). Method: 3 nodes, an [`LmdbShardStore`] each and a lease
/// long enough for a restart; increments go to keys of four shards of a follower (not the
/// leader, so no election is needed); the other follower is drained, which changes the map
/// without touching those shards; more increments; the follower is killed and started again on
/// its directories. Its shards must still be its own, reactivated at their first activation's
/// epoch (below the map's), and every key must hold exactly its acknowledged increments.
#[tokio::test]
async fn a_restart_in_place_after_an_unrelated_map_change_keeps_every_acknowledged_increment() {
    let name = "durable-restart-cluster";
    let faults = StoreFaults::new();
    let records = faults.clone();
    let cluster = TestCluster::<Counters>::start_with_stores(
        name,
        3,
        |config| config.lease.lease = LONG_LEASE,
        move |node, dir| {
            Ok(Arc::new(FaultyStore {
                inner: open_lmdb(node, dir)?,
                node,
                faults: records.clone(),
            }) as Arc<dyn ShardStore>)
        },
    )
    .await;
    let leader = cluster.wait_ready().await;
    let (restarted, others) = cluster.follower_and_others(leader);
    let drained = *others
        .iter()
        .find(|&&id| id != leader)
        .expect("a 3-node cluster has a second follower");
    let (_, owners) = cluster.shards(restarted).await.expect("the node has a map");
    let shards: Vec<ShardId> = shards_of(&owners, restarted).into_iter().take(4).collect();
    assert_eq!(shards.len(), 4, "node {restarted} owns shards {owners:?}");
    let keys: Vec<String> = shards
        .iter()
        .flat_map(|&shard| {
            ["a", "b"].map(|prefix| key_of_shard(&format!("in-place-{prefix}"), shard))
        })
        .collect();
    let mut tally = increment(&cluster, restarted, &keys, 25, Arc::default()).await;

    // An unrelated map change: the other follower's shards move away, these stay.
    let drain = cluster
        .node(leader)
        .expect("the leader runs")
        .admin(clusterfunk::admin::AdminRequest::Drain { id: drained })
        .await;
    assert!(drain.is_ok(), "draining node {drained}: {drain:?}");
    let (map_epoch, owners) = cluster.wait_converged().await;
    for &shard in &shards {
        assert_eq!(
            owners[shard as usize], restarted,
            "shard {shard} moved: {owners:?}"
        );
    }
    tally.add(increment(&cluster, restarted, &keys, 25, Arc::default()).await);
    assert!(
        tally.errors.is_empty(),
        "increments failed on a quiet cluster: {:?}",
        tally.errors
    );
    let first_activations: Vec<Vec<Epoch>> = shards
        .iter()
        .map(|&shard| faults.activations_of(restarted, shard))
        .collect();

    cluster.kill(restarted).await;
    cluster.restart(restarted).await;
    cluster.wait_ready().await;
    let (_, owners) = cluster.wait_converged().await;
    for &shard in &shards {
        assert_eq!(
            owners[shard as usize], restarted,
            "shard {shard} moved while node {restarted} restarted (the restart took longer than its {LONG_LEASE:?} lease?): {owners:?}"
        );
    }
    let values = read_all(&cluster, restarted, &keys).await;
    assert_exactly_acknowledged(&values, &tally);
    for (&shard, first) in shards.iter().zip(&first_activations) {
        let activations = faults.activations_of(restarted, shard);
        assert!(
            first.len() == 1 && first[0] < map_epoch && activations == [first[0], first[0]],
            "shard {shard}: activated at {first:?} before the restart (map epoch {map_epoch}), at {activations:?} in all"
        );
    }
    let sum: u64 = values.values().sum();
    assert_eq!(sum, (2 * SENDERS * 25) as u64);
    println!(
        "{name}: {sum} acknowledged increments on node {restarted}, all read back after its restart (map epoch {map_epoch}, activations {first_activations:?})"
    );
    cluster.heal_and_check(name).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Replies wait for their commit; commits are grouped
// ---------------------------------------------------------------------------------------------

/// Goal: a reply is sent only once the commit holding its change returned, while the shard goes
/// on handling messages, and what queued meanwhile is committed together. Method: one node, a
/// shared store whose commits of one shard wait at a gate. A first increment's commit is held:
/// its reply must not come; four more messages (to that key and three others) are handled
/// meanwhile (their handler runs complete), and their replies must not come either. Letting
/// one commit through answers the first message; the second commit must then hold the changes
/// of all four (so two commits for five messages), and its replies come when it returns.
/// "Must not come" is checked after a round trip through the same node to another shard, at
/// which point a reply sent without waiting would have arrived.
#[tokio::test]
async fn replies_wait_for_their_commit_and_commits_are_grouped() {
    let name = "durable-grouped";
    let (cluster, shared, faults) = start_shared::<Counters>(name, 1, patient).await;
    let shard: ShardId = 7;
    let keys: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|prefix| key_of_shard(&format!("grouped-{prefix}"), shard))
        .collect();
    let elsewhere = cluster.key_of(shard + 1).to_owned();
    // A round trip through node 1's thread to another shard.
    let round_trip = || async {
        cluster
            .send(1, &elsewhere, Get)
            .await
            .expect("another shard answers at once")
    };
    // The shard activates before the gate closes.
    let (read, _) = send_until_answered(&cluster, 1, &keys[0], || Get).await;
    assert_eq!(read.value, None);

    faults.gate(1, shard);
    let since = Instant::now();
    let mut first = spawn_send(&cluster, 1, &keys[0], Incr);
    wait_arrived(&cluster, &faults, 1).await;
    round_trip().await;
    assert!(
        is_pending(&mut first),
        "a reply came while its commit was held"
    );

    // The shard goes on while the first commit is held.
    let mut later = vec![
        spawn_send(&cluster, 1, &keys[0], Incr),
        spawn_send(&cluster, 1, &keys[1], Incr),
        spawn_send(&cluster, 1, &keys[2], Incr),
        spawn_send(&cluster, 1, &keys[3], Incr),
    ];
    wait_completed(&cluster, 1, shard, since, 5).await;
    round_trip().await;
    assert!(
        is_pending(&mut first),
        "a reply came while its commit was held"
    );
    for request in &mut later {
        assert!(is_pending(request), "a reply came before its commit");
    }
    assert_eq!(faults.arrived(), 1, "one commit of a shard at a time");

    // The first commit returns: its reply comes, and the next commit holds the rest.
    faults.allow(1);
    let answered = reply_of(first)
        .await
        .expect("the first increment is answered");
    assert_eq!(answered.value, Some(1));
    wait_arrived(&cluster, &faults, 2).await;
    round_trip().await;
    for request in &mut later {
        assert!(is_pending(request), "a reply came before its commit");
    }
    faults.open();
    let mut values = Vec::new();
    for request in later {
        let served = reply_of(request)
            .await
            .expect("a later increment is answered");
        values.push(served.value);
    }
    assert_eq!(values, vec![Some(2), Some(1), Some(1), Some(1)]);

    // Two commits for the five changes: the second holds every key changed meanwhile.
    let commits = faults.commits_of(1, shard);
    let mut grouped = keys.clone();
    grouped.sort();
    assert_eq!(
        commits
            .iter()
            .map(|c| (c.keys.clone(), c.outcome.as_ref().map(Result::is_ok)))
            .collect::<Vec<_>>(),
        vec![(vec![keys[0].clone()], Some(true)), (grouped, Some(true))],
        "the shard's commits: {commits:?}"
    );

    // At the end, every value through the node and in the store.
    let expected = [2, 1, 1, 1];
    for (key, value) in keys.iter().zip(expected) {
        let read = cluster.send(1, key, Get).await.expect("the node answers");
        assert_eq!(read.value, Some(value), "{key} through the node");
    }
    drop(cluster);
    let stored = stored_values(&shared, shard).await;
    for (key, value) in keys.iter().zip(expected) {
        assert_eq!(stored.get(key), Some(&value), "{key} in the store");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A failed commit
// ---------------------------------------------------------------------------------------------

/// Goal: a commit that fails answers its messages with `OutcomeUnknown`, also those handled
/// after it on the state it did not write, and the shard reloads from the store before it
/// serves again. Method: one node; a value is committed; the next commit is held at the gate
/// and marked to fail without reaching the store, and another message is handled meanwhile;
/// then the commit fails. Both messages must get `OutcomeUnknown`; the next read must return
/// the value from before (after a second activation), and a later write must commit.
#[tokio::test]
async fn a_failed_commit_answers_outcome_unknown_and_the_shard_reloads() {
    let name = "durable-failed-commit";
    let (cluster, shared, faults) = start_shared::<Counters>(name, 1, patient).await;
    let shard: ShardId = 9;
    let key = cluster.key_of(shard).to_owned();
    let (written, _) = send_until_answered(&cluster, 1, &key, || Put { value: 5 }).await;
    assert_eq!(written.value, Some(5));
    let activations = faults.activations_of(1, shard);
    assert_eq!(activations.len(), 1, "one activation: {activations:?}");

    faults.gate(1, shard);
    faults.fail_next(1, shard);
    let since = Instant::now();
    let put = spawn_send(&cluster, 1, &key, Put { value: 7 });
    wait_arrived(&cluster, &faults, 1).await;
    let incr = spawn_send(&cluster, 1, &key, Incr);
    wait_completed(&cluster, 1, shard, since, 2).await;
    // A round trip through node 1's thread to another shard: the increment's change has joined
    // the commit queue behind the held commit.
    let elsewhere = cluster.key_of(shard + 1).to_owned();
    cluster
        .send(1, &elsewhere, Get)
        .await
        .expect("another shard answers at once");
    faults.open();
    let unknown = Err(SendError::Node(Error::OutcomeUnknown { shard }));
    assert_eq!(
        reply_of(put).await,
        unknown,
        "the write whose commit failed"
    );
    assert_eq!(
        reply_of(incr).await,
        unknown,
        "the increment handled on the state the failed commit did not write"
    );

    let read = cluster
        .send(1, &key, Get)
        .await
        .expect("the shard serves again");
    assert_eq!(
        read.value,
        Some(5),
        "the value from before the failed commit"
    );
    let activations = faults.activations_of(1, shard);
    assert_eq!(
        activations.len(),
        2,
        "the shard reloaded once: {activations:?}"
    );
    assert_eq!(
        activations[0], activations[1],
        "it reloads at its activation's epoch"
    );
    let rewritten = cluster
        .send(1, &key, Put { value: 9 })
        .await
        .expect("a write after the reload commits");
    assert_eq!(rewritten.value, Some(9));

    // At the end: the failed commit never reached the store, the next one did.
    let commits = faults.commits_of(1, shard);
    let outcomes: Vec<_> = commits
        .iter()
        .map(|c| match &c.outcome {
            Some(Ok(())) => "ok",
            Some(Err(StoreError::Backend { .. })) => "backend error",
            other => panic!("unexpected commit outcome {other:?} in {commits:?}"),
        })
        .collect();
    assert_eq!(outcomes, vec!["ok", "backend error", "ok"], "{commits:?}");
    let read = cluster.send(1, &key, Get).await.expect("the node answers");
    assert_eq!(read.value, Some(9));
    drop(cluster);
    assert_eq!(stored_values(&shared, shard).await.get(&key), Some(&9));
}

// ---------------------------------------------------------------------------------------------
// 5. An async on_activate
// ---------------------------------------------------------------------------------------------

/// Goal: an `async on_activate` runs to its end before the shard's first message is handled,
/// after the shard's durable state was loaded. Method: the store holds a value for the shard
/// before the node starts; the shard's hook sums the loaded values, then waits at a gate for a
/// token. The first message must stay unanswered and undelivered while the hook waits (checked
/// after a round trip to another shard of the node); once the gate opens, its reply must carry
/// the token and the loaded sum, and the hook must have run once.
#[tokio::test]
async fn an_async_on_activate_runs_before_the_first_message() {
    let name = "durable-warm-up";
    let key = key_of_shard("warm", WARM_UP_SHARD);
    // A value committed by an earlier owner (at epoch 0, below any map's).
    let memory = MemoryStore::new();
    memory
        .activate(WARM_UP_SHARD, READER, 0, Scope::All)
        .await
        .expect("a new shard activates");
    let mut seed = Durable::new(0u64);
    *seed = 41;
    let mut batch = Batch::new();
    seed.take_changes(&mut batch).expect("a counter encodes");
    memory
        .commit(WARM_UP_SHARD, 0, batch)
        .await
        .expect("the seed commits");
    let shared = memory.clone();
    let cluster = TestCluster::<WarmedUp>::start_with_stores(
        name,
        1,
        |_| {},
        move |_, _| Ok(Arc::new(shared.clone()) as Arc<dyn ShardStore>),
    )
    .await;
    let elsewhere = cluster.key_of(WARM_UP_SHARD + 1).to_owned();

    let since = Instant::now();
    let mut first = spawn_send(&cluster, 1, &key, ReadWarmUp);
    cluster
        .wait_until("the shard's on_activate begins", DEADLINE, || async {
            (WARM_UPS_BEGUN.load(Ordering::Acquire) >= 1).then_some(())
        })
        .await;
    let other = cluster
        .send(1, &elsewhere, ReadWarmUp)
        .await
        .expect("another shard activates and answers");
    assert_eq!(
        other,
        Warm {
            done: true,
            token: None,
            loaded_sum: 0
        }
    );
    assert!(
        is_pending(&mut first),
        "a reply came while on_activate waited"
    );
    let delivered = |kind| {
        cluster
            .recorder()
            .events()
            .iter()
            .filter(|e| e.shard == WARM_UP_SHARD && e.kind == kind && e.at >= since)
            .map(|e| e.at)
            .collect::<Vec<_>>()
    };
    assert!(
        delivered(ServeEventKind::Delivered).is_empty(),
        "the first message was handled while on_activate waited"
    );

    WARM_UP.send_replace(Some(7));
    let warm = reply_of(first)
        .await
        .expect("the first message is answered");
    assert_eq!(
        warm,
        Warm {
            done: true,
            token: Some(7),
            loaded_sum: 41
        },
        "what on_activate found, as the first message saw it"
    );
    let again = cluster.send(1, &key, ReadWarmUp).await.expect("answered");
    assert_eq!(again, warm);
    assert_eq!(WARM_UPS_BEGUN.load(Ordering::Acquire), 1, "one activation");
    let (activated, handled) = (
        delivered(ServeEventKind::Activated),
        delivered(ServeEventKind::Delivered),
    );
    assert!(
        activated.len() == 1 && handled.len() == 2 && activated[0] <= handled[0],
        "activated at {activated:?}, delivered at {handled:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Exactly once (issue 19)
// ---------------------------------------------------------------------------------------------

/// The deadline of a client call in the exactly-once tests: it covers a failover.
const CLIENT_DEADLINE: Duration = Duration::from_secs(40);

/// A client of `cluster` seeded with every node.
fn client_of<H: ShardHandler + Default>(cluster: &TestCluster<H>) -> Client {
    let seeds: Vec<_> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.addr(id))
        .collect();
    Client::with_config(seeds, None, "clusterfunk", CLIENT_DEADLINE).expect("a client")
}

/// The cluster error of a client call that failed, failing the test on any other outcome.
fn refusal<T: std::fmt::Debug>(outcome: Result<T, ClientError>) -> Error {
    match outcome {
        Err(ClientError::Cluster(error)) => error,
        other => panic!("expected a refusal from the cluster, got {other:?}"),
    }
}

/// Goal: an increment that its owner applied, whose reply never reached the client, is not
/// applied again when the client retries at the shard's next owner. Method: 3 nodes share a
/// store; the owner's commit of the increment is applied by the store and then held before it
/// returns, so the change (and its session record) is durable but no reply leaves; the owner
/// freezes, the others fail the shard over, and the client, which sees the owner silent and
/// the shard moved, sends the request again under its id. The new owner loads the record with
/// the state and must answer with the old owner's reply; the count, read back at the end
/// through every node and from the store, must be exactly 2 (one increment before, one now).
#[tokio::test]
async fn a_retry_after_failover_is_answered_from_the_record_the_old_owner_committed() {
    let name = "once-failover";
    let (cluster, shared, faults) = start_shared::<Counters>(name, 3, patient).await;
    let leader = cluster.wait_ready().await;
    let (old, others) = cluster.follower_and_others(leader);
    let (_, owners) = cluster.shards(old).await.expect("the old owner has a map");
    let shard = *shards_of(&owners, old)
        .first()
        .expect("every node of a 3-node cluster owns shards");
    let key = cluster.key_of(shard).to_owned();
    let client = client_of(&cluster);
    let first = client
        .send(key.as_str(), Incr)
        .await
        .expect("the first increment");
    assert_eq!((first.node, first.value), (old, Some(1)));

    faults.hold_after(old, shard);
    let request = Arc::new(client.request(key.as_str(), Incr).expect("a request"));
    let sent = {
        let request = request.clone();
        tokio::spawn(async move { request.send().await })
    };
    cluster
        .wait_until(
            "the owner's commit is applied and held",
            DEADLINE,
            || async { (faults.applied_held() >= 1).then_some(()) },
        )
        .await;
    let frozen = cluster.freeze(old).await.expect("the old owner runs");
    let reply = reply_of(sent)
        .await
        .expect("the retried increment is acknowledged");
    println!("{name}: node {old} froze with its commit applied; the client got {reply:?}");
    assert_eq!(
        (reply.node, reply.value),
        (old, Some(2)),
        "the retry is answered with the reply the old owner recorded, not applied again"
    );
    let new_owner = cluster
        .wait_until("another node owns the shard", DEADLINE, || async {
            let (_, owners) = cluster.shards(others[0]).await?;
            (owners[shard as usize] != old).then_some(owners[shard as usize])
        })
        .await;
    faults.let_return();
    frozen.thaw();
    drop(request);

    cluster.heal_and_check(name).await;
    for id in cluster.ids() {
        let (read, _) = send_until_answered(&cluster, id, &key, || Get).await;
        assert_eq!(
            read.value,
            Some(2),
            "{key} read through node {id}: {read:?}"
        );
    }
    println!("{name}: shard {shard} moved from node {old} to node {new_owner}");
    drop(cluster);
    assert_eq!(stored_values(&shared, shard).await.get(&key), Some(&2));
}

/// Goal: a request id is bound to what it asks. Method: one node with a store; request 7 of a
/// session sets a key to 1; the same number with another value is refused with
/// `RequestIdReused`, and the key still holds 1 at the end.
#[tokio::test]
async fn the_same_request_id_with_another_payload_is_refused() {
    let (cluster, _, _) = start_shared::<Counters>("once-reused", 1, |_| {}).await;
    cluster.wait_ready().await;
    let client = client_of(&cluster);
    let first = client
        .request_numbered(7, "reused", Put { value: 1 })
        .expect("a request");
    assert_eq!(first.send().await.expect("applied").value, Some(1));
    let other = client
        .request_numbered(7, "reused", Put { value: 2 })
        .expect("a request");
    let refused = refusal(other.send().await);
    assert!(
        matches!(refused, Error::RequestIdReused { seq: 7, .. }),
        "got {refused:?}"
    );
    // The same payload under the same id is answered again, not applied again.
    assert_eq!(first.send().await.expect("answered").value, Some(1));
    let read = client.send("reused", Get).await.expect("read");
    assert_eq!(read.value, Some(1));
}

/// Goal: a shard forgets the replies its client no longer waits on, and says so. Method: one
/// node; request 1 increments a key and is answered (and dropped); request 2 tells the shard
/// the client waits on nothing below 2, which drops reply 1; request 1 sent again is refused
/// with `RequestTooOld`, and the count is 2 at the end.
#[tokio::test]
async fn a_retry_below_the_low_watermark_is_refused() {
    let (cluster, _, _) = start_shared::<Counters>("once-watermark", 1, |_| {}).await;
    cluster.wait_ready().await;
    let client = client_of(&cluster);
    let first = client.request("watermark", Incr).expect("a request");
    let seq = first.id().seq;
    assert_eq!(first.send().await.expect("applied").value, Some(1));
    drop(first);
    let second = client.send("watermark", Incr).await.expect("applied");
    assert_eq!(second.value, Some(2));
    let again = client
        .request_numbered(seq, "watermark", Incr)
        .expect("a request");
    let refused = refusal(again.send().await);
    assert!(
        matches!(refused, Error::RequestTooOld { seq: s, low, .. } if s == seq && low > seq),
        "got {refused:?}"
    );
    let read = client.send("watermark", Get).await.expect("read");
    assert_eq!(read.value, Some(2));
}

/// Goal: a session's record expires, and a late retry is refused rather than applied again.
/// Method: one node with a session idle time of 200 ms; a request increments a key; once
/// more than twice that time has passed (the test waits for time itself, the subject of the
/// rule), another session's request to the same shard sweeps the expired record away; the
/// first request sent again must be refused with `SessionExpired`, and the count must be 2.
#[tokio::test]
async fn a_retry_on_an_expired_session_is_refused() {
    let idle = Duration::from_millis(200);
    let (cluster, _, _) = start_shared::<Counters>("once-expired", 1, move |config| {
        config.session_idle = idle;
    })
    .await;
    cluster.wait_ready().await;
    let client = client_of(&cluster);
    let request = client.request("expiring", Incr).expect("a request");
    assert_eq!(request.send().await.expect("applied").value, Some(1));
    tokio::time::sleep(idle * 3).await;
    let other = client_of(&cluster);
    let swept = other.send("expiring", Incr).await.expect("applied");
    assert_eq!(swept.value, Some(2));
    let refused = refusal(request.send().await);
    assert!(
        matches!(refused, Error::SessionExpired { idle_ms: 200, .. }),
        "got {refused:?}"
    );
    let read = client.send("expiring", Get).await.expect("read");
    assert_eq!(read.value, Some(2));
}

/// Goal: a handler's own sends are not applied twice when its request is retried. Method: one
/// node; a `Relay` to a key of one shard sends an `Incr` to a key of another shard, then
/// counts itself; the relay's own commit fails once (after its child was applied), so its
/// client gets an unknown outcome and sends it again under its id; the handler runs again and
/// sends its child under the same derived id, which the child's shard answers from its
/// record. At the end each key must hold exactly 1.
#[tokio::test]
async fn a_retried_parent_sends_its_children_under_the_same_ids_so_they_apply_once() {
    let (cluster, _, faults) = start_shared::<Counters>("once-nested", 1, |_| {}).await;
    cluster.wait_ready().await;
    let (parent, child) = (key_of_shard("parent", 3), key_of_shard("child", 5));
    let client = client_of(&cluster);
    faults.fail_next(1, 3);
    let relayed = client
        .send(parent.as_str(), Relay { to: child.clone() })
        .await
        .expect("the relay is acknowledged after its retry");
    assert_eq!(relayed.value, Some(1));
    let failed = faults
        .commits_of(1, 3)
        .iter()
        .filter(|commit| matches!(commit.outcome, Some(Err(_))))
        .count();
    assert_eq!(
        failed, 1,
        "the relay's first commit failed, so it was retried"
    );
    for key in [&parent, &child] {
        let read = client.send(key.as_str(), Get).await.expect("read");
        assert_eq!(read.value, Some(1), "{key}: {read:?}");
    }
}

/// Goal: without a record, a retry of a message that is not idempotent is refused rather
/// than applied again, and keys reserved for the records cannot be sent to. Method: one node
/// whose handler keeps no durable state; an increment is answered, then sent again under its
/// id: the client reports an unknown outcome and the count stays 1; a message to a key with
/// the reserved prefix is refused with `ReservedKey`.
#[tokio::test]
async fn a_retry_to_a_shard_without_a_record_is_refused_and_reserved_keys_are_too() {
    let cluster = TestCluster::start("once-unrecorded", 1).await;
    cluster.wait_ready().await;
    let client = client_of(&cluster);
    let request = client.request("plain", Incr).expect("a request");
    assert_eq!(request.send().await.expect("applied").value, Some(1));
    let again = request.send().await;
    assert!(
        again.as_ref().is_err_and(ClientError::is_outcome_unknown),
        "got {again:?}"
    );
    let read = client.send("plain", Get).await.expect("read");
    assert_eq!(read.value, Some(1));
    let mut reserved = clusterfunk::session::RESERVED_PREFIX.to_vec();
    reserved.extend_from_slice(b"x");
    let refused = refusal(client.send(reserved, Incr).await);
    assert_eq!(refused, Error::ReservedKey);
}
