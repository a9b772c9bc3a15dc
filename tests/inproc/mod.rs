//! The in-process test harness: a [`TestCluster`] of real clusterfunk nodes inside the test
//! process, each on its own OS thread running its own actix `System`, with its own LMDB data dir
//! in a temporary directory and its own loopback address.
//!
//! The harness can kill a node (stop its `System` without any graceful shutdown, as a crash
//! would), restart it from its own disk, pause it (freeze its thread), and partition nodes or
//! blackhole single directions of links with the transport's fault injector (`Node::faults`).
//! The nodes run [`Registers`] by default; [`TestCluster::start_with_stores`] runs another
//! handler and gives each node a shard store (for handlers with durable state).
//! A shared [`Recorder`] receives every node's [`ServeEvent`]s, and the
//! checks run at the end of each test: single owner ([`TestCluster::check_single_owner`]),
//! liveness ([`TestCluster::check_liveness`]) and convergence
//! ([`TestCluster::wait_converged`]). Every wait polls with a deadline and prints every node's
//! status when it runs out; nothing here asserts how long anything takes.
//!
//! Environment: `CLUSTERFUNK_TEST_LOG=<filter>` turns the nodes' tracing on (default: off).
//! Ports, keys per shard and polling come from the library's process harness
//! (`clusterfunk::testing`), which the process-level tests and the tools share. It does not own
//! the fault schedules or the test assertions: those live in the test files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::hash::Hasher;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_rt::{ArbiterHandle, System};
use clusterfunk::admin::{AdminRequest, AdminResponse, StatusReport};
use clusterfunk::persist::ShardStore;
use clusterfunk::prelude::*;
use clusterfunk::shard::Handles;
use clusterfunk::shard_map::{shard_for, Epoch};
use clusterfunk::storage::StoreOptions;
use clusterfunk::testing::{self, reserve_port_on_hosts, PortReservation};
use clusterfunk::NodeInfo;
use clusterfunk::{
    ConsensusConfig, LeaseConfig, NodeConfig, ServeEvent, ServeEventKind, ServeObserver,
};
use serde_bytes::ByteBuf;
use tempfile::TempDir;
use tokio::sync::oneshot;

/// Shards of every test cluster: few, so that checking every shard stays cheap.
pub const SHARD_COUNT: u32 = 64;

/// How long a node waits for a reply before `Error::Timeout` (its `request_timeout`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the harness waits for a `send` before it calls the request hung: the node's own
/// bound plus a margin for a busy machine. A request that takes longer broke its bound.
pub const SEND_BOUND: Duration = Duration::from_secs(15);

/// Bound on waits for the cluster to reach a state (elections, failover, handoff). Far above
/// what a passing test needs, because CI is a busy 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Bound on the liveness check: every shard must be served again within this after a heal.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(20);

/// How often [`TestCluster::wait_until`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(15);

/// Bound on starting one node (including retries while the old incarnation releases its data
/// dir and port).
const START_BOUND: Duration = Duration::from_secs(20);

/// Bound on a [`TestCluster::freeze`]: a frozen node thaws by itself after this, so a test that
/// forgets to thaw it (or fails while it is frozen) still ends.
const FREEZE_MAX: Duration = Duration::from_secs(120);

/// Keys starting with this make the first `on_restore` of their shard's snapshot panic; the
/// key's value is a token that [`restore_panicked`] reports on.
pub const RESTORE_PANIC_PREFIX: &str = "panic-on-restore";

/// The tokens whose `on_restore` panicked.
static RESTORES_PANICKED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// Whether the `on_restore` of a snapshot holding `token` (see [`RESTORE_PANIC_PREFIX`])
/// panicked.
// Only the handoff tests use it.
#[allow(dead_code)]
pub fn restore_panicked(token: u64) -> bool {
    lock(&RESTORES_PANICKED).contains(&token)
}

// ---------------------------------------------------------------------------------------------
// The handler
// ---------------------------------------------------------------------------------------------

/// What every handler method answers: who served the message, under which map epoch, and the
/// key's value after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// The node that ran the handler.
    pub node: NodeId,
    /// The map epoch it served under (the fencing token).
    pub epoch: Epoch,
    /// The shard of the key.
    pub shard: ShardId,
    /// The key's value after the message (`None`: never written on this shard's state).
    pub value: Option<u64>,
}

/// Adds one to the key's counter.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct Incr;

/// Sets the key's value.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct Put {
    /// The new value.
    pub value: u64,
}

/// Reads the key's value.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct Get;

/// Sets the key's value, like [`Put`], but declared idempotent: when its first attempt's fate
/// is unknown (its owner went silent and the shard moved), it is sent to the next owner.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
#[idempotent]
pub struct Set {
    /// The new value.
    pub value: u64,
}

/// Sets the key's value after sleeping `millis` (an `async` handler method: the shard takes no
/// other message meanwhile, and a deactivation waits its turn behind it).
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct SlowPut {
    /// The new value.
    pub value: u64,
    /// How long the handler sleeps before it stores the value.
    pub millis: u64,
}

/// Reads the key's value after sleeping `millis` (an `async` handler method, like [`SlowPut`]:
/// the value is read when the sleep ends, and the reply is withheld if the node stopped serving
/// the shard meanwhile).
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct SlowGet {
    /// How long the handler sleeps before it reads the value.
    pub millis: u64,
}

/// Stores a blob under the key (kept apart from its register value).
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(BlobServed)]
pub struct PutBlob {
    /// The blob.
    pub bytes: ByteBuf,
}

/// Reads the key's blob, as its length and checksum.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(BlobServed)]
pub struct GetBlob;

/// A blob's length and checksum, so replies stay small however big the blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobDigest {
    /// Its length in bytes.
    pub len: u64,
    /// A hash of its bytes.
    pub checksum: u64,
}

impl BlobDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> BlobDigest {
        // SipHash with fixed keys: the same bytes give the same checksum on every node.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        hasher.write(bytes);
        BlobDigest {
            len: bytes.len() as u64,
            checksum: hasher.finish(),
        }
    }
}

/// What `PutBlob` and `GetBlob` answer: who served the message, and the key's blob after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobServed {
    /// The node that ran the handler.
    pub node: NodeId,
    /// The shard of the key.
    pub shard: ShardId,
    /// The key's blob after the message (`None`: never stored on this shard's state).
    pub blob: Option<BlobDigest>,
}

/// What [`Registers`] hands over on a planned move: every register value and every blob.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistersSnapshot {
    /// The register values, by key bytes.
    values: Vec<(Vec<u8>, u64)>,
    /// The blobs, by key bytes.
    blobs: Vec<(Vec<u8>, ByteBuf)>,
}

/// The test handler: a register per key. Its state moves with a planned handoff
/// (`on_deactivate` → `on_restore`) and is lost on failover, as the design says.
#[derive(Default)]
pub struct Registers {
    /// The values of this shard's keys.
    values: HashMap<Key, u64>,
    /// The blobs of this shard's keys ([`PutBlob`]).
    blobs: HashMap<Key, ByteBuf>,
}

