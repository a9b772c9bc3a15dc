//! Local routing on a standalone node: keys reach the shard they hash to, shards are restarted
//! after a panic, a full mailbox answers `Overloaded` instead of hanging, and shutdown
//! deactivates every shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clusterfunk::prelude::*;
use clusterfunk::shard_map::shard_for;
use clusterfunk::{ConfigError, StartError};
use tokio::sync::{mpsc, Notify};

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply((u64, ShardId))]
struct Incr {
    by: u64,
}

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Get;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct Boom;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct BoomLater;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct Block;

/// Shared probes the tests observe the handlers through.
#[derive(Default)]
struct Probes {
    gate: Notify,
    blocked: Option<mpsc::UnboundedSender<()>>,
    deactivated: AtomicUsize,
}

struct Counters {
    values: HashMap<Key, u64>,
    probes: Arc<Probes>,
}

#[shard_handler]
impl Counters {
    fn incr(&mut self, key: Key, msg: Incr, ctx: &mut ShardContext) -> (u64, ShardId) {
        let value = self.values.entry(key).or_default();
        *value += msg.by;
        (*value, ctx.shard())
    }

    async fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> u64 {
        self.values.get(&key).copied().unwrap_or(0)
    }

    fn boom(&mut self, _key: Key, _msg: Boom, _ctx: &mut ShardContext) {
        panic!("boom on purpose");
    }

    async fn boom_later(&mut self, _key: Key, _msg: BoomLater, _ctx: &mut ShardContext) {
        tokio::task::yield_now().await;
        panic!("async boom on purpose");
    }

    async fn block(&mut self, _key: Key, _msg: Block, _ctx: &mut ShardContext) {
        if let Some(blocked) = &self.probes.blocked {
            let _ = blocked.send(());
        }
        self.probes.gate.notified().await;
    }

    fn on_deactivate(&mut self, _ctx: &mut ShardContext) -> Option<Handoff> {
        self.probes.deactivated.fetch_add(1, Ordering::SeqCst);
        None
    }
}

async fn start(shards: u32, mailbox: usize, probes: Arc<Probes>) -> Node<Counters> {
    Cluster::builder()
        .shards(shards)
        .mailbox_capacity(mailbox)
        .request_timeout(Duration::from_secs(30))
        .handler_with(move |_shard| Counters {
            values: HashMap::new(),
            probes: probes.clone(),
        })
        .standalone()
        .start()
        .await
        .expect("valid config")
}

#[actix_rt::test]
async fn many_keys_from_concurrent_senders_reach_their_shard() {
    // Method: 8 concurrent senders increment 500 keys 250 times in total each; every reply names
    // the shard that served it, which must be the key's hash shard, and the final counts add up.
    let node = start(64, 1024, Arc::default()).await;
    let senders = (0..8u64).map(|sender| {
        let node = node.clone();
        async move {
            for i in 0..1000u64 {
                let key = format!("key-{}", (i * 7 + sender) % 500);
                let (_, shard) = node
                    .send(key.as_str(), Incr { by: 1 })
                    .await
                    .expect("served");
                assert_eq!(
                    shard,
                    shard_for(key.as_bytes(), 64),
                    "key {key} served by the wrong shard"
                );
            }
        }
    });
    futures_util::future::join_all(senders).await;
    let mut total = 0;
    for k in 0..500 {
        total += node.send(format!("key-{k}"), Get).await.expect("served");
    }
    assert_eq!(total, 8 * 1000);
    let status = node.status();
    assert_eq!(status.shards_owned, 64);
    assert!(
        status.shards_active > 32,
        "most of 64 shards see some of 500 keys"
    );
}

#[actix_rt::test]
async fn panicking_handler_fails_its_message_and_the_shard_restarts_fresh() {
    // Method: build state on a shard, make its handler panic (sync and async), and check the
    // panicking message fails with ShardFailed while the shard keeps serving with fresh state.
    let node = start(16, 64, Arc::default()).await;
    assert_eq!(node.send("k", Incr { by: 5 }).await.unwrap().0, 5);
    match node.send("k", Boom).await {
        Err(Error::ShardFailed { shard, reason }) => {
            assert_eq!(shard, node.shard_for("k"));
            assert!(reason.contains("boom on purpose"), "{reason}");
        }
        other => panic!("expected ShardFailed, got {other:?}"),
    }
    assert_eq!(
        node.send("k", Get).await.unwrap(),
        0,
        "restarted with fresh state"
    );
    assert_eq!(node.send("k", Incr { by: 2 }).await.unwrap().0, 2);
    assert!(matches!(
        node.send("k", BoomLater).await,
        Err(Error::ShardFailed { .. })
    ));
    assert_eq!(
        node.send("k", Get).await.unwrap(),
        0,
        "restarted after the async panic too"
    );
}

