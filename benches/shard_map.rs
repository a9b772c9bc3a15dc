//! Benchmarks of the shard map: allocation (run on every membership change, inside the
//! replicated state machine's `apply`) and key routing (run on every request).
//!
//! Run with `cargo bench --bench shard_map`. The allocation benches use 50 nodes in 5 zones,
//! so that the zone-aware path is the one measured.

use std::hint::black_box;

use clusterfunk::shard_map::{allocate, shard_for, Member, ShardMap};
use criterion::{criterion_group, criterion_main, Criterion};

const SHARDS: u32 = 10_000;

/// `count` members with ids 1..=count, spread round-robin over 5 zones.
fn members(count: u64) -> Vec<Member> {
    (1..=count)
        .map(|id| Member::in_zone(id, format!("zone-{}", id % 5)))
        .collect()
}

fn shard_map(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_map");

    let fifty = members(50);
    group.bench_function("allocate_10000_shards_50_nodes_fresh", |b| {
        b.iter(|| allocate(None, black_box(&fifty), black_box(SHARDS)))
    });

    let before: ShardMap =
        allocate(None, &members(49), SHARDS).expect("50 members and 10 000 shards are valid");
    group.bench_function("allocate_10000_shards_50_nodes_one_join", |b| {
        b.iter(|| {
            allocate(
                Some(black_box(&before)),
                black_box(&fifty),
                black_box(SHARDS),
            )
        })
    });

    let key = b"user-0000000042!";
    group.bench_function("key_to_shard", |b| {
        b.iter(|| shard_for(black_box(key), black_box(1024)))
    });

    let routed = allocate(None, &fifty, 1024).expect("50 members and 1024 shards are valid");
    group.bench_function("key_to_owner", |b| {
        b.iter(|| black_box(&routed).owner_of_key(black_box(key)))
    });

    group.finish();
}

criterion_group!(benches, shard_map);
criterion_main!(benches);
