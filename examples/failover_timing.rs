//! `failover_timing`: how long a dead node's shards stay unavailable, how many requests fail
//! meanwhile, and what a planned move (a drain) costs, on a local `kv` cluster under load.
//!
//! ```text
//! cargo build --release --examples --bins      # once: builds `kv`
//! cargo run --release --example failover_timing -- [--kills 20] [--json FILE]
//! ```
//!
//! It starts 3 `kv serve` processes on 127.0.0.1 (a temporary directory, `RUST_LOG=warn`, one
//! log file per node) sharing a fresh `CLUSTERFUNK_SECRET`, and drives them through the library:
//! [`Client`] with copies of `kv`'s `Put` and `Get` messages (same wire tags) and [`AdminClient`].
//!
//! - **Load**, all along: `--clients` tasks, each with its own [`Client`], write a key and read
//!   it back, over and over, each task covering its own quarter of the shards (one key per
//!   shard, so the load touches every shard). Every request is recorded: start, latency,
//!   outcome. A read that returns something else than the write before it stored counts as
//!   *lost*, not failed: the owner may have died in between (values live in memory).
//! - **Follower kills**, `--kills` times: SIGKILL a follower (the two take turns), then probe
//!   one key of each of its shards through a client seeded with the survivors, every
//!   `--probe-ms` until it answers. A shard's *unavailability* is the time from the kill to its
//!   first successful answer (the probe's reply time, so it includes one round trip; a probe
//!   that fails is retried after `--probe-ms`, so a sample can be late by that much). Status
//!   polls of the survivors meanwhile give *kill → marked down* (and, for leader kills, *kill →
//!   new leader*), and `--survivor-probes` shards of each survivor, probed continuously from
//!   before the kill, give the longest pause of shards that did not move (a leader election can
//!   let the survivors' leases lapse). Then the node restarts from its data dir, and the next
//!   kill waits until it owns its share again and nothing moves.
//! - **Leader kills**, `--kills` times: the same for the leader.
//! - **Drain**: with the load on, probe every shard of a follower every `--probe-ms` for a
//!   second, drain the node (`Drain` answers once it owns no shard), keep probing until nothing
//!   moves and a second more, and record for each moving shard the longest gap between
//!   consecutive successful answers (the *pause*), next to the longest gap before the drain (the
//!   probing's own granularity); then undrain it and wait until it owns its share again.
//! - Prints a table and, with `--json FILE`, writes every figure (`--requests-csv FILE` also
//!   writes every load request).
//!
//! The `kv` binary is taken from next to this program (`target/release/examples/kv`); `cargo
//! run --example` does not rebuild it. Every child process and the temporary directory are
//! removed on exit, on error and on Ctrl-C.

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clap::Parser;
use clusterfunk::admin::{AdminClient, AdminRequest, AdminResponse};
use clusterfunk::client::Client;
use clusterfunk::testing::{self, keys_per_shard, Binaries, Settled};
use clusterfunk::{ConsensusConfig, LeaseConfig, NodeId};
use serde_json::{json, Value};
use support::{
    check_interrupt, exit_code, fmt_ms, lib_status, load_average, ms, probe_until_ok, round3,
    runtime, stopped_early, utc_now, watch_interrupt, write_json, Harness, Launch, NodeOptions,
    Series, SummaryTable, POLL_TIMEOUT,
};

use support::kv_api::{Get, Put};

