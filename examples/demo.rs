//! `demo`: clusterfunk in one command. A three-node cluster of the `kv` example on this machine
//! serves traffic while its leader is killed, restarts, grows to five nodes and drains one.
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
//!
//! Then a summary table: requests sent and failed, p50/p99 latency, failover time, shards moved,
//! per chapter and in total. A chapter fails when its step does not finish within
//! `--deadline-secs`, when a request fails outside the leader kill (planned moves fail none),
//! or when a read misses the value its client just wrote, outside the leader kill (`kv` keeps
//! values in memory, so only a crash loses them). The story stops at the first failed chapter
//! and the program exits with 1, naming it.
//!
//! The demo drives the cluster through the library ([`Client`], [`AdminClient`]); the lines that
//! start with `$` show the `clusterfunk` command an operator would type for the same request.
//! Before it starts, it runs `cargo build --example kv` in the profile it was built with (a no-op
//! when `kv` is up to date; `--no-build` skips it), since `cargo run --example demo` builds only
//! the demo. The status line refreshes only when stdout is a terminal; otherwise (or with
//! `--plain`) a plain status line is printed every few seconds. Every child process and the
//! temporary directory are removed on every way out of the program: success, failure, panic,
//! Ctrl-C, SIGTERM (a `kill -9` of the demo itself leaves its nodes running).

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
use clusterfunk::testing::{
    self, build_kv_example, keys_per_shard, shard_owners, wait_for, Binaries, Settled,
};
use clusterfunk::{NodeId, ShardId};
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

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    about = "A local kv cluster under traffic: leader killed, restarted, two nodes added, one drained"
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

/// One traffic task: writes each of its keys and reads it back, round after round.
async fn traffic(client: Client, index: usize, pause: Duration, live: Arc<Live>) {
    let keys: Vec<String> = (0..KEYS_PER_CLIENT)
        .map(|k| format!("client{index}-key{k}"))
        .collect();
    let mut round = 0u64;
    while !live.stopped() {
        for key in &keys {
            if live.stopped() {
                return;
            }
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
            let written = put.is_ok();
            match put {
                Ok(()) => live.record(start, Outcome::Ok, None),
                Err(e) => live.record(start, Outcome::Failed, Some(e.to_string())),
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if !written {
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
}

impl Step {
    const ALL: [Step; 7] = [
        Step::Start,
        Step::Traffic,
        Step::KillLeader,
        Step::Restart,
        Step::Add(JOINING[0]),
        Step::Add(JOINING[1]),
        Step::Drain,
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
    /// The node processes.
    harness: &'a mut Harness,
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
    /// The traffic tasks.
    traffic: Vec<tokio::task::JoinHandle<()>>,
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
            };
            let ended = Instant::now();
            let mut chapter = Told {
                step,
                started,
                ended,
                done: None,
                error: None,
            };
            match result {
                Ok(done) => {
                    chapter.done = Some(done);
                    chapter.error = self.check_traffic(step, started, ended);
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
            match &chapter.error {
                None => self.say("✓ done"),
                Some(e) => self.say(format!("✗ FAILED: {e}")),
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
    /// fails the chapter.
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
        if w.failed > 0 || w.lost > 0 {
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
        let started = Instant::now();
        self.harness.start_all()?;
        let addrs: Vec<String> = self
            .members
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        self.say(format!(
            "$ kv serve --id N --listen IP:PORT --data-dir DIR --init {}",
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
        Ok(Done::default())
    }

    /// Chapter: the traffic starts, and keeps going until the end.
    async fn run_traffic(&mut self) -> Result<Done, String> {
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
                Duration::from_millis(self.options.client_pause_ms),
                self.live.clone(),
            )));
        }
        self.say(format!(
            "{} clients, each with its own connection and {KEYS_PER_CLIENT} keys: put a value, get it back to check it, {}",
            self.options.clients,
            match self.options.client_pause_ms {
                0 => "back to back".to_string(),
                pause => format!("{pause} ms apart"),
            }
        ));
        watch(TRAFFIC_TIME).await?;
        Ok(Done::default())
    }

    /// Chapter: SIGKILL of the leader; every shard probed until it answers again.
    async fn kill_leader(&mut self) -> Result<Done, String> {
        let limit = self.limit();
        let admins = self.admins(POLL_TIMEOUT)?;
        let before = wait_settled(&admins, None, limit).await?;
        let victim = before.leader;
        let survivors: Vec<NodeId> = self
            .members
            .keys()
            .copied()
            .filter(|&id| id != victim)
            .collect();
        // A probe client of the survivors, holding the map from before the kill.
        let seeds: Vec<SocketAddr> = survivors.iter().map(|id| self.members[id]).collect();
        let probe = Client::with_config(
            seeds,
            self.harness.launch.secret()?,
            "clusterfunk",
            REQUEST_TIMEOUT,
        )
        .map_err(|e| e.to_string())?;
        probe
            .refresh()
            .await
            .map_err(|e| format!("probe client: {e}"))?;
        let keys = keys_per_shard("key", SHARD_COUNT).ok_or("no key found for some shard")?;

        // Survivors' statuses, polled until one names a new leader.
        let new_leader: Arc<Mutex<Option<(Instant, NodeId)>>> = Arc::new(Mutex::new(None));
        let watchers: Vec<_> = survivors
            .iter()
            .map(|id| {
                let admin = admins[id].clone();
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

        let pid = self.harness.node(victim).pid().unwrap_or(0);
        self.say(format!(
            "$ kill -9 {pid}        # node {victim}, the leader, owning {} shards",
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
        for watcher in &watchers {
            watcher.abort();
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
        let back = answers
            .iter()
            .map(|(at, _)| *at - t_kill)
            .max()
            .unwrap_or_default();
        if let Some((at, leader)) = *lock(&new_leader) {
            self.say(format!(
                "node {leader} named the new leader {} ms after the kill",
                (at - t_kill).as_millis()
            ));
        }
        let mut moved_back = Series::default();
        for ((at, _), owner) in answers.iter().zip(&before.owners) {
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
        let after = shard_owners(&admins[&survivors[0]], SHARD_COUNT)
            .await
            .map_err(|e| e.to_string())?;
        let (moved, detail) = moves(&before.owners, &after);
        self.say(format!("{moved} shards moved: {detail}"));
        self.owners_before_restart = after;
        watch(AFTER_STEP).await?;
        Ok(Done {
            shards_moved: moved,
            failover: Some(back),
        })
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
            failover: None,
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
            failover: None,
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
            failover: None,
        })
    }
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
    for (number, chapter) in told.iter().enumerate() {
        let w = window(
            log,
            live.micros(chapter.started),
            live.micros(chapter.ended),
        );
        let done = chapter.done.as_ref();
        let moved = done.map_or(0, |d| d.shards_moved);
        moved_total += moved;
        failover = failover.or(done.and_then(|d| d.failover));
        row(
            &format!("{} {}", number + 1, chapter.step.name()),
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
        None if told.len() == Step::ALL.len() => println!(
            "  result          all {} chapters passed in {:.1} s",
            told.len(),
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
            out: out.clone(),
            live: live.clone(),
            members,
            spare,
            killed: None,
            owners_before_restart: Vec::new(),
            traffic: Vec::new(),
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
    check_interrupt()?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    exit_code(PROGRAM, run(Options::parse()))
}
