//! `raft_timing`: leader-failover and membership-change timings of a local `kv` cluster.
//!
//! ```text
//! cargo build --release --examples --bins      # once: builds `kv` and `clusterfunk`
//! cargo run --release --example raft_timing -- [--kills 20] [--nodes 3] [--changes 20] [--json FILE]
//! ```
//!
//! It starts `--nodes` `kv serve` processes on 127.0.0.1 (free ports, a temporary directory,
//! `RUST_LOG=warn`, one log file per node) that share a freshly made `CLUSTERFUNK_SECRET`, then:
//!
//! 1. **Leader failover**, `--kills` times: finds the leader with `clusterfunk status --json`,
//!    kills it with SIGKILL and polls the survivors until a majority of them name one live new
//!    leader whose own status says `raft_state: leader`; the time from the kill to that moment
//!    is one sample. Two pollers watch side by side: the library poller (`AdminClient`, no
//!    process spawns, every `--poll-ms`; its figures are the reported ones) and the
//!    command-line poller (one `clusterfunk status` process per call, every `--cli-poll-ms`,
//!    for comparison). A sample is late by at most one poll interval plus one status round
//!    trip. The killed node then restarts from its data directory (after `--restart-delay-ms`),
//!    and the next kill waits until every voter names one leader and holds and applied its
//!    whole log. Also reported: kill → first survivor that stops naming the old leader (its
//!    election timer fired), restart → the node names the new leader, restart → settled, and
//!    any term change that no kill caused.
//! 2. **Membership changes**, `--changes` times: starts a fresh node, times `AddNode` as a
//!    learner against the leader (it answers once the learner caught up and the change
//!    committed), then `RemoveNode`, and stops the node; then one voter add and remove pair.
//! 3. Prints a table and, with `--json FILE`, writes the figures.
//!
//! The binaries are taken from next to this program (`target/release/examples/kv` and
//! `target/release/clusterfunk`); `cargo run --example` does not rebuild them. Every child
//! process and the temporary directory are removed on exit, on error and on Ctrl-C too.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use clusterfunk::admin::{AdminClient, AdminRequest, AdminResponse, NodeState, StatusReport};
use clusterfunk::testing::{self, wait_for, Binaries};
use clusterfunk::transport::SECRET_ENV_VAR;
use clusterfunk::ConsensusConfig;
use clusterfunk::NodeId;
use serde_json::{json, Value};
use support::{
    check_interrupt, exit_code, fmt_ms, lib_status, load_average, ms, round3, runtime,
    stopped_early, utc_now, watch_interrupt, write_json, Harness, Launch, NodeOptions, Series,
    SummaryTable, POLL_TIMEOUT,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// This program's name, in its messages and the node logs.
const PROGRAM: &str = "raft_timing";
/// Id of the first node started for membership changes (the voters are 1..=N).
const FIRST_EXTRA_ID: NodeId = 100;
/// How long a membership command may take (the node's own admin timeout is 60 s).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(70);
/// After the library poller saw the new leader, how much longer the CLI poller may take.
const CLI_GRACE: Duration = Duration::from_secs(5);

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    about = "Times leader failover and membership changes of a local kv cluster"
)]
struct Options {
    /// Leader kills to time.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Voters in the cluster (at least 3).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Learner add/remove pairs to time (one voter add/remove pair follows; 0 skips both).
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Library poll interval per survivor, in ms (bounds the failover resolution).
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// `clusterfunk status` poll interval per survivor, in ms; 0 turns the CLI poller off.
    #[arg(long, default_value_t = 10)]
    cli_poll_ms: u64,
    /// Wait between seeing the new leader and restarting the killed node, in ms. A restart
    /// within ~200 ms can meet the new leader's 500 ms replication backoff toward that node and
    /// campaign before it hears a heartbeat (see the summary's "elections that no kill caused").
    #[arg(long, default_value_t = 0)]
    restart_delay_ms: u64,
    /// Seconds one failover, or one wait for the cluster, may take before it counts as failed.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
    /// The node processes.
    #[command(flatten)]
    node: NodeOptions,
}

/// Which poller produced a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// `AdminClient` in this process.
    Library,
    /// A `clusterfunk status --json` process.
    Cli,
}

/// One status answer (or failure) from one survivor.
struct Report {
    /// The poller.
    source: Source,
    /// The node asked.
    node: NodeId,
    /// When the answer arrived.
    at: Instant,
    /// The answer.
    status: Result<StatusReport, String>,
}

/// The moment a poller saw a quorum of survivors agree on a live new leader.
#[derive(Debug, Clone, Copy)]
struct Elected {
    /// When the deciding report arrived.
    at: Instant,
    /// The new leader.
    leader: NodeId,
    /// Its term.
    term: u64,
}

