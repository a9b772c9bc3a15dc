//! Durable shards on a standalone node. Passivation: idle durable shards commit, free their
//! memory and load again on the next message; a bound on active shards passivates the least recently used; a
//! handler without durable state keeps its shards unless it opts in (and then loses its state,
//! as it chose). Every value is read back at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfunk::persist::{DurableMap, DurableState, LmdbShardStore, ShardStore};
use clusterfunk::prelude::*;
use clusterfunk::storage::StoreOptions;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Get;

/// Counters per key, durable.
#[derive(Default)]
struct Durables {
    counts: DurableMap<u64>,
}

#[shard_handler]
impl Durables {
    fn incr(&mut self, key: Key, _msg: Incr, _ctx: &mut ShardContext) -> u64 {
        let count = self.counts.entry(key);
        *count += 1;
        *count
    }

    fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> u64 {
        self.counts.get(&key).copied().unwrap_or(0)
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.counts)
    }
}

/// Counters per key in memory only; `opt_in` decides whether idle shards may drop them.
#[derive(Default)]
struct Volatile {
    counts: HashMap<Key, u64>,
    opt_in: bool,
}

#[shard_handler]
impl Volatile {
    fn incr(&mut self, key: Key, _msg: Incr, _ctx: &mut ShardContext) -> u64 {
        let count = self.counts.entry(key).or_default();
        *count += 1;
        *count
    }

    fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> u64 {
        self.counts.get(&key).copied().unwrap_or(0)
    }

    fn may_passivate(&self) -> bool {
        self.opt_in
    }
}

/// Far above what a passing run needs on a busy machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn lmdb(dir: &tempfile::TempDir) -> Arc<dyn ShardStore> {
    let options = StoreOptions {
        sync: false,
        ..StoreOptions::default()
    };
    Arc::new(LmdbShardStore::open(dir.path(), options).expect("open the shard store"))
}

