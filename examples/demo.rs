//! `demo`: clusterfunk in one command. A three-node cluster of the `kv` example on this machine
//! serves traffic while its leader is killed, restarts, grows to five nodes and drains one; then
//! a fresh cluster that keeps its values in PostgreSQL loses a node under traffic and none of
//! the values it acknowledged.
//!
//! ```text
//! cargo run --release --example demo [-- --clients 4 --keep-dir --plain --no-build]
//! ```
//!
//! The story, each chapter a heading with its result:
//!
//! 1. **Start**: three `kv serve` processes on 127.0.0.1 (free ports, a temporary directory,
//!    a fresh `CLUSTERFUNK_SECRET`) bootstrap a cluster of 1024 shards.
//! 2. **Traffic**: `--clients` tasks, each with its own [`Client`], write a key and read it back,
//!    over and over, on keys of every shard. The traffic runs until the end; a status line
//!    refreshes with requests per second, p50/p99 latency over the last second, failed
//!    requests, the leader, the map epoch and each node's shard count.
//! 3. **Failover**: `kill -9` of the leader. One key of every shard is probed (the `kv owner`
//!    request) until each answers; the time from the kill to the last answer is the failover
//!    time. Requests that were in flight on the killed node fail, and are counted.
//! 4. **Restart**: the killed node starts again from its own data dir (no `--init`), rejoins as a
//!    voter and gets its share of shards back by handoff.
//! 5. **Grow**: node 4 joins (with the operator's warning about an even number of voters), then
//!    node 5; each gets its share by handoff.
//! 6. **Drain**: a node hands all its shards over, with the traffic on.
//! 7. **Durable store**: a throwaway PostgreSQL starts in a temporary directory
//!    ([`PostgresServer`]); the first cluster's traffic and nodes stop, and three fresh nodes
//!    start with `kv serve --store postgres://…`, so that every shard keeps its values in the
//!    database. The same traffic runs on them (on more keys, so that a value written before the
//!    kill is not written again after it), a follower gets `kill -9`, every shard is probed
//!    until it answers again, and once the traffic has stopped every key it wrote is read back:
//!    each must hold the value of its last acknowledged put (or of a put that failed after it,
//!    which may or may not have landed). Without PostgreSQL the chapter is skipped with one line
//!    that says why and how to install it (`apt-get install postgresql`); the demo still passes.
//!
//! Then a summary table: requests sent and failed, p50/p99 latency, failover time, shards moved,
//! per chapter and in total. A chapter fails when its step does not finish within
//! `--deadline-secs`, when a request fails outside a kill (planned moves fail none), or when a
//! read misses the value its client just wrote, outside the leader kill (the first cluster's
//! `kv` keeps values in memory, so a crash loses those on the killed node). In the durable
//! chapter requests may fail around the kill, but a value lost, in the traffic or in the
//! read-back, fails it. The story stops at the first failed chapter and the program exits with
//! 1, naming it.
//!
//! The demo drives the cluster through the library ([`Client`], [`AdminClient`]); the lines that
//! start with `$` show the `clusterfunk` command an operator would type for the same request.
//! Before it starts, it runs `cargo build --example kv` in the profile it was built with (a no-op
//! when `kv` is up to date; `--no-build` skips it), since `cargo run --example demo` builds only
//! the demo. The status line refreshes only when stdout is a terminal; otherwise (or with
//! `--plain`) a plain status line is printed every few seconds. Every child process, PostgreSQL
//! and the temporary directories are removed on every way out of the program: success, failure,
//! panic, Ctrl-C, SIGTERM (a `kill -9` of the demo itself leaves its nodes and PostgreSQL
//! running).

// The demo uses the cluster harness of the shared support, not its tables and JSON.
#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clap::Parser;
use clusterfunk::admin::{
    layout_warnings, AdminClient, AdminRequest, AdminResponse, ChangeReport, NodeState,
    StatusReport,
};
use clusterfunk::client::Client;
use clusterfunk::shard_map::shard_for;
use clusterfunk::testing::{
    self, build_kv_example, keys_per_shard, shard_owners, wait_for, Binaries, PostgresServer,
    Settled, TestingError,
};
use clusterfunk::{NodeId, ShardId};
use futures_util::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use support::{
    check_interrupt, exit_code, fmt_ms, interrupted, lib_status, runtime, watch_interrupt, Harness,
    Launch, NodeOptions, Series, POLL_TIMEOUT,
};

use support::kv_api::{Get, Put, WhoOwns};

/// This program's name, in its messages and the node logs.
const PROGRAM: &str = "demo";
/// The cluster's size at the start.
const INITIAL_NODES: u64 = 3;
/// The nodes that join later.
const JOINING: [NodeId; 2] = [4, 5];
/// The shard count `kv serve` bootstraps with.
const SHARD_COUNT: u32 = 1024;
/// Keys each traffic task cycles through (its own, so its read-backs see its own writes).
const KEYS_PER_CLIENT: usize = 2048;
/// Keys each traffic task of the durable chapter cycles through: more than it writes in the
/// chapter on a fast machine, so that the values acknowledged before the kill are not written
/// again after it, and the read-back at the end finds them where the killed node left them.
const DURABLE_KEYS_PER_CLIENT: usize = 32_768;
/// How long one traffic or probe request may take (the `kv` tool's own timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `add-node` and `drain` may take (the node's own bounds are below this).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the traffic chapter lets the traffic run.
const TRAFFIC_TIME: Duration = Duration::from_secs(8);
/// How long each later chapter watches the traffic after its step, to show it steady again.
const AFTER_STEP: Duration = Duration::from_secs(3);
/// How often the status line refreshes.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// How often a plain status line is printed when the status line cannot refresh.
const PLAIN_STATUS_EVERY: Duration = Duration::from_secs(4);
/// How often an unanswered failover probe is sent again.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// The window of the live rate and latency figures.
const LIVE_WINDOW: Duration = Duration::from_secs(1);
/// How long the durable chapter's traffic runs before its kill, and after the failover.
const DURABLE_LOAD: Duration = Duration::from_secs(2);
/// Reads in flight when the durable chapter reads every key back.
const READS_IN_FLIGHT: usize = 32;
/// Attempts of one read-back before the key counts as unreadable.
const READ_ATTEMPTS: usize = 3;

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    about = "A local kv cluster under traffic: leader killed, restarted, two nodes added, one drained; then a cluster on PostgreSQL loses a node and no value"
)]
struct Options {
    /// Traffic tasks, each with its own client.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Pause of each traffic task after each request, in ms (0: back to back).
    #[arg(long, default_value_t = 0)]
    client_pause_ms: u64,
    /// Seconds each step may take before its chapter counts as failed.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
    /// Do not run `cargo build --example kv` first; use the `kv` next to this program.
    #[arg(long)]
    no_build: bool,
    /// Plain lines only, no refreshing status line (the default when stdout is not a terminal).
    #[arg(long)]
    plain: bool,
    /// The node processes.
    #[command(flatten)]
    node: NodeOptions,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Output

/// Where the story goes: lines above a refreshing status line on a terminal, plain lines
/// elsewhere.
#[derive(Clone)]
struct Out {
    /// The status line (hidden when it cannot refresh).
    bar: ProgressBar,
}

impl Out {
    /// A status line on stdout, hidden when stdout is not a terminal or `plain` is set.
    fn new(plain: bool) -> Self {
        let bar = if plain {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout())
        };
        let style = ProgressStyle::with_template("{spinner} {elapsed:>3} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Out { bar }
    }