#[actix_rt::test]
async fn full_mailbox_answers_overloaded_instead_of_hanging() {
    // Method: park the shard inside an async handler, then send more messages than its mailbox
    // holds; the surplus must fail at once with Overloaded, and the rest be served once released.
    let (blocked_tx, mut blocked_rx) = mpsc::unbounded_channel();
    let probes = Arc::new(Probes {
        blocked: Some(blocked_tx),
        ..Probes::default()
    });
    let node = start(4, 8, probes.clone()).await;
    let parked = {
        let node = node.clone();
        actix_rt::spawn(async move { node.send("hot", Block).await })
    };
    blocked_rx.recv().await.expect("the handler started");
    let sends: Vec<_> = (0..40).map(|_| node.send("hot", Incr { by: 1 })).collect();
    let (results, ()) = futures_util::join!(futures_util::future::join_all(sends), async {
        // Runs after join_all's first poll has tried every send.
        tokio::task::yield_now().await;
        probes.gate.notify_one();
    });
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(Error::Overloaded { .. })))
        .count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        overloaded >= 20,
        "only {overloaded} of 40 were refused by a mailbox of 8"
    );
    assert_eq!(
        overloaded + served,
        40,
        "every send either served or refused: {results:?}"
    );
    assert!(served >= 1);
    parked.await.expect("task").expect("parked message served");
    assert_eq!(node.send("hot", Get).await.unwrap(), served as u64);
}

#[actix_rt::test]
async fn shutdown_deactivates_every_active_shard_and_refuses_new_sends() {
    let probes = Arc::new(Probes::default());
    let node = start(32, 64, probes.clone()).await;
    for k in 0..100 {
        node.send(format!("k{k}"), Incr { by: 1 }).await.unwrap();
    }
    let active = node.status().shards_active;
    node.shutdown().await;
    assert_eq!(probes.deactivated.load(Ordering::SeqCst), active);
    assert!(matches!(
        node.send("k1", Get).await,
        Err(Error::ShuttingDown)
    ));
}

#[actix_rt::test]
async fn a_reply_that_never_comes_is_a_timeout() {
    let probes = Arc::new(Probes::default());
    let node = Cluster::builder()
        .shards(4)
        .request_timeout(Duration::from_millis(200))
        .handler_with(move |_| Counters {
            values: HashMap::new(),
            probes: probes.clone(),
        })
        .standalone()
        .start()
        .await
        .unwrap();
    assert!(matches!(
        node.send("k", Block).await,
        Err(Error::Timeout { .. })
    ));
}

#[test]
fn a_node_started_outside_actix_runs_on_its_own_thread() {
    // Method: a plain multi-threaded tokio runtime (no actix System) starts a node and sends.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let node = start(8, 64, Arc::default()).await;
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let node = node.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        node.send(format!("k{}", (i + t) % 10), Incr { by: 1 })
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let mut total = 0;
        for k in 0..10 {
            total += node.send(format!("k{k}"), Get).await.unwrap();
        }
        assert_eq!(total, 400);
        node.shutdown().await;
    });
}

#[actix_rt::test]
async fn bad_settings_are_refused_before_start() {
    let zero_shards = Cluster::builder()
        .shards(0)
        .handler::<Plain>()
        .standalone()
        .start()
        .await;
    assert!(matches!(
        zero_shards,
        Err(StartError::Config(ConfigError::OutOfRange {
            name: "shard_count",
            ..
        }))
    ));
    let zero_mailbox = Cluster::builder()
        .mailbox_capacity(0)
        .handler::<Plain>()
        .standalone()
        .start()
        .await;
    assert!(matches!(
        zero_mailbox,
        Err(StartError::Config(ConfigError::OutOfRange {
            name: "mailbox_capacity",
            ..
        }))
    ));
    let clustered = Cluster::builder().handler::<Plain>().start().await;
    assert!(matches!(
        clustered,
        Err(StartError::Config(ConfigError::Missing { .. }))
    ));
}

#[derive(Default)]
struct Plain;

#[shard_handler]
impl Plain {
    fn get(&mut self, _: Key, _: Get, _: &mut ShardContext) -> u64 {
        0
    }
}