/// Waits until `check` holds for the node's active shard count, polling its status.
async fn wait_active<H: ShardHandler>(node: &Node<H>, what: &str, check: impl Fn(usize) -> bool) {
    let started = Instant::now();
    loop {
        let active = node.status().shards_active;
        if check(active) {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: still {active} active shards after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Increments each of `keys` keys `rounds` times, from 4 concurrent senders.
async fn increment<H: ShardHandler + clusterfunk::__private::Handles<Incr>>(
    node: &Node<H>,
    keys: u64,
    rounds: u64,
) {
    let senders = (0..4u64).map(|sender| {
        let node = node.clone();
        async move {
            for round in 0..rounds {
                for key in (sender..keys).step_by(4) {
                    node.send(format!("key-{key}"), Incr)
                        .await
                        .unwrap_or_else(|e| panic!("increment {round} of key-{key}: {e}"));
                }
            }
        }
    });
    futures_util::future::join_all(senders).await;
}

#[actix_rt::test]
async fn idle_durable_shards_passivate_and_load_every_value_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Cluster::builder()
        .shards(16)
        .store(lmdb(&dir))
        .passivate_after(Duration::from_millis(200))
        .handler::<Durables>()
        .standalone()
        .start()
        .await
        .expect("start");
    increment(&node, 400, 3).await;
    assert!(node.status().shards_active > 0);
    wait_active(&node, "idle shards passivate", |active| active == 0).await;
    for key in 0..400 {
        let count = node.send(format!("key-{key}"), Get).await.expect("read");
        assert_eq!(count, 3, "key-{key} after its shard passivated");
    }
    node.shutdown().await;
}

#[actix_rt::test]
async fn the_least_recently_used_shards_passivate_beyond_the_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Cluster::builder()
        .shards(64)
        .store(lmdb(&dir))
        .active_shards_max(4)
        .handler::<Durables>()
        .standalone()
        .start()
        .await
        .expect("start");
    for round in 1..=2u64 {
        increment(&node, 1000, 1).await;
        wait_active(&node, "the bound holds", |active| active <= 4).await;
        for key in 0..1000 {
            let count = node.send(format!("key-{key}"), Get).await.expect("read");
            assert_eq!(count, round, "key-{key} in round {round}");
        }
    }
    node.shutdown().await;
}

/// Regression: the bound was only enforced by the periodic pass, so under load every shard of
/// the node started between two passes (1024 of 1024 with a bound of 64 in the memory run) and
/// memory grew with the keys. A start now queues a pass, so the bound holds during the load.
#[actix_rt::test]
async fn the_active_shard_bound_holds_while_shards_start_under_load() {
    const BOUND: usize = 8;
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Cluster::builder()
        .shards(256)
        .store(lmdb(&dir))
        .active_shards_max(BOUND)
        .handler::<Durables>()
        .standalone()
        .start()
        .await
        .expect("start");
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (node, peak, done) = (node.clone(), peak.clone(), done.clone());
        actix_rt::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(
                    node.status().shards_active,
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    increment(&node, 3000, 1).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.await.expect("sampler");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    // Starts that race the queued pass may overshoot by a few (one per concurrent sender); a
    // bound enforced only every 50 ms lets far more of the 256 shards start.
    assert!(
        peak <= 4 * BOUND,
        "{peak} shards were active at once under load with a bound of {BOUND}"
    );
    for key in 0..3000 {
        let count = node.send(format!("key-{key}"), Get).await.expect("read");
        assert_eq!(count, 1, "key-{key}");
    }
    node.shutdown().await;
}

#[actix_rt::test]
async fn a_handler_without_durable_state_keeps_its_shards_unless_it_opts_in() {
    let start = |opt_in: bool| async move {
        Cluster::builder()
            .shards(8)
            .passivate_after(Duration::from_millis(100))
            .handler_with(move |_| Volatile {
                counts: HashMap::new(),
                opt_in,
            })
            .standalone()
            .start()
            .await
            .expect("start")
    };
    let (kept, dropped) = (start(false).await, start(true).await);
    increment(&kept, 100, 2).await;
    increment(&dropped, 100, 2).await;
    // Both nodes run the same passes on the same clock: once the one that opted in has
    // passivated every shard, the other has had the same chances to.
    wait_active(&dropped, "opted-in shards passivate", |active| active == 0).await;
    assert_eq!(
        kept.status().shards_active,
        8,
        "no shard of the other node passivated"
    );
    for key in 0..100 {
        let key = format!("key-{key}");
        assert_eq!(kept.send(key.as_str(), Get).await.expect("read"), 2);
        assert_eq!(
            dropped.send(key.as_str(), Get).await.expect("read"),
            0,
            "an opted-in shard drops its state"
        );
    }
    kept.shutdown().await;
    dropped.shutdown().await;
}

/// Opens the store in `dir`, waiting while the previous node's shard actors still hold it.
async fn reopen(dir: &tempfile::TempDir) -> Arc<dyn ShardStore> {
    let started = Instant::now();
    loop {
        match LmdbShardStore::open(dir.path(), StoreOptions::default()) {
            Ok(store) => return Arc::new(store),
            Err(error) => assert!(started.elapsed() < DEADLINE, "reopen: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn the_first_message_after_an_activation_sees_its_keys_stored_value() {
    // Regression: the message that activated a shard was handled before its key was read from
    // the store, so a read saw nothing and an increment overwrote the stored count.
    let dir = tempfile::tempdir().expect("temp dir");
    for round in 1..=3u64 {
        let node = Cluster::builder()
            .shards(4)
            .store(reopen(&dir).await)
            .handler::<Durables>()
            .standalone()
            .start()
            .await
            .expect("start");
        let stored = node.send("key", Get).await.expect("read");
        assert_eq!(stored, round - 1, "the first message of round {round}");
        assert_eq!(node.send("key", Incr).await.expect("increment"), round);
        node.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_key_too_long_for_the_store_is_refused_alone_and_the_other_writes_commit() {
    // Regression: a change with a key over LMDB's limit was merged into a commit with other
    // messages' changes, the store refused the whole group, every reply in it became
    // OutcomeUnknown, and the shard reloaded, over and over while one client retried.
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Cluster::builder()
        .shards(1)
        .store(reopen(&dir).await)
        .handler::<Durables>()
        .standalone()
        .start()
        .await
        .expect("start");
    let long = "x".repeat(LmdbShardStore::KEY_BYTES_MAX + 1);
    let attacker = {
        let node = node.clone();
        async move {
            for _ in 0..200 {
                match node.send(long.as_str(), Incr).await {
                    Err(Error::KeyTooLong { size, limit, .. }) => {
                        assert_eq!(
                            (size, limit),
                            (long.len() as u64, LmdbShardStore::KEY_BYTES_MAX as u64)
                        );
                    }
                    other => panic!("a key over the limit: {other:?}"),
                }
            }
        }
    };
    let writers = (0..4u64).map(|writer| {
        let node = node.clone();
        async move {
            for _ in 0..100 {
                node.send(format!("writer-{writer}"), Incr)
                    .await
                    .expect("a normal key's increment commits");
            }
        }
    });
    futures_util::future::join(attacker, futures_util::future::join_all(writers)).await;
    for writer in 0..4 {
        let count = node
            .send(format!("writer-{writer}"), Get)
            .await
            .expect("read");
        assert_eq!(count, 100, "writer-{writer}");
    }
    node.shutdown().await;
}