    /// Whether the status line is invisible, so status goes out as plain lines.
    fn plain(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Prints a line above the status line (or just the line).
    fn line(&self, text: impl AsRef<str>) {
        self.bar.suspend(|| println!("{}", text.as_ref()));
    }

    /// Removes the status line for good.
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `n` with thousands separated by commas.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut text = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            text.push(',');
        }
        text.push(c);
    }
    text
}

/// Seconds with two decimals.
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A failure message without the addresses and numbers that differ from one request to the
/// next, so that equal failures count together.
fn error_kind(message: &str) -> String {
    let kind: String = message
        .split_whitespace()
        .map(|word| {
            if word.chars().any(|c| c.is_ascii_digit()) {
                "#"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    kind.chars().take(140).collect()
}

/// Every node's shard count, `1:342 2:341 3:341`.
fn shares(owners: &[NodeId]) -> String {
    let mut counts: BTreeMap<NodeId, usize> = BTreeMap::new();
    for owner in owners {
        *counts.entry(*owner).or_default() += 1;
    }
    counts
        .iter()
        .map(|(id, n)| format!("{id}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How many shards changed owner from `before` to `after`, and to whom: `342 (2: 171, 3: 171)`.
fn moves(before: &[NodeId], after: &[NodeId]) -> (usize, String) {
    let mut to: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (a, b) in before.iter().zip(after) {
        if a != b {
            *to.entry(*b).or_default() += 1;
        }
    }
    let count = to.values().sum();
    let detail = to
        .iter()
        .map(|(id, n)| format!("{n} to node {id}"))
        .collect::<Vec<_>>()
        .join(", ");
    (count, detail)
}

// ---------------------------------------------------------------------------------------------
// Building `kv`

/// Runs `cargo build --example kv` in this program's profile (a no-op when `kv` is up to date),
/// unless told not to or this program is not in its checkout any more; then finds `kv`.
fn build_kv(options: &Options) -> Result<Binaries, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    if options.no_build || !manifest.is_file() {
        return Binaries::beside_current_exe(false).map_err(|e| e.to_string());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = !cfg!(debug_assertions);
    println!(
        "demo: building the kv example the nodes run: cargo build{} --example kv (quick when it is up to date)",
        if release { " --release" } else { "" }
    );
    build_kv_example(
        Path::new(&cargo),
        Path::new(env!("CARGO_MANIFEST_DIR")),
        release,
        false,
    )
    .map_err(|e| format!("{e}; see cargo's output above"))?;
    Binaries::beside_current_exe(false).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Traffic

/// How a traffic request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered (a read with the value written just before).
    Ok,
    /// A read returned something else than the write just before it stored: the value was lost
    /// (only a crash of its owner loses values).
    Lost,
    /// An error answer; the message is in [`Log::failures`].
    Failed,
}

/// One traffic request, in 12 bytes: a fast machine sends millions in a run.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// When it ended, in µs since [`Live::base`].
    end_us: u32,
    /// How long it took, in µs.
    latency_us: u32,
    /// How it ended.
    outcome: Outcome,
}

/// Every traffic request, in order of completion.
#[derive(Default)]
struct Log {
    /// Every request.
    records: Vec<Record>,
    /// The failed requests' end (µs since [`Live::base`]) and message.
    failures: Vec<(u32, String)>,
}

/// What the traffic, the status line and the story share.
struct Live {
    /// The time the request times count from.
    base: Instant,
    /// Every traffic request.
    log: Mutex<Log>,
    /// Requests sent so far.
    sent: AtomicU64,
    /// Requests failed so far.
    failed: AtomicU64,
    /// The nodes the status line asks, by id.
    polled: Mutex<BTreeMap<NodeId, AdminClient>>,
    /// Tells the traffic and the status line to stop.
    stop: AtomicBool,
}

impl Live {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || interrupted()
    }

    /// µs from [`Self::base`] to `at` (0 before it; a run lasts far less than the 71 minutes
    /// that fit).
    fn micros(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u32::MAX)
    }

    /// Notes a request that started at `start` and ended now, failed with `error` if given.
    fn record(&self, start: Instant, outcome: Outcome, error: Option<String>) {
        let end = Instant::now();
        let record = Record {
            end_us: self.micros(end),
            latency_us: u32::try_from((end - start).as_micros()).unwrap_or(u32::MAX),
            outcome,
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.log);
        log.records.push(record);
        if let Some(error) = error {
            self.failed.fetch_add(1, Ordering::Relaxed);
            log.failures.push((record.end_us, error));
        }
    }
}

/// What one key holds as far as the client that writes it knows: the value of its last
/// acknowledged put, and the puts that failed since (each may or may not have landed). The
/// durable chapter reads every key back against it.
#[derive(Debug, Clone, Default)]
struct Written {
    /// The round of the last acknowledged put (its value), if any was.
    acknowledged: Option<u64>,
    /// When that put was acknowledged, in µs since [`Live::base`].
    acknowledged_us: u32,
    /// The rounds of the puts that failed after it.
    unsure: Vec<u64>,
}

impl Written {
    /// What the key may hold, for a message: `"4"`, or `"4" or a failed put's "5"`.
    fn expected(&self) -> String {
        let acknowledged = self
            .acknowledged
            .map_or("nothing".to_string(), |round| format!("\"{round}\""));
        if self.unsure.is_empty() {
            return acknowledged;
        }
        let unsure: Vec<String> = self.unsure.iter().map(|r| format!("\"{r}\"")).collect();
        format!("{acknowledged} or a failed put's {}", unsure.join(", "))
    }

    /// Whether the key may hold `found`: the last acknowledged value or a later failed put's;
    /// nothing only when no put was acknowledged.
    fn admits(&self, found: Option<&str>) -> bool {
        match found {
            None => self.acknowledged.is_none(),
            Some(text) => text.parse::<u64>().is_ok_and(|round| {
                self.acknowledged == Some(round) || self.unsure.contains(&round)
            }),
        }
    }
}

/// The name of key `k` of traffic task `index`.
fn key_name(index: usize, k: usize) -> String {
    format!("client{index}-key{k}")
}

/// One traffic task: writes each of its `keys` and reads it back, round after round, until the
/// story ends or `stop` is set. Returns what each key it wrote holds as far as it knows.
async fn traffic(
    client: Client,
    index: usize,
    keys: usize,
    pause: Duration,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
) -> Vec<(String, Written)> {
    let mut written = vec![Written::default(); keys];
    let stopped = || live.stopped() || stop.load(Ordering::SeqCst);
    let mut round = 0u64;
    'rounds: while !stopped() {
        for (k, known) in written.iter_mut().enumerate() {
            if stopped() {
                break 'rounds;
            }
            let key = key_name(index, k);
            let value = format!("{round}");
            let start = Instant::now();
            let put = client
                .send(
                    key.as_str(),
                    Put {
                        value: value.clone(),
                    },
                )
                .await;
            let acknowledged = put.is_ok();
            match put {
                Ok(()) => {
                    live.record(start, Outcome::Ok, None);
                    *known = Written {
                        acknowledged: Some(round),
                        acknowledged_us: live.micros(Instant::now()),
                        unsure: Vec::new(),
                    };
                }
                Err(e) => {
                    live.record(start, Outcome::Failed, Some(e.to_string()));
                    known.unsure.push(round);
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if !acknowledged {
                continue;
            }
            let start = Instant::now();
            match client.send(key.as_str(), Get).await {
                Ok(Some(v)) if v == value => live.record(start, Outcome::Ok, None),
                Ok(_) => live.record(start, Outcome::Lost, None),
                Err(e) => live.record(start, Outcome::Failed, Some(e.to_string())),
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        round += 1;
    }
    written
        .into_iter()
        .enumerate()
        .filter(|(_, w)| w.acknowledged.is_some() || !w.unsure.is_empty())
        .map(|(k, w)| (key_name(index, k), w))
        .collect()
}

/// The traffic's requests that ended in `[from, to)` (so that a chapter's figures, printed at
/// its end, are complete, and the summary shows the same).
#[derive(Debug, Default)]
struct Window {
    /// Requests that ended in the window.
    requests: u64,
    /// Those that failed.
    failed: u64,
    /// Reads that missed the value written just before.
    lost: u64,
    /// Latencies of the answered requests (lost ones included), in ms.
    latency_ms: Series,
    /// Failure messages, counted by kind.
    errors: BTreeMap<String, usize>,
}

/// The requests of `log` that ended in `[from, to)`, in µs since [`Live::base`].
fn window(log: &Log, from: u32, to: u32) -> Window {
    let mut w = Window::default();
    for r in log
        .records
        .iter()
        .filter(|r| (from..to).contains(&r.end_us))
    {
        w.requests += 1;
        match r.outcome {
            Outcome::Ok => w.latency_ms.values.push(f64::from(r.latency_us) / 1000.0),
            Outcome::Lost => {
                w.lost += 1;
                w.latency_ms.values.push(f64::from(r.latency_us) / 1000.0);
            }
            Outcome::Failed => w.failed += 1,
        }
    }
    for (_, error) in log
        .failures
        .iter()
        .filter(|(end, _)| (from..to).contains(end))
    {
        *w.errors.entry(error_kind(error)).or_default() += 1;
    }
    w
}

/// Keeps the status line fresh until the story ends: the traffic of the last second and every
/// node's view.
async fn show_status(live: Arc<Live>, out: Out) {
    let mut last_plain = Instant::now();
    while !live.stopped() {
        let admins = lock(&live.polled).clone();
        let statuses = testing::statuses(&admins).await;
        let line = status_line(&live, &statuses);
        if !out.plain() {
            out.bar.set_message(line);
        } else if last_plain.elapsed() >= PLAIN_STATUS_EVERY {
            out.line(format!("      · {line}"));
            last_plain = Instant::now();
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

/// `2,914 req/s  p50 0.9 ms  p99 3.1 ms  failed 0 │ leader 1  term 1  epoch 2 │ nodes 1:342 …`.
fn status_line(
    live: &Live,
    statuses: &[(NodeId, Result<StatusReport, testing::TestingError>)],
) -> String {
    let now = live.micros(Instant::now());
    let since = now.saturating_sub(LIVE_WINDOW.as_micros() as u32);
    let mut recent = Series::default();
    for r in lock(&live.log).records.iter().rev() {
        if r.end_us < since {
            break;
        }
        if r.outcome != Outcome::Failed {
            recent.values.push(f64::from(r.latency_us) / 1000.0);
        }
    }
    let sent = live.sent.load(Ordering::Relaxed);
    let failed = live.failed.load(Ordering::Relaxed);
    let traffic = if sent == 0 {
        "no traffic yet".to_string()
    } else {
        format!(
            "{} req/s  p50 {} ms  p99 {} ms  sent {}  failed {}",
            thousands(recent.values.len() as u64),
            fmt_ms(recent.quantile(0.5)),
            fmt_ms(recent.quantile(0.99)),
            thousands(sent),
            failed
        )
    };
    // The freshest view: the answer with the highest term, then epoch.
    let freshest = statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .filter(|s| s.state == NodeState::Serving)
        .max_by_key(|s| (s.term, s.epoch));
    let cluster = match freshest {
        Some(s) => format!(
            "leader {}  term {}  epoch {}{}",
            s.leader.map_or("-".into(), |l| l.to_string()),
            s.term,
            s.epoch,
            if s.shards_moving > 0 {
                format!("  moving {}", s.shards_moving)
            } else {
                String::new()
            }
        ),
        None => "no node serving".into(),
    };
    let nodes: Vec<String> = statuses
        .iter()
        .map(|(id, s)| match s {
            Err(_) => format!("{id}:dead"),
            Ok(_) if freshest.is_some_and(|f| f.down.contains(id)) => format!("{id}:down"),
            Ok(s) if s.state != NodeState::Serving => format!("{id}:waiting"),
            Ok(s) if freshest.is_some_and(|f| f.draining.contains(id)) => {
                format!("{id}:{}(draining)", s.shards_owned)
            }
            Ok(s) => format!("{id}:{}", s.shards_owned),
        })
        .collect();
    format!("{traffic} │ {cluster} │ shards {}", nodes.join(" "))
}

// ---------------------------------------------------------------------------------------------
// Waiting for the cluster

/// Waits until every node of `admins` serves as a voter (the voters being exactly these
/// nodes), all agree on leader, term and map epoch, nobody is down, no shard moves, and
/// `draining` (if any) is the only node drained while the others own balanced shares.
async fn wait_settled(
    admins: &BTreeMap<NodeId, AdminClient>,
    draining: Option<NodeId>,
    limit: Duration,
) -> Result<Settled, String> {
    testing::wait_settled(admins, SHARD_COUNT, draining, true, limit)
        .await
        .map_err(|e| e.to_string())
}

/// Waits `time`, giving up early on Ctrl-C.
async fn watch(time: Duration) -> Result<(), String> {
    let until = Instant::now() + time;
    while Instant::now() < until {
        check_interrupt()?;
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
    }
    Ok(())
}

/// Sends `key` the `owner` request until it answers or `deadline` passes; returns the moment
/// of the answer and the answering node.
async fn probe_until_served(
    client: Client,
    key: String,
    shard: ShardId,
    deadline: Instant,
) -> Result<(Instant, NodeId), String> {
    let mut last = "no attempt".to_string();
    for _ in 0..100_000 {
        match client.send(key.as_str(), WhoOwns).await {
            Ok(owner) if owner.shard == shard => return Ok((Instant::now(), owner.node)),
            Ok(owner) => {
                return Err(format!(
                    "key {key} of shard {shard} answered from shard {}",
                    owner.shard
                ))
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline || interrupted() {
            break;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    Err(format!("shard {shard} not served again: {last}"))
}

// ---------------------------------------------------------------------------------------------
// The story

/// The chapters, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Three nodes bootstrap a cluster.
    Start,
    /// The traffic starts.
    Traffic,
    /// `kill -9` of the leader, and the failover.
    KillLeader,
    /// The killed node restarts from its data dir.
    Restart,
    /// A fresh node joins as a voter.
    Add(NodeId),
    /// A follower hands over all its shards.
    Drain,
    /// A fresh cluster on PostgreSQL, `kill -9` of a node under load, every acknowledged value
    /// read back.
    Durable,
}

impl Step {
    const ALL: [Step; 8] = [
        Step::Start,
        Step::Traffic,
        Step::KillLeader,
        Step::Restart,
        Step::Add(JOINING[0]),
        Step::Add(JOINING[1]),
        Step::Drain,
        Step::Durable,
    ];

    fn title(self, options: &Options) -> String {
        match self {
            Step::Start => format!("Start {INITIAL_NODES} kv nodes on 127.0.0.1"),
            Step::Traffic => format!(
                "Traffic: {} clients write keys and read them back",
                options.clients
            ),
            Step::KillLeader => "kill -9 the leader".into(),
            Step::Restart => "Restart the killed node from its data dir".into(),
            Step::Add(id) => format!("Add node {id}"),
            Step::Drain => "Drain a node, with the traffic on".into(),
            Step::Durable => format!(
                "A durable store: {INITIAL_NODES} fresh nodes keep their values in PostgreSQL; kill -9 a node under load"
            ),
        }
    }

    /// Short name for the summary table.
    fn name(self) -> String {
        match self {
            Step::Start => "start 3 nodes".into(),
            Step::Traffic => "traffic".into(),
            Step::KillLeader => "kill -9 the leader".into(),
            Step::Restart => "restart it".into(),
            Step::Add(id) => format!("add node {id}"),
            Step::Drain => "drain a node".into(),
            Step::Durable => "postgres kill -9".into(),
        }
    }
}

/// What a chapter's step did.
#[derive(Default)]
struct Done {
    /// Shards that changed owner.
    shards_moved: usize,
    /// Kill → every shard served again (the leader kill only).
    failover: Option<Duration>,
    /// Why the chapter did not run (the durable chapter without PostgreSQL).
    skipped: Option<String>,
    /// What the durable chapter found.
    durable: Option<DurableReport>,
}

/// What the durable chapter found, for the summary.
struct DurableReport {
    /// The node killed.
    killed: NodeId,
    /// Kill → every shard served again.
    failover: Duration,
    /// Keys read back at the end (each with an acknowledged value or a failed put).
    read_back: usize,
    /// Those whose value was acknowledged before the kill on a shard of the killed node: their
    /// values came back from PostgreSQL.
    from_killed_node: usize,
    /// Keys that did not hold their last acknowledged value.
    lost: usize,
}

/// What a `kill -9` and the probes after it found.
struct Failover {
    /// The moment right after the kill.
    t_kill: Instant,
    /// Every shard's first answer after the kill, by shard: when, and from which node.
    answers: Vec<(Instant, NodeId)>,
    /// The members that were not killed.
    survivors: Vec<NodeId>,
}

/// A chapter, once told.
struct Told {
    /// Which chapter.
    step: Step,
    /// When it began.
    started: Instant,
    /// When it ended, its traffic checked.
    ended: Instant,
    /// What its step did, if it finished.
    done: Option<Done>,
    /// Why it failed, if it did.
    error: Option<String>,
}

/// The running story: the cluster, the traffic and what was told so far.
struct Story<'a> {
    /// The command line.
    options: &'a Options,
    /// The node processes (the durable chapter puts its own cluster in place of the first).
    harness: &'a mut Harness,
    /// The durable chapter's PostgreSQL, kept by the caller so that it stops after the nodes
    /// that use it.
    postgres: &'a mut Option<PostgresServer>,
    /// Where the story goes.
    out: Out,
    /// The traffic's log and the status line's nodes.
    live: Arc<Live>,
    /// The members and their addresses.
    members: BTreeMap<NodeId, SocketAddr>,
    /// Addresses kept for the joining nodes.
    spare: BTreeMap<NodeId, SocketAddr>,
    /// The node killed in the leader kill.
    killed: Option<NodeId>,
    /// The map before the leader kill's node was restarted.
    owners_before_restart: Vec<NodeId>,
    /// The traffic tasks, each returning what its keys hold.
    traffic: Vec<tokio::task::JoinHandle<Vec<(String, Written)>>>,
    /// Tells the traffic tasks of the current cluster to stop.
    traffic_stop: Arc<AtomicBool>,
}

impl Story<'_> {
    fn limit(&self) -> Duration {
        Duration::from_secs(self.options.deadline_secs.max(1))
    }

    /// Admin clients of every member, each call bounded by `timeout`.
    fn admins(&self, timeout: Duration) -> Result<BTreeMap<NodeId, AdminClient>, String> {
        self.members
            .iter()
            .map(|(id, addr)| Ok((*id, self.harness.launch.admin(*addr, timeout)?)))
            .collect()
    }

    /// Prints an indented result line.
    fn say(&self, text: impl AsRef<str>) {
        self.out.line(format!("      {}", text.as_ref()));
    }

    /// Prints the command an operator would type for what the demo does through the library.
    fn command(&self, node: NodeId, text: &str) {
        self.out.line(format!(
            "      $ clusterfunk --node {} {text}",
            self.members[&node]
        ));
    }

    /// Tells every chapter in order, stopping at the first that fails.
    async fn tell(&mut self) -> Vec<Told> {
        let mut told = Vec::new();
        for (number, step) in Step::ALL.into_iter().enumerate() {
            self.out.line(format!(
                "\n[{}/{}] {}",
                number + 1,
                Step::ALL.len(),
                step.title(self.options)
            ));
            let started = Instant::now();
            let result = match step {
                Step::Start => self.start().await,
                Step::Traffic => self.run_traffic().await,
                Step::KillLeader => self.kill_leader().await,
                Step::Restart => self.restart().await,
                Step::Add(id) => self.add(id).await,
                Step::Drain => self.drain().await,
                Step::Durable => self.durable().await,
            };
            let ended = Instant::now();
            let mut chapter = Told {
                step,
                started,
                ended,
                done: None,
                error: None,
            };
            let mut skipped = None;
            match result {
                Ok(done) => {
                    skipped = done.skipped.clone();
                    if skipped.is_none() {
                        chapter.error = self.check_traffic(step, started, ended);
                    }
                    chapter.done = Some(done);
                }
                Err(e) => chapter.error = Some(e),
            }
            if interrupted() {
                // Ctrl-C reaches the nodes too: their exits are no finding.
                chapter.error = Some("interrupted".into());
            } else if let Err(e) = self.check_processes() {
                chapter.error = Some(match chapter.error.take() {
                    Some(earlier) => format!("{e}; {earlier}"),
                    None => e,
                });
            }
            match (&chapter.error, skipped) {
                (None, None) => self.say("✓ done"),
                (None, Some(why)) => self.say(format!("– skipped: {why}")),
                (Some(e), _) => self.say(format!("✗ FAILED: {e}")),
            }
            let failed = chapter.error.is_some();
            told.push(chapter);
            if failed {
                break;
            }
        }
        told
    }

    /// Fails when a node process that should run has exited (another program may have killed
    /// it, or it crashed): the story cannot go on without it.
    fn check_processes(&mut self) -> Result<(), String> {
        let mut exited = Vec::new();
        for node in self.harness.nodes.iter().chain(self.harness.extra.iter()) {
            if let Ok(Some(status)) = node.exit_status() {
                exited.push(format!("node {} exited unexpectedly ({status})", node.id()));
            }
        }
        if exited.is_empty() {
            Ok(())
        } else {
            self.harness.print_log_tails(&[]);
            Err(exited.join(", "))
        }
    }

    /// Reports the chapter's traffic; a request failed or a value lost outside the leader kill
    /// fails the chapter (in the durable chapter, only a value lost does).
    fn check_traffic(&self, step: Step, from: Instant, to: Instant) -> Option<String> {
        if matches!(step, Step::Start) {
            return None;
        }
        let w = window(
            &lock(&self.live.log),
            self.live.micros(from),
            self.live.micros(to),
        );
        let seconds = (to - from).as_secs_f64().max(0.001);
        self.say(format!(
            "traffic: {} requests ({} req/s), p50 {} ms, p99 {} ms, max {} ms, {} failed{}",
            thousands(w.requests),
            thousands((w.requests as f64 / seconds) as u64),
            fmt_ms(w.latency_ms.quantile(0.5)),
            fmt_ms(w.latency_ms.quantile(0.99)),
            fmt_ms(w.latency_ms.quantile(1.0)),
            w.failed,
            if w.lost > 0 {
                format!(", {} read(s) missed the value just written", w.lost)
            } else {
                String::new()
            }
        ));
        for (kind, n) in &w.errors {
            self.say(format!("  {n} × {kind}"));
        }
        if step == Step::KillLeader {
            if w.failed > 0 {
                self.say("  (requests in flight on the killed node fail: they may or may not have been handled)");
            }
            if w.lost > 0 {
                self.say("  (kv keeps values in memory: values on the killed node died with it)");
            }
            return None;
        }
        if step == Step::Durable {
            if w.failed > 0 {
                self.say("  (requests in flight on the killed node fail: they may or may not have been handled, and the read-back allows for both)");
            }
            if w.lost > 0 {
                return Some(format!(
                    "{} acknowledged value(s) were lost with the values in PostgreSQL",
                    thousands(w.lost)
                ));
            }
        } else if w.failed > 0 || w.lost > 0 {
            return Some(format!(
                "{} request(s) failed and {} value(s) were lost with no node crashing",
                w.failed, w.lost
            ));
        }
        if w.requests == 0 {
            return Some("the traffic sent no request".into());
        }
        None
    }

    /// Chapter: three nodes bootstrap a cluster.
    async fn start(&mut self) -> Result<Done, String> {
        self.start_cluster("").await?;
        Ok(Done::default())
    }

    /// Starts the initial members with `--init` (`store` shows their `--store` option, if
    /// any) and waits until they serve, with balanced shares.
    async fn start_cluster(&mut self, store: &str) -> Result<(), String> {
        let started = Instant::now();
        self.harness.start_all()?;
        let addrs: Vec<String> = self
            .members
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        self.say(format!(
            "$ kv serve --id N --listen IP:PORT --data-dir DIR{store} --init {}",
            addrs.join(",")
        ));
        let admins = self.admins(POLL_TIMEOUT)?;
        *lock(&self.live.polled) = admins.clone();
        let settled = wait_settled(&admins, None, self.limit() * 2)
            .await
            .inspect_err(|_| self.harness.print_log_tails(&[]))?;
        self.say(format!(
            "{INITIAL_NODES} nodes serving {} after the start: leader node {} (term {}), map epoch {}",
            secs(started.elapsed()),
            settled.leader,
            settled.term,
            settled.epoch
        ));
        self.say(format!(
            "{SHARD_COUNT} shards, per node {}",
            shares(&settled.owners)
        ));
        Ok(())
    }

    /// Chapter: the traffic starts, and keeps going until the end.
    async fn run_traffic(&mut self) -> Result<Done, String> {
        self.start_traffic(KEYS_PER_CLIENT)?;
        watch(TRAFFIC_TIME).await?;
        Ok(Done::default())
    }

    /// Starts `--clients` traffic tasks on the members, each cycling through `keys` keys,
    /// which run until the story ends or [`Self::stop_traffic`].
    fn start_traffic(&mut self, keys: usize) -> Result<(), String> {
        let secret = self.harness.launch.secret()?;
        let ids: Vec<NodeId> = self.members.keys().copied().collect();
        for index in 0..self.options.clients {
            // Each client starts from a different node, as clients spread over a cluster would.
            let mut seeds: Vec<SocketAddr> = ids.iter().map(|id| self.members[id]).collect();
            seeds.rotate_left(index % ids.len());
            let client = Client::with_config(seeds, secret.clone(), "clusterfunk", REQUEST_TIMEOUT)
                .map_err(|e| e.to_string())?;
            self.traffic.push(tokio::spawn(traffic(
                client,
                index,
                keys,
                Duration::from_millis(self.options.client_pause_ms),
                self.live.clone(),
                self.traffic_stop.clone(),
            )));
        }
        self.say(format!(
            "{} clients, each with its own connection and {} keys: put a value, get it back to check it, {}",
            self.options.clients,
            thousands(keys as u64),
            match self.options.client_pause_ms {
                0 => "back to back".to_string(),
                pause => format!("{pause} ms apart"),
            }
        ));
        Ok(())
    }

    /// Stops the traffic tasks once their request in flight returns; returns what every key
    /// they wrote holds as far as they know.
    async fn stop_traffic(&mut self) -> Result<Vec<(String, Written)>, String> {
        self.traffic_stop.store(true, Ordering::SeqCst);
        let mut written = Vec::new();
        for task in self.traffic.drain(..) {
            written.extend(
                task.await
                    .map_err(|e| format!("a traffic task failed: {e}"))?,
            );
        }
        self.traffic_stop = Arc::new(AtomicBool::new(false));
        Ok(written)
    }

    /// Chapter: SIGKILL of the leader; every shard probed until it answers again.
    async fn kill_leader(&mut self) -> Result<Done, String> {
        let limit = self.limit();
        let admins = self.admins(POLL_TIMEOUT)?;
        let before = wait_settled(&admins, None, limit).await?;
        let victim = before.leader;

        // Survivors' statuses, polled until one names a new leader.
        let new_leader: Arc<Mutex<Option<(Instant, NodeId)>>> = Arc::new(Mutex::new(None));
        let watchers: Vec<_> = admins
            .iter()
            .filter(|(&id, _)| id != victim)
            .map(|(_, admin)| {
                let admin = admin.clone();
                let new_leader = new_leader.clone();
                tokio::spawn(async move {
                    for _ in 0..10_000 {
                        if let Ok(s) = lib_status(&admin).await {
                            if let Some(leader) = s.leader.filter(|&l| l != victim) {
                                let mut found = lock(&new_leader);
                                if found.is_none() {
                                    *found = Some((Instant::now(), leader));
                                }
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        let failover = self.kill_and_probe(victim, "the leader", &before).await;
        for watcher in &watchers {
            watcher.abort();
        }
        let failover = failover?;
        if let Some((at, leader)) = *lock(&new_leader) {
            self.say(format!(
                "node {leader} named the new leader {} ms after the kill",
                (at - failover.t_kill).as_millis()
            ));
        }
        let (back, after) = self.report_failover(victim, &before, &failover).await?;
        let (moved, _) = moves(&before.owners, &after);
        self.owners_before_restart = after;
        watch(AFTER_STEP).await?;
        Ok(Done {
            shards_moved: moved,
            failover: Some(back),
            ..Done::default()
        })
    }

    /// SIGKILLs member `victim` (`role` says which node it is) of the cluster settled as
    /// `before`, then probes one key of every shard through the survivors until each answers.
    async fn kill_and_probe(
        &mut self,
        victim: NodeId,
        role: &str,
        before: &Settled,
    ) -> Result<Failover, String> {
        let limit = self.limit();
        let survivors: Vec<NodeId> = self
            .members
            .keys()
            .copied()
            .filter(|&id| id != victim)
            .collect();
        // A probe client of the survivors, holding the map from before the kill.
        let probe = self.client_of(&survivors)?;
        probe
            .refresh()
            .await
            .map_err(|e| format!("probe client: {e}"))?;
        let keys = keys_per_shard("key", SHARD_COUNT).ok_or("no key found for some shard")?;

        let pid = self.harness.node(victim).pid().unwrap_or(0);
        self.say(format!(
            "$ kill -9 {pid}        # node {victim}, {role}, owning {} shards",
            before.owners.iter().filter(|&&o| o == victim).count()
        ));
        let t_kill = self.harness.kill(victim)?;
        self.killed = Some(victim);
        let deadline = t_kill + limit;
        let probes: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(shard, key)| {
                tokio::spawn(probe_until_served(
                    probe.clone(),
                    key.clone(),
                    shard as ShardId,
                    deadline,
                ))
            })
            .collect();
        let mut answers = Vec::with_capacity(probes.len());
        let mut errors = Vec::new();
        for probe in probes {
            match probe.await.map_err(|e| e.to_string())? {
                Ok(answer) => answers.push(answer),
                Err(e) => errors.push(e),
            }
        }
        check_interrupt()?;
        if !errors.is_empty() {
            self.harness.print_log_tails(&survivors);
            return Err(format!(
                "{} of {SHARD_COUNT} shards were not served again within {limit:?} (first: {})",
                errors.len(),
                errors[0]
            ));
        }
        if let Some((_, node)) = answers.iter().find(|(_, node)| *node == victim) {
            return Err(format!(
                "a shard answered from node {node}, which was killed"
            ));
        }
        Ok(Failover {
            t_kill,
            answers,
            survivors,
        })
    }

    /// Says how long the failover after the kill of `victim` took and which shards moved;
    /// returns the time until every shard answered again and the map after it.
    async fn report_failover(
        &self,
        victim: NodeId,
        before: &Settled,
        failover: &Failover,
    ) -> Result<(Duration, Vec<NodeId>), String> {
        let t_kill = failover.t_kill;
        let back = failover
            .answers
            .iter()
            .map(|(at, _)| *at - t_kill)
            .max()
            .unwrap_or_default();
        let mut moved_back = Series::default();
        for ((at, _), owner) in failover.answers.iter().zip(&before.owners) {
            if *owner == victim {
                moved_back.values.push(support::ms(*at - t_kill));
            }
        }
        self.say(format!(
            "every one of the {SHARD_COUNT} shards answers again {} after the kill (the killed node's {} shards: median {} ms, last {} ms)",
            secs(back),
            moved_back.values.len(),
            fmt_ms(moved_back.quantile(0.5)),
            fmt_ms(moved_back.quantile(1.0)),
        ));
        // The map the probes were answered by, from a survivor.
        let survivor = self.members[&failover.survivors[0]];
        let admin = self.harness.launch.admin(survivor, POLL_TIMEOUT)?;
        let after = shard_owners(&admin, SHARD_COUNT)
            .await
            .map_err(|e| e.to_string())?;
        let (moved, detail) = moves(&before.owners, &after);
        self.say(format!("{moved} shards moved: {detail}"));
        Ok((back, after))
    }

    /// A client of the cluster seeded with the addresses of `nodes`.
    fn client_of(&self, nodes: &[NodeId]) -> Result<Client, String> {
        let seeds: Vec<SocketAddr> = nodes.iter().map(|id| self.members[id]).collect();
        Client::with_config(
            seeds,
            self.harness.launch.secret()?,
            "clusterfunk",
            REQUEST_TIMEOUT,
        )
        .map_err(|e| e.to_string())
    }

    /// Chapter: the killed node restarts from its data dir and gets its share back.
    async fn restart(&mut self) -> Result<Done, String> {
        let node = self.killed.ok_or("no node was killed")?;
        let started = Instant::now();
        self.harness.start(node, false)?;
        self.say(format!(
            "$ kv serve --id {node} --listen {} --data-dir {}        # no --init: its data dir holds the cluster",
            self.members[&node],
            self.harness.node(node).data_dir().display()
        ));
        let admins = self.admins(POLL_TIMEOUT)?;
        let settled = wait_settled(&admins, None, self.limit())
            .await
            .inspect_err(|_| self.harness.print_log_tails(&[]))?;
        let (moved, detail) = moves(&self.owners_before_restart, &settled.owners);
        let owned = settled.owners.iter().filter(|&&o| o == node).count();
        self.say(format!(
            "node {node} is a live voter again {} after its start and serves {owned} shards (per node {})",
            secs(started.elapsed()),
            shares(&settled.owners)
        ));
        self.say(format!("{moved} shards moved by handoff: {detail}"));
        watch(AFTER_STEP).await?;
        Ok(Done {
            shards_moved: moved,
            ..Done::default()
        })
    }

    /// Chapter: a fresh node starts and joins as a voter.
    async fn add(&mut self, id: NodeId) -> Result<Done, String> {
        let limit = self.limit();
        let addr = *self
            .spare
            .get(&id)
            .ok_or(format!("no address for node {id}"))?;
        let node = self.harness.slot(id, addr);
        let started = self.harness.launch.start(&node, None);
        self.harness.extra.push(node);
        started?;
        self.say(format!(
            "$ kv serve --id {id} --listen {addr} --data-dir DIR        # a fresh node, no --init: it waits to be added"
        ));
        let fresh = self.harness.launch.admin(addr, POLL_TIMEOUT)?;
        wait_for(
            &format!("node {id} to answer"),
            Duration::from_millis(20),
            limit,
            || lib_status(&fresh),
        )
        .await
        .map_err(|e| e.to_string())?;
        let admins = self.admins(POLL_TIMEOUT)?;
        let before = wait_settled(&admins, None, limit).await?;

        self.command(before.leader, &format!("add-node --id {id} --addr {addr}"));
        let admin = self
            .harness
            .launch
            .admin(self.members[&before.leader], CHANGE_TIMEOUT)?;
        let t_add = Instant::now();
        let report = match admin
            .request(AdminRequest::AddNode {
                id,
                addr: addr.to_string(),
                zone: None,
                learner: false,
            })
            .await
        {
            Ok(AdminResponse::Changed(report)) => report,
            Ok(other) => return Err(format!("unexpected answer to add-node: {other:?}")),
            Err(e) => {
                self.harness.print_log_tails(&[id, before.leader]);
                return Err(format!("add-node {id} failed: {e}"));
            }
        };
        self.show_change(&report);
        if !report.voters.contains(&id) {
            return Err(format!("add-node answered without node {id} as a voter"));
        }
        // The story shows the operator's warning for an even voter count: check it came.
        if !layout_warnings(report.voters.len()).is_empty() && report.warnings.is_empty() {
            return Err(format!(
                "{} voters and no warning about the layout",
                report.voters.len()
            ));
        }
        self.members.insert(id, addr);
        lock(&self.live.polled).insert(id, fresh);
        let admins = self.admins(POLL_TIMEOUT)?;
        let settled = wait_settled(&admins, None, limit)
            .await
            .inspect_err(|_| self.harness.print_log_tails(&[id, before.leader]))?;
        let (moved, detail) = moves(&before.owners, &settled.owners);
        self.say(format!(
            "node {id} serves {} shards {} after add-node (per node {})",
            settled.owners.iter().filter(|&&o| o == id).count(),
            secs(t_add.elapsed()),
            shares(&settled.owners)
        ));
        self.say(format!("{moved} shards moved by handoff: {detail}"));
        watch(AFTER_STEP).await?;
        Ok(Done {
            shards_moved: moved,
            ..Done::default()
        })
    }

    /// Prints a membership change as the `clusterfunk` tool does: warnings, the message, the
    /// voters.
    fn show_change(&self, report: &ChangeReport) {
        for warning in &report.warnings {
            self.say(format!("warning: {warning}"));
        }
        self.say(&report.message);
        let join = |ids: &[NodeId]| {
            if ids.is_empty() {
                "-".to_string()
            } else {
                ids.iter()
                    .map(NodeId::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        self.say(format!(
            "voters: {}; learners: {}; tolerates {} failure(s); leader: {}",
            join(&report.voters),
            join(&report.learners),
            report.failures_tolerated,
            report.leader.map_or("-".to_string(), |l| l.to_string())
        ));
    }

    /// Chapter: a follower hands all its shards over, with the traffic on.
    async fn drain(&mut self) -> Result<Done, String> {
        let limit = self.limit();
        let admins = self.admins(POLL_TIMEOUT)?;
        let before = wait_settled(&admins, None, limit).await?;
        // A follower among the first nodes, so the story ends with the newcomers serving.
        let node = self
            .members
            .keys()
            .copied()
            .find(|&id| id != before.leader)
            .ok_or("no follower to drain")?;
        self.command(before.leader, &format!("drain --id {node}"));
        let admin = self
            .harness
            .launch
            .admin(self.members[&before.leader], CHANGE_TIMEOUT)?;
        let t_drain = Instant::now();
        match admin.request(AdminRequest::Drain { id: node }).await {
            Ok(AdminResponse::Changed(report)) => self.say(&report.message),
            Ok(other) => return Err(format!("unexpected answer to drain: {other:?}")),
            Err(e) => {
                self.harness.print_log_tails(&[]);
                return Err(format!("drain of node {node} failed: {e}"));
            }
        }
        let answered = t_drain.elapsed();
        let settled = wait_settled(&admins, Some(node), limit)
            .await
            .inspect_err(|_| self.harness.print_log_tails(&[]))?;
        let (moved, detail) = moves(&before.owners, &settled.owners);
        self.say(format!(
            "drain answered after {}; node {node} owns no shard, per node {}",
            secs(answered),
            shares(&settled.owners)
        ));
        self.say(format!("{moved} shards moved by handoff: {detail}"));
        watch(AFTER_STEP).await?;
        Ok(Done {
            shards_moved: moved,
            ..Done::default()
        })
    }

    /// Chapter: a fresh cluster keeps its values in PostgreSQL; `kill -9` of a follower under
    /// load; every acknowledged value read back at the end. Skipped, with the reason, when no
    /// PostgreSQL can be started.
    async fn durable(&mut self) -> Result<Done, String> {
        let limit = self.limit();
        // PostgreSQL first: when it cannot start, the chapter is skipped and the first cluster
        // is left as it is.
        let t_postgres = Instant::now();
        let server = match tokio::task::spawn_blocking(PostgresServer::start).await {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => {
                return Ok(Done {
                    skipped: Some(no_postgres(&e)),
                    ..Done::default()
                })
            }
            Err(e) => return Err(format!("starting PostgreSQL failed: {e}")),
        };
        let url = server.url();
        *self.postgres = Some(server);
        self.say(format!(
            "a throwaway PostgreSQL (initdb, pg_ctl start, createdb in a temporary directory) serves {url}, up {} after its start",
            secs(t_postgres.elapsed())
        ));
        check_interrupt()?;

        // The first cluster has told its story: its traffic and nodes stop, so that the durable
        // cluster has the machine to itself.
        self.stop_traffic().await?;
        lock(&self.live.polled).clear();
        let mut launch = Launch::new(
            PROGRAM,
            self.harness.launch.bins.clone(),
            &self.options.node,
        )?;
        launch.store = Some(url.clone());
        let fresh = Harness::new(launch, INITIAL_NODES as usize, self.options.node.keep_dir)?;
        drop(std::mem::replace(&mut *self.harness, fresh));
        self.members = self
            .harness
            .nodes
            .iter()
            .map(|node| (node.id(), node.addr()))
            .collect();
        self.spare.clear();
        self.killed = None;
        self.say(format!(
            "the first cluster's traffic and nodes are stopped; the new cluster's data dirs and logs are in {}",
            self.harness.path().display()
        ));
        self.start_cluster(&format!(" --store {url}")).await?;
        self.start_traffic(DURABLE_KEYS_PER_CLIENT)?;
        watch(DURABLE_LOAD).await?;

        let admins = self.admins(POLL_TIMEOUT)?;
        let before = wait_settled(&admins, None, limit).await?;
        let victim = self
            .members
            .keys()
            .copied()
            .find(|&id| id != before.leader)
            .ok_or("no follower to kill")?;
        let failover = self.kill_and_probe(victim, "a follower", &before).await?;
        let (back, after) = self.report_failover(victim, &before, &failover).await?;
        let (moved, _) = moves(&before.owners, &after);
        watch(DURABLE_LOAD).await?;

        // Every key the traffic wrote, read back once the traffic has stopped.
        let checked = self.stop_traffic().await?;
        let t_kill_us = self.live.micros(failover.t_kill);
        let from_killed_node = checked
            .iter()
            .filter(|(key, w)| {
                w.acknowledged.is_some()
                    && w.acknowledged_us < t_kill_us
                    && before.owners[shard_for(key.as_bytes(), SHARD_COUNT) as usize] == victim
            })
            .count();
        let reader = self.client_of(&failover.survivors)?;
        let t_read = Instant::now();
        let reads: Vec<(String, Written, Result<Option<String>, String>)> = stream::iter(checked)
            .map(|(key, w)| {
                let reader = reader.clone();
                let live = self.live.clone();
                async move {
                    let start = Instant::now();
                    let found = read_back(&reader, &key).await;
                    match &found {
                        Ok(value) if w.admits(value.as_deref()) => {
                            live.record(start, Outcome::Ok, None)
                        }
                        Ok(_) => live.record(start, Outcome::Lost, None),
                        Err(e) => live.record(start, Outcome::Failed, Some(e.clone())),
                    }
                    (key, w, found)
                }
            })
            .buffer_unordered(READS_IN_FLIGHT)
            .collect()
            .await;
        let mut lost = Vec::new();
        let mut unreadable = Vec::new();
        for (key, w, found) in &reads {
            match found {
                Ok(value) if w.admits(value.as_deref()) => {}
                Ok(value) => lost.push(format!("{key} holds {value:?}, expected {}", w.expected())),
                Err(e) => unreadable.push(format!("{key}: {e}")),
            }
        }
        self.say(format!(
            "read back {} keys through nodes {} in {}; {} of them were last acknowledged before the kill on node {victim}'s shards, so their values had to come back from PostgreSQL",
            thousands(reads.len() as u64),
            failover
                .survivors
                .iter()
                .map(NodeId::to_string)
                .collect::<Vec<_>>()
                .join(" and "),
            secs(t_read.elapsed()),
            thousands(from_killed_node as u64)
        ));
        if lost.is_empty() && unreadable.is_empty() {
            self.say("every key holds its last acknowledged value (or the value of a put that failed after it): 0 lost");
        }
        if !lost.is_empty() {
            self.say(format!(
                "{} key(s) lost their acknowledged value:",
                thousands(lost.len() as u64)
            ));
            for line in lost.iter().take(5) {
                self.say(format!("  {line}"));
            }
        }
        if from_killed_node == 0 {
            return Err(format!(
                "no value was acknowledged on node {victim}'s shards before the kill and left alone after it: the read-back proves nothing"
            ));
        }
        if !unreadable.is_empty() {
            self.harness.print_log_tails(&failover.survivors);
            return Err(format!(
                "{} of {} keys could not be read back (first: {})",
                unreadable.len(),
                reads.len(),
                unreadable[0]
            ));
        }
        Ok(Done {
            shards_moved: moved,
            durable: Some(DurableReport {
                killed: victim,
                failover: back,
                read_back: reads.len(),
                from_killed_node,
                lost: lost.len(),
            }),
            ..Done::default()
        })
    }
}

/// The reason the durable chapter is skipped, in one line that says how to get PostgreSQL.
fn no_postgres(error: &TestingError) -> String {
    let why = match error {
        TestingError::PostgresMissing => {
            return "PostgreSQL is not installed (no initdb, pg_ctl and createdb in PATH or /usr/lib/postgresql/*/bin); `apt-get install postgresql` installs it".into();
        }
        // The command line is long and says little: the tool's exit and its first error line
        // (or its last line) say why.
        TestingError::ToolFailed { detail, .. } => {
            let lines: Vec<&str> = detail
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect();
            let cause = lines
                .iter()
                .skip(1)
                .find(|line| {
                    let line = line.to_lowercase();
                    line.contains("error") || line.contains("fatal")
                })
                .or(lines.last())
                .copied()
                .unwrap_or_default();
            match lines.first() {
                Some(&exit) if exit != cause => format!("{exit} {cause}"),
                _ => cause.to_string(),
            }
        }
        other => other.to_string(),
    };
    let why: String = why
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(240)
        .collect();
    format!("PostgreSQL did not start: {why} (`apt-get install postgresql` installs it)")
}

/// Reads `key` for the durable chapter's check, trying again after an error (every shard
/// serves again, so none is expected).
async fn read_back(client: &Client, key: &str) -> Result<Option<String>, String> {
    let mut last = String::new();
    for _ in 0..READ_ATTEMPTS {
        match client.send(key, Get).await {
            Ok(value) => return Ok(value),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

// ---------------------------------------------------------------------------------------------
// Summary

/// Prints the table of chapters and the totals; returns the failed chapter's message, if any.
fn summary(told: &[Told], live: &Live, log: &Log, total: Duration) -> Option<String> {
    println!();
    println!("Summary");
    println!(
        "  {:<20} {:>6} {:>9} {:>6} {:>4} {:>6} {:>6} {:>7} {:>6}  result",
        "chapter", "time s", "requests", "failed", "lost", "p50 ms", "p99 ms", "max ms", "moved"
    );
    let row = |name: &str, time: Duration, w: &Window, moved: usize, result: &str| {
        println!(
            "  {:<20} {:>6.1} {:>9} {:>6} {:>4} {:>6} {:>6} {:>7} {:>6}  {result}",
            name,
            time.as_secs_f64(),
            thousands(w.requests),
            w.failed,
            w.lost,
            fmt_ms(w.latency_ms.quantile(0.5)),
            fmt_ms(w.latency_ms.quantile(0.99)),
            fmt_ms(w.latency_ms.quantile(1.0)),
            thousands(moved as u64)
        );
    };
    let mut moved_total = 0;
    let mut failover = None;
    let mut durable = None;
    let mut skipped = Vec::new();
    for (number, chapter) in told.iter().enumerate() {
        let name = format!("{} {}", number + 1, chapter.step.name());
        if let Some(why) = chapter.done.as_ref().and_then(|d| d.skipped.as_ref()) {
            println!(
                "  {name:<20} {:>6} {:>9} {:>6} {:>4} {:>6} {:>6} {:>7} {:>6}  skipped",
                "-", "-", "-", "-", "-", "-", "-", "-"
            );
            skipped.push((name, why.clone()));
            continue;
        }
        let w = window(
            log,
            live.micros(chapter.started),
            live.micros(chapter.ended),
        );
        let done = chapter.done.as_ref();
        let moved = done.map_or(0, |d| d.shards_moved);
        moved_total += moved;
        failover = failover.or(done.and_then(|d| d.failover));
        durable = durable.or(done.and_then(|d| d.durable.as_ref()));
        row(
            &name,
            chapter.ended - chapter.started,
            &w,
            moved,
            if chapter.error.is_some() {
                "FAILED"
            } else {
                "ok"
            },
        );
    }
    // Every request, those that ended while the traffic stopped too.
    let whole = window(log, 0, u32::MAX);
    row("whole story", total, &whole, moved_total, "");
    println!();
    println!(
        "  requests sent   {} (a put and a get each time; {} req/s on average)",
        thousands(whole.requests),
        thousands((whole.requests as f64 / total.as_secs_f64().max(0.001)) as u64)
    );
    println!(
        "  failed          {}{}",
        whole.failed,
        if whole.lost > 0 {
            format!(
                "; {} read(s) missed the value just written (lost with the killed node)",
                whole.lost
            )
        } else {
            String::new()
        }
    );
    println!(
        "  latency         p50 {} ms, p99 {} ms, max {} ms",
        fmt_ms(whole.latency_ms.quantile(0.5)),
        fmt_ms(whole.latency_ms.quantile(0.99)),
        fmt_ms(whole.latency_ms.quantile(1.0))
    );
    println!(
        "  failover time   {}",
        failover.map_or("- (not measured)".to_string(), |f| format!(
            "{} from kill -9 of the leader until every shard answered again",
            secs(f)
        ))
    );
    println!("  shards moved    {}", thousands(moved_total as u64));
    if let Some(d) = durable {
        println!(
            "  durable store   {} keys read back after kill -9 of node {} under load, {} lost ({} of them acknowledged on its shards before the kill); every shard answered again {} after the kill",
            thousands(d.read_back as u64),
            d.killed,
            thousands(d.lost as u64),
            thousands(d.from_killed_node as u64),
            secs(d.failover)
        );
    }
    for (name, why) in &skipped {
        println!("  skipped         {name}: {why}");
    }
    let failed = told.iter().enumerate().find_map(|(number, chapter)| {
        chapter.error.as_ref().map(|e| {
            format!(
                "chapter {} ({}) failed: {e}",
                number + 1,
                chapter.step.name()
            )
        })
    });
    match &failed {
        None if told.len() == Step::ALL.len() && skipped.is_empty() => println!(
            "  result          all {} chapters passed in {:.1} s",
            told.len(),
            total.as_secs_f64()
        ),
        None if told.len() == Step::ALL.len() => println!(
            "  result          {} chapters passed and {} skipped in {:.1} s",
            told.len() - skipped.len(),
            skipped.len(),
            total.as_secs_f64()
        ),
        None => println!("  result          stopped after {} chapter(s)", told.len()),
        Some(e) => println!("  result          FAILED: {e}"),
    }
    failed
}

// ---------------------------------------------------------------------------------------------
// Running

fn run(options: Options) -> Result<(), String> {
    watch_interrupt(PROGRAM);
    if options.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let bins = build_kv(&options)?;
    check_interrupt()?;
    let launch = Launch::new(PROGRAM, bins, &options.node)?;
    let count = INITIAL_NODES as usize + JOINING.len();
    // Declared before the harness, so that PostgreSQL stops after the nodes that use it on
    // every way out.
    let mut postgres: Option<PostgresServer> = None;
    let mut harness = Harness::new(launch, INITIAL_NODES as usize, options.node.keep_dir)?;
    let first: Vec<SocketAddr> = harness.nodes.iter().map(|node| node.addr()).collect();
    let later = harness.reserve_addrs(count - first.len())?;
    let out = Out::new(options.plain);
    out.line(format!(
        "clusterfunk demo: a kv cluster on this machine, data dirs and node logs in {}",
        harness.path().display()
    ));
    out.line(
        "lines with $ show the operator's command for a step; the demo sends the same requests through clusterfunk::client and clusterfunk::admin",
    );
    if out.plain() {
        out.line("(stdout is not a terminal: the status line is printed every few seconds instead of refreshing)");
    }
    let live = Arc::new(Live {
        base: Instant::now(),
        log: Mutex::new(Log::default()),
        sent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        polled: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
    });
    let members: BTreeMap<NodeId, SocketAddr> = (1..).zip(first.iter().copied()).collect();
    let spare: BTreeMap<NodeId, SocketAddr> =
        JOINING.into_iter().zip(later.iter().copied()).collect();
    let started = Instant::now();
    let told = runtime()?.block_on(async {
        let status = tokio::spawn(show_status(live.clone(), out.clone()));
        let mut story = Story {
            options: &options,
            harness: &mut harness,
            postgres: &mut postgres,
            out: out.clone(),
            live: live.clone(),
            members,
            spare,
            killed: None,
            owners_before_restart: Vec::new(),
            traffic: Vec::new(),
            traffic_stop: Arc::new(AtomicBool::new(false)),
        };
        let told = story.tell().await;
        live.stop.store(true, Ordering::SeqCst);
        for task in story.traffic.drain(..) {
            let _ = task.await;
        }
        let _ = status.await;
        told
    });
    let total = started.elapsed();
    out.finish();
    let log = std::mem::take(&mut *lock(&live.log));
    let failed = summary(&told, &live, &log, total);
    drop(harness);
    drop(postgres);
    check_interrupt()?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    exit_code(PROGRAM, run(Options::parse()))
}