/// This program's name, in its messages and the node logs.
const PROGRAM: &str = "failover_timing";
/// The cluster's size.
const NODES: u64 = 3;
/// The shard count `kv serve` bootstraps with.
const SHARD_COUNT: u32 = 1024;
/// How long a load or probe request may take (the `kv` tool's own timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Drain` may take (the node's own drain timeout is below this).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the drain's probes run before the drain and after it settled.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);
/// How long the survivors' shards are probed before a kill.
const SURVIVOR_LEAD: Duration = Duration::from_millis(300);

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    about = "Times shard failover after kill -9 and planned moves of a local kv cluster under load"
)]
struct Options {
    /// Follower kills to time; as many leader kills follow.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every load request (start, latency, outcome) to this CSV file.
    #[arg(long)]
    requests_csv: Option<PathBuf>,
    /// Load tasks.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Pause of each load task between two requests, in ms (0: back to back).
    #[arg(long, default_value_t = 1)]
    client_pause_ms: u64,
    /// Probe interval per shard, in ms.
    #[arg(long, default_value_t = 5)]
    probe_ms: u64,
    /// Shards of each surviving node probed continuously around each kill (0: none), for the
    /// pause the failover causes to shards that did not move.
    #[arg(long, default_value_t = 32)]
    survivor_probes: usize,
    /// Skip the drain measurement.
    #[arg(long)]
    no_drain: bool,
    /// Seconds a failover, or a wait for the cluster, may take before it counts as failed.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
    /// The node processes.
    #[command(flatten)]
    node: NodeOptions,
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A shard client seeded with nodes `ids`.
fn shard_client(harness: &Harness, ids: &[NodeId]) -> Result<Client, String> {
    let seeds: Vec<SocketAddr> = ids.iter().map(|&id| harness.node(id).addr()).collect();
    let secret = harness.launch.secret()?;
    Client::with_config(seeds, secret, "clusterfunk", REQUEST_TIMEOUT).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Waiting for the cluster

/// Waits until the cluster is at rest ([`testing::wait_settled`] over every node).
async fn wait_settled(
    harness: &Harness,
    draining: Option<NodeId>,
    limit: Duration,
) -> Result<Settled, String> {
    let clients = harness.admin_clients(POLL_TIMEOUT)?;
    testing::wait_settled(&clients, SHARD_COUNT, draining, false, limit)
        .await
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Load

/// What a load request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

/// How a load request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// A read after a successful write returned something else (the owner died in between).
    Lost,
    Failed(String),
}

/// One load request.
#[derive(Debug, Clone)]
struct Record {
    client: usize,
    op: Op,
    shard: u32,
    start: Instant,
    latency: Duration,
    outcome: Outcome,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One load task: writes and reads back the keys of shards `index`, `index + clients`, ...
async fn load(
    client: Client,
    index: usize,
    clients: usize,
    keys: Arc<Vec<String>>,
    pause: Duration,
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
) {
    let shards: Vec<u32> = (0..SHARD_COUNT)
        .filter(|s| *s as usize % clients == index)
        .collect();
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        for &shard in &shards {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let key = keys[shard as usize].as_str();
            let value = format!("{index}-{round}");
            let start = Instant::now();
            let put = client
                .send(
                    key,
                    Put {
                        value: value.clone(),
                    },
                )
                .await;
            let mut record = Record {
                client: index,
                op: Op::Put,
                shard,
                start,
                latency: start.elapsed(),
                outcome: match &put {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Failed(e.to_string()),
                },
            };
            lock(&records).push(record.clone());
            if put.is_ok() {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let start = Instant::now();
                let got = client.send(key, Get).await;
                record.op = Op::Get;
                record.start = start;
                record.latency = start.elapsed();
                record.outcome = match got {
                    Ok(Some(v)) if v == value => Outcome::Ok,
                    Ok(_) => Outcome::Lost,
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                lock(&records).push(record);
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        round += 1;
    }
}

/// The load's requests that started in `[from, to)`.
struct Window {
    requests: usize,
    failed: usize,
    lost: usize,
    /// The longest latency of a request in the window, in ms.
    worst_latency_ms: f64,
    /// Failure messages, counted.
    errors: BTreeMap<String, usize>,
}

fn window(records: &[Record], from: Instant, to: Instant) -> Window {
    let mut w = Window {
        requests: 0,
        failed: 0,
        lost: 0,
        worst_latency_ms: 0.0,
        errors: BTreeMap::new(),
    };
    for r in records.iter().filter(|r| r.start >= from && r.start < to) {
        w.requests += 1;
        w.worst_latency_ms = w.worst_latency_ms.max(ms(r.latency));
        match &r.outcome {
            Outcome::Ok => {}
            Outcome::Lost => w.lost += 1,
            Outcome::Failed(e) => {
                w.failed += 1;
                *w.errors.entry(error_kind(e)).or_default() += 1;
            }
        }
    }
    w
}

/// A failure message without addresses and numbers that differ from one request to the next.
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
    kind.chars().take(160).collect()
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Which node a kill took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Follower,
    Leader,
}

/// One timed kill.
#[derive(Debug, Clone)]
struct Kill {
    number: usize,
    role: Role,
    node: NodeId,
    /// The raft term before the kill.
    term: u64,
    killed_at_utc: String,
    /// Each of the node's shards: kill → first successful answer, ms (`None`: not in time).
    unavailable_ms: Vec<Option<f64>>,
    /// Failed probe attempts (each retried after the probe interval).
    probe_errors: usize,
    /// Survivors' shards probed continuously.
    survivor_shards: usize,
    /// The longest gap between successful answers of a probed survivor shard, overlapping
    /// the time from the kill until the dead node's shards were back.
    survivor_pause_ms: Option<f64>,
    /// Failed probes of survivors' shards.
    survivor_probe_errors: usize,
    /// The last probe failure seen.
    probe_error: Option<String>,
    /// Kill → a survivor reports the node down.
    marked_down_ms: Option<f64>,
    /// Kill → a survivor names another leader (leader kills).
    new_leader_ms: Option<f64>,
    t_kill: Instant,
    /// When the last probed shard answered (or the probes gave up).
    t_back: Instant,
    t_restart: Instant,
    t_settled: Instant,
    /// Restart → it owns its share again and nothing moves.
    rejoin_ms: Option<f64>,
    error: Option<String>,
}

impl Kill {
    fn series(&self) -> Series {
        let mut series = Series::default();
        for v in &self.unavailable_ms {
            series.push_option(*v);
        }
        series
    }
}

/// The drain measurement.
#[derive(Debug, Clone)]
struct Drain {
    node: NodeId,
    shards: usize,
    /// Each moving shard's longest gap between successful answers that overlaps the drain.
    pause_ms: Series,
    /// Each moving shard's longest gap before the drain (the probing's granularity).
    baseline_gap_ms: Series,
    probe_errors: usize,
    probe_error: Option<String>,
    /// `Drain` sent → answered.
    drain_ms: f64,
    /// `Drain` sent → the cluster settled with the node drained.
    settle_ms: f64,
    /// `Undrain` sent → the node owns its share again and nothing moves.
    undrain_settle_ms: Option<f64>,
    t_start: Instant,
    t_settled: Instant,
    t_undrain: Instant,
    t_undrained: Instant,
}

/// Probes one key with `kv`'s `Get` until it answers ([`probe_until_ok`]).
async fn probe_until_served(
    client: Client,
    key: String,
    t_kill: Instant,
    every: Duration,
    deadline: Instant,
) -> (Option<f64>, usize, Option<String>) {
    let probe = || {
        let (client, key) = (client.clone(), key.clone());
        async move {
            client
                .send(key, Get)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    probe_until_ok(probe, t_kill, every, deadline).await
}

/// Polls `node`'s status every `every`, noting the first time it reports `victim` down and the
/// first time it names a leader other than `victim`.
async fn watch_status(
    client: AdminClient,
    victim: NodeId,
    every: Duration,
    marks: Arc<Mutex<(Option<Instant>, Option<Instant>)>>,
) {
    loop {
        if let Ok(s) = lib_status(&client).await {
            let now = Instant::now();
            let mut marks = lock(&marks);
            if marks.0.is_none() && s.down.contains(&victim) {
                marks.0 = Some(now);
            }
            if marks.1.is_none() && s.leader.is_some_and(|l| l != victim) {
                marks.1 = Some(now);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Kills one node (the leader, or a follower), times its shards' return, restarts it and
/// waits until it owns its share again.
async fn time_kill(
    harness: &mut Harness,
    options: &Options,
    keys: &Arc<Vec<String>>,
    number: usize,
    role: Role,
) -> Result<Kill, String> {
    let limit = Duration::from_secs(options.deadline_secs);
    let every = Duration::from_millis(options.probe_ms.max(1));
    let settled = wait_settled(harness, None, limit).await?;
    let node = match role {
        Role::Leader => settled.leader,
        Role::Follower => {
            let followers: Vec<NodeId> = harness
                .ids()
                .into_iter()
                .filter(|&id| id != settled.leader)
                .collect();
            followers[number % followers.len()]
        }
    };
    let survivors: Vec<NodeId> = harness.ids().into_iter().filter(|&id| id != node).collect();
    let shards: Vec<u32> = (0..SHARD_COUNT)
        .filter(|&s| settled.owners[s as usize] == node)
        .collect();

    // A probe client in steady state: connected to the survivors, holding the current map.
    let probe = shard_client(harness, &survivors)?;
    for &id in &survivors {
        let shard = settled
            .owners
            .iter()
            .position(|&owner| owner == id)
            .ok_or(format!("node {id} owns no shard"))?;
        probe
            .send(keys[shard].as_str(), Get)
            .await
            .map_err(|e| format!("warming up the probe client: {e}"))?;
    }
    // Shards that do not move, probed from before the kill: does the failover pause them too?
    let survivor_stop = Arc::new(AtomicBool::new(false));
    let survivor_probes: Vec<_> = survivors
        .iter()
        .flat_map(|&id| {
            let owned: Vec<u32> = (0..SHARD_COUNT)
                .filter(|&s| settled.owners[s as usize] == id)
                .collect();
            let step = (owned.len() / options.survivor_probes.max(1)).max(1);
            owned
                .into_iter()
                .step_by(step)
                .take(options.survivor_probes)
                .collect::<Vec<_>>()
        })
        .map(|s| {
            tokio::spawn(probe_continuously(
                probe.clone(),
                keys[s as usize].clone(),
                every,
                survivor_stop.clone(),
            ))
        })
        .collect();
    if !survivor_probes.is_empty() {
        tokio::time::sleep(SURVIVOR_LEAD).await;
    }
    let marks = Arc::new(Mutex::new((None, None)));
    let watchers: Vec<_> = survivors
        .iter()
        .map(|&id| {
            Ok(tokio::spawn(watch_status(
                harness.admin(id, POLL_TIMEOUT)?,
                node,
                every,
                marks.clone(),
            )))
        })
        .collect::<Result<_, String>>()?;

    let t_kill = harness.kill(node)?;
    let killed_at_utc = utc_now();
    let deadline = t_kill + limit;
    let probes: Vec<_> = shards
        .iter()
        .map(|&s| {
            tokio::spawn(probe_until_served(
                probe.clone(),
                keys[s as usize].clone(),
                t_kill,
                every,
                deadline,
            ))
        })
        .collect();
    let mut unavailable_ms = Vec::with_capacity(probes.len());
    let (mut probe_errors, mut probe_error) = (0, None);
    for probe in probes {
        let (back, errors, last) = probe.await.map_err(|e| e.to_string())?;
        unavailable_ms.push(back);
        probe_errors += errors;
        probe_error = last.or(probe_error);
    }
    let t_back = Instant::now();
    for watcher in &watchers {
        watcher.abort();
    }
    survivor_stop.store(true, Ordering::SeqCst);
    let survivor_shards = survivor_probes.len();
    let (mut survivor_pause_ms, mut survivor_probe_errors) = (None, 0);
    for probe in survivor_probes {
        let (successes, errors, _) = probe.await.map_err(|e| e.to_string())?;
        survivor_probe_errors += errors;
        let gap = longest_gap(&successes, Instant::now(), t_kill, t_back);
        if let Some(gap) = gap {
            survivor_pause_ms = Some(survivor_pause_ms.map_or(gap, |p: f64| p.max(gap)));
        }
    }
    let (down_at, leader_at) = *lock(&marks);
    check_interrupt()?;

    let t_restart = Instant::now();
    harness.start(node, true)?;
    let rejoined = wait_settled(harness, None, limit).await;
    let t_settled = Instant::now();
    let error = match (&rejoined, unavailable_ms.iter().any(Option::is_none)) {
        (Err(e), _) => Some(e.clone()),
        (Ok(_), true) => Some(format!(
            "{} shard(s) not back within {limit:?}",
            unavailable_ms.iter().filter(|v| v.is_none()).count()
        )),
        _ => None,
    };
    if error.is_some() {
        harness.print_log_tails(&[]);
    }
    Ok(Kill {
        number,
        role,
        node,
        term: settled.term,
        killed_at_utc,
        unavailable_ms,
        probe_errors,
        probe_error,
        survivor_shards,
        survivor_pause_ms,
        survivor_probe_errors,
        marked_down_ms: down_at.map(|t| ms(t - t_kill)),
        // A follower kill leaves the leader in place: nothing to time.
        new_leader_ms: leader_at
            .filter(|_| role == Role::Leader)
            .map(|t| ms(t - t_kill)),
        t_kill,
        t_back,
        t_restart,
        t_settled,
        rejoin_ms: rejoined.is_ok().then(|| ms(t_settled - t_restart)),
        error,
    })
}

/// The longest gap, in ms, between consecutive successes (and from the last one to `end`, when
/// the probing stopped) that overlaps `[from, to)`.
fn longest_gap(successes: &[Instant], end: Instant, from: Instant, to: Instant) -> Option<f64> {
    successes
        .iter()
        .zip(successes.iter().skip(1).chain([&end]))
        .filter(|(a, b)| **b > from && **a < to)
        .map(|(a, b)| ms(*b - *a))
        .fold(None, |longest: Option<f64>, gap| {
            Some(longest.map_or(gap, |l| l.max(gap)))
        })
}

/// Probes one key every `every` until `stop`; returns the reply times of its successes, the
/// failures and the last failure.
async fn probe_continuously(
    client: Client,
    key: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (Vec<Instant>, usize, Option<String>) {
    let (mut successes, mut errors, mut last) = (Vec::new(), 0, None);
    while !stop.load(Ordering::SeqCst) {
        match client.send(key.as_str(), Get).await {
            Ok(_) => successes.push(Instant::now()),
            Err(e) => {
                errors += 1;
                last = Some(e.to_string());
            }
        }
        tokio::time::sleep(every).await;
    }
    (successes, errors, last)
}

/// Drains a follower under load, timing each of its shards' pause; then undrains it.
async fn time_drain(
    harness: &Harness,
    options: &Options,
    keys: &Arc<Vec<String>>,
) -> Result<Drain, String> {
    let limit = Duration::from_secs(options.deadline_secs);
    let every = Duration::from_millis(options.probe_ms.max(1));
    let settled = wait_settled(harness, None, limit).await?;
    let node = harness
        .ids()
        .into_iter()
        .find(|&id| id != settled.leader)
        .ok_or("no follower")?;
    let shards: Vec<u32> = (0..SHARD_COUNT)
        .filter(|&s| settled.owners[s as usize] == node)
        .collect();
    let client = shard_client(harness, &harness.ids())?;
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = shards
        .iter()
        .map(|&s| {
            tokio::spawn(probe_continuously(
                client.clone(),
                keys[s as usize].clone(),
                every,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(DRAIN_MARGIN).await;

    let admin = harness.admin(settled.leader, DRAIN_TIMEOUT)?;
    harness.node(node).mark("drain");
    let t_start = Instant::now();
    let drained = admin.request(AdminRequest::Drain { id: node }).await;
    let drain_ms = ms(t_start.elapsed());
    let drained = match drained {
        Ok(AdminResponse::Changed(_)) => Ok(()),
        Ok(other) => Err(format!("unexpected answer to Drain: {other:?}")),
        Err(e) => Err(format!("Drain of node {node} failed: {e}")),
    };
    let settle = match drained {
        Ok(()) => wait_settled(harness, Some(node), limit).await.map(|_| ()),
        Err(e) => Err(e),
    };
    let t_settled = Instant::now();
    tokio::time::sleep(DRAIN_MARGIN).await;
    stop.store(true, Ordering::SeqCst);
    let end = Instant::now();
    let mut drain = Drain {
        node,
        shards: shards.len(),
        pause_ms: Series::default(),
        baseline_gap_ms: Series::default(),
        probe_errors: 0,
        probe_error: None,
        drain_ms,
        settle_ms: ms(t_settled - t_start),
        undrain_settle_ms: None,
        t_start,
        t_settled,
        t_undrain: t_settled,
        t_undrained: t_settled,
    };
    for probe in probes {
        let (successes, errors, last) = probe.await.map_err(|e| e.to_string())?;
        drain.probe_errors += errors;
        drain.probe_error = last.or(drain.probe_error.take());
        let baseline = longest_gap(&successes, end, t_start - DRAIN_MARGIN, t_start);
        drain.baseline_gap_ms.push_option(baseline);
        drain
            .pause_ms
            .push_option(longest_gap(&successes, end, t_start, t_settled));
    }
    settle?;

    harness.node(node).mark("undrain");
    let t_undrain = Instant::now();
    drain.t_undrain = t_undrain;
    match admin.request(AdminRequest::Undrain { id: node }).await {
        Ok(AdminResponse::Changed(_)) => {}
        Ok(other) => return Err(format!("unexpected answer to Undrain: {other:?}")),
        Err(e) => return Err(format!("Undrain of node {node} failed: {e}")),
    }
    wait_settled(harness, None, limit).await?;
    drain.t_undrained = Instant::now();
    drain.undrain_settle_ms = Some(ms(drain.t_undrained - t_undrain));
    Ok(drain)
}

/// Everything measured.
#[derive(Default)]
struct Results {
    startup_ms: Option<f64>,
    kills: Vec<Kill>,
    drain: Option<Drain>,
    error: Option<String>,
}

/// Runs the measurements, filling `results` as it goes (a run that stops early still reports).
async fn measure(
    harness: &mut Harness,
    options: &Options,
    results: &mut Results,
    records: &Arc<Mutex<Vec<Record>>>,
) -> Result<(), String> {
    let limit = Duration::from_secs(options.deadline_secs);
    let started = Instant::now();
    harness.start_all()?;
    wait_settled(harness, None, limit * 2)
        .await
        .inspect_err(|_| harness.print_log_tails(&[]))?;
    results.startup_ms = Some(ms(started.elapsed()));
    println!(
        "cluster up in {} ms; starting {} load clients",
        fmt_ms(results.startup_ms),
        options.clients
    );

    let keys = Arc::new(keys_per_shard("key", SHARD_COUNT).ok_or("no key found for some shard")?);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load_tasks = Vec::new();
    for index in 0..options.clients {
        // Each client starts from a different node, as clients spread over a cluster would.
        let mut seeds = harness.ids();
        let turn = index % seeds.len();
        seeds.rotate_left(turn);
        load_tasks.push(tokio::spawn(load(
            shard_client(harness, &seeds)?,
            index,
            options.clients,
            keys.clone(),
            Duration::from_millis(options.client_pause_ms),
            records.clone(),
            stop.clone(),
        )));
    }
    // Let the load reach every shard once, so every client holds a map.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let outcome = async {
        for role in [Role::Follower, Role::Leader] {
            println!();
            println!(
                "{} kills (kill -9; ms from the kill; unavailable = kill → a shard's first successful answer):",
                match role {
                    Role::Follower => "follower",
                    Role::Leader => "leader",
                }
            );
            println!(
                "{:>4} {:>5} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>5} {:>8} {:>10} {:>7}",
                "kill", "node", "shards", "leader@", "down@", "first", "median", "p90", "worst",
                "prb-err", "failed", "lost", "max-lat", "surv-pause", "rejoin"
            );
            for number in 1..=options.kills {
                check_interrupt()?;
                let kill = time_kill(harness, options, &keys, number, role).await?;
                let series = kill.series();
                let w = window(&lock(records), kill.t_kill, kill.t_back);
                println!(
                    "{:>4} {:>5} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>5} {:>8} {:>10} {:>7}{}",
                    number,
                    kill.node,
                    kill.unavailable_ms.len(),
                    if role == Role::Leader { fmt_ms(kill.new_leader_ms) } else { "-".into() },
                    fmt_ms(kill.marked_down_ms),
                    fmt_ms(series.quantile(0.0)),
                    fmt_ms(series.quantile(0.5)),
                    fmt_ms(series.quantile(0.9)),
                    fmt_ms(series.quantile(1.0)),
                    kill.probe_errors,
                    w.failed,
                    w.lost,
                    format!("{:.1}", w.worst_latency_ms),
                    fmt_ms(kill.survivor_pause_ms),
                    fmt_ms(kill.rejoin_ms),
                    kill.error.as_ref().map_or(String::new(), |e| format!("  ERROR: {e}")),
                );
                let failed = kill.error.clone();
                results.kills.push(kill);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
        if !options.no_drain {
            check_interrupt()?;
            println!();
            println!("planned move: drain of a follower under load ...");
            let drain = time_drain(harness, options, &keys).await?;
            results.drain = Some(drain);
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in load_tasks {
        let _ = task.await;
    }
    outcome
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn pooled(kills: &[Kill], role: Role) -> (Series, Series) {
    let (mut all, mut worst) = (Series::default(), Series::default());
    for kill in kills.iter().filter(|k| k.role == role) {
        for v in &kill.unavailable_ms {
            all.push_option(*v);
        }
        worst.push_option(kill.series().quantile(1.0));
    }
    (all, worst)
}

fn series_of(kills: &[Kill], role: Role, figure: impl Fn(&Kill) -> Option<f64>) -> Series {
    let mut series = Series::default();
    for kill in kills.iter().filter(|k| k.role == role) {
        series.push_option(figure(kill));
    }
    series
}

/// The load's figures over the kills of one role: (kill → back) and (restart → settled).
fn load_windows(records: &[Record], kills: &[Kill], role: Role) -> (Window, Window) {
    let mut failover = window(&[], Instant::now(), Instant::now());
    let mut rejoin = window(&[], Instant::now(), Instant::now());
    for kill in kills.iter().filter(|k| k.role == role) {
        for (total, w) in [
            (&mut failover, window(records, kill.t_kill, kill.t_back)),
            (&mut rejoin, window(records, kill.t_restart, kill.t_settled)),
        ] {
            total.requests += w.requests;
            total.failed += w.failed;
            total.lost += w.lost;
            total.worst_latency_ms = total.worst_latency_ms.max(w.worst_latency_ms);
            for (e, n) in w.errors {
                *total.errors.entry(e).or_default() += n;
            }
        }
    }
    (failover, rejoin)
}

fn window_json(w: &Window) -> Value {
    json!({
        "requests": w.requests,
        "failed": w.failed,
        "lost": w.lost,
        "worst_latency_ms": round3(w.worst_latency_ms),
        "errors": w.errors,
    })
}

fn print_summary(results: &Results, records: &[Record], options: &Options) {
    println!();
    println!(
        "summary (3 nodes, {} shards; {} load clients, pause {} ms; probes every {} ms; ms):",
        SHARD_COUNT, options.clients, options.client_pause_ms, options.probe_ms
    );
    let table = SummaryTable {
        name_width: 52,
        figure_width: 8,
        gap: " ",
    };
    table.header("figure");
    let row = |name: &str, s: &Series| table.row(name, s);
    for (role, label) in [(Role::Follower, "follower"), (Role::Leader, "leader")] {
        let (all, worst) = pooled(&results.kills, role);
        row(
            &format!("{label} kill: shard unavailable (every shard)"),
            &all,
        );
        row(&format!("{label} kill: worst shard of each kill"), &worst);
        if role == Role::Leader {
            row(
                "leader kill: kill → a survivor names a new leader",
                &series_of(&results.kills, role, |k| k.new_leader_ms),
            );
        }
        row(
            &format!("{label} kill: kill → a survivor reports it down"),
            &series_of(&results.kills, role, |k| k.marked_down_ms),
        );
        row(
            &format!("{label} kill: longest pause of a survivor's shard"),
            &series_of(&results.kills, role, |k| k.survivor_pause_ms),
        );
        row(
            &format!("{label} kill: restart → share back, nothing moving"),
            &series_of(&results.kills, role, |k| k.rejoin_ms),
        );
    }
    if let Some(drain) = &results.drain {
        row(
            &format!("drain: pause of each moving shard ({})", drain.shards),
            &drain.pause_ms,
        );
        row(
            "drain: longest gap of each shard before the drain",
            &drain.baseline_gap_ms,
        );
        println!(
            "drain of node {}: answered after {:.1} ms, settled after {:.1} ms; undrain settled after {} ms; {} failed probe(s){}",
            drain.node,
            drain.drain_ms,
            drain.settle_ms,
            fmt_ms(drain.undrain_settle_ms),
            drain.probe_errors,
            drain.probe_error.as_ref().map_or(String::new(), |e| format!(" (last: {e})"))
        );
    }
    println!();
    println!("load requests (a put and its read back; failed = an error answer):");
    let print_window = |name: &str, w: &Window| {
        println!(
            "  {name:<44} {:>8} requests {:>6} failed {:>5} lost   worst latency {:>8.1} ms",
            w.requests, w.failed, w.lost, w.worst_latency_ms
        );
        for (e, n) in &w.errors {
            println!("      {n:>6} × {e}");
        }
    };
    for (role, label) in [(Role::Follower, "follower"), (Role::Leader, "leader")] {
        let (failover, rejoin) = load_windows(records, &results.kills, role);
        print_window(&format!("{label} kills: kill → shards back"), &failover);
        print_window(&format!("{label} kills: restart → settled"), &rejoin);
        let probe_errors: usize = results
            .kills
            .iter()
            .filter(|k| k.role == role)
            .map(|k| k.probe_errors)
            .sum();
        let last = results
            .kills
            .iter()
            .filter(|k| k.role == role)
            .filter_map(|k| k.probe_error.clone())
            .next_back();
        println!(
            "  {label} kills: failed probe attempts {probe_errors}{}",
            last.map_or(String::new(), |e| format!(" (last: {e})"))
        );
    }
    if let Some(drain) = &results.drain {
        print_window(
            "drain: Drain sent → settled",
            &window(records, drain.t_start, drain.t_settled),
        );
        print_window(
            "undrain: Undrain sent → settled",
            &window(records, drain.t_undrain, drain.t_undrained),
        );
    }
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        print_window(
            "whole run",
            &window(records, first.start, last.start + Duration::from_nanos(1)),
        );
    }
}

fn to_json(results: &Results, records: &[Record], options: &Options) -> Value {
    let (lease, raft) = match options.node.timing.as_str() {
        "fast" => (LeaseConfig::fast(), ConsensusConfig::fast()),
        _ => (LeaseConfig::default(), ConsensusConfig::default()),
    };
    let mut figures = serde_json::Map::new();
    for (role, label) in [(Role::Follower, "follower"), (Role::Leader, "leader")] {
        let (all, worst) = pooled(&results.kills, role);
        let (failover, rejoin) = load_windows(records, &results.kills, role);
        figures.insert(
            format!("{label}_kills"),
            json!({
                "shard_unavailable_ms": all.to_json(false),
                "worst_shard_per_kill_ms": worst.to_json(false),
                "new_leader_ms": series_of(&results.kills, role, |k| k.new_leader_ms).to_json(false),
                "marked_down_ms": series_of(&results.kills, role, |k| k.marked_down_ms).to_json(false),
                "rejoin_ms": series_of(&results.kills, role, |k| k.rejoin_ms).to_json(false),
                "survivor_shard_pause_ms": series_of(&results.kills, role, |k| k.survivor_pause_ms).to_json(false),
                "survivor_probe_errors": results.kills.iter().filter(|k| k.role == role).map(|k| k.survivor_probe_errors).sum::<usize>(),
                "load_kill_to_back": window_json(&failover),
                "load_restart_to_settled": window_json(&rejoin),
                "probe_errors": results.kills.iter().filter(|k| k.role == role).map(|k| k.probe_errors).sum::<usize>(),
            }),
        );
    }
    let kills: Vec<Value> = results
        .kills
        .iter()
        .map(|k| {
            let s = k.series();
            let w = window(records, k.t_kill, k.t_back);
            json!({
                "kill": k.number,
                "role": format!("{:?}", k.role).to_lowercase(),
                "node": k.node,
                "term_before": k.term,
                "killed_at_utc": k.killed_at_utc,
                "shards": k.unavailable_ms.len(),
                "unavailable_ms": {
                    "min": s.quantile(0.0).map(round3),
                    "median": s.quantile(0.5).map(round3),
                    "p90": s.quantile(0.9).map(round3),
                    "max": s.quantile(1.0).map(round3),
                    "not_back": s.failures.len(),
                },
                "new_leader_ms": k.new_leader_ms.map(round3),
                "marked_down_ms": k.marked_down_ms.map(round3),
                "probe_errors": k.probe_errors,
                "probe_error": k.probe_error,
                "survivor_shards_probed": k.survivor_shards,
                "survivor_shard_pause_ms": k.survivor_pause_ms.map(round3),
                "survivor_probe_errors": k.survivor_probe_errors,
                "load": window_json(&w),
                "rejoin_ms": k.rejoin_ms.map(round3),
                "error": k.error,
            })
        })
        .collect();
    let drain = results.drain.as_ref().map(|d| {
        json!({
            "node": d.node,
            "shards": d.shards,
            "pause_ms": d.pause_ms.to_json(false),
            "baseline_gap_ms": d.baseline_gap_ms.to_json(false),
            "probe_errors": d.probe_errors,
            "probe_error": d.probe_error,
            "drain_answered_ms": round3(d.drain_ms),
            "drain_settled_ms": round3(d.settle_ms),
            "undrain_settled_ms": d.undrain_settle_ms.map(round3),
            "load_drain": window_json(&window(records, d.t_start, d.t_settled)),
            "load_undrain": window_json(&window(records, d.t_undrain, d.t_undrained)),
        })
    });
    let whole = match (records.first(), records.last()) {
        (Some(first), Some(last)) => Some(window_json(&window(
            records,
            first.start,
            last.start + Duration::from_nanos(1),
        ))),
        _ => None,
    };
    json!({
        "figures": figures,
        "drain": drain,
        "load_whole_run": whole,
        "kills": kills,
        "startup_ms": results.startup_ms.map(round3),
        "stopped_early": results.error,
        "config": {
            "kills_per_role": options.kills,
            "clients": options.clients,
            "client_pause_ms": options.client_pause_ms,
            "probe_interval_ms": options.probe_ms,
            "survivor_probes_per_node": options.survivor_probes,
            "deadline_s": options.deadline_secs,
            "rust_log": options.node.rust_log,
            "shard_count": SHARD_COUNT,
            "lease_ms": ms(lease.lease),
            "lease_renew_ms": ms(lease.renew_period),
            "clock_drift_max": lease.clock_drift_max,
            "markdown_wait_ms": ms(lease.markdown_wait()),
            "heartbeat_ms": ms(raft.heartbeat_interval),
            "election_timeout_min_ms": ms(raft.election_timeout_min),
            "election_timeout_max_ms": ms(raft.election_timeout_max),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "load_average": load_average(),
            "quantiles": "linear interpolation between closest ranks",
        },
    })
}

/// Writes every load request as CSV: ms since the first request, latency, and the outcome.
fn write_csv(path: &Path, records: &[Record]) -> Result<(), String> {
    let Some(first) = records.iter().map(|r| r.start).min() else {
        return Ok(());
    };
    let mut text = String::from("start_ms,latency_ms,client,op,shard,outcome,error\n");
    for r in records {
        let (outcome, error) = match &r.outcome {
            Outcome::Ok => ("ok", String::new()),
            Outcome::Lost => ("lost", String::new()),
            Outcome::Failed(e) => ("failed", format!("\"{}\"", e.replace('"', "'"))),
        };
        text.push_str(&format!(
            "{:.3},{:.3},{},{:?},{},{outcome},{error}\n",
            ms(r.start - first),
            ms(r.latency),
            r.client,
            r.op,
            r.shard
        ));
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn run(options: Options) -> Result<(), String> {
    let bins = Binaries::beside_current_exe(false).map_err(|e| e.to_string())?;
    watch_interrupt(PROGRAM);
    let launch = Launch::new(PROGRAM, bins, &options.node)?;
    let mut harness = Harness::new(launch, NODES as usize, options.node.keep_dir)?;
    println!(
        "failover_timing: 3 nodes, {} follower kills and {} leader kills{}; nodes in {} (RUST_LOG={}); load average {}",
        options.kills,
        options.kills,
        if options.no_drain { "" } else { ", one drain" },
        harness.path().display(),
        options.node.rust_log,
        load_average().as_deref().unwrap_or("?")
    );
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut results = Results::default();
    let outcome = runtime()?.block_on(measure(&mut harness, &options, &mut results, &records));
    results.error = stopped_early(PROGRAM, &outcome);
    let records = std::mem::take(&mut *lock(&records));
    print_summary(&results, &records, &options);
    println!(
        "load average after: {}",
        load_average().as_deref().unwrap_or("?")
    );
    if let Some(path) = &options.json {
        write_json(path, &to_json(&results, &records, &options))?;
    }
    if let Some(path) = &options.requests_csv {
        write_csv(path, &records)?;
        println!("wrote {} ({} requests)", path.display(), records.len());
    }
    drop(harness);
    outcome
}

fn main() -> ExitCode {
    exit_code(PROGRAM, run(Options::parse()))
}
