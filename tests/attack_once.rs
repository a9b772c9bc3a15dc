//! Attacks on exactly-once effects (issue 19): client sessions, the per-shard record of their
//! replies, nested sends and the rules that refuse what the record cannot answer.
//!
//! Every test here states what the guide (`guide/src/exactly-once.md`) or the API docs promise
//! and checks it against real in-process clusters (see `inproc`), whose nodes keep durable
//! state in one shared [`MemoryStore`] seen through a [`Spy`]: a store wrapper that records
//! what the framework writes under its reserved keys (session records and the session index)
//! and can hold or fail a commit. They were written by an attack review as failing tests, one
//! per finding; each now pins the fixed behaviour (or, where the guide now states a limit, that
//! limit), and its message says what was observed when it fails.
//! `CLUSTERFUNK_TEST_LOG=<filter>` turns the nodes' logs on.
//!
//! Run one with `cargo test --test attack_once <name> -- --nocapture`.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod inproc;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clusterfunk::client::{CallOptions, Client, ClientError};
use clusterfunk::internals::{Request, Response};
use clusterfunk::persist::{
    Batch, Change, DurableMap, DurableState, Loaded, Locality, MemoryStore, Scope, ShardStore,
    StoreError,
};
use clusterfunk::prelude::*;
use clusterfunk::session::{Once, SessionId, RESERVED_PREFIX};
use clusterfunk::shard_map::Epoch;
use clusterfunk::transport::{Transport, TransportConfig};
use clusterfunk::NodeConfig;
use futures_util::future::{BoxFuture, FutureExt};
use inproc::{key_of_shard, shards_of, Get, Incr, Served, TestCluster, DEADLINE};
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// A durable counter per key (in a [`DurableMap`]), with messages that send to other shards.
#[derive(Default)]
pub struct Tally {
    values: DurableMap<u64>,
}

/// Adds one to the key's counter after sleeping `millis` (an `async` handler method).
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct SlowIncr {
    /// How long the handler sleeps before it adds one.
    pub millis: u64,
}

/// Adds one to the key's counter; carries a map (as many real messages do).
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct Bag {
    /// Anything; the handler ignores it.
    pub items: HashMap<String, u64>,
}

/// Adds one to the key's counter; carries the time it was built at.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Served)]
pub struct Stamped {
    /// Nanoseconds since the Unix epoch when the sender built it.
    pub at_nanos: u128,
}

/// What a handler that sends to another shard makes of the send, and its own count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relayed {
    /// The child's reply (its counter after the send), or the error the send failed with.
    pub child: Result<Option<u64>, String>,
    /// The parent key's own counter after the message.
    pub value: Option<u64>,
}

/// Sends an `Incr` to `to`, then adds one to its own key.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Relayed)]
pub struct Relay {
    /// A key of another shard.
    pub to: String,
}

/// Sends a [`Bag`] of `n` entries (built afresh on every run of the handler, with the same
/// content) to `to`, then adds one to its own key.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Relayed)]
pub struct RelayBag {
    /// A key of another shard.
    pub to: String,
    /// How many entries the bag has.
    pub n: u64,
}

/// Sends a [`Stamped`] (built with the current time) to `to`, then adds one to its own key.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Relayed)]
pub struct RelayStamped {
    /// A key of another shard.
    pub to: String,
}

/// Sends an `Incr` to `to` and, while the send's outcome is unknown, sends it again (at most
/// three times): what a handler does with a send that may or may not have landed, as the guide
/// tells clients to do. Then adds one to its own key.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Relayed)]
pub struct RelayRetrying {
    /// A key of another shard.
    pub to: String,
}

/// When set, `Tally::on_deactivate` writes a value under a key with the framework's reserved
/// prefix (a handler flushing entries keyed by bytes it did not get as message keys).
static WRITE_RESERVED_ON_DEACTIVATE: AtomicBool = AtomicBool::new(false);

impl Tally {
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
impl Tally {
    fn incr(&mut self, key: Key, _msg: Incr, ctx: &mut ShardContext) -> Served {
        *self.values.entry(key.clone()) += 1;
        self.served(&key, ctx)
    }

    fn get(&mut self, key: Key, _msg: Get, ctx: &mut ShardContext) -> Served {
        self.served(&key, ctx)
    }

    async fn slow_incr(&mut self, key: Key, msg: SlowIncr, ctx: &mut ShardContext) -> Served {
        actix::clock::sleep(Duration::from_millis(msg.millis)).await;
        *self.values.entry(key.clone()) += 1;
        self.served(&key, ctx)
    }

    fn bag(&mut self, key: Key, _msg: Bag, ctx: &mut ShardContext) -> Served {
        *self.values.entry(key.clone()) += 1;
        self.served(&key, ctx)
    }

    fn stamped(&mut self, key: Key, _msg: Stamped, ctx: &mut ShardContext) -> Served {
        *self.values.entry(key.clone()) += 1;
        self.served(&key, ctx)
    }

    async fn relay(&mut self, key: Key, msg: Relay, ctx: &mut ShardContext) -> Relayed {
        let child = ctx.cluster().send(msg.to.as_str(), Incr).await;
        *self.values.entry(key.clone()) += 1;
        Relayed {
            child: child.map(|s| s.value).map_err(|e| format!("{e:?}")),
            value: self.values.get(&key).copied(),
        }
    }

    async fn relay_bag(&mut self, key: Key, msg: RelayBag, ctx: &mut ShardContext) -> Relayed {
        // The same content on every run; a new map (and so a new hasher) each time.
        let items: HashMap<String, u64> = (0..msg.n).map(|i| (format!("item-{i}"), i)).collect();
        let child = ctx.cluster().send(msg.to.as_str(), Bag { items }).await;
        *self.values.entry(key.clone()) += 1;
        Relayed {
            child: child.map(|s| s.value).map_err(|e| format!("{e:?}")),
            value: self.values.get(&key).copied(),
        }
    }

    async fn relay_stamped(
        &mut self,
        key: Key,
        msg: RelayStamped,
        ctx: &mut ShardContext,
    ) -> Relayed {
        let at_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let child = ctx
            .cluster()
            .send(msg.to.as_str(), Stamped { at_nanos })
            .await;
        *self.values.entry(key.clone()) += 1;
        Relayed {
            child: child.map(|s| s.value).map_err(|e| format!("{e:?}")),
            value: self.values.get(&key).copied(),
        }
    }

    async fn relay_retrying(
        &mut self,
        key: Key,
        msg: RelayRetrying,
        ctx: &mut ShardContext,
    ) -> Relayed {
        let mut child = ctx.cluster().send(msg.to.as_str(), Incr).await;
        for _ in 0..3 {
            match &child {
                Err(Error::OutcomeUnknown { .. } | Error::Timeout { .. }) => {
                    child = ctx.cluster().send(msg.to.as_str(), Incr).await;
                }
                _ => break,
            }
        }
        *self.values.entry(key.clone()) += 1;
        Relayed {
            child: child.map(|s| s.value).map_err(|e| format!("{e:?}")),
            value: self.values.get(&key).copied(),
        }
    }

    fn on_deactivate(&mut self, _ctx: &mut ShardContext) -> Option<Handoff> {
        if WRITE_RESERVED_ON_DEACTIVATE.load(Ordering::Acquire) {
            let mut key = RESERVED_PREFIX.to_vec();
            key.extend_from_slice(b"sessions");
            self.values.insert(key, 7);
        }
        None
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.values)
    }
}

/// One durable total per shard (a whole-shard record, `Scope::State`): the records of client
/// sessions are then read key by key beside a state that is loaded whole.
#[derive(Default)]
pub struct Total {
    total: clusterfunk::persist::Durable<u64>,
}

#[shard_handler]
impl Total {
    fn incr(&mut self, _key: Key, _msg: Incr, ctx: &mut ShardContext) -> Served {
        *self.total += 1;
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: Some(*self.total),
        }
    }

    fn get(&mut self, _key: Key, _msg: Get, ctx: &mut ShardContext) -> Served {
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: Some(*self.total),
        }
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.total)
    }
}

