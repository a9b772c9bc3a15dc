//! Local routed `send` on a standalone node, side by side with a raw actix `addr.send().await`
//! to one actor, in one criterion group: the ratio is what the router costs over actix itself.
//!
//! Run: `cargo bench --bench routing`

use std::hint::black_box;
use std::time::{Duration, Instant};

use actix::prelude::*;
use clusterfunk::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};

/// The routed message: add one to the key's counter.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr;

/// One shard's counters.
#[derive(Default)]
struct Counters {
    values: std::collections::HashMap<Key, u64>,
}

#[shard_handler]
impl Counters {
    fn incr(&mut self, key: Key, _msg: Incr, _ctx: &mut ShardContext) -> u64 {
        let value = self.values.entry(key).or_default();
        *value += 1;
        *value
    }
}

/// The raw actix baseline: one actor counting.
struct RawCounter(u64);

impl Actor for RawCounter {
    type Context = Context<Self>;
}

/// The raw actix message.
struct RawIncr;

impl Message for RawIncr {
    type Result = u64;
}

impl Handler<RawIncr> for RawCounter {
    type Result = u64;

    fn handle(&mut self, _: RawIncr, _: &mut Self::Context) -> u64 {
        self.0 += 1;
        self.0
    }
}

fn local_send(c: &mut Criterion) {
    let system = System::new();
    let (node, raw) = system.block_on(async {
        let node = Cluster::builder()
            .shards(1024)
            .handler::<Counters>()
            .standalone()
            .start()
            .await
            .expect("a standalone node starts");
        // Activate the shard before measuring, as a warm service would have it.
        node.send("bench-key", Incr).await.expect("served");
        (node, RawCounter(0).start())
    });
    let mut group = c.benchmark_group("local_send");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("raw_actix_send", |b| {
        b.iter_custom(|iterations| {
            system.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    black_box(raw.send(RawIncr).await.expect("actor alive"));
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("routed_send", |b| {
        b.iter_custom(|iterations| {
            system.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    black_box(node.send("bench-key", Incr).await.expect("served"));
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, local_send);
criterion_main!(benches);