/// The leader that a quorum of `nodes` names, provided its own status says it leads.
fn agreed_leader(
    latest: &BTreeMap<NodeId, StatusReport>,
    nodes: &[NodeId],
    need: usize,
) -> Option<(NodeId, u64)> {
    nodes.iter().find_map(|&candidate| {
        let own = latest.get(&candidate)?;
        if own.raft_state != "leader" || own.leader != Some(candidate) {
            return None;
        }
        let agree = nodes
            .iter()
            .filter(|n| latest.get(n).is_some_and(|s| s.leader == Some(candidate)))
            .count();
        (agree >= need).then_some((candidate, own.term))
    })
}

/// Follows one poller's reports after a kill until a quorum of survivors agrees on a new leader.
struct Detector {
    /// The killed leader.
    killed: NodeId,
    /// The nodes polled.
    survivors: Vec<NodeId>,
    /// How many survivors must agree (a majority of them).
    need: usize,
    /// When the leader was killed; earlier reports are ignored.
    t_kill: Instant,
    /// Each survivor's newest answer.
    latest: BTreeMap<NodeId, StatusReport>,
    /// Answers since the kill.
    polls: usize,
    /// Failed polls since the kill.
    errors: usize,
    /// The newest poll error.
    last_error: Option<String>,
    /// First answer that no longer named the killed leader (a survivor's election timer fired).
    first_change: Option<Instant>,
    /// Answers with `raft_state: candidate`.
    candidate_reports: usize,
    /// The highest term seen.
    max_term: u64,
    /// The outcome, once seen.
    elected: Option<Elected>,
}

impl Detector {
    /// A detector for the kill of `killed` at `t_kill`.
    fn new(killed: NodeId, survivors: Vec<NodeId>, t_kill: Instant) -> Self {
        let need = survivors.len() / 2 + 1;
        Detector {
            killed,
            survivors,
            need,
            t_kill,
            latest: BTreeMap::new(),
            polls: 0,
            errors: 0,
            last_error: None,
            first_change: None,
            candidate_reports: 0,
            max_term: 0,
            elected: None,
        }
    }

    /// Takes one report into account.
    fn observe(&mut self, node: NodeId, at: Instant, status: &Result<StatusReport, String>) {
        if at < self.t_kill {
            return;
        }
        self.polls += 1;
        let status = match status {
            Ok(status) => status,
            Err(e) => {
                self.errors += 1;
                self.last_error = Some(format!("node {node}: {e}"));
                return;
            }
        };
        if status.leader != Some(self.killed) && self.first_change.is_none() {
            self.first_change = Some(at);
        }
        if status.raft_state == "candidate" {
            self.candidate_reports += 1;
        }
        self.max_term = self.max_term.max(status.term);
        self.latest.insert(node, status.clone());
        if self.elected.is_none() {
            if let Some((leader, term)) = agreed_leader(&self.latest, &self.survivors, self.need) {
                self.elected = Some(Elected { at, leader, term });
            }
        }
    }

    /// Milliseconds from the kill to the agreement, if seen.
    fn failover_ms(&self) -> Option<f64> {
        self.elected.map(|e| ms(e.at - self.t_kill))
    }
}

/// One timed leader kill.
#[derive(Debug, Clone)]
struct Failover {
    /// 1-based kill number.
    number: usize,
    /// The killed leader.
    killed: NodeId,
    /// Its term.
    old_term: u64,
    /// Wall-clock time of the kill, to find it in the node logs.
    killed_at_utc: String,
    /// The new leader and its term (from the library poller, else the CLI poller).
    new_leader: Option<(NodeId, u64)>,
    /// Kill → agreement, library poller.
    lib_ms: Option<f64>,
    /// Kill → agreement, CLI poller.
    cli_ms: Option<f64>,
    /// Kill → first survivor that stopped naming the old leader, library poller.
    detect_ms: Option<f64>,
    /// Answers with `raft_state: candidate` seen by the library poller.
    candidate_reports: usize,
    /// Status polls by the library and CLI pollers after the kill.
    polls: (usize, usize),
    /// Restart of the killed node → it names the new leader and serves.
    rejoin_ms: Option<f64>,
    /// Restart of the killed node → every voter holds and applied the leader's whole log.
    settle_ms: Option<f64>,
    /// The leader and term once settled.
    settled: Option<(NodeId, u64)>,
    /// What went wrong, if anything.
    error: Option<String>,
}

impl Failover {
    /// The new term minus the old one: more than 1 means more than one election round.
    fn term_jump(&self) -> Option<u64> {
        self.new_leader
            .map(|(_, t)| t.saturating_sub(self.old_term))
    }

