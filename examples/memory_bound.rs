//! How much memory a node holds with a bound on active shards, as the number of keys grows.
//!
//! ```text
//! cargo run --release --example memory_bound -- --keys 100000
//! cargo run --release --example memory_bound -- --keys 1000000
//! ```
//!
//! One standalone node in this process, 1024 shards, a durable per-key counter in an
//! `LmdbShardStore` (in a temporary directory, fsync off: this measures memory, not the disk),
//! and at most `--active` shards active (64 by default): 8 concurrent senders increment every
//! key once, then every key is read back and checked. The process's resident memory is printed
//! at the end, once the bound holds again, as one JSON line: `rss_kib` (VmRSS), `anon_kib`
//! (RssAnon: the heap, where shard state lives) and `file_kib` (RssFile: mapped files, here
//! mostly the store's LMDB pages, which the kernel may evict and which grow with the data on
//! disk, not with what the node holds in memory), `rss_peak_kib` (VmHWM, the highest VmRSS of
//! the run) and `peak_active`, the most shards active at once during the load (sampled every
//! millisecond). Run each key count in its own process.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use clusterfunk::persist::{DurableMap, DurableState, LmdbShardStore};
use clusterfunk::prelude::*;
use clusterfunk::storage::StoreOptions;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Get;

#[derive(Default)]
struct Counters {
    counts: DurableMap<u64>,
}

#[shard_handler]
impl Counters {
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

#[derive(Parser)]
#[command(about = "Resident memory of a node with a bound on active shards")]
struct Options {
    /// How many distinct keys to write.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// The bound on active shards.
    #[arg(long, default_value_t = 64)]
    active: usize,
    /// Shards on the node.
    #[arg(long, default_value_t = 1024)]
    shards: u32,
}

/// Concurrent senders.
const SENDERS: u64 = 8;
/// Longest wait for the bound to hold again after the load.
const SETTLE: Duration = Duration::from_secs(60);

/// One field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn main() -> Result<(), String> {
    let options = Options::parse();
    actix::System::new().block_on(run(options))
}

async fn run(options: Options) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let store = LmdbShardStore::open(
        dir.path(),
        StoreOptions {
            sync: false,
            map_size_bytes: 8 << 30,
        },
    )
    .map_err(|e| e.to_string())?;
    let node = Cluster::builder()
        .shards(options.shards)
        .store(Arc::new(store))
        .active_shards_max(options.active)
        .handler::<Counters>()
        .standalone()
        .start()
        .await
        .map_err(|e| e.to_string())?;
    // The most shards active at once during the load, sampled every millisecond.
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (node, peak, done) = (node.clone(), peak.clone(), done.clone());
        actix::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(node.status().shards_active, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let started = Instant::now();
    let keys = options.keys;
    for phase in ["write", "read"] {
        let senders = (0..SENDERS).map(|sender| {
            let node = node.clone();
            async move {
                for key in (sender..keys).step_by(SENDERS as usize) {
                    let key = format!("key-{key}");
                    let count = match phase {
                        "write" => node.send(key.as_str(), Incr).await,
                        _ => node.send(key.as_str(), Get).await,
                    }
                    .map_err(|e| format!("{phase} {key}: {e}"))?;
                    if count != 1 {
                        return Err(format!("{phase} {key}: count {count}, expected 1"));
                    }
                }
                Ok::<(), String>(())
            }
        });
        for outcome in futures_util::future::join_all(senders).await {
            outcome?;
        }
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.await.map_err(|e| format!("sampler: {e}"))?;
    let settle = Instant::now();
    while node.status().shards_active > options.active {
        if settle.elapsed() > SETTLE {
            return Err(format!(
                "{} shards still active after {SETTLE:?}",
                node.status().shards_active
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = serde_json::json!({
        "keys": keys,
        "active_max": options.active,
        "active": node.status().shards_active,
        "peak_active": peak.load(Ordering::Relaxed),
        "seconds": elapsed.as_secs_f64(),
        "rss_kib": status_kib("VmRSS"),
        "rss_peak_kib": status_kib("VmHWM"),
        "anon_kib": status_kib("RssAnon"),
        "file_kib": status_kib("RssFile"),
    });
    println!("{line}");
    node.shutdown().await;
    Ok(())
}