impl Registers {
    fn served(&self, key: &Key, ctx: &ShardContext) -> Served {
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: self.values.get(key).copied(),
        }
    }

    fn blob_served(&self, key: &Key, ctx: &ShardContext) -> BlobServed {
        BlobServed {
            node: ctx.node_id(),
            shard: ctx.shard(),
            blob: self.blobs.get(key).map(|blob| BlobDigest::of(blob)),
        }
    }
}

#[shard_handler]
impl Registers {
    fn incr(&mut self, key: Key, _msg: Incr, ctx: &mut ShardContext) -> Served {
        *self.values.entry(key.clone()).or_default() += 1;
        self.served(&key, ctx)
    }

    fn put(&mut self, key: Key, msg: Put, ctx: &mut ShardContext) -> Served {
        self.values.insert(key.clone(), msg.value);
        self.served(&key, ctx)
    }

    fn set(&mut self, key: Key, msg: Set, ctx: &mut ShardContext) -> Served {
        self.values.insert(key.clone(), msg.value);
        self.served(&key, ctx)
    }

    fn get(&mut self, key: Key, _msg: Get, ctx: &mut ShardContext) -> Served {
        self.served(&key, ctx)
    }

    async fn slow_put(&mut self, key: Key, msg: SlowPut, ctx: &mut ShardContext) -> Served {
        actix::clock::sleep(Duration::from_millis(msg.millis)).await;
        self.values.insert(key.clone(), msg.value);
        self.served(&key, ctx)
    }

    async fn slow_get(&mut self, key: Key, msg: SlowGet, ctx: &mut ShardContext) -> Served {
        actix::clock::sleep(Duration::from_millis(msg.millis)).await;
        self.served(&key, ctx)
    }

    fn put_blob(&mut self, key: Key, msg: PutBlob, ctx: &mut ShardContext) -> BlobServed {
        self.blobs.insert(key.clone(), msg.bytes);
        self.blob_served(&key, ctx)
    }

    fn get_blob(&mut self, key: Key, _msg: GetBlob, ctx: &mut ShardContext) -> BlobServed {
        self.blob_served(&key, ctx)
    }

    fn on_deactivate(&mut self, _ctx: &mut ShardContext) -> Option<Handoff> {
        let snapshot = RegistersSnapshot {
            values: self
                .values
                .drain()
                .map(|(key, value)| (key.into_bytes(), value))
                .collect(),
            blobs: self
                .blobs
                .drain()
                .map(|(key, blob)| (key.into_bytes(), blob))
                .collect(),
        };
        Handoff::encode(&snapshot).ok()
    }