/// A counter per key in memory only: a shard that keeps no session record.
#[derive(Default)]
pub struct Plain {
    values: HashMap<Key, u64>,
}

#[shard_handler]
impl Plain {
    fn incr(&mut self, key: Key, _msg: Incr, ctx: &mut ShardContext) -> Served {
        *self.values.entry(key.clone()).or_default() += 1;
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: self.values.get(&key).copied(),
        }
    }

    fn get(&mut self, key: Key, _msg: Get, ctx: &mut ShardContext) -> Served {
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: self.values.get(&key).copied(),
        }
    }

    async fn slow_incr(&mut self, key: Key, msg: SlowIncr, ctx: &mut ShardContext) -> Served {
        actix::clock::sleep(Duration::from_millis(msg.millis)).await;
        *self.values.entry(key.clone()).or_default() += 1;
        Served {
            node: ctx.node_id(),
            epoch: ctx.epoch(),
            shard: ctx.shard(),
            value: self.values.get(&key).copied(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The spy store
// ---------------------------------------------------------------------------------------------

/// A node's view of the shared store: every call goes to `inner`; commits are recorded (what
/// they wrote under the framework's reserved keys) and can be held after they applied, or fail.
struct Spy {
    inner: Arc<dyn ShardStore>,
    node: NodeId,
    spy: Arc<SpyState>,
}

/// What every node's [`Spy`] shares.
struct SpyState {
    state: Mutex<SpyRecords>,
    /// Whether commits held after they applied may return.
    returned: watch::Sender<bool>,
}

#[derive(Default)]
struct SpyRecords {
    /// Commits of this node and shard are applied, then held until `let_return`.
    hold_after: Option<(NodeId, ShardId)>,
    /// Commits applied and held since `hold_after` was set.
    applied_held: usize,
    /// The next commit of this node and shard fails without reaching the store.
    fail_next: Option<(NodeId, ShardId)>,
    /// The next commit of this node and shard is applied by the store, then reports a failure
    /// (a connection lost after COMMIT: the change landed, the node does not know it).
    fail_after_apply: Option<(NodeId, ShardId)>,
    /// Per shard: the reserved keys the store holds now, with their value's size.
    live: BTreeMap<ShardId, BTreeMap<Vec<u8>, usize>>,
    /// Per shard: the largest session index written.
    index_max: BTreeMap<ShardId, usize>,
    /// Per shard: the largest session record written.
    record_max: BTreeMap<ShardId, usize>,
    /// Per shard: every byte written under reserved keys.
    reserved_written: BTreeMap<ShardId, u64>,
    /// Per shard: every byte written under the handler's own keys.
    user_written: BTreeMap<ShardId, u64>,
    /// Per shard: successful commits.
    commits: BTreeMap<ShardId, usize>,
}

fn index_key() -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"sessions");
    key
}

impl SpyState {
    fn new() -> Arc<SpyState> {
        Arc::new(SpyState {
            state: Mutex::new(SpyRecords::default()),
            returned: watch::channel(true).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SpyRecords> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold_after(&self, node: NodeId, shard: ShardId) {
        let mut state = self.lock();
        state.hold_after = Some((node, shard));
        state.applied_held = 0;
        self.returned.send_replace(false);
    }

    fn let_return(&self) {
        self.lock().hold_after = None;
        self.returned.send_replace(true);
    }

    fn applied_held(&self) -> usize {
        self.lock().applied_held
    }

    fn fail_next(&self, node: NodeId, shard: ShardId) {
        self.lock().fail_next = Some((node, shard));
    }

    fn fail_after_apply(&self, node: NodeId, shard: ShardId) {
        self.lock().fail_after_apply = Some((node, shard));
    }

    /// How many reserved keys (session records and the index) the store holds for `shard`.
    fn live_reserved(&self, shard: ShardId) -> usize {
        self.lock().live.get(&shard).map_or(0, BTreeMap::len)
    }

    fn index_max(&self, shard: ShardId) -> usize {
        self.lock().index_max.get(&shard).copied().unwrap_or(0)
    }

    fn record_max(&self, shard: ShardId) -> usize {
        self.lock().record_max.get(&shard).copied().unwrap_or(0)
    }

    fn reserved_written(&self, shard: ShardId) -> u64 {
        self.lock()
            .reserved_written
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    fn user_written(&self, shard: ShardId) -> u64 {
        self.lock().user_written.get(&shard).copied().unwrap_or(0)
    }

    fn commits(&self, shard: ShardId) -> usize {
        self.lock().commits.get(&shard).copied().unwrap_or(0)
    }

    fn applied(&self, shard: ShardId, batch: &Batch) {
        let mut state = self.lock();
        *state.commits.entry(shard).or_default() += 1;
        let index = index_key();
        for (key, change) in batch.records() {
            let bytes = key.as_bytes();
            let reserved = bytes.starts_with(RESERVED_PREFIX);
            match change {
                Change::Put(value) => {
                    if reserved {
                        *state.reserved_written.entry(shard).or_default() += value.len() as u64;
                        state
                            .live
                            .entry(shard)
                            .or_default()
                            .insert(bytes.to_vec(), value.len());
                        let max = match bytes == index.as_slice() {
                            true => state.index_max.entry(shard).or_default(),
                            false => state.record_max.entry(shard).or_default(),
                        };
                        *max = (*max).max(value.len());
                    } else {
                        *state.user_written.entry(shard).or_default() += value.len() as u64;
                    }
                }
                Change::Delete => {
                    if reserved {
                        state.live.entry(shard).or_default().remove(bytes);
                    }
                }
            }
        }
    }
}

impl ShardStore for Spy {
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>> {
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
        let (fail, hold, fail_after) = {
            let mut state = self.spy.lock();
            let fail = state.fail_next == here;
            if fail {
                state.fail_next = None;
            }
            let fail_after = state.fail_after_apply == here;
            if fail_after {
                state.fail_after_apply = None;
            }
            (fail, state.hold_after == here, fail_after)
        };
        let inner = self.inner.clone();
        let spy = self.spy.clone();
        let mut returned = self.spy.returned.subscribe();
        async move {
            if fail {
                return Err(StoreError::backend(std::io::Error::other(
                    "the test failed this commit",
                )));
            }
            let seen = batch.clone();
            let outcome = inner.commit(shard, epoch, batch).await;
            if outcome.is_ok() {
                spy.applied(shard, &seen);
            }
            if hold {
                spy.lock().applied_held += 1;
                let _ = returned.wait_for(|returned| *returned).await;
            }
            if fail_after && outcome.is_ok() {
                return Err(StoreError::backend(std::io::Error::other(
                    "the test lost this commit's answer after it was applied",
                )));
            }
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

/// Starts `nodes` nodes running `H` that share one [`MemoryStore`], each through its [`Spy`].
async fn start<H: ShardHandler + Default>(
    name: &str,
    nodes: usize,
    configure: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
) -> (Arc<TestCluster<H>>, Arc<SpyState>) {
    let store = MemoryStore::new();
    let spy = SpyState::new();
    let shared = spy.clone();
    let cluster = TestCluster::<H>::start_with_stores(name, nodes, configure, move |node, _| {
        Ok(Arc::new(Spy {
            inner: Arc::new(store.clone()),
            node,
            spy: shared.clone(),
        }) as Arc<dyn ShardStore>)
    })
    .await;
    (cluster, spy)
}

/// A client of every node of `cluster`, whose calls have `deadline` unless they set one.
fn client_of<H: ShardHandler + Default>(cluster: &TestCluster<H>, deadline: Duration) -> Client {
    let seeds: Vec<_> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.addr(id))
        .collect();
    Client::with_config(seeds, None, "clusterfunk", deadline).expect("a client")
}

/// A raw connection that speaks the client protocol (as `Client` does, byte by byte).
fn raw_transport() -> Transport {
    Transport::new(TransportConfig {
        cluster_name: "clusterfunk".to_owned(),
        node_id: None,
        ..TransportConfig::default()
    })
    .expect("a transport")
}

/// Sends one numbered request (`Request::ShardOnce`, what `Client` sends) to `addr`.
async fn send_once<M: ShardMessage>(
    transport: &Transport,
    addr: SocketAddr,
    key: &str,
    payload: Vec<u8>,
    once: Once,
) -> Result<M::Reply, Error> {
    let request = Request::ShardOnce {
        key: key.as_bytes().to_vec(),
        tag: M::TAG.to_owned(),
        payload,
        epoch: 0,
        once,
    };
    let bytes = clusterfunk::internals::encode(&request).expect("encode");
    let answer = transport
        .request(addr, bytes, Duration::from_secs(20))
        .await
        .expect("the node answers");
    match clusterfunk::internals::decode::<Response>(&answer).expect("a response") {
        Response::Shard(Ok(reply)) => Ok(clusterfunk::internals::decode(&reply).expect("reply")),
        Response::Shard(Err(error)) => Err(error),
        other => panic!("unexpected response {other:?}"),
    }
}

/// The value of `key`, read without a request id (no record is written for it).
async fn value_of<H>(client: &Client, key: &str) -> Option<u64>
where
    H: ShardHandler,
{
    let _ = std::marker::PhantomData::<H>;
    client
        .send_with(key, Get, CallOptions::new().numbered(false))
        .await
        .expect("read")
        .value
}

// ---------------------------------------------------------------------------------------------
// 1. The expiry rule: a retry older than the idle time on an expired session
// ---------------------------------------------------------------------------------------------

/// Guide: "a retry older than `session_idle` whose reply is not in the record is refused with
/// `SessionExpired`" and "None of the refusals applies the request". Method: one node, idle
/// time 300 ms. Request n increments `k`; its commit is applied but held until its call's
/// deadline passes, so the client sees an unknown outcome (attempt counted) and keeps the
/// request to retry it. After 3x the idle time another client's request sweeps the expired
/// session. Before retrying n, the client sends another increment to the same shard (normal:
/// a client has other work): that creates a *new* record for the session. The retry of n,
/// older than the idle time, finds a record without n: it must be refused, not applied again
/// (it was, before the fix).
#[tokio::test]
async fn an_expired_retry_is_refused_also_once_the_session_has_a_new_record() {
    expired_retry("attack-expired-recreated", true).await;
}

/// Control for the test above: the same steps without the client's other request to the
/// shard before its retry. The session then has no record and the retry is refused with
/// `SessionExpired`.
#[tokio::test]
async fn control_an_expired_retry_without_a_new_record_is_refused() {
    expired_retry("attack-expired-control", false).await;
}

/// The steps of the two tests above; `new_record`: the client increments another key of the
/// shard before its retry.
async fn expired_retry(name: &str, new_record: bool) {
    let idle = Duration::from_millis(300);
    let (cluster, spy) = start::<Tally>(name, 1, move |config| {
        config.session_idle = idle;
    })
    .await;
    cluster.wait_ready().await;
    let shard = 7;
    let key = key_of_shard("expiring", shard);
    let other_key = key_of_shard("other", shard);
    let client = client_of(&cluster, Duration::from_secs(20));
    // Warm up: the client knows the map, the shard is active.
    client.send(other_key.as_str(), Get).await.expect("warm up");

    spy.hold_after(1, shard);
    let request = client.request(key.as_str(), Incr).expect("a request");
    let first = request
        .send_with(CallOptions::new().deadline(Duration::from_millis(400)))
        .await;
    assert!(
        first.as_ref().is_err_and(ClientError::is_outcome_unknown),
        "the first attempt's outcome is unknown: {first:?}"
    );
    cluster
        .wait_until(
            "the first attempt's commit is applied",
            DEADLINE,
            || async { (spy.applied_held() >= 1).then_some(()) },
        )
        .await;
    spy.let_return();

    // Time passing is the subject of the rule.
    tokio::time::sleep(idle * 3).await;
    // Another session's request sweeps the expired session away (as in durable.rs).
    let sweeper = client_of(&cluster, Duration::from_secs(20));
    sweeper
        .send(other_key.as_str(), Incr)
        .await
        .expect("the sweeper's increment");
    if new_record {
        // The client's own next change to the same shard records a new session record.
        client
            .send(other_key.as_str(), Incr)
            .await
            .expect("the client's next request");
    }
    // The retry of n, older than the idle time.
    let retry = request.send().await;
    let count = value_of::<Tally>(&client, &key).await;
    println!("{name}: retry of an expired request: {retry:?}; count of {key}: {count:?}");
    assert!(
        matches!(
            retry,
            Err(ClientError::Cluster(Error::SessionExpired { .. }))
        ),
        "a retry older than session_idle on an expired session must be refused with \
         SessionExpired, got {retry:?} (count {count:?})"
    );
    assert_eq!(count, Some(1), "the increment was applied {count:?} times");
}

// ---------------------------------------------------------------------------------------------
// 2. A cancelled attempt makes the next one a "first attempt"
// ---------------------------------------------------------------------------------------------

/// Guide ("Shards without a record"): a retry of a message that is not idempotent is refused
/// with `NotRecorded`; `ClientRequest` docs: "send it, and send it again ... as often as
/// needed". Method: one node whose handler keeps no durable state; a slow increment is sent
/// under `tokio::time::timeout` (a caller's own timeout, the usual way to bound a future),
/// which cancels the call while the shard is already handling it; the same `ClientRequest`
/// is then sent again. The second send goes out as attempt 0 (the cancelled attempt was never
/// counted), so the shard applies it again instead of refusing it.
#[tokio::test]
async fn a_cancelled_send_makes_the_retry_a_first_attempt_and_a_shard_without_record_applies_it_twice(
) {
    let (cluster, _spy) = start::<Plain>("attack-cancelled", 1, |_| {}).await;
    cluster.wait_ready().await;
    let key = key_of_shard("cancelled", 9);
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(key.as_str(), Get).await.expect("warm up");

    let request = client
        .request(key.as_str(), SlowIncr { millis: 500 })
        .expect("a request");
    let cancelled = tokio::time::timeout(Duration::from_millis(150), request.send()).await;
    assert!(
        cancelled.is_err(),
        "the caller's timeout cancelled the call"
    );
    // The shard finishes the first attempt meanwhile.
    cluster
        .wait_until("the first attempt is applied", DEADLINE, || async {
            (value_of::<Plain>(&client, &key).await == Some(1)).then_some(())
        })
        .await;
    let again = request.send().await;
    let count = value_of::<Plain>(&client, &key).await;
    println!("second send of a cancelled request: {again:?}; count of {key}: {count:?}");
    assert!(
        again.as_ref().is_err_and(ClientError::is_outcome_unknown),
        "the retry must be refused (NotRecorded, reported as an unknown outcome), got \
         {again:?} (count {count:?})"
    );
    assert_eq!(count, Some(1), "the increment was applied {count:?} times");
}

/// The same hole through the API made for it: `Client::request_numbered` is "for a program
/// that sends again a request it numbered before and no longer holds". Method: one node
/// without a record; a slow increment times out (deadline 150 ms, outcome unknown) and the
/// program, which dropped the request, sends it again under its number as the docs say. The
/// recreated request's first send is attempt 0, so the shard applies it again.
#[tokio::test]
async fn a_request_sent_again_with_request_numbered_is_applied_twice_by_a_shard_without_record() {
    let (cluster, _spy) = start::<Plain>("attack-renumbered", 1, |_| {}).await;
    cluster.wait_ready().await;
    let key = key_of_shard("renumbered", 9);
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(key.as_str(), Get).await.expect("warm up");

    let seq = {
        let request = client
            .request(key.as_str(), SlowIncr { millis: 500 })
            .expect("a request");
        let first = request
            .send_with(CallOptions::new().deadline(Duration::from_millis(150)))
            .await;
        assert!(
            first.as_ref().is_err_and(ClientError::is_outcome_unknown),
            "{first:?}"
        );
        request.id().seq
    };
    cluster
        .wait_until("the first attempt is applied", DEADLINE, || async {
            (value_of::<Plain>(&client, &key).await == Some(1)).then_some(())
        })
        .await;
    let again = client
        .request_numbered(seq, key.as_str(), SlowIncr { millis: 500 })
        .expect("a request")
        .send()
        .await;
    let count = value_of::<Plain>(&client, &key).await;
    println!("request_numbered({seq}) sent again: {again:?}; count of {key}: {count:?}");
    assert!(
        again.as_ref().is_err_and(ClientError::is_outcome_unknown),
        "the retry must be refused (NotRecorded), got {again:?} (count {count:?})"
    );
    assert_eq!(count, Some(1), "the increment was applied {count:?} times");
}

// ---------------------------------------------------------------------------------------------
// 3. Unbounded records
// ---------------------------------------------------------------------------------------------

/// Guide: "Each applied request with an id writes its session's record (the replies the
/// client still waits on, a few dozen bytes plus the reply)". Method: one node; a client holds
/// one request it has not been answered for yet (as the guide's `add_until_answered` loop does
/// while that request's shard is down, or any request in flight to a slow shard) and sends
/// 1500 increments to another shard, one at a time, each answered. The low watermark stays
/// at the held request, so the other shard's record keeps every reply and each commit
/// rewrites the whole record: its size grows linearly and the bytes written quadratically,
/// without bound and without expiry (the session stays active).
#[tokio::test]
async fn a_held_request_makes_every_other_shards_record_grow_without_bound() {
    let (cluster, spy) = start::<Tally>("attack-stuck-watermark", 1, |_| {}).await;
    cluster.wait_ready().await;
    let (held_key, hot_key) = (key_of_shard("held", 3), key_of_shard("hot", 5));
    let client = client_of(&cluster, Duration::from_secs(20));
    let _held = client.request(held_key.as_str(), Incr).expect("a request");
    let count = 1500;
    let started = Instant::now();
    for _ in 0..count {
        client
            .send(hot_key.as_str(), Incr)
            .await
            .expect("increment");
    }
    let record = spy.record_max(5);
    let (reserved, user) = (spy.reserved_written(5), spy.user_written(5));
    println!(
        "{count} answered increments in {:?} while one request is held: largest session \
         record {record} bytes; bytes written to shard 5: {reserved} for session records \
         vs {user} for the counters ({} commits)",
        started.elapsed(),
        spy.commits(5)
    );
    assert!(
        record < 16 << 10,
        "one session's record in one shard reached {record} bytes after {count} answered \
         requests (it keeps every reply since the held request); {reserved} bytes were \
         written for records against {user} for the state"
    );
}

/// Guide ("Messages a handler sends"): the children of a request get ids derived from it; the
/// rule "records below [the low watermark] are dropped". Method: one node; a client sends 400
/// `Relay`s one at a time (each answered, so its own record stays small), each of which sends
/// one `Incr` to a key of shard 5. Every relay's child is a new session in shard 5 whose low
/// watermark is always 0: no record is ever dropped (only expiry, 30 min by default, removes
/// them), and every new child session rewrites shard 5's whole session index.
#[tokio::test]
async fn every_nested_send_leaves_a_record_and_rewrites_the_whole_session_index() {
    let (cluster, spy) = start::<Tally>("attack-nested-growth", 1, |_| {}).await;
    cluster.wait_ready().await;
    let child = key_of_shard("child", 5);
    let client = client_of(&cluster, Duration::from_secs(20));
    let count = 400;
    for i in 0..count {
        let parent = key_of_shard(&format!("parent-{i}"), 3);
        let relayed = client
            .send(parent.as_str(), Relay { to: child.clone() })
            .await
            .expect("relay");
        assert!(relayed.child.is_ok(), "{relayed:?}");
    }
    let (live, index) = (spy.live_reserved(5), spy.index_max(5));
    let (reserved, user) = (spy.reserved_written(5), spy.user_written(5));
    println!(
        "after {count} answered relays: shard 5 holds {live} reserved keys (session records \
         + index); its index reached {index} bytes; bytes written to shard 5: {reserved} for \
         records and index vs {user} for the counter; parent shard 3 holds {} reserved keys",
        spy.live_reserved(3)
    );
    assert!(
        live <= 16,
        "every answered parent left a session record in its child's shard: {live} records, \
         none of which a watermark will ever drop"
    );
    assert!(
        index < 4 << 10,
        "the session index of shard 5 grew to {index} bytes, rewritten whole by every commit \
         that adds a session ({reserved} bytes written for records vs {user} for state)"
    );
}

/// Guide ("What it costs"): "Each applied request with an id writes its session's record ...
/// in the commit it already makes". Method: one node; 300 reads (`Get`, which changes
/// nothing) with the default options, then 300 without an id. A read without an id commits
/// nothing; a numbered read has no commit of its own to ride on, so each one becomes a store
/// commit (a write transaction, an fsync with LMDB or PostgreSQL) holding its session record:
/// reads turn into writes, and fail when the store cannot take writes.
#[tokio::test]
async fn every_numbered_read_becomes_a_store_commit() {
    let (cluster, spy) = start::<Tally>("attack-read-commits", 1, |_| {}).await;
    cluster.wait_ready().await;
    let key = key_of_shard("read", 5);
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(key.as_str(), Incr).await.expect("a value");
    let reads = 300;
    let before = spy.commits(5);
    for _ in 0..reads {
        client
            .send_with(key.as_str(), Get, CallOptions::new().numbered(false))
            .await
            .expect("read");
    }
    let unnumbered = spy.commits(5) - before;
    let before = spy.commits(5);
    for _ in 0..reads {
        client.send(key.as_str(), Get).await.expect("read");
    }
    let numbered = spy.commits(5) - before;
    println!(
        "{reads} reads: {unnumbered} store commits without ids, {numbered} with ids \
         ({} bytes of session records written)",
        spy.reserved_written(5)
    );
    assert!(
        numbered <= unnumbered,
        "{reads} numbered reads made {numbered} store commits ({unnumbered} without ids): \
         the record is not written \"in the commit it already makes\""
    );
}

/// The index half of the finding above, for top-level sessions: every client (a `kv` CLI
/// run, a short-lived worker) is a new session. Method: one node; 1000 sessions send one
/// numbered `Get` each to one shard (raw `ShardOnce`, as 1000 clients would). Each new session
/// rewrites the shard's whole session index, which holds every session of the last
/// `2 x session_idle` (30 min by default).
#[tokio::test]
async fn every_new_client_session_rewrites_the_whole_session_index() {
    let (cluster, spy) = start::<Tally>("attack-index-clients", 1, |_| {}).await;
    cluster.wait_ready().await;
    let key = key_of_shard("many-clients", 5);
    let transport = raw_transport();
    let addr = cluster.addr(1);
    let sessions = 1000;
    let payload = clusterfunk::internals::encode(&Get).expect("encode");
    for _ in 0..sessions {
        let once = Once {
            session: SessionId::random().expect("random"),
            seq: 1,
            low: 1,
            age_ms: 0,
            attempt: 0,
            idempotent: true,
        };
        send_once::<Get>(&transport, addr, &key, payload.clone(), once)
            .await
            .expect("read");
    }
    let (index, written, live) = (
        spy.index_max(5),
        spy.reserved_written(5),
        spy.live_reserved(5),
    );
    println!(
        "{sessions} one-request sessions: index {index} bytes, {live} reserved keys, \
         {written} bytes written for records and index"
    );
    assert!(
        written < 1 << 20,
        "{sessions} one-request sessions made the shard write {written} bytes of session \
         records and index (index {index} bytes, rewritten whole for each new session)"
    );
}

// ---------------------------------------------------------------------------------------------
// 3b. A session's low watermark is whatever a request says
// ---------------------------------------------------------------------------------------------

/// `ClientRequest`'s `Debug` prints the request id, session included (an application that
/// logs its requests publishes its session); ids are chosen by the client and not bound to the
/// connection's identity. A request's own number is always at or above its client's low
/// watermark (it is outstanding while sent), yet a node takes any `low`. Method: one node; a
/// victim client increments a key; another connection sends one request under the victim's
/// session (read from the victim's `{:?}` output) with `low = u64::MAX`. The victim's next
/// request, a first attempt never sent before, is refused with `RequestTooOld`, and so is every
/// later one to that shard: the session is dead there.
#[tokio::test]
async fn a_low_watermark_above_the_requests_own_number_does_not_poison_the_session() {
    let (cluster, _spy) = start::<Tally>("attack-poisoned-low", 1, |_| {}).await;
    cluster.wait_ready().await;
    let key = key_of_shard("victim", 5);
    let victim = client_of(&cluster, Duration::from_secs(20));
    let request = victim.request(key.as_str(), Incr).expect("a request");
    let logged = format!("{request:?}");
    request.send().await.expect("the victim's increment");
    drop(request);
    println!("the victim's request, as its application logs it: {logged}");
    let session = victim.session();
    assert!(
        logged.contains(&session.to_string()),
        "the Debug output names the session"
    );
    let transport = raw_transport();
    let poison = Once {
        session,
        seq: 1_000_000,
        low: u64::MAX,
        age_ms: 0,
        attempt: 0,
        idempotent: false,
    };
    let payload = clusterfunk::internals::encode(&Get).expect("encode");
    let accepted = send_once::<Get>(&transport, cluster.addr(1), &key, payload, poison).await;
    println!("a request with low = u64::MAX under the victim's session: {accepted:?}");
    let next = victim.send(key.as_str(), Incr).await;
    println!("the victim's next (first) attempt: {next:?}");
    // The node takes a request's low watermark only up to the request's own number.
    assert!(next.is_ok(), "the victim's session is poisoned: {next:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Nested sends whose payload is not byte-identical on the retry
// ---------------------------------------------------------------------------------------------

/// Guide: "When the request is retried ... the handler runs again and sends the same messages
/// under the same ids: shards that applied them answer from their records." Method: one node;
/// a `RelayBag` sends a `Bag` (a `HashMap` of 16 entries, the same content on every run) to
/// another shard; the relay's own commit fails once (after its child was applied), so the
/// client retries it. The retried handler builds the same map, whose iteration order (and so
/// encoding) differs: the child's digest differs and its shard refuses it with
/// `RequestIdReused`; the parent can never complete its child send.
#[tokio::test]
async fn a_retried_parents_child_that_encodes_differently_is_refused_never_applied_twice() {
    let (cluster, spy) = start::<Tally>("attack-nested-hashmap", 1, |_| {}).await;
    cluster.wait_ready().await;
    let (parent, child) = (key_of_shard("parent", 3), key_of_shard("child", 5));
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(parent.as_str(), Get).await.expect("warm up");
    spy.fail_next(1, 3);
    let relayed = client
        .send(
            parent.as_str(),
            RelayBag {
                to: child.clone(),
                n: 16,
            },
        )
        .await
        .expect("the relay is answered after its retry");
    let counts = (
        value_of::<Tally>(&client, &parent).await,
        value_of::<Tally>(&client, &child).await,
    );
    println!("retried relay with a HashMap child: {relayed:?}; counts (parent, child) {counts:?}");
    // The guide: messages a handler sends must encode the same way on every attempt (a
    // `HashMap`'s order does not): the retried child is refused, never applied twice.
    assert!(
        matches!(relayed.child, Err(ref e) if e.contains("RequestIdReused")),
        "the retried parent's child that encodes differently: {:?}",
        relayed.child
    );
    assert_eq!(counts, (Some(1), Some(1)));
}

/// Guide: "a handler whose sends depend on something that changes between attempts (the
/// clock, a random number) gets new ids for them." Method: as above, with a child that
/// carries the time it was built at. By the guide, the retried parent's child gets a new id
/// and is applied (at least once). The code derives the id from the send's place only, so the
/// child gets the same id with another payload and is refused with `RequestIdReused`.
#[tokio::test]
async fn a_child_that_changes_between_attempts_is_refused_under_its_id() {
    let (cluster, spy) = start::<Tally>("attack-nested-clock", 1, |_| {}).await;
    cluster.wait_ready().await;
    let (parent, child) = (key_of_shard("parent", 3), key_of_shard("child", 5));
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(parent.as_str(), Get).await.expect("warm up");
    spy.fail_next(1, 3);
    let relayed = client
        .send(parent.as_str(), RelayStamped { to: child.clone() })
        .await
        .expect("the relay is answered after its retry");
    println!("retried relay with a clock-stamped child: {relayed:?}");
    // The guide: a child sent at the same place with another payload is refused.
    assert!(
        matches!(relayed.child, Err(ref e) if e.contains("RequestIdReused")),
        "the changed child under the same id: {:?}",
        relayed.child
    );
}

/// Client docs: a request whose owner cannot be reached "goes to another node instead, which
/// forwards it". Method: two nodes; a numbered `Bag` (a `HashMap` of 16 entries) is sent as the
/// client sends it (`Request::ShardOnce`, the client's encoded bytes) to its shard's owner and
/// applied; its retry (same id, same bytes, attempt 1) goes to the other node, which decodes
/// and re-encodes the message before forwarding it. The owner computes the digest from the
/// re-encoded bytes, which differ (map order), and refuses the retry as `RequestIdReused`
/// instead of answering it from its record.
#[tokio::test]
async fn a_retry_forwarded_through_another_node_is_refused_as_a_reused_id() {
    let (cluster, _spy) = start::<Tally>("attack-forwarded-digest", 2, |_| {}).await;
    let leader = cluster.wait_ready().await;
    let (_, owners) = cluster.shards(leader).await.expect("a map");
    let owner = owners[0];
    let other = *cluster
        .ids()
        .iter()
        .find(|id| **id != owner)
        .expect("two nodes");
    let shard = *shards_of(&owners, owner).first().expect("a shard");
    let key = key_of_shard("forwarded", shard);
    let items: HashMap<String, u64> = (0..16).map(|i| (format!("item-{i}"), i)).collect();
    let payload = clusterfunk::internals::encode(&Bag { items }).expect("encode");
    let transport = raw_transport();
    let mut once = Once {
        session: SessionId::random().expect("random"),
        seq: 1,
        low: 1,
        age_ms: 0,
        attempt: 0,
        idempotent: false,
    };
    let first = send_once::<Bag>(&transport, cluster.addr(owner), &key, payload.clone(), once)
        .await
        .expect("the first attempt is applied");
    once.attempt = 1;
    once.age_ms = 50;
    let retry = send_once::<Bag>(&transport, cluster.addr(other), &key, payload, once).await;
    let client = client_of(&cluster, Duration::from_secs(20));
    let count = value_of::<Tally>(&client, &key).await;
    println!("first {first:?}; retry through node {other}: {retry:?}; count {count:?}");
    assert_eq!(
        retry,
        Ok(first),
        "the retry (same id, same bytes) must be answered from the record"
    );
    assert_eq!(count, Some(1));
}

/// Issue: "a handler that sends to other shards derives the ids from its own request, so a
/// retried parent does not apply its children twice"; the guide tells a caller whose attempt's
/// outcome is unknown to send it again. Method: one node; a `RelayRetrying` sends an `Incr` to
/// a key of shard 5, whose commit is applied by the store but reports a failure (the change
/// and its record landed; the send answers `OutcomeUnknown`). The handler sends it again, as a
/// client would; the second send gets the next derived id (the send's place), not the first
/// one's, so shard 5 applies it again. There is no way for a handler to resend under the same
/// id.
#[tokio::test]
async fn a_handler_that_resends_a_child_after_an_unknown_outcome_applies_it_twice() {
    let (cluster, spy) = start::<Tally>("attack-child-resend", 1, |_| {}).await;
    cluster.wait_ready().await;
    let (parent, child) = (key_of_shard("parent", 3), key_of_shard("child", 5));
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(child.as_str(), Get).await.expect("warm up");
    spy.fail_after_apply(1, 5);
    let relayed = client
        .send(parent.as_str(), RelayRetrying { to: child.clone() })
        .await
        .expect("the relay is answered");
    let count = value_of::<Tally>(&client, &child).await;
    println!("a handler resending its child after an unknown outcome: {relayed:?}; child count {count:?}");
    assert_eq!(
        count,
        Some(1),
        "the child increment was applied {count:?} times for one parent request"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Reserved keys
// ---------------------------------------------------------------------------------------------

/// Shard docs: "A handler wrote a record under the framework's prefix: refused". Method: one
/// node with passivation after 100 ms; the handler's `on_deactivate` writes a value under the
/// session index's key (as a handler flushing entries keyed by bytes it computed would). The
/// write is not refused on that path: it is committed when the shard passivates, and from
/// then on every numbered request to the shard fails, because the index cannot be decoded.
#[tokio::test]
async fn a_write_under_the_reserved_prefix_in_on_deactivate_is_committed_and_bricks_the_shard() {
    let (cluster, _spy) = start::<Tally>("attack-reserved-deactivate", 1, |config| {
        config.passivate_after = Some(Duration::from_millis(100));
    })
    .await;
    cluster.wait_ready().await;
    let key = key_of_shard("bricked", 4);
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(key.as_str(), Incr).await.expect("increment");
    WRITE_RESERVED_ON_DEACTIVATE.store(true, Ordering::Release);
    // Passivation runs on_deactivate; wait for it (the shard reactivates on the next request).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    WRITE_RESERVED_ON_DEACTIVATE.store(false, Ordering::Release);
    let after = client.send(key.as_str(), Incr).await;
    println!("a numbered increment after on_deactivate wrote a reserved key: {after:?}");
    assert!(
        after.is_ok(),
        "the reserved write must have been refused; instead the shard refuses requests: \
         {after:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Errors that hide an unknown outcome
// ---------------------------------------------------------------------------------------------

/// `ClientError::is_outcome_unknown`: "Whether the message may or may not have taken effect";
/// the guide's `add_until_answered` loop retries only on it and returns any other error as the
/// outcome. Method: 3 nodes sharing a store, with a lease of 3 s; an increment's commit is
/// applied but held, then its owner is killed: the connection breaks, the attempt's outcome is
/// unknown. The call's deadline (2 s) ends before the failover completes. The call must report an unknown outcome; it reports what
/// the later waits saw instead (not ready / unreachable), though the increment was applied.
#[tokio::test]
async fn a_call_whose_attempt_may_have_applied_reports_a_plain_error_at_its_deadline() {
    // A failover that takes longer than the call's deadline (a lease of 3 s), and nodes that
    // wait only briefly for an owner before they answer "not ready".
    let (cluster, spy) = start::<Tally>("attack-hidden-unknown", 3, |config| {
        config.lease.lease = Duration::from_secs(3);
        config.lease.renew_period = Duration::from_millis(750);
        config.unavailable_wait = Duration::from_millis(200);
    })
    .await;
    let leader = cluster.wait_ready().await;
    let (victim, _) = cluster.follower_and_others(leader);
    let (_, owners) = cluster.shards(victim).await.expect("a map");
    let shard = *shards_of(&owners, victim).first().expect("a shard");
    let key = key_of_shard("hidden", shard);
    let client = client_of(&cluster, Duration::from_secs(20));
    client.send(key.as_str(), Get).await.expect("warm up");
    spy.hold_after(victim, shard);
    let request = Arc::new(client.request(key.as_str(), Incr).expect("a request"));
    let sent = {
        let request = request.clone();
        tokio::spawn(async move {
            request
                .send_with(CallOptions::new().deadline(Duration::from_secs(2)))
                .await
        })
    };
    cluster
        .wait_until("the commit is applied and held", DEADLINE, || async {
            (spy.applied_held() >= 1).then_some(())
        })
        .await;
    cluster.kill(victim).await;
    spy.let_return();
    let outcome = sent.await.expect("the call's task");
    let count = loop {
        match client
            .send_with(key.as_str(), Get, CallOptions::new().numbered(false))
            .await
        {
            Ok(read) => break read.value,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    println!("call whose attempt was applied, owner killed: {outcome:?}; count {count:?}");
    assert_eq!(count, Some(1), "the increment was applied");
    if let Err(error) = &outcome {
        assert!(
            error.is_outcome_unknown(),
            "the increment was applied but the call says {error:?}, which \
             is_outcome_unknown() does not count as unknown: a caller following the guide \
             gives up (or sends it again as a new request)"
        );
    }
}

/// `Client::request_numbered`: "The session's later requests are numbered above `seq`."
/// Method: no cluster needed; a client numbers one request `u64::MAX` (a number a program
/// kept, or a corrupted one), then two more with `Client::request`. The counter saturates and
/// then wraps: the next request gets `u64::MAX` again (the id of another message), the one after
/// it 0, then 1, 2, ... (numbers the session used before): a shard answers such a request from
/// the record of an older one with the same payload, without applying it, or refuses it.
#[test]
fn request_numbered_near_the_top_makes_later_requests_reuse_ids() {
    let client = Client::with_config(
        ["127.0.0.1:9".parse().expect("an address")],
        None,
        "clusterfunk",
        Duration::from_secs(1),
    )
    .expect("a client");
    let refused = client.request_numbered(u64::MAX, "k", Incr);
    assert!(
        matches!(refused, Err(ClientError::Invalid(_))),
        "a number past REQUEST_NUMBER_MAX: {refused:?}"
    );
    let kept = client
        .request_numbered(clusterfunk::client::REQUEST_NUMBER_MAX, "k", Incr)
        .expect("a request");
    let next = client.request("k", Get).expect("a request");
    let after = client.request("k", Get).expect("a request");
    println!(
        "numbers after request_numbered(u64::MAX): {}, {}",
        next.id().seq,
        after.id().seq
    );
    assert!(
        next.id().seq != kept.id().seq && after.id().seq > kept.id().seq.min(next.id().seq),
        "later requests reuse numbers: {} then {} after {}",
        next.id().seq,
        after.id().seq,
        kept.id().seq
    );
}

// ---------------------------------------------------------------------------------------------
// Held up: attacks that found nothing (these pass)
// ---------------------------------------------------------------------------------------------

/// A numbered increment (raw `ShardOnce`, so the test controls every attempt) to `addr`.
fn incr_once(session: SessionId, seq: u64, attempt: u32) -> Once {
    Once {
        session,
        seq,
        low: seq,
        age_ms: u64::from(attempt) * 10,
        attempt,
        idempotent: false,
    }
}

/// A retry that arrives while the first attempt's commit is in flight (applied by the store,
/// not yet returned) waits for that commit and gets the first attempt's reply; a commit that
/// lands but reports a failure is answered from the record on the client's retry; a retry
/// after the shard passivated (record read back from the store) is answered too. Count: 1 each.
#[tokio::test]
async fn held_up_retries_during_a_commit_after_a_lost_commit_answer_and_after_passivation() {
    let (cluster, spy) = start::<Tally>("attack-held-up", 1, |config| {
        config.passivate_after = Some(Duration::from_millis(100));
    })
    .await;
    cluster.wait_ready().await;
    let transport = Arc::new(raw_transport());
    let addr = cluster.addr(1);
    let client = client_of(&cluster, Duration::from_secs(20));
    let payload = clusterfunk::internals::encode(&Incr).expect("encode");

    // 1. A retry while the first attempt's commit is in flight.
    let key = key_of_shard("in-flight", 5);
    client.send(key.as_str(), Get).await.expect("warm up");
    let session = SessionId::random().expect("random");
    spy.hold_after(1, 5);
    let first = {
        let (transport, key, payload) = (transport.clone(), key.clone(), payload.clone());
        tokio::spawn(async move {
            send_once::<Incr>(&transport, addr, &key, payload, incr_once(session, 1, 0)).await
        })
    };
    cluster
        .wait_until(
            "the first attempt's commit is applied",
            DEADLINE,
            || async { (spy.applied_held() >= 1).then_some(()) },
        )
        .await;
    let retry = {
        let (transport, key, payload) = (transport.clone(), key.clone(), payload.clone());
        tokio::spawn(async move {
            send_once::<Incr>(&transport, addr, &key, payload, incr_once(session, 1, 1)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !retry.is_finished(),
        "the retry waits for the commit in flight"
    );
    spy.let_return();
    let (first, retry) = (first.await.expect("task"), retry.await.expect("task"));
    assert_eq!(first, retry, "the retry gets the first attempt's reply");
    assert_eq!(value_of::<Tally>(&client, &key).await, Some(1));

    // 2. A commit that landed but reported a failure: the client's own retry is answered.
    let key = key_of_shard("lost-answer", 6);
    client.send(key.as_str(), Get).await.expect("warm up");
    spy.fail_after_apply(1, 6);
    let reply = client.send(key.as_str(), Incr).await.expect("answered");
    assert_eq!(reply.value, Some(1));
    assert_eq!(value_of::<Tally>(&client, &key).await, Some(1));

    // 3. A retry after the shard passivated.
    let key = key_of_shard("passivated", 7);
    let session = SessionId::random().expect("random");
    let first = send_once::<Incr>(
        &transport,
        addr,
        &key,
        payload.clone(),
        incr_once(session, 1, 0),
    )
    .await
    .expect("applied");
    wait_deactivated(&cluster, 7).await;
    let retry = send_once::<Incr>(&transport, addr, &key, payload, incr_once(session, 1, 1)).await;
    assert_eq!(retry, Ok(first));
    assert_eq!(value_of::<Tally>(&client, &key).await, Some(1));
}

/// A whole-shard state (`Durable`, loaded with `Scope::State`) on a node-local LMDB store:
/// a retry after the shard passivated, and after the node was killed and restarted in place,
/// is answered from the record read back from LMDB. Count: 1.
#[tokio::test]
async fn held_up_whole_shard_state_on_lmdb_answers_retries_after_passivation_and_restart() {
    let cluster = TestCluster::<Total>::start_with_stores(
        "attack-held-up-lmdb",
        1,
        |config| config.passivate_after = Some(Duration::from_millis(100)),
        |_, dir| {
            clusterfunk::persist::LmdbShardStore::open(
                dir,
                clusterfunk::storage::StoreOptions {
                    map_size_bytes: 64 << 20,
                    sync: false,
                },
            )
            .map(|store| Arc::new(store) as Arc<dyn ShardStore>)
            .map_err(|e| e.to_string())
        },
    )
    .await;
    cluster.wait_ready().await;
    let transport = raw_transport();
    let addr = cluster.addr(1);
    let key = key_of_shard("whole", 9);
    let payload = clusterfunk::internals::encode(&Incr).expect("encode");
    let session = SessionId::random().expect("random");
    let first = send_once::<Incr>(
        &transport,
        addr,
        &key,
        payload.clone(),
        incr_once(session, 1, 0),
    )
    .await
    .expect("applied");
    wait_deactivated(&cluster, 9).await;
    let after_passivation = send_once::<Incr>(
        &transport,
        addr,
        &key,
        payload.clone(),
        incr_once(session, 1, 1),
    )
    .await;
    assert_eq!(after_passivation, Ok(first));
    cluster.kill(1).await;
    cluster.restart(1).await;
    cluster.wait_ready().await;
    let transport = raw_transport();
    let after_restart =
        send_once::<Incr>(&transport, addr, &key, payload, incr_once(session, 1, 2)).await;
    assert_eq!(after_restart, Ok(first));
    let client = client_of(&cluster, Duration::from_secs(20));
    assert_eq!(value_of::<Total>(&client, &key).await, Some(1));
}

// ---------------------------------------------------------------------------------------------
// 7. Process level: `kv serve` nodes, clients that retry until acknowledged
// ---------------------------------------------------------------------------------------------
//
// The acceptance run, written independently of tests/exactly_once_faults.rs (which also
// covers the restart in place on LMDB): counter increments from clients that retry each request
// under its id until it is acknowledged, through kill -9 of a follower and of the leader and a
// SIGSTOP of an owner (PostgreSQL), and through planned moves between node-local LMDB stores. A
// client that gives up (a final refusal, or no answer within `GIVE_UP`) fails the run; at the
// end every counter must equal its acknowledged increments.

#[allow(dead_code)]
mod common;

#[allow(dead_code)]
#[path = "../examples/support/kv_api.rs"]
mod kv_api;

mod process {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use clusterfunk::client::{CallOptions, Client, ClientError};
    use clusterfunk::shard_map::shard_for;
    use clusterfunk::testing::PostgresServer;
    use clusterfunk::transport::Secret;
    use clusterfunk::Error;
    use tokio::runtime::Runtime;

    use super::common::{Cluster, Store, SHARD_COUNT};
    use super::kv_api::{Get, Incr};

    /// Concurrent writers.
    const WRITERS: usize = 8;
    /// Counters, shared by the writers.
    const COUNTERS: usize = 6;
    /// Acknowledged increments before each fault, and again after it.
    const ACKS: usize = 200;
    /// A request not acknowledged after this long is given up (fails the run).
    const GIVE_UP: Duration = Duration::from_secs(120);
    /// Per-call deadline; a call that runs out is sent again under its id.
    const CALL_DEADLINE: Duration = Duration::from_secs(5);
    /// Bound on the waits of the test's own steps.
    const STEP_DEADLINE: Duration = Duration::from_secs(180);

    /// What the writers saw.
    #[derive(Default)]
    struct Tally {
        acknowledged: [u64; COUNTERS],
        gave_up: Vec<String>,
        retries: u64,
        errors: Vec<String>,
    }

    struct Load {
        acked: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        tasks: Vec<tokio::task::JoinHandle<Tally>>,
    }

    impl Load {
        fn start(runtime: &Runtime, client: &Client) -> Load {
            let acked = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let tasks = (0..WRITERS)
                .map(|writer| {
                    runtime.spawn(write_loop(
                        client.clone(),
                        writer,
                        acked.clone(),
                        stop.clone(),
                    ))
                })
                .collect();
            Load { acked, stop, tasks }
        }

        fn acked(&self) -> usize {
            self.acked.load(Ordering::SeqCst)
        }

        fn stop(self, runtime: &Runtime) -> Tally {
            self.stop.store(true, Ordering::SeqCst);
            let tallies = runtime.block_on(futures_util::future::join_all(self.tasks));
            let mut all = Tally::default();
            for tally in tallies {
                let tally = tally.expect("a writer panicked");
                for (sum, n) in all.acknowledged.iter_mut().zip(tally.acknowledged) {
                    *sum += n;
                }
                all.gave_up.extend(tally.gave_up);
                all.retries += tally.retries;
                all.errors.extend(tally.errors);
            }
            all
        }
    }

    /// Increments counters until told to stop; each request is sent again under its id after
    /// any error until it is acknowledged, or given up after a final refusal or `GIVE_UP`.
    async fn write_loop(
        client: Client,
        writer: usize,
        acked: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
    ) -> Tally {
        let mut tally = Tally::default();
        let mut step = 0;
        while !stop.load(Ordering::SeqCst) {
            let counter = (writer + step) % COUNTERS;
            step += 1;
            let request = client
                .request(format!("counter-{counter}"), Incr { by: 1 })
                .expect("a request");
            let began = Instant::now();
            loop {
                match request
                    .send_with(CallOptions::new().deadline(CALL_DEADLINE))
                    .await
                {
                    Ok(Some(_)) => {
                        tally.acknowledged[counter] += 1;
                        acked.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Ok(None) => {
                        tally
                            .gave_up
                            .push(format!("counter-{counter}: not a number"));
                        break;
                    }
                    Err(ClientError::Cluster(
                        error @ (Error::RequestIdReused { .. }
                        | Error::RequestTooOld { .. }
                        | Error::SessionExpired { .. }),
                    )) => {
                        tally
                            .gave_up
                            .push(format!("counter-{counter} {}: {error}", request.id()));
                        break;
                    }
                    Err(error) => {
                        if began.elapsed() > GIVE_UP {
                            tally.gave_up.push(format!(
                                "counter-{counter} {}: unanswered after {GIVE_UP:?}: {error}",
                                request.id()
                            ));
                            break;
                        }
                        tally.retries += 1;
                        if tally.errors.len() < 20 {
                            tally.errors.push(error.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        tally
    }

    fn client(cluster: &Cluster) -> Client {
        let seeds = cluster
            .ids()
            .into_iter()
            .map(|id| cluster.addr(id).parse().expect("IP:PORT"));
        let secret = Secret::new(cluster.secret().as_bytes().to_vec()).expect("secret");
        Client::with_config(seeds, Some(secret), "clusterfunk", CALL_DEADLINE).expect("client")
    }

    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    }

    fn wait_acks(cluster: &Cluster, load: &Load, what: &str, more: usize) {
        let from = load.acked();
        cluster.wait_until(
            &format!("{more} more increments are acknowledged {what}"),
            STEP_DEADLINE,
            || (load.acked() >= from + more).then_some(()),
        );
    }

    /// Reads every counter (no id: no record) and compares it with the acknowledged count.
    fn check(cluster: &Cluster, runtime: &Runtime, tally: &Tally, name: &str) {
        let client = client(cluster);
        let mut problems = Vec::new();
        for counter in 0..COUNTERS {
            let key = format!("counter-{counter}");
            let value = runtime.block_on(async {
                for _ in 0..20 {
                    let read = client
                        .send_with(key.as_str(), Get, CallOptions::new().numbered(false))
                        .await;
                    if let Ok(value) = read {
                        return value;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                panic!("{key} unreadable");
            });
            let value: u64 = value.map_or(0, |v| v.parse().expect("a number"));
            let acknowledged = tally.acknowledged[counter];
            if value != acknowledged {
                problems.push(format!(
                    "{key} holds {value}, {acknowledged} increments were acknowledged ({})",
                    match value > acknowledged {
                        true => format!("{} duplicated", value - acknowledged),
                        false => format!("{} lost", acknowledged - value),
                    }
                ));
            }
        }
        let total: u64 = tally.acknowledged.iter().sum();
        eprintln!(
            "{name}: {total} increments acknowledged after {} retries; gave up: {:?}; \
             sample errors: {:?}",
            tally.retries, tally.gave_up, tally.errors
        );
        assert!(
            tally.gave_up.is_empty() && problems.is_empty(),
            "{name}: gave up on {:?}; counters: {problems:?}\n{}",
            tally.gave_up,
            cluster.report()
        );
    }

    /// The owner of `key`'s shard in node `id`'s map.
    fn owner_of(cluster: &Cluster, id: u64, key: &str) -> Option<u64> {
        let shard = shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize;
        cluster
            .shard_map(id)
            .and_then(|map| map.owners.get(shard).copied())
    }

    /// Guide / issue: "The final counts equal the acknowledged increments in every fault above
    /// (0 lost, 0 duplicated), with the PostgreSQL store". Method: 3 `kv serve` nodes on a
    /// throwaway PostgreSQL; 8 writers increment 6 counters, each request retried under its
    /// id until acknowledged; kill -9 of a follower (restarted), of the leader (restarted),
    /// and a SIGSTOP of the owner of `counter-0` (resumed once its shards moved), each after
    /// and before 200 acknowledged increments; then every counter is read back.
    #[test]
    fn kv_on_postgres_counts_equal_acknowledged_increments_through_kill9_and_sigstop() {
        let name = "attack_once_pg";
        let server = PostgresServer::start().unwrap_or_else(|e| panic!("start PostgreSQL: {e}"));
        let cluster = Cluster::new(name, 3).with_store(Store::Postgres(server.url()));
        cluster.start_all_with_init();
        let ids = cluster.ids();
        let runtime = runtime();
        let load = Load::start(&runtime, &client(&cluster));
        for fault in ["kill -9 follower", "kill -9 leader", "SIGSTOP owner"] {
            let (agreement, _) = cluster.wait_for_one_map(&ids);
            let victim = match fault {
                "kill -9 leader" => agreement.leader,
                "kill -9 follower" => *ids
                    .iter()
                    .find(|&&id| id != agreement.leader)
                    .expect("a follower"),
                _ => owner_of(&cluster, agreement.leader, "counter-0").expect("an owner"),
            };
            let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != victim).collect();
            wait_acks(
                &cluster,
                &load,
                &format!("before the {fault} of node {victim}"),
                ACKS,
            );
            cluster.mark(&format!("{fault}: node {victim}"));
            match fault {
                "SIGSTOP owner" => cluster.pause(victim),
                _ => cluster.kill9(victim),
            }
            cluster.wait_until(
                &format!("the survivors' map gives node {victim} no shard"),
                STEP_DEADLINE,
                || {
                    survivors
                        .iter()
                        .all(|&id| cluster.shard_map(id).is_some_and(|m| m.count(victim) == 0))
                        .then_some(())
                },
            );
            wait_acks(
                &cluster,
                &load,
                &format!("after the {fault} of node {victim}"),
                ACKS,
            );
            match fault {
                "SIGSTOP owner" => cluster.resume(victim),
                _ => cluster.restart(victim),
            }
        }
        cluster.wait_for_one_map(&ids);
        wait_acks(&cluster, &load, "after the last fault healed", ACKS);
        let tally = load.stop(&runtime);
        check(&cluster, &runtime, &tally, name);
    }

    /// Planned moves on a node-local store: the session records travel in the handoff with
    /// the state. Method: 3 `kv serve --store lmdb` nodes; 8 writers as above; under load,
    /// drain node 2 and undrain it, then drain node 3 and undrain it (every shard moves twice
    /// between stores that cannot read each other), each step after 200 acknowledged
    /// increments; then every counter is read back.
    #[test]
    fn kv_on_lmdb_counts_equal_acknowledged_increments_through_drains_and_undrains() {
        let name = "attack_once_lmdb_drain";
        let cluster = Cluster::new(name, 3).with_store(Store::Lmdb);
        cluster.start_all_with_init();
        let ids = cluster.ids();
        let runtime = runtime();
        let load = Load::start(&runtime, &client(&cluster));
        for node in [2u64, 3] {
            for step in ["drain", "undrain"] {
                cluster.wait_for_one_map(&ids);
                wait_acks(
                    &cluster,
                    &load,
                    &format!("before {step} of node {node}"),
                    ACKS,
                );
                cluster.mark(&format!("{step} node {node}"));
                let id = node.to_string();
                let (code, stdout, stderr) = cluster.cf_at(1, &[step, "--id", &id]);
                assert_eq!(code, 0, "{step} --id {node}: {stdout}{stderr}");
                cluster.wait_until(
                    &format!("{step} of node {node} is done"),
                    STEP_DEADLINE,
                    || {
                        let map = cluster.shard_map(1)?;
                        let moving = ids
                            .iter()
                            .any(|&id| cluster.status(id).is_none_or(|s| s["shards_moving"] != 0));
                        let placed = match step {
                            "drain" => map.count(node) == 0,
                            _ => map.count(node) > 0,
                        };
                        (placed && !moving).then_some(())
                    },
                );
            }
        }
        wait_acks(&cluster, &load, "after the last move", ACKS);
        let tally = load.stop(&runtime);
        check(&cluster, &runtime, &tally, name);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The deliverables
// ---------------------------------------------------------------------------------------------

/// Issue: "Bench `exactly_once`: counter increments from retrying clients through kill -9 of
/// a follower and of the leader, and a SIGSTOP of an owner, with a durable store ...; report
/// the cost of the session record"; the guide: "The bench's `exactly_once` scenario measures
/// the cost against the same load sent with `numbered(false)`." Method: look for the scenario
/// in the bench's source (its `--scenarios` values).
#[test]
fn the_exactly_once_bench_scenario_exists() {
    let bench = include_str!("../examples/bench.rs");
    assert!(
        bench.contains("exactly_once"),
        "examples/bench.rs has no `exactly_once` scenario (its --scenarios values: local, \
         raw_actix, forwarded, client, raw_tcp, durable, raw_lmdb, failover, planned, freeze, \
         partition, durable_postgres, raw_postgres, durable_failover, ...); the guide's \
         \"What it costs\" section points at it"
    );
}

/// Waits until shard `shard` deactivated on some node (it passivated).
async fn wait_deactivated<H: ShardHandler + Default>(cluster: &TestCluster<H>, shard: ShardId) {
    cluster
        .wait_until(&format!("shard {shard} passivates"), DEADLINE, || async {
            cluster
                .recorder()
                .events()
                .iter()
                .any(|e| e.shard == shard && e.kind == clusterfunk::ServeEventKind::Deactivated)
                .then_some(())
        })
        .await;
}