    /// The record as JSON.
    fn to_json(&self) -> Value {
        json!({
            "kill": self.number,
            "killed": self.killed,
            "killed_at_utc": self.killed_at_utc,
            "old_term": self.old_term,
            "new_leader": self.new_leader.map(|(l, _)| l),
            "new_term": self.new_leader.map(|(_, t)| t),
            "failover_ms": self.lib_ms,
            "failover_cli_ms": self.cli_ms,
            "detect_ms": self.detect_ms,
            "candidate_reports": self.candidate_reports,
            "library_polls": self.polls.0,
            "cli_polls": self.polls.1,
            "rejoin_ms": self.rejoin_ms,
            "settle_ms": self.settle_ms,
            "settled_term": self.settled.map(|(_, t)| t),
            "error": self.error,
        })
    }
}

/// Everything measured.
#[derive(Debug, Default)]
struct Results {
    /// Startup → every voter serves.
    startup_ms: Option<f64>,
    /// Each kill.
    failovers: Vec<Failover>,
    /// Kill → agreement, library poller.
    failover_lib: Series,
    /// Kill → agreement, CLI poller.
    failover_cli: Series,
    /// Kill → first survivor that stopped naming the old leader.
    detect: Series,
    /// Restart → naming the new leader.
    rejoin: Series,
    /// Restart → every voter holds and applied the leader's whole log.
    settle: Series,
    /// `AddNode` as learner.
    add_learner: Series,
    /// `RemoveNode` of a learner.
    remove_learner: Series,
    /// `AddNode` as voter.
    add_voter: Series,
    /// `RemoveNode` of a voter.
    remove_voter: Series,
    /// Why the run stopped early, if it did.
    error: Option<String>,
}

/// One node's status through `clusterfunk --node ADDR --json status` (one process spawn).
fn cli_status(cli: &Path, addr: SocketAddr, secret: &str) -> Result<StatusReport, String> {
    let output = Command::new(cli)
        .arg("--node")
        .arg(addr.to_string())
        .args(["--json", "--timeout", "1", "status"])
        .env(SECRET_ENV_VAR, secret)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cli.display()))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("bad status JSON: {e}"))
}

