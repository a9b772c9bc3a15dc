//! A counter service on a standalone node: 100 000 increments over 10 000 keys from concurrent
//! senders, then a check that every count adds up, and the throughput.
//!
//! Run: `cargo run --release --example counter [-- --senders 16 --increments 100000 --keys 10000]`

use std::collections::HashMap;
use std::time::Instant;

use clusterfunk::prelude::*;

/// Adds `by` to the key's counter and returns the new value.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr {
    by: u64,
}

/// Reads the key's counter.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Get;

/// One shard's counters.
#[derive(Default)]
struct Counters {
    values: HashMap<Key, u64>,
}

#[shard_handler]
impl Counters {
    fn incr(&mut self, key: Key, msg: Incr, _ctx: &mut ShardContext) -> u64 {
        let value = self.values.entry(key).or_default();
        *value += msg.by;
        *value
    }

    fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> u64 {
        self.values.get(&key).copied().unwrap_or(0)
    }
}

struct Args {
    senders: u64,
    increments: u64,
    keys: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        senders: 16,
        increments: 100_000,
        keys: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| format!("{flag}: `{value}` is not a number"))?;
        match flag.as_str() {
            "--senders" => args.senders = value.max(1),
            "--increments" => args.increments = value,
            "--keys" => args.keys = value.max(1),
            other => {
                return Err(format!(
                    "unknown flag {other}; flags: --senders N --increments N --keys N"
                ))
            }
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    actix::System::new().block_on(async move {
        let node = Cluster::builder()
            .node_id(1)
            .shards(1024)
            .handler::<Counters>()
            .standalone()
            .start()
            .await?;
        println!(
            "standalone node 1: 1024 shards; {} increments over {} keys from {} concurrent senders",
            args.increments, args.keys, args.senders
        );
        let started = Instant::now();
        let senders = (0..args.senders).map(|sender| {
            let node = node.clone();
            let (keys, per_sender) = (args.keys, args.increments / args.senders);
            async move {
                for i in 0..per_sender {
                    let key = (sender * per_sender + i) % keys;
                    node.send(key, Incr { by: 1 }).await?;
                }
                Ok::<u64, Error>(per_sender)
            }
        });
        let mut sent = 0;
        for result in futures_util::future::join_all(senders).await {
            sent += result?;
        }
        let elapsed = started.elapsed();
        let mut total = 0;
        for key in 0..args.keys {
            total += node.send(key, Get).await?;
        }
        let status = node.status();
        node.shutdown().await;
        if total != sent {
            return Err(format!("counts add up to {total}, expected {sent}").into());
        }
        println!(
            "{sent} increments in {:.3} s: {:.0} increments/s; {} shards active; all {} keys add up to {total}",
            elapsed.as_secs_f64(),
            sent as f64 / elapsed.as_secs_f64(),
            status.shards_active,
            args.keys
        );
        Ok(())
    })
}