    fn on_restore(&mut self, handoff: Handoff, _ctx: &mut ShardContext) {
        if let Ok(snapshot) = handoff.decode::<RegistersSnapshot>() {
            // A test that stores a value under a key starting with RESTORE_PANIC_PREFIX makes
            // the first restore of that snapshot panic (the value is the token of that test).
            for (key, token) in &snapshot.values {
                if key.starts_with(RESTORE_PANIC_PREFIX.as_bytes())
                    && lock(&RESTORES_PANICKED).insert(*token)
                {
                    panic!("on_restore panics once, {INTENDED_PANIC} (token {token})");
                }
            }
            self.values.extend(
                snapshot
                    .values
                    .into_iter()
                    .map(|(key, value)| (Key::from(key), value)),
            );
            self.blobs.extend(
                snapshot
                    .blobs
                    .into_iter()
                    .map(|(key, blob)| (Key::from(key), blob)),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The recorder and the single-owner checker
// ---------------------------------------------------------------------------------------------

/// Collects every [`ServeEvent`] of every node of a cluster (all nodes share the process, so
/// their `Instant`s are comparable).
pub struct Recorder {
    /// When the recorder was made; events print as milliseconds since then.
    base: Instant,
    /// Every event, in arrival order.
    events: Mutex<Vec<ServeEvent>>,
}

impl ServeObserver for Recorder {
    fn observe(&self, event: ServeEvent) {
        lock(&self.events).push(event);
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// An empty recorder; its clock starts now.
    pub fn new() -> Self {
        Recorder {
            base: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// How many events were recorded so far.
    pub fn count(&self) -> usize {
        lock(&self.events).len()
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<ServeEvent> {
        lock(&self.events).clone()
    }

    /// When the recorder was made: the zero of the times it prints.
    // Only the value tests use it.
    #[allow(dead_code)]
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Milliseconds from the recorder's start to `at`, for messages.
    pub fn millis(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.base).as_secs_f64() * 1000.0
    }

    /// The violations of the single-owner rule among `events` (see
    /// [`TestCluster::check_single_owner`]), described with the offending events.
    pub fn violations(&self, events: &[ServeEvent]) -> Vec<String> {
        single_owner_violations(self, events).1
    }

    /// The first delivery for `shard` by a node other than `node`, at or after `since`.
    pub fn first_delivery_by_other(
        &self,
        shard: ShardId,
        node: NodeId,
        since: Instant,
    ) -> Option<ServeEvent> {
        lock(&self.events)
            .iter()
            .filter(|e| {
                e.kind == ServeEventKind::Delivered
                    && e.shard == shard
                    && e.node != node
                    && e.at >= since
            })
            .min_by_key(|e| e.at)
            .copied()
    }

    fn describe(&self, event: &ServeEvent) -> String {
        format!(
            "{:>10.3} ms  node {} shard {} epoch {} {:?}",
            self.millis(event.at),
            event.node,
            event.shard,
            event.epoch,
            event.kind
        )
    }

    /// Every event of `shard` between `from` and `to`, one per line.
    fn shard_history(
        &self,
        events: &[ServeEvent],
        shard: ShardId,
        from: Instant,
        to: Instant,
    ) -> String {
        let mut lines: Vec<&ServeEvent> = events
            .iter()
            .filter(|e| e.shard == shard && e.at >= from && e.at <= to)
            .collect();
        lines.sort_by_key(|e| e.at);
        let shown = 60;
        let mut text: String = lines
            .iter()
            .take(shown)
            .map(|e| format!("      {}\n", self.describe(e)))
            .collect();
        if lines.len() > shown {
            text.push_str(&format!("      ... {} more\n", lines.len() - shown));
        }
        text
    }
}

/// What the single-owner check saw.
#[derive(Debug, Default, Clone)]
pub struct CheckSummary {
    /// Deliveries checked.
    pub deliveries: usize,
    /// Handler runs checked from delivery to completion (a [`ServeEventKind::Completed`]
    /// paired with its delivery).
    pub completed_runs: usize,
    /// Deliveries per node.
    pub by_node: BTreeMap<NodeId, usize>,
    /// Activations per node.
    pub activations: BTreeMap<NodeId, usize>,
    /// The highest map epoch any delivery was made under.
    pub epoch_max: Epoch,
}

/// Finds the violations of the single-owner rule in `events`: for one shard, (a) a node
/// delivering under an older epoch after another node delivered under a newer one, (b) two
/// nodes delivering under the same epoch, and (c) a node delivering while another node was
/// still running a handler it completed with a success reply (between that handler's
/// `Delivered` and `Completed`). Returns a description of each (at most a few).
///
/// Why (c) holds for any epochs: a node replies with success only while it still serves the
/// shard (its lease valid, the shard still its own in its table, its actor still holding the
/// state), and another node gets the shard only after the old actor retired (a planned move:
/// a retirement waits for the running handler) or after the old owner's lease expired
/// (failover: then the old handler's reply is withheld and no `Completed` is recorded). So a
/// completed run must not overlap any other node's delivery, whatever epochs the two carry.
/// Events must be in the order each node recorded them (as [`Recorder::events`] gives them):
/// a `Completed` pairs with the latest `Delivered` of the same node and shard before it.
fn single_owner_violations(
    recorder: &Recorder,
    events: &[ServeEvent],
) -> (CheckSummary, Vec<String>) {
    let mut summary = CheckSummary::default();
    let mut by_shard: BTreeMap<ShardId, Vec<ServeEvent>> = BTreeMap::new();
    // (c) The delivery each node is handling per shard, and the completed runs per shard.
    let mut running: BTreeMap<(NodeId, ShardId), ServeEvent> = BTreeMap::new();
    let mut runs: BTreeMap<ShardId, Vec<(ServeEvent, ServeEvent)>> = BTreeMap::new();
    for event in events {
        match event.kind {
            ServeEventKind::Delivered => {
                summary.deliveries += 1;
                *summary.by_node.entry(event.node).or_default() += 1;
                summary.epoch_max = summary.epoch_max.max(event.epoch);
                by_shard.entry(event.shard).or_default().push(*event);
                running.insert((event.node, event.shard), *event);
            }
            ServeEventKind::Completed => {
                if let Some(delivered) = running.remove(&(event.node, event.shard)) {
                    if delivered.epoch == event.epoch && delivered.at <= event.at {
                        summary.completed_runs += 1;
                        runs.entry(event.shard)
                            .or_default()
                            .push((delivered, *event));
                    }
                }
            }
            ServeEventKind::Activated => *summary.activations.entry(event.node).or_default() += 1,
            ServeEventKind::Deactivated => {}
        }
    }
    let mut violations = Vec::new();
    let context = Duration::from_millis(1500);
    for (shard, deliveries) in &mut by_shard {
        deliveries.sort_by_key(|e| e.at);
        // (a) The delivery with the highest epoch so far, per node.
        let mut newest: BTreeMap<NodeId, ServeEvent> = BTreeMap::new();
        // (b) The first delivery per (epoch, node).
        let mut first_at_epoch: BTreeMap<Epoch, BTreeMap<NodeId, ServeEvent>> = BTreeMap::new();
        let mut found_a = false;
        for later in deliveries.iter() {
            if !found_a {
                if let Some(earlier) = newest
                    .iter()
                    .filter(|(node, e)| {
                        **node != later.node && e.epoch > later.epoch && e.at < later.at
                    })
                    .map(|(_, e)| *e)
                    .max_by_key(|e| e.epoch)
                {
                    found_a = true;
                    violations.push(format!(
                        "shard {shard}: node {} delivered under epoch {} at {:.3} ms, after node {} had delivered under the newer epoch {} at {:.3} ms\n    offending events:\n      {}\n      {}\n    history of the shard around them:\n{}",
                        later.node,
                        later.epoch,
                        recorder.millis(later.at),
                        earlier.node,
                        earlier.epoch,
                        recorder.millis(earlier.at),
                        recorder.describe(&earlier),
                        recorder.describe(later),
                        recorder.shard_history(events, *shard, earlier.at.checked_sub(context).unwrap_or(earlier.at), later.at + context),
                    ));
                }
            }
            let entry = newest.entry(later.node).or_insert(*later);
            if later.epoch > entry.epoch {
                *entry = *later;
            }
            first_at_epoch
                .entry(later.epoch)
                .or_default()
                .entry(later.node)
                .or_insert(*later);
        }
        // (c) Deliveries by other nodes during a completed run.
        for (delivered, completed) in runs.get(shard).map(Vec::as_slice).unwrap_or_default() {
            let start = deliveries.partition_point(|e| e.at < delivered.at);
            let intruder = deliveries[start..]
                .iter()
                .take_while(|e| e.at <= completed.at)
                .find(|e| e.node != delivered.node);
            if let Some(intruder) = intruder {
                violations.push(format!(
                    "shard {shard}: node {} delivered under epoch {} at {:.3} ms while node {} was still running a handler it took under epoch {} at {:.3} ms and completed with a success reply at {:.3} ms\n    offending events:\n      {}\n      {}\n      {}\n    history of the shard around them:\n{}",
                    intruder.node,
                    intruder.epoch,
                    recorder.millis(intruder.at),
                    delivered.node,
                    delivered.epoch,
                    recorder.millis(delivered.at),
                    recorder.millis(completed.at),
                    recorder.describe(delivered),
                    recorder.describe(intruder),
                    recorder.describe(completed),
                    recorder.shard_history(events, *shard, delivered.at.checked_sub(context).unwrap_or(delivered.at), completed.at + context),
                ));
                break;
            }
        }
        for (epoch, nodes) in first_at_epoch {
            if nodes.len() > 1 {
                let firsts: Vec<&ServeEvent> = nodes.values().collect();
                let from = firsts.iter().map(|e| e.at).min().unwrap_or(recorder.base);
                let to = firsts.iter().map(|e| e.at).max().unwrap_or(recorder.base);
                violations.push(format!(
                    "shard {shard}: nodes {:?} all delivered under the same epoch {epoch}\n    first delivery of each:\n{}    history of the shard around them:\n{}",
                    nodes.keys().collect::<Vec<_>>(),
                    firsts
                        .iter()
                        .map(|e| format!("      {}\n", recorder.describe(e)))
                        .collect::<String>(),
                    recorder.shard_history(events, *shard, from.checked_sub(context).unwrap_or(from), to + context),
                ));
                break;
            }
        }
        if violations.len() >= 6 {
            break;
        }
    }
    (summary, violations)
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// A running incarnation of a node.
struct Running<H: ShardHandler> {
    /// The node handle (cloned out of the node's thread).
    node: Node<H>,
    /// The node's actix `System`: stopping it kills the node.
    system: System,
    /// The node's arbiter: requests are spawned there, so they run on the node's own thread.
    arbiter: ArbiterHandle,
    /// The node's thread; it ends when the `System` stops.
    thread: JoinHandle<()>,
}

/// One node of a [`TestCluster`], running or not.
struct Slot<H: ShardHandler> {
    /// Its node id.
    id: NodeId,
    /// Its address `127.0.0.<id>:<cluster port>`.
    addr: SocketAddr,
    /// Its LMDB data dir.
    data_dir: PathBuf,
    /// The directory its shard store may keep its data in (see [`StoreFactory`]), beside the
    /// data dir and never inside it.
    store_dir: PathBuf,
    /// The running incarnation, if any.
    running: Mutex<Option<Running<H>>>,
    /// How often it was started.
    starts: AtomicU32,
}

/// Why [`TestCluster::send`] got no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The node answered with this error.
    Node(Error),
    /// The node is not running (killed, or killed while the request was in flight).
    NotRunning,
    /// No answer within [`SEND_BOUND`]: the request broke its own time bound.
    Hung,
}

/// A node frozen by [`TestCluster::freeze`]: it thaws when this is thawed or dropped (also when
/// the test fails while it is frozen).
// Only the durable-state tests use it.
#[allow(dead_code)]
pub struct Frozen {
    /// Dropping it ends the node thread's blocking wait.
    _thaw: std::sync::mpsc::Sender<()>,
}

impl Frozen {
    /// Lets the node run again.
    // Only the durable-state tests use it.
    #[allow(dead_code)]
    pub fn thaw(self) {}
}

/// N real nodes in this process running handler `H` ([`Registers`] unless the test chose
/// another), their recorder, and the faults injected between them.
pub struct TestCluster<H: ShardHandler = Registers> {
    /// The test's name, for messages.
    name: String,
    /// Holds the data dirs; kept on disk when the test fails.
    dir: Option<TempDir>,
    /// The port every node listens on (each on its own address `127.0.0.<id>`, see
    /// [`reserve_port_on_hosts`]), held until the cluster drops.
    _port: PortReservation,
    /// The nodes, node id `i` at index `i - 1`.
    slots: Vec<Slot<H>>,
    /// Receives every node's serve events.
    recorder: Arc<Recorder>,
    /// The blocked directed links `(from, to)`: `from`'s requests to `to` fail. Re-applied to a
    /// node when it restarts (its fault injector starts empty).
    blocked: Mutex<BTreeSet<(NodeId, NodeId)>>,
    /// The slowed directed links: `from`'s requests to `to` wait this long before they are
    /// sent. Re-applied on restart like `blocked`.
    delayed: Mutex<BTreeMap<(NodeId, NodeId), Duration>>,
    /// The blackholed directed links `(from, to)`: every frame `from` sends to `to` is lost
    /// without a word (see [`TestCluster::blackhole`]). Re-applied on restart like `blocked`.
    blackholed: Mutex<BTreeSet<(NodeId, NodeId)>>,
    /// A key of each shard, by shard.
    keys: Vec<String>,
    /// Adjusts every node's configuration after the harness set its own timings
    /// ([`TestCluster::start_with`]); applied at every start and restart.
    configure: Configure,
    /// Makes each node's shard store at every start and restart; `None`: the nodes have none.
    stores: Option<StoreFactory>,
}

/// A change to the harness's node configuration, e.g. a shorter `deactivate_timeout`.
pub type Configure = Arc<dyn Fn(&mut NodeConfig) + Send + Sync>;

/// Makes the shard store of node `id` for one incarnation of it, given a directory of the node's
/// own that outlives its restarts (for a store on disk); called on the node's thread before the
/// node starts. An `Err` fails that start attempt, which the harness retries (a killed
/// incarnation may still hold the directory open for a moment).
pub type StoreFactory =
    Arc<dyn Fn(NodeId, &Path) -> Result<Arc<dyn ShardStore>, String> + Send + Sync>;

impl TestCluster {
    /// Starts `nodes` nodes (ids `1..=nodes`) that bootstrap one cluster together, and waits
    /// until they all serve under one map ([`TestCluster::wait_ready`]).
    pub async fn start(name: &str, nodes: usize) -> Arc<TestCluster> {
        TestCluster::start_with(name, nodes, |_| {}).await
    }

    /// [`TestCluster::start`], with `configure` applied to every node's configuration after the
    /// harness's own settings (node id, shard count, timings), at every start and restart.
    pub async fn start_with(
        name: &str,
        nodes: usize,
        configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> Arc<TestCluster> {
        TestCluster::launch_all(name, nodes, Arc::new(configure), None).await
    }
}

impl<H: ShardHandler + Default> TestCluster<H> {
    /// Starts `nodes` nodes running handler `H`, like [`TestCluster::start_with`], where node
    /// `id` keeps the durable state of its shards in the store `stores(id, dir)` returns (called
    /// again at every restart; `dir` is the node's own and survives restarts). Give every node a
    /// clone of one [`MemoryStore`](clusterfunk::persist::MemoryStore) for a store they share,
    /// or open an [`LmdbShardStore`](clusterfunk::persist::LmdbShardStore) in `dir` for one
    /// local to the node.
    // Only the durable-state tests use it.
    #[allow(dead_code)]
    pub async fn start_with_stores(
        name: &str,
        nodes: usize,
        configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
        stores: impl Fn(NodeId, &Path) -> Result<Arc<dyn ShardStore>, String> + Send + Sync + 'static,
    ) -> Arc<TestCluster<H>> {
        TestCluster::launch_all(name, nodes, Arc::new(configure), Some(Arc::new(stores))).await
    }

    /// Starts the nodes of a new cluster and waits until they serve under one map.
    async fn launch_all(
        name: &str,
        nodes: usize,
        configure: Configure,
        stores: Option<StoreFactory>,
    ) -> Arc<TestCluster<H>> {
        init_logging();
        let dir = tempfile::Builder::new()
            .prefix(&format!("clusterfunk-{name}-"))
            .tempdir()
            .expect("create the cluster's temporary directory");
        let hosts: Vec<Ipv4Addr> = (1..=nodes as NodeId).map(node_ip).collect();
        let reservation =
            reserve_port_on_hosts(name, &hosts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let port = reservation.ports()[0];
        let slots = (1..=nodes as NodeId)
            .map(|id| Slot {
                id,
                addr: node_addr(id, port),
                data_dir: dir.path().join(format!("node-{id}")),
                store_dir: dir.path().join(format!("node-{id}-store")),
                running: Mutex::new(None),
                starts: AtomicU32::new(0),
            })
            .collect();
        let keys = (0..SHARD_COUNT)
            .map(|shard| key_of_shard("probe", shard))
            .collect();
        let cluster = Arc::new(TestCluster {
            name: name.to_string(),
            dir: Some(dir),
            _port: reservation,
            slots,
            recorder: Arc::new(Recorder::new()),
            blocked: Mutex::new(BTreeSet::new()),
            delayed: Mutex::new(BTreeMap::new()),
            blackholed: Mutex::new(BTreeSet::new()),
            keys,
            configure,
            stores,
        });
        println!(
            "{name}: {nodes} nodes on 127.0.0.1..={nodes}:{port}, data in {}",
            cluster.dir().display()
        );
        for id in cluster.ids() {
            cluster.launch(id).await;
        }
        cluster.wait_ready().await;
        cluster
    }

    /// The address node `id` listens on (for a [`clusterfunk::Client`]: the nodes are
    /// insecure).
    // Only the client tests use it.
    #[allow(dead_code)]
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        self.slot(id).addr
    }

    /// The node ids, ascending.
    pub fn ids(&self) -> Vec<NodeId> {
        self.slots.iter().map(|slot| slot.id).collect()
    }

    /// The ids of the running nodes.
    pub fn running_ids(&self) -> Vec<NodeId> {
        self.slots
            .iter()
            .filter(|slot| lock(&slot.running).is_some())
            .map(|slot| slot.id)
            .collect()
    }

    /// The recorder every node reports to.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// A key of `shard` (the same one every time).
    pub fn key_of(&self, shard: ShardId) -> &str {
        &self.keys[shard as usize]
    }

    /// The handle of node `id`, if it runs.
    pub fn node(&self, id: NodeId) -> Option<Node<H>> {
        lock(&self.slot(id).running)
            .as_ref()
            .map(|r| r.node.clone())
    }

    /// A node other than `leader` (the lowest id), and every node but that one.
    // Not every test file needs it.
    #[allow(dead_code)]
    pub fn follower_and_others(&self, leader: NodeId) -> (NodeId, Vec<NodeId>) {
        let follower = self
            .ids()
            .into_iter()
            .find(|&id| id != leader)
            .expect("a cluster of more than one node");
        let others = self
            .ids()
            .into_iter()
            .filter(|&id| id != follower)
            .collect();
        (follower, others)
    }

    /// Waits until node `node` started handling a message for `shard` (a delivery recorded at
    /// or after `since`).
    // Not every test file waits for one.
    #[allow(dead_code)]
    pub async fn wait_delivered(&self, node: NodeId, shard: ShardId, since: Instant) {
        self.wait_until(
            &format!("node {node} handles a message for shard {shard}"),
            DEADLINE,
            || async {
                self.recorder()
                    .events()
                    .iter()
                    .any(|e| {
                        e.kind == ServeEventKind::Delivered
                            && e.node == node
                            && e.shard == shard
                            && e.at >= since
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Node `id`'s status report, if it runs.
    pub fn status(&self, id: NodeId) -> Option<StatusReport> {
        self.node(id)?.cluster_status()
    }

    /// Sends `msg` to `key` through node `id`. The request runs on the node's own thread (as a
    /// client of that node would be served), and the harness waits at most [`SEND_BOUND`].
    pub async fn send<M>(&self, id: NodeId, key: &str, msg: M) -> Result<M::Reply, SendError>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        self.send_within(id, key, msg, SEND_BOUND).await
    }

    /// [`TestCluster::send`], waiting at most `bound` instead of [`SEND_BOUND`] before it calls
    /// the request hung: for a request through a node the test froze, whose node-side timeout
    /// cannot run until the node thaws.
    pub async fn send_within<M>(
        &self,
        id: NodeId,
        key: &str,
        msg: M,
        bound: Duration,
    ) -> Result<M::Reply, SendError>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        let (node, arbiter) = {
            let running = lock(&self.slot(id).running);
            let Some(running) = running.as_ref() else {
                return Err(SendError::NotRunning);
            };
            (running.node.clone(), running.arbiter.clone())
        };
        let (reply, answer) = oneshot::channel();
        let key = key.to_string();
        let spawned = arbiter.spawn(async move {
            let result = node.send(key.as_str(), msg).await;
            let _ = reply.send(result);
        });
        if !spawned {
            return Err(SendError::NotRunning);
        }
        match tokio::time::timeout(bound, answer).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(error))) => Err(SendError::Node(error)),
            // The node's runtime dropped the request: it was killed meanwhile.
            Ok(Err(_)) => Err(SendError::NotRunning),
            Err(_) => Err(SendError::Hung),
        }
    }

    /// Node `id`'s shard map (epoch and owner of every shard), if it runs and has one.
    pub async fn shards(&self, id: NodeId) -> Option<(Epoch, Vec<NodeId>)> {
        let node = self.node(id)?;
        match node.admin(AdminRequest::Shards).await {
            Ok(AdminResponse::Shards(report)) if report.epoch > 0 => Some((
                report.epoch,
                report.shards.iter().map(|owner| owner.node).collect(),
            )),
            _ => None,
        }
    }

    /// Kills node `id`: stops its `System` (dropping every task, connection and shard actor on
    /// it) and drops its handle, without calling anything on the node, as a crash would. The
    /// data dir stays for a restart.
    pub async fn kill(&self, id: NodeId) {
        let running = lock(&self.slot(id).running)
            .take()
            .unwrap_or_else(|| panic!("{}: kill: node {id} is not running", self.name));
        running.system.stop();
        let deadline = Instant::now() + DEADLINE;
        while !running.thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{}: node {id}'s System did not stop within {DEADLINE:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = running.thread.join();
        drop(running.node);
    }

    /// Starts node `id` again from its data dir after [`TestCluster::kill`], on the same address,
    /// re-applying the faults of the links from it (blocks, delays, blackholes) and the
    /// blackholes of links to it. The fault injector only exists once the node has started, so
    /// the node may exchange a few messages before they apply: partitions leak for a moment at a
    /// restart, which safety must survive anyway.
    pub async fn restart(&self, id: NodeId) {
        assert!(
            lock(&self.slot(id).running).is_none(),
            "{}: restart: node {id} is running",
            self.name
        );
        self.launch(id).await;
    }

    /// Blocks `from`'s requests to `to` (one direction only: `to` can still reach `from`).
    pub fn block(&self, from: NodeId, to: NodeId) {
        lock(&self.blocked).insert((from, to));
        if let Some(node) = self.node(from) {
            node.faults()
                .expect("a clustered node has a fault injector")
                .block(self.slot(to).addr);
        }
    }

    /// Delays `from`'s requests to `to` by `delay` (one direction only; `Duration::ZERO` ends
    /// it).
    pub fn slow(&self, from: NodeId, to: NodeId, delay: Duration) {
        lock(&self.delayed).insert((from, to), delay);
        if let Some(node) = self.node(from) {
            node.faults()
                .expect("a clustered node has a fault injector")
                .set_delay(self.slot(to).addr, delay);
        }
    }

    /// Loses every frame `from` sends to `to`, without closing any connection and without any
    /// error: `from`'s requests to `to` are dropped unsent, and `from`'s answers to `to`'s
    /// requests are dropped on arrival at `to`. Whoever waits for them runs into its own
    /// timeout. The other direction (`to` to `from`) still works. Re-applied when either node
    /// restarts; [`TestCluster::heal`] ends it.
    // Only the value tests use it.
    #[allow(dead_code)]
    pub fn blackhole(&self, from: NodeId, to: NodeId) {
        lock(&self.blackholed).insert((from, to));
        if let Some(node) = self.node(from) {
            node.faults()
                .expect("a clustered node has a fault injector")
                .blackhole_requests(self.slot(to).addr);
        }
        if let Some(node) = self.node(to) {
            node.faults()
                .expect("a clustered node has a fault injector")
                .blackhole_responses(self.slot(from).addr);
        }
    }

    /// Freezes node `id` for `duration`, as a stopped process (or a long GC pause) would be:
    /// blocks its thread, so that its raft, lease, transport and shard tasks all stand still,
    /// while its clock runs on (only its storage writer thread keeps running). Returns once the
    /// pause has begun (at once when the node is not running); the node resumes by itself.
    // Only the value tests use it.
    #[allow(dead_code)]
    pub async fn pause(&self, id: NodeId, duration: Duration) {
        let Some(arbiter) = lock(&self.slot(id).running)
            .as_ref()
            .map(|r| r.arbiter.clone())
        else {
            return;
        };
        let (began, began_rx) = oneshot::channel::<()>();
        let spawned = arbiter.spawn(async move {
            let _ = began.send(());
            // Deliberately blocking: this is the pause.
            std::thread::sleep(duration);
        });
        if spawned {
            let _ = tokio::time::timeout(DEADLINE, began_rx).await;
        }
    }

    /// Freezes node `id` until the returned [`Frozen`] is thawed or dropped (at most
    /// [`FREEZE_MAX`]), as [`TestCluster::pause`] does for a fixed time: its thread blocks, so
    /// its raft, lease, transport and shard tasks (and a durable shard's commits) all stand
    /// still while its clock runs on. Returns once the freeze has begun; `None` when the node is
    /// not running.
    // Only the durable-state tests use it.
    #[allow(dead_code)]
    pub async fn freeze(&self, id: NodeId) -> Option<Frozen> {
        let arbiter = lock(&self.slot(id).running)
            .as_ref()
            .map(|r| r.arbiter.clone())?;
        let (thaw, thawed) = std::sync::mpsc::channel::<()>();
        let (began, began_rx) = oneshot::channel::<()>();
        let spawned = arbiter.spawn(async move {
            let _ = began.send(());
            // Deliberately blocking: this is the freeze. It ends when the sender is dropped.
            let _ = thawed.recv_timeout(FREEZE_MAX);
        });
        if !spawned {
            return None;
        }
        match tokio::time::timeout(DEADLINE, began_rx).await {
            Ok(Ok(())) => Some(Frozen { _thaw: thaw }),
            _ => None,
        }
    }

    /// Cuts every link between the sets `a` and `b`, both ways.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.block(x, y);
                self.block(y, x);
            }
        }
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&self, id: NodeId) {
        let others: Vec<NodeId> = self.ids().into_iter().filter(|&o| o != id).collect();
        self.partition(&[id], &others);
    }

    /// Unblocks every link and removes every delay and blackhole, on every running node.
    pub fn heal(&self) {
        lock(&self.blocked).clear();
        lock(&self.delayed).clear();
        lock(&self.blackholed).clear();
        for id in self.running_ids() {
            if let Some(node) = self.node(id) {
                let faults = node
                    .faults()
                    .expect("a clustered node has a fault injector");
                faults.unblock_all();
                for slot in &self.slots {
                    faults.set_delay(slot.addr, Duration::ZERO);
                }
            }
        }
    }

    /// Polls `probe` every ~15 ms until it returns `Some`, and returns that. When `timeout`
    /// passes first, fails the test with `description` and every node's status.
    pub async fn wait_until<T, F, Fut>(
        &self,
        description: &str,
        timeout: Duration,
        mut probe: F,
    ) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let polled = testing::wait_for(description, POLL_INTERVAL, timeout, || {
            let answer = probe();
            async move { answer.await.ok_or("not yet") }
        })
        .await;
        polled.unwrap_or_else(|_| {
            panic!(
                "{}: timed out after {timeout:?} waiting until {description}\n{}",
                self.name,
                self.report()
            )
        })
    }

    /// Waits until the running nodes agree: each serves (holds a lease), names the same leader
    /// (one of them, which says it leads), in the same term, with the same map epoch, no member
    /// marked down and no shard moving. Returns the leader.
    pub async fn wait_ready(&self) -> NodeId {
        self.wait_until(
            "the running nodes serve under one leader and one map",
            DEADLINE,
            move || async move { self.agreement() },
        )
        .await
    }

    /// One look at [`TestCluster::wait_ready`]'s condition.
    fn agreement(&self) -> Option<NodeId> {
        let ids = self.running_ids();
        let mut leader = None;
        let mut first: Option<(u64, Epoch)> = None;
        for &id in &ids {
            let node = self.node(id)?;
            let status = node.cluster_status()?;
            if !node.status().serving
                || status.leader.is_none()
                || !status.down.is_empty()
                || status.shards_moving != 0
                || status.epoch == 0
            {
                return None;
            }
            if leader.is_some_and(|l| Some(l) != status.leader) {
                return None;
            }
            leader = status.leader;
            let view = (status.term, status.epoch);
            if first.is_some_and(|f| f != view) {
                return None;
            }
            first = Some(view);
        }
        let leader = leader?;
        (ids.contains(&leader) && self.status(leader)?.raft_state == "leader").then_some(leader)
    }

    /// Waits until every running node holds the same map (epoch and owners), they agree on the
    /// leader, and no member is down and no shard moving; returns the map.
    pub async fn wait_converged(&self) -> (Epoch, Vec<NodeId>) {
        let map = self
            .wait_until(
                "the running nodes converge on one map (same epoch and owners, none down, nothing moving)",
                DEADLINE,
                move || self.converged_once(),
            )
            .await;
        let owners: BTreeSet<NodeId> = map.1.iter().copied().collect();
        println!(
            "{}: converged on map epoch {} with owners {owners:?}",
            self.name, map.0
        );
        map
    }

    /// One look at [`TestCluster::wait_converged`]'s condition: the common map, if there is one.
    pub async fn converged_once(&self) -> Option<(Epoch, Vec<NodeId>)> {
        self.agreement()?;
        let mut maps = Vec::new();
        for id in self.running_ids() {
            maps.push(self.shards(id).await?);
        }
        let first = maps.first()?.clone();
        maps.iter().all(|m| *m == first).then_some(first)
    }

    /// Checks the single-owner rule over every event recorded so far; fails the test with the
    /// offending events (and `context`, e.g. the seed) if it is broken.
    pub fn check_single_owner(&self, context: &str) -> CheckSummary {
        let events = self.recorder.events();
        let (summary, violations) = single_owner_violations(&self.recorder, &events);
        assert!(
            violations.is_empty(),
            "{}: single owner broken ({context}); {} violation(s):\n{}",
            self.name,
            violations.len(),
            violations.join("\n")
        );
        println!(
            "{}: single owner holds over {} deliveries and {} completed handler runs (by node {:?}, activations {:?}, newest epoch {})",
            self.name, summary.deliveries, summary.completed_runs, summary.by_node, summary.activations, summary.epoch_max
        );
        summary
    }

    /// Every node's state and the blocked links, for failure messages.
    pub fn report(&self) -> String {
        let mut report = format!(
            "  blocked links (from -> to): {:?}\n  slowed links: {:?}\n  blackholed links (from -> to): {:?}\n",
            lock(&self.blocked).iter().collect::<Vec<_>>(),
            lock(&self.delayed),
            lock(&self.blackholed).iter().collect::<Vec<_>>()
        );
        for slot in &self.slots {
            let starts = slot.starts.load(Ordering::Relaxed);
            match self.node(slot.id) {
                None => report.push_str(&format!(
                    "--- node {} at {}: not running (started {starts} times)\n",
                    slot.id, slot.addr
                )),
                Some(node) => report.push_str(&format!(
                    "--- node {} at {} (start #{starts}): {:?}\n  status: {:?}\n",
                    slot.id,
                    slot.addr,
                    node.status(),
                    node.cluster_status()
                )),
            }
        }
        report
    }

    /// Node `id`'s data dir (its LMDB environment); read it only while the node is killed.
    // Only the value tests use it.
    #[allow(dead_code)]
    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.slot(id).data_dir.clone()
    }

    fn slot(&self, id: NodeId) -> &Slot<H> {
        self.slots
            .iter()
            .find(|slot| slot.id == id)
            .unwrap_or_else(|| panic!("{}: no node {id}", self.name))
    }

    fn dir(&self) -> &std::path::Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    /// Starts node `id` on its own thread and `System`, retrying while the previous incarnation
    /// still holds the data dir or the port, then re-applies the faults of the links from it.
    async fn launch(&self, id: NodeId) {
        let slot = self.slot(id);
        let members: Vec<(NodeId, NodeInfo)> = self
            .slots
            .iter()
            .map(|s| {
                (
                    s.id,
                    NodeInfo {
                        addr: s.addr.to_string(),
                        zone: None,
                    },
                )
            })
            .collect();
        let deadline = Instant::now() + START_BOUND;
        let mut attempt = 0u32;
        let mut refusals = Vec::new();
        let running = loop {
            attempt += 1;
            match spawn_node::<H>(NodeSetup {
                id,
                addr: slot.addr,
                data_dir: slot.data_dir.clone(),
                store_dir: slot.store_dir.clone(),
                members: members.clone(),
                recorder: self.recorder.clone(),
                configure: self.configure.clone(),
                stores: self.stores.clone(),
            })
            .await
            {
                Ok(running) => break running,
                Err(error) => {
                    // The killed incarnation's LMDB environment and listener close when its
                    // runtime finished dropping; until then opening or binding fails.
                    assert!(
                        Instant::now() < deadline && attempt < 1000,
                        "{}: node {id} did not start within {START_BOUND:?} ({attempt} attempts): {error}",
                        self.name
                    );
                    if refusals.len() < 3 {
                        refusals.push(error);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        if attempt > 1 {
            println!(
                "{}: node {id} started at attempt {attempt}; earlier attempts failed: {refusals:?}",
                self.name
            );
        }
        slot.starts.fetch_add(1, Ordering::Relaxed);
        let faults = running
            .node
            .faults()
            .expect("a clustered node has a fault injector")
            .clone();
        *lock(&slot.running) = Some(running);
        for (from, to) in lock(&self.blocked).iter() {
            if *from == id {
                faults.block(self.slot(*to).addr);
            }
        }
        for ((from, to), delay) in lock(&self.delayed).iter() {
            if *from == id {
                faults.set_delay(self.slot(*to).addr, *delay);
            }
        }
        for (from, to) in lock(&self.blackholed).iter() {
            if *from == id {
                faults.blackhole_requests(self.slot(*to).addr);
            }
            if *to == id {
                faults.blackhole_responses(self.slot(*from).addr);
            }
        }
    }
}

/// The checks that probe every shard with [`Get`]: for handlers that answer it.
impl<H: Handles<Get> + Default> TestCluster<H> {
    /// Checks that every shard is served again: a `Get` for a key of every shard, through every
    /// running node, must succeed within [`LIVENESS_BOUND`] (retrying on errors).
    pub async fn check_liveness(&self) {
        let started = Instant::now();
        let deadline = started + LIVENESS_BOUND;
        let probes = self.running_ids().into_iter().flat_map(|id| {
            (0..SHARD_COUNT).map(move |shard| async move {
                let key = self.key_of(shard);
                let mut last = None;
                let mut attempts = 0u32;
                while Instant::now() < deadline && attempts < 10_000 {
                    attempts += 1;
                    match self.send(id, key, Get).await {
                        Ok(served) => {
                            assert_eq!(served.shard, shard, "key {key} served by the wrong shard");
                            return Ok(());
                        }
                        Err(error) => last = Some(error),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(format!(
                    "shard {shard} (key {key}) through node {id}: {attempts} attempts, last error {last:?}"
                ))
            })
        });
        let failures: Vec<String> = futures_util::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        assert!(
            failures.is_empty(),
            "{}: liveness: {} (node, shard) pairs were not served within {LIVENESS_BOUND:?} after the faults healed:\n  {}\n{}",
            self.name,
            failures.len(),
            failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n  "),
            self.report()
        );
        println!(
            "{}: liveness: every shard served through every node after {:?}",
            self.name,
            started.elapsed()
        );
    }

    /// The end of every test: heals every link, restarts every killed node, then checks
    /// liveness, convergence and the single-owner rule. Returns the converged map.
    pub async fn heal_and_check(&self, context: &str) -> (Epoch, Vec<NodeId>) {
        self.heal();
        for id in self.ids() {
            if lock(&self.slot(id).running).is_none() {
                self.restart(id).await;
            }
        }
        self.check_liveness().await;
        let map = self.wait_converged().await;
        // Once more under the final map, so the checker also sees every shard served there.
        self.check_liveness().await;
        self.check_single_owner(context);
        map
    }
}

impl<H: ShardHandler> Drop for TestCluster<H> {
    fn drop(&mut self) {
        for slot in &self.slots {
            if let Some(running) = lock(&slot.running).take() {
                running.system.stop();
                let deadline = Instant::now() + Duration::from_secs(10);
                while !running.thread.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "{}: kept the data dirs in {}",
                    self.name,
                    dir.keep().display()
                );
            }
        }
    }
}

/// What one incarnation of a node is started from.
struct NodeSetup {
    /// Its node id.
    id: NodeId,
    /// Its address.
    addr: SocketAddr,
    /// Its LMDB data dir.
    data_dir: PathBuf,
    /// The directory its shard store may use.
    store_dir: PathBuf,
    /// The cluster's initial members.
    members: Vec<(NodeId, NodeInfo)>,
    /// Receives its serve events.
    recorder: Arc<Recorder>,
    /// The test's change to its configuration.
    configure: Configure,
    /// Makes its shard store, if it has one.
    stores: Option<StoreFactory>,
}

/// Starts one node on a new thread with its own `System` and returns its handles once started.
async fn spawn_node<H: ShardHandler + Default>(setup: NodeSetup) -> Result<Running<H>, String> {
    let NodeSetup {
        id,
        addr,
        data_dir,
        store_dir,
        members,
        recorder,
        configure,
        stores,
    } = setup;
    let (started, started_rx) =
        oneshot::channel::<Result<(Node<H>, System, ArbiterHandle), String>>();
    let thread = std::thread::Builder::new()
        .name(format!("node-{id}"))
        .spawn(move || {
            let runner = System::new();
            let node = runner.block_on(async move {
                let store = match &stores {
                    Some(stores) => Some(
                        stores(id, &store_dir)
                            .map_err(|e| format!("open node {id}'s shard store: {e}"))?,
                    ),
                    None => None,
                };
                let mut config = NodeConfig {
                    node_id: id,
                    shard_count: SHARD_COUNT,
                    request_timeout: REQUEST_TIMEOUT,
                    consensus: ConsensusConfig {
                        heartbeat_interval: Duration::from_millis(50),
                        election_timeout_min: Duration::from_millis(150),
                        election_timeout_max: Duration::from_millis(300),
                        ..ConsensusConfig::default()
                    },
                    lease: LeaseConfig {
                        lease: Duration::from_millis(500),
                        renew_period: Duration::from_millis(125),
                        ..LeaseConfig::default()
                    },
                    ..NodeConfig::default()
                };
                configure(&mut config);
                let builder = Cluster::builder()
                    .config(config)
                    .listen(addr)
                    .data_dir(data_dir)
                    // A crash of this process loses nothing without fsync (the kernel keeps the
                    // pages); only an OS crash would, and tests never have one.
                    .store_options(StoreOptions {
                        map_size_bytes: 64 << 20,
                        sync: false,
                    })
                    .insecure()
                    .initial_members(members)
                    .observer(recorder)
                    .handler::<H>();
                let builder = match store {
                    Some(store) => builder.store(store),
                    None => builder,
                };
                builder.start().await.map_err(|e| e.to_string())
            });
            match node {
                Ok(node) => {
                    let system = System::current();
                    let arbiter = system.arbiter().clone();
                    if started.send(Ok((node, system, arbiter))).is_ok() {
                        let _ = runner.run();
                    }
                }
                Err(error) => {
                    let _ = started.send(Err(error));
                }
            }
        })
        .map_err(|e| format!("spawn the node's thread: {e}"))?;
    match tokio::time::timeout(START_BOUND, started_rx).await {
        Ok(Ok(Ok((node, system, arbiter)))) => Ok(Running {
            node,
            system,
            arbiter,
            thread,
        }),
        Ok(Ok(Err(error))) => {
            let _ = thread.join();
            Err(error)
        }
        Ok(Err(_)) => Err("the node's thread ended without starting it".into()),
        Err(_) => Err(format!("the node did not start within {START_BOUND:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Client traffic
// ---------------------------------------------------------------------------------------------

/// Counts of the outcomes of client requests.
#[derive(Debug, Default, Clone)]
pub struct TrafficStats {
    /// Requests answered.
    pub ok: u64,
    /// `NotReady` answers.
    pub not_ready: u64,
    /// `Timeout` answers.
    pub timeout: u64,
    /// Other errors, by their debug text.
    pub other: BTreeMap<String, u64>,
    /// The first few other errors with when and through which node they happened.
    pub other_samples: Vec<String>,
    /// Requests to a node that was not running.
    pub not_running: u64,
    /// Requests that broke their time bound: what, when.
    pub hung: Vec<String>,
}

impl TrafficStats {
    fn add(&mut self, other: &TrafficStats) {
        self.ok += other.ok;
        self.not_ready += other.not_ready;
        self.timeout += other.timeout;
        for (error, count) in &other.other {
            *self.other.entry(error.clone()).or_default() += count;
        }
        self.other_samples
            .extend(other.other_samples.iter().cloned());
        self.not_running += other.not_running;
        self.hung.extend(other.hung.iter().cloned());
    }
}

/// Client traffic running in the background: one task per node sending `Incr` to random keys
/// through that node until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<TrafficStats>>,
}

/// Keys the traffic writes to (disjoint from the probe keys of [`TestCluster::key_of`]).
const TRAFFIC_KEYS: u64 = 256;

/// Bound on one traffic task's requests.
const TRAFFIC_REQUESTS_MAX: u64 = 200_000;

/// Bound on how long traffic runs.
const TRAFFIC_TIME_MAX: Duration = Duration::from_secs(300);

impl Traffic {
    /// Starts one sender per node of `cluster`, seeded by `seed`.
    pub fn start(cluster: &Arc<TestCluster>, seed: u64) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = cluster
            .ids()
            .into_iter()
            .map(|id| {
                let cluster = cluster.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut rng = SplitMix64::new(seed ^ id.wrapping_mul(0x9e37_79b9));
                    let mut stats = TrafficStats::default();
                    let started = Instant::now();
                    for _ in 0..TRAFFIC_REQUESTS_MAX {
                        if stop.load(Ordering::Acquire) || started.elapsed() > TRAFFIC_TIME_MAX {
                            break;
                        }
                        let key = format!("traffic-{}", rng.below(TRAFFIC_KEYS));
                        let sent = Instant::now();
                        match cluster.send(id, &key, Incr).await {
                            Ok(_) => stats.ok += 1,
                            Err(SendError::Node(Error::NotReady { .. })) => stats.not_ready += 1,
                            Err(SendError::Node(Error::Timeout { .. })) => stats.timeout += 1,
                            Err(SendError::Node(error)) => {
                                let text = format!("{error:?}");
                                if stats.other_samples.len() < 5 {
                                    stats.other_samples.push(format!(
                                        "Incr {key} (shard {}) through node {id}, sent at {:.3} ms, failed after {:?}: {text}",
                                        shard_for(key.as_bytes(), SHARD_COUNT),
                                        cluster.recorder().millis(sent),
                                        sent.elapsed()
                                    ));
                                }
                                let text = text.chars().take(120).collect::<String>();
                                *stats.other.entry(text).or_default() += 1;
                            }
                            Err(SendError::NotRunning) => {
                                stats.not_running += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(SendError::Hung) => stats.hung.push(format!(
                                "Incr {key} through node {id}, sent at {:.3} ms",
                                cluster.recorder().millis(sent)
                            )),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    stats
                })
            })
            .collect();
        Traffic { stop, tasks }
    }

    /// Stops the senders and returns their combined counts.
    pub async fn stop(self) -> TrafficStats {
        self.stop.store(true, Ordering::Release);
        let mut total = TrafficStats::default();
        for task in self.tasks {
            let stats = task.await.expect("a traffic task panicked");
            total.add(&stats);
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A small deterministic random number generator (splitmix64): a seed fully determines the
/// fault schedule, without a dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// A duration between `low` and `high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The shards `node` owns in `owners` (a map as [`TestCluster::shards`] gives it).
pub fn shards_of(owners: &[NodeId], node: NodeId) -> Vec<ShardId> {
    owners
        .iter()
        .enumerate()
        .filter(|(_, owner)| **owner == node)
        .map(|(shard, _)| shard as ShardId)
        .collect()
}

/// The first key `"{prefix}-{i}"` that hashes to `shard` ([`testing::key_of_shard`]).
pub fn key_of_shard(prefix: &str, shard: ShardId) -> String {
    testing::key_of_shard(prefix, shard, SHARD_COUNT).expect("some key hashes to every shard")
}

/// Node `id`'s address: `127.0.0.<id>:<port>`.
fn node_addr(id: NodeId, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(node_ip(id), port))
}

/// Node `id`'s loopback address, `127.0.0.<id>`.
fn node_ip(id: NodeId) -> Ipv4Addr {
    let last = u8::try_from(id).expect("node ids of test clusters fit an address byte");
    Ipv4Addr::new(127, 0, 0, last)
}

/// Turns on the nodes' tracing when `CLUSTERFUNK_TEST_LOG` is set (once per process).
fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        quiet_intended_panics();
        if let Ok(filter) = std::env::var("CLUSTERFUNK_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// The message of the panics a test asks a handler for: [`INTENDED_PANIC`].
pub const INTENDED_PANIC: &str = "as the test asked";

/// Panics a test asks a handler for (their message holds [`INTENDED_PANIC`]) print one line,
/// never a backtrace: with `RUST_BACKTRACE=1` the default hook symbolises the stack on the node's
/// only thread, which on a loaded machine froze that node past its lease, so it was marked down
/// and its shards failed over without their state (seen in
/// `a_panicking_restore_keeps_the_snapshot_for_the_next_try`). Every other panic keeps the
/// default hook.
fn quiet_intended_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains(INTENDED_PANIC) {
            eprintln!("intended panic: {message}");
        } else {
            default(info);
        }
    }));
}

/// Locks `mutex`, ignoring poisoning: a failed test must still clean up in `Drop`.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