/// The leader that every voter names, found with the command-line tool.
async fn find_leader_cli(harness: &Harness, limit: Duration) -> Result<(NodeId, u64), String> {
    let ids = harness.ids();
    wait_for(
        "a leader that every voter names",
        Duration::from_millis(50),
        limit,
        || {
            let statuses: BTreeMap<NodeId, StatusReport> = ids
                .iter()
                .filter_map(|&id| {
                    let status = cli_status(
                        &harness.launch.bins.clusterfunk,
                        harness.node(id).addr(),
                        &harness.launch.secret,
                    );
                    status.ok().map(|s| (id, s))
                })
                .collect();
            let found = agreed_leader(&statuses, &ids, ids.len()).ok_or_else(|| {
                let seen: Vec<String> = statuses
                    .iter()
                    .map(|(id, s)| format!("{id}: leader {:?} ({})", s.leader, s.raft_state))
                    .collect();
                format!("seen {}", seen.join(", "))
            });
            std::future::ready(found)
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// Waits until the cluster is settled, as the library sees it: every voter serves and names one
/// leader (`want`, when given) that says it leads, and every voter's log holds and has applied
/// exactly the leader's last entry. Returns the leader and its term.
///
/// Knowing the leader is not enough after a restart: the leader's replication to a peer it
/// could not reach backs off (openraft drains for 500 ms), so a restarted node can name the
/// leader while its log still lacks the leader's newest entries; a failover started then would
/// time a node with a shorter log asking for votes, which the others refuse.
async fn wait_settled(
    clients: &BTreeMap<NodeId, AdminClient>,
    want: Option<NodeId>,
    limit: Duration,
) -> Result<(NodeId, u64), String> {
    let ids: Vec<NodeId> = clients.keys().copied().collect();
    let ids = &ids;
    let what = match want {
        Some(l) => format!("every voter to follow leader {l} with its whole log applied"),
        None => "every voter to follow one leader with its whole log applied".to_string(),
    };
    wait_for(&what, Duration::from_millis(10), limit, || async move {
        let answers = testing::statuses(clients).await;
        let mut statuses = BTreeMap::new();
        let mut problems = Vec::new();
        for (id, answer) in answers {
            match answer {
                Ok(s) if s.state == NodeState::Serving => {
                    statuses.insert(id, s);
                }
                Ok(s) => problems.push(format!("{id}: {:?} {:?}", s.state, s.reason)),
                Err(e) => problems.push(format!("{id}: {e}")),
            }
        }
        let Some((leader, term)) = agreed_leader(&statuses, ids, ids.len()) else {
            return Err(format!("no agreement yet; {}", problems.join("; ")));
        };
        if want.is_some_and(|w| w != leader) {
            return Err(format!("leader is {leader}, not {want:?}"));
        }
        let last = statuses[&leader].last_log_index;
        let behind: Vec<String> = statuses
            .iter()
            .filter(|(_, s)| s.last_log_index != last || s.last_applied_index != last)
            .map(|(id, s)| {
                format!(
                    "{id}: log {:?} applied {:?} (leader's log {last:?})",
                    s.last_log_index, s.last_applied_index
                )
            })
            .collect();
        if behind.is_empty() {
            Ok((leader, term))
        } else {
            Err(format!("not caught up: {}", behind.join("; ")))
        }
    })
    .await
    .map_err(|e| e.to_string())
}

/// Polls one survivor through the library every `every` until aborted.
async fn poll_library(
    client: AdminClient,
    node: NodeId,
    every: Duration,
    tx: UnboundedSender<Report>,
) {
    let mut next = tokio::time::Instant::now();
    loop {
        let status = lib_status(&client).await;
        let report = Report {
            source: Source::Library,
            node,
            at: Instant::now(),
            status,
        };
        if tx.send(report).is_err() {
            return;
        }
        next += every;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// Polls one survivor with `clusterfunk status` every `every` until `stop` is set.
fn poll_cli(
    cli: PathBuf,
    addr: SocketAddr,
    secret: String,
    node: NodeId,
    every: Duration,
    stop: Arc<AtomicBool>,
    tx: UnboundedSender<Report>,
) {
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let status = cli_status(&cli, addr, &secret);
        let report = Report {
            source: Source::Cli,
            node,
            at: Instant::now(),
            status,
        };
        if tx.send(report).is_err() {
            return;
        }
        if let Some(rest) = every.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// The running pollers of one failover.
struct Pollers {
    /// Library poll tasks.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// CLI poll threads.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Tells the CLI threads to stop.
    stop: Arc<AtomicBool>,
    /// Their reports.
    rx: UnboundedReceiver<Report>,
}

impl Pollers {
    /// Starts a library poller and, unless `cli_every` is zero, a CLI poller per survivor.
    fn start(
        harness: &Harness,
        survivors: &[NodeId],
        every: Duration,
        cli_every: Duration,
    ) -> Result<Self, String> {
        let (tx, rx) = unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut pollers = Pollers {
            tasks: Vec::new(),
            threads: Vec::new(),
            stop: stop.clone(),
            rx,
        };
        for &id in survivors {
            let addr = harness.node(id).addr();
            let client = harness.admin(id, POLL_TIMEOUT)?;
            pollers
                .tasks
                .push(tokio::spawn(poll_library(client, id, every, tx.clone())));
            if !cli_every.is_zero() {
                let (cli, secret) = (
                    harness.launch.bins.clusterfunk.clone(),
                    harness.launch.secret.clone(),
                );
                let (stop, tx) = (stop.clone(), tx.clone());
                pollers.threads.push(std::thread::spawn(move || {
                    poll_cli(cli, addr, secret, id, cli_every, stop, tx)
                }));
            }
        }
        Ok(pollers)
    }

    /// Stops every poller and waits for the CLI threads (each ends within one status call).
    fn stop(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.stop.store(true, Ordering::SeqCst);
        self.rx.close();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Kills the leader once and times the failover, then restarts the killed node.
async fn time_failover(
    harness: &mut Harness,
    options: &Options,
    number: usize,
) -> Result<Failover, String> {
    let limit = Duration::from_secs(options.deadline_secs);
    let cli_every = Duration::from_millis(options.cli_poll_ms);
    let cli_on = !cli_every.is_zero();
    let (leader, old_term) = find_leader_cli(harness, limit).await?;
    let survivors: Vec<NodeId> = harness
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let mut pollers = Pollers::start(
        harness,
        &survivors,
        Duration::from_millis(options.poll_ms.max(1)),
        cli_every,
    )?;

    // Warm up: every poller has answered once (connections open) and names the same leader.
    let expected = survivors.len() * if cli_on { 2 } else { 1 };
    let mut warm: BTreeSet<(Source, NodeId)> = BTreeSet::new();
    let warm_deadline = Instant::now() + Duration::from_secs(10);
    while warm.len() < expected {
        let wake = tokio::time::Instant::from_std(warm_deadline);
        let report = match tokio::time::timeout_at(wake, pollers.rx.recv()).await {
            Ok(Some(report)) => report,
            _ => break,
        };
        match &report.status {
            Ok(s) if s.leader == Some(leader) => {
                warm.insert((report.source, report.node));
            }
            Ok(s) => {
                pollers.stop();
                return Err(format!(
                    "before the kill, node {} named leader {:?} instead of {leader}",
                    report.node, s.leader
                ));
            }
            Err(_) => {}
        }
    }
    if warm.len() < expected {
        pollers.stop();
        return Err(format!(
            "the pollers did not all answer within 10 s ({} of {expected})",
            warm.len()
        ));
    }

    let t_kill = harness.kill(leader)?;
    let killed_at_utc = utc_now();
    let mut lib = Detector::new(leader, survivors.clone(), t_kill);
    let mut cli = Detector::new(leader, survivors.clone(), t_kill);
    let deadline = t_kill + limit;
    let mut interrupted = false;
    loop {
        let done_cli = !cli_on
            || cli.elected.is_some()
            || lib.elected.is_some_and(|e| e.at.elapsed() > CLI_GRACE);
        if lib.elected.is_some() && done_cli {
            break;
        }
        if support::interrupted() {
            interrupted = true;
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wake = tokio::time::Instant::from_std(deadline.min(now + Duration::from_millis(100)));
        match tokio::time::timeout_at(wake, pollers.rx.recv()).await {
            Ok(Some(report)) => match report.source {
                Source::Library => lib.observe(report.node, report.at, &report.status),
                Source::Cli => cli.observe(report.node, report.at, &report.status),
            },
            Ok(None) => break,
            Err(_) => {}
        }
    }
    pollers.stop();
    if interrupted {
        return Err("interrupted".into());
    }

    let new_leader = lib.elected.or(cli.elected).map(|e| (e.leader, e.term));
    let mut failover = Failover {
        number,
        killed: leader,
        old_term,
        killed_at_utc,
        new_leader,
        lib_ms: lib.failover_ms(),
        cli_ms: cli.failover_ms(),
        detect_ms: lib.first_change.map(|t| ms(t - t_kill)),
        candidate_reports: lib.candidate_reports,
        polls: (lib.polls, cli.polls),
        rejoin_ms: None,
        settle_ms: None,
        settled: None,
        error: None,
    };
    if lib.elected.is_none() {
        let seen: Vec<String> = lib
            .latest
            .iter()
            .map(|(id, s)| {
                format!(
                    "{id}: leader {:?}, {}, term {}",
                    s.leader, s.raft_state, s.term
                )
            })
            .collect();
        failover.error = Some(format!(
            "no new leader within {limit:?} after killing node {leader} (max term seen {}; {} polls, {} failed{}; last view: {})",
            lib.max_term,
            lib.polls,
            lib.errors,
            lib.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default(),
            seen.join("; ")
        ));
        eprintln!(
            "raft_timing: kill {number}: {}",
            failover.error.as_deref().unwrap_or_default()
        );
        harness.print_log_tails(&[]);
    } else if cli_on && cli.elected.is_none() {
        eprintln!(
            "raft_timing: kill {number}: the CLI poller saw no agreement ({} polls, {} failed{})",
            cli.polls,
            cli.errors,
            cli.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }

    // Restart the killed node from its data dir and wait until it follows the new leader.
    tokio::time::sleep(Duration::from_millis(options.restart_delay_ms)).await;
    harness
        .start(leader, false)
        .map_err(|e| format!("restarting node {leader}: {e}"))?;
    let restarted = Instant::now();
    let client = harness.admin(leader, POLL_TIMEOUT)?;
    let (want, want_term) = match new_leader {
        Some(found) => found,
        None => find_leader_cli(harness, limit).await?,
    };
    // On restart an ex-leader restores its old leadership from its persisted vote and names
    // itself, at its old term, until it hears of the newer one: wait for a leader at the new
    // term or later (usually `want`, unless another election happened meanwhile).
    let rejoin = wait_for(
        &format!("restarted node {leader} to name a leader of term {want_term} or later"),
        Duration::from_millis(10),
        limit,
        || async {
            let s = lib_status(&client).await?;
            if s.leader.is_some() && s.term >= want_term && s.state == NodeState::Serving {
                Ok(())
            } else {
                Err(format!(
                    "it says leader {:?}, term {}, {:?} ({})",
                    s.leader, s.term, s.state, s.raft_state
                ))
            }
        },
    )
    .await
    .map_err(|e| e.to_string());
    let settled = match rejoin {
        Ok(()) => {
            failover.rejoin_ms = Some(ms(restarted.elapsed()));
            wait_settled(&harness.admin_clients(POLL_TIMEOUT)?, None, limit).await
        }
        Err(e) => Err(e),
    };
    match settled {
        Ok(settled) => {
            failover.settle_ms = Some(ms(restarted.elapsed()));
            failover.settled = Some(settled);
        }
        Err(e) => {
            if check_interrupt().is_ok() {
                harness.print_log_tails(&[leader, want]);
            }
            return Err(e);
        }
    }
    Ok(failover)
}

/// Adds a fresh node (as learner or voter) and removes it again, timing both commands.
async fn time_change(
    harness: &mut Harness,
    options: &Options,
    id: NodeId,
    learner: bool,
) -> Result<(Result<f64, String>, Result<f64, String>), String> {
    let limit = Duration::from_secs(options.deadline_secs);
    let addr = harness.reserve_addrs(1)?[0];
    let node = harness.slot(id, addr);
    let started = harness.launch.start(&node, None);
    harness.extra.push(node);
    started?;
    let slot = harness.extra.len() - 1;

    let fresh = harness.launch.admin(addr, POLL_TIMEOUT)?;
    wait_for(
        &format!("new node {id} to answer"),
        Duration::from_millis(10),
        limit,
        || lib_status(&fresh),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (leader, _) = wait_settled(&harness.admin_clients(POLL_TIMEOUT)?, None, limit).await?;
    let admin = harness.admin(leader, CHANGE_TIMEOUT)?;
    lib_status(&admin).await?; // opens the connection, so the timing below excludes it

    let role = if learner { "learner" } else { "voter" };
    let started = Instant::now();
    let added = admin
        .request(AdminRequest::AddNode {
            id,
            addr: addr.to_string(),
            zone: None,
            learner,
        })
        .await;
    let add_ms = ms(started.elapsed());
    let add = match added {
        Ok(AdminResponse::Changed(report)) => {
            let listed = if learner {
                report.learners.contains(&id)
            } else {
                report.voters.contains(&id)
            };
            if listed {
                Ok(add_ms)
            } else {
                Err(format!(
                    "add {role} {id}: answered without it as a {role}: {report:?}"
                ))
            }
        }
        Ok(other) => Err(format!("add {role} {id}: unexpected answer {other:?}")),
        Err(e) => Err(format!("add {role} {id} failed after {add_ms:.1} ms: {e}")),
    };

    let started = Instant::now();
    let removed = admin.request(AdminRequest::RemoveNode { id }).await;
    let remove_ms = ms(started.elapsed());
    let remove = match removed {
        Ok(AdminResponse::Changed(report))
            if !report.voters.contains(&id) && !report.learners.contains(&id) =>
        {
            Ok(remove_ms)
        }
        Ok(other) => Err(format!("remove {role} {id}: unexpected answer {other:?}")),
        Err(e) => Err(format!(
            "remove {role} {id} failed after {remove_ms:.1} ms: {e}"
        )),
    };
    if add.is_err() || remove.is_err() {
        harness.print_log_tails(&[id, leader]);
    }
    // The node may have died on its own already; either way it is gone afterwards.
    let _ = harness.extra[slot].kill();
    Ok((add, remove))
}

/// Runs every measurement on a started runtime, filling `results` as it goes (so that a run
/// that stops early still reports what it measured).
async fn measure(
    harness: &mut Harness,
    options: &Options,
    results: &mut Results,
) -> Result<(), String> {
    let limit = Duration::from_secs(options.deadline_secs);

    let started = Instant::now();
    harness.start_all()?;
    let startup = wait_settled(&harness.admin_clients(POLL_TIMEOUT)?, None, limit * 2).await;
    let (leader, term) = startup.inspect_err(|_| {
        if check_interrupt().is_ok() {
            harness.print_log_tails(&[]);
        }
    })?;
    results.startup_ms = Some(ms(started.elapsed()));
    println!(
        "cluster up in {} ms: leader {leader}, term {term}",
        fmt_ms(results.startup_ms)
    );

    if options.kills > 0 {
        println!();
        println!("leader failover (kill -9 of the leader; ms from the kill):");
        println!(
            "{:>5}  {:>6}  {:>10}  {:>7}  {:>8}  {:>9}  {:>8}  {:>7}  {:>7}",
            "kill",
            "killed",
            "new leader",
            "terms",
            "detect",
            "failover",
            "(cli)",
            "rejoin",
            "settled"
        );
    }
    for number in 1..=options.kills {
        check_interrupt()?;
        let failover = time_failover(harness, options, number).await?;
        let terms = match failover.new_leader {
            Some((_, t)) => format!("{}→{t}", failover.old_term),
            None => format!("{}→?", failover.old_term),
        };
        println!(
            "{:>5}  {:>6}  {:>10}  {:>7}  {:>8}  {:>9}  {:>8}  {:>7}  {:>7}{}",
            number,
            failover.killed,
            failover
                .new_leader
                .map_or("none".to_string(), |(l, _)| l.to_string()),
            terms,
            fmt_ms(failover.detect_ms),
            fmt_ms(failover.lib_ms),
            fmt_ms(failover.cli_ms),
            fmt_ms(failover.rejoin_ms),
            fmt_ms(failover.settle_ms),
            if failover.candidate_reports > 0 {
                format!("  (candidate seen {}x)", failover.candidate_reports)
            } else {
                String::new()
            }
        );
        results.failover_lib.push(failover.lib_ms.ok_or_else(|| {
            failover
                .error
                .clone()
                .unwrap_or_else(|| "no new leader".into())
        }));
        if options.cli_poll_ms > 0 {
            results.failover_cli.push(
                failover
                    .cli_ms
                    .ok_or_else(|| "the CLI poller saw no new leader".to_string()),
            );
        }
        if let Some(d) = failover.detect_ms {
            results.detect.values.push(d);
        }
        if let Some(r) = failover.rejoin_ms {
            results.rejoin.values.push(r);
        }
        if let Some(r) = failover.settle_ms {
            results.settle.values.push(r);
        }
        results.failovers.push(failover);
    }

    if options.changes > 0 {
        println!();
        println!("membership changes (through AdminClient against the leader; ms):");
        println!(
            "{:>5}  {:>7}  {:>8}  {:>10}  {:>10}",
            "n", "node", "role", "add", "remove"
        );
    }
    let pairs = if options.changes > 0 {
        options.changes + 1
    } else {
        0
    };
    for i in 0..pairs {
        check_interrupt()?;
        let learner = i < options.changes;
        let id = FIRST_EXTRA_ID + i as NodeId;
        let (add, remove) = time_change(harness, options, id, learner).await?;
        println!(
            "{:>5}  {:>7}  {:>8}  {:>10}  {:>10}",
            i + 1,
            id,
            if learner { "learner" } else { "voter" },
            fmt_ms(add.as_ref().ok().copied()),
            fmt_ms(remove.as_ref().ok().copied())
        );
        for e in [&add, &remove].into_iter().filter_map(|r| r.as_ref().err()) {
            eprintln!("raft_timing: {e}");
        }
        let (adds, removes) = if learner {
            (&mut results.add_learner, &mut results.remove_learner)
        } else {
            (&mut results.add_voter, &mut results.remove_voter)
        };
        adds.push(add);
        removes.push(remove);
    }
    Ok(())
}

/// Prints the summary table.
fn print_summary(results: &Results, options: &Options) {
    let rows: [(&str, &Series); 9] = [
        ("leader failover (library poll)", &results.failover_lib),
        ("leader failover (CLI poll)", &results.failover_cli),
        (
            "  of which: kill → first survivor moves on",
            &results.detect,
        ),
        ("restart → it names the new leader", &results.rejoin),
        ("restart → all logs caught up and applied", &results.settle),
        ("add learner (caught up + committed)", &results.add_learner),
        ("remove learner", &results.remove_learner),
        ("add voter", &results.add_voter),
        ("remove voter", &results.remove_voter),
    ];
    println!();
    println!(
        "summary ({} voters; library poll every {} ms, {}; restart {} ms after the failover; a failover sample is late by at most one poll interval plus one status round trip):",
        options.nodes,
        options.poll_ms,
        if options.cli_poll_ms == 0 {
            "CLI poll off".to_string()
        } else {
            format!("CLI poll every {} ms", options.cli_poll_ms)
        },
        options.restart_delay_ms
    );
    let table = SummaryTable {
        name_width: 44,
        figure_width: 9,
        gap: "  ",
    };
    table.header("figure (ms)");
    for (name, series) in rows {
        table.row(name, series);
    }
    if !results.failovers.is_empty() {
        let jumps = multi_round_elections(&results.failovers);
        println!(
            "failovers whose election took more than one round (term rose by more than 1): {}{}",
            jumps.len(),
            listed(&jumps)
        );
        let unplanned = unplanned_elections(&results.failovers);
        println!(
            "elections that no kill caused (the term moved after a failover): {}{}",
            unplanned.len(),
            listed(&unplanned)
        );
    }
}

/// ` (a, b)` for a non-empty list, nothing otherwise.
fn listed(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" ({})", items.join("; "))
    }
}

/// The failovers whose term rose by more than one (split votes or refused candidates).
fn multi_round_elections(failovers: &[Failover]) -> Vec<String> {
    failovers
        .iter()
        .filter_map(|f| {
            let jump = f.term_jump().filter(|&j| j > 1)?;
            Some(format!("kill {}: term {} → +{jump}", f.number, f.old_term))
        })
        .collect()
}

/// Term changes after a failover's election that no kill caused: while the killed node rejoined
/// (typically it campaigns before the leader's heartbeats reach it), or before the next kill.
fn unplanned_elections(failovers: &[Failover]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, f) in failovers.iter().enumerate() {
        let Some((_, term)) = f.new_leader else {
            continue;
        };
        let settled = f.settled.map_or(term, |(_, t)| t);
        if settled != term {
            found.push(format!(
                "while node {} rejoined after kill {}: term {term} → {settled}, leader {}",
                f.killed,
                f.number,
                f.settled.map_or("?".to_string(), |(l, _)| l.to_string())
            ));
        }
        if let Some(next) = failovers.get(i + 1) {
            if next.old_term != settled {
                found.push(format!(
                    "between kill {} and kill {}: term {settled} → {}",
                    f.number, next.number, next.old_term
                ));
            }
        }
    }
    found
}

/// The JSON document of `--json`.
fn to_json(
    results: &Results,
    options: &Options,
    bins: &Binaries,
    load: [Option<String>; 2],
) -> Value {
    let raft = ConsensusConfig::default();
    json!({
        "leader_failover_ms": results.failover_lib.to_json(true),
        "leader_failover_cli_ms": results.failover_cli.to_json(true),
        "leader_detect_ms": results.detect.to_json(true),
        "rejoin_ms": results.rejoin.to_json(true),
        "settle_ms": results.settle.to_json(true),
        "add_learner_ms": results.add_learner.to_json(true),
        "remove_node_ms": results.remove_learner.to_json(true),
        "add_voter_ms": results.add_voter.to_json(true),
        "remove_voter_ms": results.remove_voter.to_json(true),
        "startup_ms": results.startup_ms.map(round3),
        "stopped_early": results.error,
        "multi_round_elections": multi_round_elections(&results.failovers),
        "unplanned_elections": unplanned_elections(&results.failovers),
        "failovers": results.failovers.iter().map(Failover::to_json).collect::<Vec<_>>(),
        "failures": results.failover_lib.failures.iter()
            .chain(&results.add_learner.failures)
            .chain(&results.remove_learner.failures)
            .chain(&results.add_voter.failures)
            .chain(&results.remove_voter.failures)
            .collect::<Vec<_>>(),
        "config": {
            "nodes": options.nodes,
            "kills": options.kills,
            "changes": options.changes,
            "poll_interval_ms": options.poll_ms,
            "cli_poll_interval_ms": options.cli_poll_ms,
            "restart_delay_ms": options.restart_delay_ms,
            "deadline_s": options.deadline_secs,
            "rust_log": options.node.rust_log,
            "quantiles": "linear interpolation between closest ranks",
            "raft_defaults": {
                "heartbeat_ms": ms(raft.heartbeat_interval),
                "election_timeout_min_ms": ms(raft.election_timeout_min),
                "election_timeout_max_ms": ms(raft.election_timeout_max),
            },
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "load_average_before": load[0],
            "load_average_after": load[1],
            "kv": bins.kv.display().to_string(),
            "clusterfunk": bins.clusterfunk.display().to_string(),
        },
    })
}

/// Parses the options, runs everything, prints and writes the results.
fn run(options: Options) -> Result<(), String> {
    if options.nodes < 3 {
        return Err("--nodes must be at least 3 (a leader kill needs a quorum left)".into());
    }
    let bins = Binaries::beside_current_exe(true).map_err(|e| e.to_string())?;
    watch_interrupt(PROGRAM);
    let launch = Launch::new(PROGRAM, bins.clone(), &options.node)?;
    let mut harness = Harness::new(launch, options.nodes, options.node.keep_dir)?;
    let load_before = load_average();
    println!(
        "raft_timing: {} voters, {} kills, {} membership changes; nodes in {} (RUST_LOG={}); load average {}",
        options.nodes,
        options.kills,
        options.changes,
        harness.path().display(),
        options.node.rust_log,
        load_before.as_deref().unwrap_or("?")
    );
    let mut results = Results::default();
    let outcome = runtime()?.block_on(measure(&mut harness, &options, &mut results));
    results.error = stopped_early(PROGRAM, &outcome);
    let load_after = load_average();
    print_summary(&results, &options);
    println!(
        "load average after: {}",
        load_after.as_deref().unwrap_or("?")
    );
    if let Some(path) = &options.json {
        let document = to_json(&results, &options, &bins, [load_before, load_after]);
        write_json(path, &document)?;
    }
    drop(harness);
    outcome
}

/// Runs the measurements; exit code 1 on any error (the cause is printed).
fn main() -> ExitCode {
    exit_code(PROGRAM, run(Options::parse()))
}
