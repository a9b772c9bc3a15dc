//! Values under faults: a workload of unique writes and of reads runs on in-process nodes (see
//! `inproc`) while a seeded schedule partitions nodes, blackholes single directions of links,
//! pauses nodes, kills them and restarts them from disk; then everything heals, and two checks
//! run over the whole history:
//!
//! - one owner per shard (the harness's checker), which now also covers the whole run of every
//!   handler that replied with success, from its delivery to its completion;
//! - reads never go back: a read that starts after a write was acknowledged returns that value
//!   or a later one, unless the shard's state was lost in between because a node holding it
//!   crashed (was killed) or was marked down (its lease expired): then the shard restarts empty
//!   by design, and only that shard's reads spanning the loss are excused.
//!
//! Seeds: without `VALUES_SEEDS` the test runs 3 fixed seeds ([`DEFAULT_SEEDS`]);
//! `VALUES_SEEDS=S` replays seed S, `VALUES_SEEDS=A..B` runs seeds A to B-1, and
//! `VALUES_SEEDS=S1,S2,..` a list. `VALUES_PARALLEL=K` runs K schedules at once (default 1;
//! a schedule mostly waits, so 3 at once fit two cores). A thousand schedules took 20 minutes
//! on a two-core machine:
//!
//! ```text
//! VALUES_SEEDS=0..1000 VALUES_PARALLEL=3 cargo test --release --test values -- --nocapture
//! ```
//!
//! Which shard states a crash or a mark-down lost is decided from facts outside the nodes'
//! serving: the kills the schedule made, and the exact map history (owners and `down` list at
//! every map epoch, every mark-down), replayed from the raft log after the nodes stopped; a
//! watcher that polls every node's map while the schedule runs dates the kills in map epochs
//! and must agree with the log.
//!
//! A schedule replays exactly from its seed; thread timing does not, so a failure may need a few
//! replays. `CLUSTERFUNK_TEST_LOG=<filter>` turns the nodes' logs on. No test asserts how long
//! anything takes.

// Each test file uses a part of the harness.
#[allow(dead_code)]
mod inproc;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clusterfunk::internals::{ClusterState, TypeConfig};
use clusterfunk::shard_map::{shard_for, Epoch};
use clusterfunk::storage::{LmdbStore, StoreOptions};
use clusterfunk::{Error, NodeId, ServeEvent, ServeEventKind, ShardId};
use inproc::{
    Get, Put, Recorder, SendError, Served, SlowGet, SlowPut, SplitMix64, TestCluster, DEADLINE,
    SHARD_COUNT,
};
use openraft::storage::RaftLogStorage;
use openraft::{Entry, EntryPayload, RaftLogReader};

/// Keys the workload writes, one writer each, so that each key's values increase with time.
const KEYS: usize = 12;

/// Tasks that read random keys through random nodes.
const READERS: usize = 6;

/// The nodes' `request_timeout` in these tests: short, so that a request lost in a blackhole
/// ends soon and a schedule stays short.
const NODE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the map watcher looks at every node's map and status.
const WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Bound on the operations of one workload task.
const OPERATIONS_MAX: u64 = 100_000;

/// Seeds run when `VALUES_SEEDS` is not set (CI): fixed, so every CI run checks the same
/// schedules; the long command explores more.
const DEFAULT_SEEDS: [u64; 3] = [3, 47, 532];

/// The name of workload key `key`.
fn key_name(key: usize) -> String {
    format!("value-{key}")
}

/// Locks `mutex`, ignoring poisoning (a failed schedule must still report).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The history
// ---------------------------------------------------------------------------------------------

/// How a write ended.
#[derive(Debug, Clone)]
enum WriteOutcome {
    /// Acknowledged: the reply arrived at `at` (the client saw it no later).
    Acked { at: Instant, served: Served },
    /// Refused with an error that says the write did not take effect (not ready, overloaded,
    /// shutting down, wrong owner).
    Refused(String),
    /// Failed in a way that leaves the outcome open (timeout, outcome unknown, unreachable,
    /// the node killed meanwhile): it may take effect at any time after it was sent.
    Unknown(String),
}

/// One write of the workload.
#[derive(Debug, Clone)]
struct WriteRecord {
    /// The workload key.
    key: usize,
    /// Its shard.
    shard: ShardId,
    /// The value written: unique per key, increasing with every write of the key.
    value: u64,
    /// The node the request went through.
    via: NodeId,
    /// Whether it went to the `async` handler (`SlowPut`) rather than the plain one (`Put`).
    is_async: bool,
    /// When it was sent (the client sent it no earlier).
    invoked: Instant,
    /// When its answer arrived (the client saw it no later).
    finished: Instant,
    /// How it ended.
    outcome: WriteOutcome,
}

impl WriteRecord {
    fn acked(&self) -> Option<(Instant, Served)> {
        match &self.outcome {
            WriteOutcome::Acked { at, served } => Some((*at, *served)),
            _ => None,
        }
    }

    /// One line for reports, with times in milliseconds since `base`.
    fn describe(&self, base: Instant) -> String {
        let message = if self.is_async { "SlowPut" } else { "Put" };
        let outcome = match &self.outcome {
            WriteOutcome::Acked { at, served } => format!(
                "acknowledged at {:.3} ms, served by node {} under epoch {}",
                millis(base, *at),
                served.node,
                served.epoch
            ),
            WriteOutcome::Refused(error) => format!("refused: {error}"),
            WriteOutcome::Unknown(error) => format!("outcome unknown: {error}"),
        };
        format!(
            "{message} of value {} to key {} (shard {}) through node {}, sent at {:.3} ms, {outcome}",
            self.value,
            key_name(self.key),
            self.shard,
            self.via,
            millis(base, self.invoked)
        )
    }
}

/// Milliseconds from `base` to `at`, for reports.
fn millis(base: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(base).as_secs_f64() * 1000.0
}

/// One successful read of the workload.
#[derive(Debug, Clone)]
struct ReadRecord {
    /// The workload key.
    key: usize,
    /// Its shard.
    shard: ShardId,
    /// The node the request went through.
    via: NodeId,
    /// Whether it went to the `async` handler (`SlowGet`) rather than the plain one (`Get`).
    is_async: bool,
    /// When it was sent (the client sent it no earlier).
    started: Instant,
    /// When its reply arrived (the client saw it no later).
    finished: Instant,
    /// The reply: who served it, under which epoch, and the value read.
    served: Served,
}

impl ReadRecord {
    /// One line for reports, with times in milliseconds since `base`.
    fn describe(&self, base: Instant) -> String {
        format!(
            "{} of key {} (shard {}) through node {}, {:.3}-{:.3} ms, served by node {} under epoch {}: {:?}",
            if self.is_async { "SlowGet" } else { "Get" },
            key_name(self.key),
            self.shard,
            self.via,
            millis(base, self.started),
            millis(base, self.finished),
            self.served.node,
            self.served.epoch,
            self.served.value
        )
    }
}

/// One kill of a node.
#[derive(Debug, Clone)]
struct KillRecord {
    /// The node.
    node: NodeId,
    /// When the kill began (the node still ran).
    began: Instant,
    /// When the node's thread had ended.
    ended: Instant,
    /// When its restart began, if it was restarted.
    restarted: Option<Instant>,
}

/// What the map watcher saw of one map epoch. Every node applies the same state at an epoch,
/// so the first observation stands for all.
#[derive(Debug, Clone, Default)]
struct EpochView {
    /// The owner of every shard, if a node reported its map at this epoch.
    owners: Option<Vec<NodeId>>,
    /// The members marked down, if a node reported its status at this epoch.
    down: Option<BTreeSet<NodeId>>,
}

/// The map epochs of a schedule: what the watcher saw while it ran (and when), and the exact
/// history replayed from the raft log after it ([`replay_log`]).
#[derive(Debug, Default)]
struct MapHistory {
    /// Every map epoch: replayed from the log, or as the watcher saw it if the replay failed.
    epochs: BTreeMap<Epoch, EpochView>,
    /// What the watcher saw of each epoch.
    watched: BTreeMap<Epoch, EpochView>,
    /// Every observation of the watcher: when, which epoch.
    seen: Vec<(Instant, Epoch)>,
    /// Every mark-down replayed from the log: the node, the map epoch before and after it.
    replayed_markdowns: Option<Vec<(NodeId, Epoch, Epoch)>>,
    /// Observations that disagreed with another one, or with the log, for the same epoch.
    anomalies: Vec<String>,
}

impl MapHistory {
    fn owners(&mut self, at: Instant, epoch: Epoch, owners: Vec<NodeId>) {
        self.seen.push((at, epoch));
        let view = self.watched.entry(epoch).or_default();
        match &view.owners {
            None => view.owners = Some(owners),
            Some(known) if *known != owners && self.anomalies.len() < 10 => self.anomalies.push(
                format!("epoch {epoch}: owners {owners:?} differ from the owners seen before"),
            ),
            Some(_) => {}
        }
    }

    fn down(&mut self, at: Instant, epoch: Epoch, down: BTreeSet<NodeId>) {
        self.seen.push((at, epoch));
        let view = self.watched.entry(epoch).or_default();
        match &view.down {
            None => view.down = Some(down),
            Some(known) if *known != down && self.anomalies.len() < 10 => self.anomalies.push(
                format!("epoch {epoch}: down {down:?} differs from {known:?} seen before"),
            ),
            Some(_) => {}
        }
    }

    /// Takes the history replayed from the log as the truth, after checking that everything
    /// the watcher saw agrees with it.
    fn install_replay(
        &mut self,
        epochs: BTreeMap<Epoch, EpochView>,
        markdowns: Vec<(NodeId, Epoch, Epoch)>,
    ) {
        /// Whether what was seen (if anything) is what the log says.
        fn agrees<T: PartialEq>(seen: &Option<T>, logged: Option<&Option<T>>) -> bool {
            seen.is_none() || logged.is_some_and(|logged| logged == seen)
        }
        for (epoch, seen) in &self.watched {
            let logged = epochs.get(epoch);
            if !agrees(&seen.owners, logged.map(|l| &l.owners))
                || !agrees(&seen.down, logged.map(|l| &l.down))
            {
                self.anomalies.push(format!(
                    "epoch {epoch}: a node reported {seen:?}, the log says {logged:?}"
                ));
            }
        }
        self.epochs = epochs;
        self.replayed_markdowns = Some(markdowns);
    }

    /// Falls back on what the watcher saw (the log could not be replayed).
    fn use_watched(&mut self) {
        self.epochs = self.watched.clone();
    }

    /// The newest epoch seen at or before `at` (0 if none).
    fn newest_by(&self, at: Instant) -> Epoch {
        self.seen
            .iter()
            .filter(|(seen, _)| *seen <= at)
            .map(|(_, epoch)| *epoch)
            .max()
            .unwrap_or(0)
    }

    /// The shards whose state `node` may have held at some epoch in `low..=high`: those it owns
    /// in any map seen in that range (widened to the nearest maps seen outside it), and, where
    /// epochs between two maps seen went unseen, those whose owner changed across the gap (they
    /// may have passed through `node` unseen).
    fn held_by(&self, node: NodeId, low: Epoch, high: Epoch) -> BTreeSet<ShardId> {
        let maps: Vec<(Epoch, &Vec<NodeId>)> = self
            .epochs
            .iter()
            .filter_map(|(epoch, view)| view.owners.as_ref().map(|owners| (*epoch, owners)))
            .collect();
        let mut shards = BTreeSet::new();
        if maps.is_empty() {
            return shards;
        }
        let first = maps.iter().rposition(|(e, _)| *e <= low).unwrap_or(0);
        let last = maps
            .iter()
            .position(|(e, _)| *e >= high)
            .unwrap_or(maps.len() - 1)
            .max(first);
        for index in first..=last {
            let (epoch, owners) = maps[index];
            shards.extend(
                owners
                    .iter()
                    .enumerate()
                    .filter(|(_, owner)| **owner == node)
                    .map(|(shard, _)| shard as ShardId),
            );
            if index > first {
                let (previous_epoch, previous) = maps[index - 1];
                if epoch > previous_epoch + 1 {
                    shards.extend(
                        owners
                            .iter()
                            .zip(previous.iter())
                            .enumerate()
                            .filter(|(_, (now, before))| now != before)
                            .map(|(shard, _)| shard as ShardId),
                    );
                }
            }
        }
        shards
    }

    /// Every mark-down: the node, the newest epoch with it up, and the first with it down (the
    /// mark-down happened in between). Exact when replayed from the log; otherwise inferred from
    /// the epochs seen (a mark-down undone before the watcher saw it is missed).
    fn markdowns(&self) -> Vec<(NodeId, Epoch, Epoch)> {
        if let Some(markdowns) = &self.replayed_markdowns {
            return markdowns.clone();
        }
        let mut last: BTreeMap<NodeId, (Epoch, bool)> = BTreeMap::new();
        let mut found = Vec::new();
        let nodes: BTreeSet<NodeId> = self
            .epochs
            .values()
            .filter_map(|view| view.owners.as_ref())
            .flat_map(|owners| owners.iter().copied())
            .chain(
                self.epochs
                    .values()
                    .filter_map(|view| view.down.as_ref())
                    .flat_map(|down| down.iter().copied()),
            )
            .collect();
        for (epoch, view) in &self.epochs {
            let Some(down) = &view.down else { continue };
            for &node in &nodes {
                let is_down = down.contains(&node);
                if is_down && last.get(&node).is_some_and(|(_, was_down)| !was_down) {
                    found.push((node, last[&node].0, *epoch));
                }
                last.insert(node, (*epoch, is_down));
            }
        }
        found
    }
}

/// Everything a schedule records for the checks.
#[derive(Default)]
struct Log {
    /// Every write, in the order they ended.
    writes: Mutex<Vec<WriteRecord>>,
    /// Every successful read, in the order they ended.
    reads: Mutex<Vec<ReadRecord>>,
    /// Failed reads, by error.
    read_errors: Mutex<BTreeMap<String, u64>>,
    /// Every kill of a node.
    kills: Mutex<Vec<KillRecord>>,
    /// When links were blocked (or a node restarted with blocked links): see [`check_reads`]
    /// on why refusals around these moments prove nothing.
    blocks: Mutex<Vec<Instant>>,
    /// What the map watcher saw.
    maps: Mutex<MapHistory>,
}

// ---------------------------------------------------------------------------------------------
// The value checker
// ---------------------------------------------------------------------------------------------

/// Why a shard's state may have been lost, by design.
#[derive(Debug, Clone)]
enum LossCause {
    /// A node that held it was killed between `began` and `ended`.
    Killed {
        /// The node.
        node: NodeId,
        /// When the kill began.
        began: Instant,
        /// When the node had stopped.
        ended: Instant,
    },
    /// A node that held it was marked down at an epoch in `after + 1..=by`.
    MarkedDown {
        /// The node.
        node: NodeId,
        /// The newest epoch seen with the node up.
        after: Epoch,
        /// The first epoch seen with the node down.
        by: Epoch,
    },
}

impl LossCause {
    /// One line for reports, with times in milliseconds since `base`.
    fn describe(&self, base: Instant) -> String {
        match *self {
            LossCause::Killed { node, began, ended } => format!(
                "node {node} killed at {:.3}-{:.3} ms",
                millis(base, began),
                millis(base, ended)
            ),
            LossCause::MarkedDown { node, after, by } => {
                format!("node {node} marked down after epoch {after}, by epoch {by}")
            }
        }
    }
}

/// A possible loss of the state of some shards.
#[derive(Debug, Clone)]
struct Loss {
    /// Why.
    cause: LossCause,
    /// The shards whose state the node held (see [`MapHistory::held_by`]).
    shards: BTreeSet<ShardId>,
}

impl Loss {
    /// Whether this loss falls between the acknowledged write `write` (served under
    /// `write_epoch`) and the read `read`, for the read's shard.
    fn spans(&self, write: &WriteRecord, write_epoch: Epoch, read: &ReadRecord) -> bool {
        if !self.shards.contains(&read.shard) {
            return false;
        }
        match self.cause {
            // The write took effect after it was sent; the read was served before it finished.
            LossCause::Killed { began, ended, .. } => {
                began < read.finished && ended > write.invoked
            }
            // The write was served before the mark-down (a down node serves nothing, and it
            // served under an epoch before it); the read after it, under its epoch or a later
            // one (the new owner got the shard with the mark-down).
            LossCause::MarkedDown { after, by, .. } => {
                write_epoch < by && read.served.epoch > after
            }
        }
    }
}

/// The possible losses of state: every kill (the shards the killed node held from its kill to
/// its restart) and every mark-down (the shards the node held when it was marked down).
fn losses(maps: &MapHistory, kills: &[KillRecord], end: Instant) -> Vec<Loss> {
    let mut losses: Vec<Loss> = kills
        .iter()
        .map(|kill| {
            let low = maps.newest_by(kill.began);
            let high = maps.newest_by(kill.restarted.unwrap_or(end));
            Loss {
                cause: LossCause::Killed {
                    node: kill.node,
                    began: kill.began,
                    ended: kill.ended,
                },
                shards: maps.held_by(kill.node, low, high),
            }
        })
        .collect();
    losses.extend(maps.markdowns().into_iter().map(|(node, after, by)| Loss {
        cause: LossCause::MarkedDown { node, after, by },
        shards: maps.held_by(node, after, by),
    }));
    losses
}

/// What the value check saw.
#[derive(Debug, Default, Clone)]
struct ValueSummary {
    /// Writes acknowledged.
    writes_acked: usize,
    /// Writes refused (did not take effect).
    writes_refused: usize,
    /// Writes whose outcome is unknown.
    writes_unknown: usize,
    /// Refusals that count as outcome unknown because a link was blocked meanwhile.
    refusals_around_blocks: usize,
    /// Writes that went through the `async` handler.
    writes_async: usize,
    /// The errors of the writes not acknowledged, by kind.
    write_errors: BTreeMap<String, usize>,
    /// Reads checked.
    reads: usize,
    /// Reads that started after some write of their key was acknowledged.
    reads_after_ack: usize,
    /// Reads that returned an older value than the newest acknowledged one, or none, and were
    /// excused by a loss of their shard's state in between.
    reads_excused_by_loss: usize,
    /// Reads that returned an older value whose write's outcome was unknown (it may have
    /// taken effect late, after newer writes).
    reads_of_late_unknown_writes: usize,
    /// Reads that went through the `async` handler.
    reads_async: usize,
}

/// What the value check found.
#[derive(Debug, Default)]
struct ValueReport {
    /// What was checked.
    summary: ValueSummary,
    /// A description of each violation.
    violations: Vec<String>,
    /// The shards of the violations, each with the time span its evidence lies in.
    shards: BTreeMap<ShardId, (Instant, Instant)>,
    /// The first few reads of an older value whose write's outcome was unknown (allowed, and
    /// rare enough to be worth a look).
    late_reads: Vec<String>,
}

impl ValueReport {
    fn violation(&mut self, shard: ShardId, from: Instant, to: Instant, text: String) {
        let span = self.shards.entry(shard).or_insert((from, to));
        *span = (span.0.min(from), span.1.max(to));
        self.violations.push(text);
    }
}

/// Checks every read against the writes of its key: the value read was written (sent before
/// the read finished, and not refused), and a read that started after a write was
/// acknowledged returns that value or a later one (or an older one whose write's outcome is
/// unknown), unless a loss of its shard's state falls in between. Every acknowledgement must
/// also report the value written. Times in reports are milliseconds since `base`.
///
/// A refusal proves nothing for a write that was in flight when a link was blocked (`blocks`):
/// the fault injector fails the requests in flight on a blocked connection with `Unreachable`
/// although they were sent, and the router takes `Unreachable` for "never sent", so it may
/// answer `NotReady` for a write the owner applied. Such writes count as outcome unknown.
fn check_reads(
    writes: &[WriteRecord],
    reads: &[ReadRecord],
    losses: &[Loss],
    blocks: &[Instant],
    base: Instant,
) -> ValueReport {
    let mut report = ValueReport::default();
    let mut by_key: BTreeMap<usize, BTreeMap<u64, WriteRecord>> = BTreeMap::new();
    for write in writes {
        let mut write = write.clone();
        if matches!(write.outcome, WriteOutcome::Refused(_))
            && blocks
                .iter()
                .any(|at| write.invoked <= *at && *at <= write.finished)
        {
            report.summary.refusals_around_blocks += 1;
            if let WriteOutcome::Refused(error) = write.outcome {
                write.outcome = WriteOutcome::Unknown(format!("{error} (in flight at a block)"));
            }
        }
        let write = &write;
        by_key
            .entry(write.key)
            .or_default()
            .insert(write.value, write.clone());
        let summary = &mut report.summary;
        summary.writes_async += usize::from(write.is_async);
        match &write.outcome {
            WriteOutcome::Acked { at, served } => {
                summary.writes_acked += 1;
                if served.value != Some(write.value) || served.shard != write.shard {
                    report.violation(
                        write.shard,
                        write.invoked,
                        *at,
                        format!(
                            "an acknowledgement reports value {:?} on shard {}: {}",
                            served.value,
                            served.shard,
                            write.describe(base)
                        ),
                    );
                }
            }
            WriteOutcome::Refused(error) | WriteOutcome::Unknown(error) => {
                if matches!(write.outcome, WriteOutcome::Refused(_)) {
                    summary.writes_refused += 1;
                } else {
                    summary.writes_unknown += 1;
                }
                let kind: String = error
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '(')
                    .collect();
                *summary.write_errors.entry(kind).or_default() += 1;
            }
        }
    }
    let empty = BTreeMap::new();
    for read in reads {
        report.summary.reads += 1;
        report.summary.reads_async += usize::from(read.is_async);
        let key_writes = by_key.get(&read.key).unwrap_or(&empty);
        let value = read.served.value;
        if read.served.shard != read.shard {
            report.violation(
                read.shard,
                read.started,
                read.finished,
                format!("served by the wrong shard: {}", read.describe(base)),
            );
        }
        if let Some(value) = value {
            match key_writes.get(&value) {
                None => report.violation(
                    read.shard,
                    read.started,
                    read.finished,
                    format!("read a value never written: {}", read.describe(base)),
                ),
                Some(write) if write.invoked > read.finished => report.violation(
                    read.shard,
                    read.started,
                    write.invoked,
                    format!(
                        "read a value before it was written:\n    read:  {}\n    write: {}",
                        read.describe(base),
                        write.describe(base)
                    ),
                ),
                Some(write) if matches!(write.outcome, WriteOutcome::Refused(_)) => report
                    .violation(
                        read.shard,
                        write.invoked,
                        read.finished,
                        format!(
                        "a write refused as not applied took effect:\n    write: {}\n    read:  {}",
                        write.describe(base),
                        read.describe(base)
                    ),
                    ),
                Some(_) => {}
            }
        }
        // The newest write of the key acknowledged before the read began (one writer per key
        // writes increasing values, so it is the acknowledged one with the highest value).
        let Some((write, write_epoch)) = key_writes.values().rev().find_map(|w| {
            w.acked()
                .filter(|(at, _)| *at < read.started)
                .map(|(_, s)| (w, s.epoch))
        }) else {
            continue;
        };
        report.summary.reads_after_ack += 1;
        match value {
            Some(value) if value >= write.value => continue,
            Some(value)
                if key_writes
                    .get(&value)
                    .is_some_and(|w| matches!(w.outcome, WriteOutcome::Unknown(_))) =>
            {
                report.summary.reads_of_late_unknown_writes += 1;
                if report.late_reads.len() < 5 {
                    report.late_reads.push(format!(
                        "{}\n      after: {}\n      wrote: {}",
                        read.describe(base),
                        write.describe(base),
                        key_writes[&value].describe(base)
                    ));
                }
                continue;
            }
            _ => {}
        }
        if losses
            .iter()
            .any(|loss| loss.spans(write, write_epoch, read))
        {
            report.summary.reads_excused_by_loss += 1;
            continue;
        }
        let other_losses: Vec<String> = losses
            .iter()
            .filter(|loss| loss.shards.contains(&read.shard))
            .map(|loss| loss.cause.describe(base))
            .collect();
        report.violation(
            read.shard,
            write.invoked,
            read.finished,
            format!(
                "a read went back: it began after a write was acknowledged, and returned {value:?}, with no crash or mark-down of a node holding shard {} in between\n    write: {}\n    read:  {}\n    losses of this shard's state at other times: {other_losses:?}",
                read.shard,
                write.describe(base),
                read.describe(base)
            ),
        );
    }
    report
}

// ---------------------------------------------------------------------------------------------
// The workload and the map watcher
// ---------------------------------------------------------------------------------------------

/// Whether `error` says the request did not take effect.
fn refused(error: &SendError) -> bool {
    matches!(
        error,
        SendError::Node(
            Error::NotReady { .. }
                | Error::Overloaded { .. }
                | Error::ShuttingDown
                | Error::WrongOwner { .. }
        )
    )
}

/// Writes increasing values to one key through random running nodes until stopped, half of
/// them through the `async` handler with a short random sleep.
async fn write_loop(
    cluster: Arc<TestCluster>,
    log: Arc<Log>,
    key: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = SplitMix64::new(seed ^ (key as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let name = key_name(key);
    let shard = shard_for(name.as_bytes(), SHARD_COUNT);
    for value in 1..=OPERATIONS_MAX {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Some(via) = pick_running(&cluster, &mut rng) else {
            // A skipped value keeps the values unique and increasing.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let is_async = rng.chance(50);
        let millis = rng.below(20);
        let invoked = Instant::now();
        let result = if is_async {
            cluster.send(via, &name, SlowPut { value, millis }).await
        } else {
            cluster.send(via, &name, Put { value }).await
        };
        let finished = Instant::now();
        let pause = match &result {
            Err(SendError::NotRunning) => Duration::from_millis(20),
            _ => rng.millis(2, 8),
        };
        let outcome = match result {
            Ok(served) => WriteOutcome::Acked {
                at: finished,
                served,
            },
            Err(error) if refused(&error) => WriteOutcome::Refused(format!("{error:?}")),
            Err(error) => WriteOutcome::Unknown(format!("{error:?}")),
        };
        lock(&log.writes).push(WriteRecord {
            key,
            shard,
            value,
            via,
            is_async,
            invoked,
            finished,
            outcome,
        });
        tokio::time::sleep(pause).await;
    }
}

/// A random running node, if any runs.
fn pick_running(cluster: &TestCluster, rng: &mut SplitMix64) -> Option<NodeId> {
    let running = cluster.running_ids();
    (!running.is_empty()).then(|| running[rng.below(running.len() as u64) as usize])
}

/// Reads random keys through random running nodes until stopped, some through the `async`
/// handler.
async fn read_loop(cluster: Arc<TestCluster>, log: Arc<Log>, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = SplitMix64::new(seed);
    for _ in 0..OPERATIONS_MAX {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let key = rng.below(KEYS as u64) as usize;
        let Some(via) = pick_running(&cluster, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let is_async = rng.chance(30);
        let millis = rng.below(20);
        let name = key_name(key);
        let started = Instant::now();
        let result = if is_async {
            cluster.send(via, &name, SlowGet { millis }).await
        } else {
            cluster.send(via, &name, Get).await
        };
        let finished = Instant::now();
        match result {
            Ok(served) => lock(&log.reads).push(ReadRecord {
                key,
                shard: shard_for(name.as_bytes(), SHARD_COUNT),
                via,
                is_async,
                started,
                finished,
                served,
            }),
            Err(error) => {
                let text: String = format!("{error:?}").chars().take(60).collect();
                *lock(&log.read_errors).entry(text).or_default() += 1;
                if error == SendError::NotRunning {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        tokio::time::sleep(rng.millis(2, 8)).await;
    }
}

/// Looks at every running node's map and status once, and records what it saw.
async fn watch_once(cluster: &TestCluster, log: &Log) {
    for id in cluster.running_ids() {
        if let Some(status) = cluster.status(id) {
            if status.epoch > 0 {
                let down = status.down.iter().copied().collect();
                lock(&log.maps).down(Instant::now(), status.epoch, down);
            }
        }
        if let Some((epoch, owners)) = cluster.shards(id).await {
            lock(&log.maps).owners(Instant::now(), epoch, owners);
        }
    }
}

/// The background tasks of a schedule: writers, readers and the map watcher.
struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    fn start(cluster: &Arc<TestCluster>, log: &Arc<Log>, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for key in 0..KEYS {
            tasks.push(tokio::spawn(write_loop(
                cluster.clone(),
                log.clone(),
                key,
                seed,
                stop.clone(),
            )));
        }
        for reader in 0..READERS {
            tasks.push(tokio::spawn(read_loop(
                cluster.clone(),
                log.clone(),
                seed ^ (0x5eed_0000 + reader as u64),
                stop.clone(),
            )));
        }
        let (cluster, log, watching) = (cluster.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !watching.load(Ordering::Acquire) {
                watch_once(&cluster, &log).await;
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
        }));
        Workload { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for task in self.tasks {
            task.await.expect("a workload task panicked");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The schedules
// ---------------------------------------------------------------------------------------------

/// The seeds to run (see the file's documentation).
fn seeds() -> Vec<u64> {
    let Ok(text) = std::env::var("VALUES_SEEDS") else {
        return DEFAULT_SEEDS.to_vec();
    };
    let number = |part: &str| -> u64 {
        part.trim().parse().unwrap_or_else(|_| {
            panic!("VALUES_SEEDS must be S, A..B or S1,S2,..; {part:?} is not a number")
        })
    };
    match text.split_once("..") {
        Some((low, high)) => (number(low)..number(high)).collect(),
        None => text.split(',').map(number).collect(),
    }
}

/// One step of a schedule.
#[derive(Debug, Clone)]
enum Step {
    /// Heal, then cut one node off from all others (requests fail at once).
    Isolate(NodeId),
    /// Heal, then cut the link between two nodes both ways.
    CutLink(NodeId, NodeId),
    /// Heal, then block one node's requests to another.
    OneWay(NodeId, NodeId),
    /// Lose every frame one node sends to another (on top of the current faults).
    Blackhole(NodeId, NodeId),
    /// Lose every frame between two nodes, both ways (on top of the current faults).
    BlackholeLink(NodeId, NodeId),
    /// Heal, then lose every frame to and from one node.
    BlackholeNode(NodeId),
    /// Slow one node's requests to another down.
    Slow(NodeId, NodeId, Duration),
    /// Heal, then split the nodes into two sides.
    Split(Vec<NodeId>, Vec<NodeId>),
    /// Freeze a node for a while.
    Pause(NodeId, Duration),
    /// Kill a running node.
    Kill(NodeId),
    /// Restart a killed node from its disk.
    Restart(NodeId),
    /// End every fault of the links.
    Heal,
}

/// Picks the next step given which nodes run.
fn next_step(rng: &mut SplitMix64, ids: &[NodeId], running: &[NodeId]) -> Step {
    let pick = |rng: &mut SplitMix64, from: &[NodeId]| from[rng.below(from.len() as u64) as usize];
    let pair = |rng: &mut SplitMix64| {
        let a = pick(rng, ids);
        let others: Vec<NodeId> = ids.iter().copied().filter(|&b| b != a).collect();
        (a, pick(rng, &others))
    };
    let dead: Vec<NodeId> = ids
        .iter()
        .copied()
        .filter(|id| !running.contains(id))
        .collect();
    match rng.below(100) {
        0..=8 => Step::Isolate(pick(rng, ids)),
        9..=14 => {
            let (a, b) = pair(rng);
            Step::CutLink(a, b)
        }
        15..=20 => {
            let (a, b) = pair(rng);
            Step::OneWay(a, b)
        }
        21..=31 => {
            let (a, b) = pair(rng);
            Step::Blackhole(a, b)
        }
        32..=38 => {
            let (a, b) = pair(rng);
            Step::BlackholeLink(a, b)
        }
        39..=48 => Step::BlackholeNode(pick(rng, ids)),
        49..=52 => {
            let (a, b) = pair(rng);
            Step::Slow(a, b, rng.millis(20, 300))
        }
        53..=58 if ids.len() > 3 => {
            let (side, rest): (Vec<NodeId>, Vec<NodeId>) =
                ids.iter().copied().partition(|_| rng.chance(50));
            if side.is_empty() || rest.is_empty() {
                Step::Heal
            } else {
                Step::Split(side, rest)
            }
        }
        59..=68 => Step::Pause(pick(rng, ids), rng.millis(200, 1200)),
        69..=82 if running.len() > 1 => Step::Kill(pick(rng, running)),
        83..=93 if !dead.is_empty() => Step::Restart(pick(rng, &dead)),
        _ => Step::Heal,
    }
}

/// Kills node `id`, recording the kill (and the maps just before it).
async fn kill(cluster: &TestCluster, log: &Log, id: NodeId) {
    watch_once(cluster, log).await;
    let began = Instant::now();
    cluster.kill(id).await;
    lock(&log.kills).push(KillRecord {
        node: id,
        began,
        ended: Instant::now(),
        restarted: None,
    });
}

/// Restarts the killed node `id`, recording when (and the maps just before).
async fn restart(cluster: &TestCluster, log: &Log, id: NodeId) {
    watch_once(cluster, log).await;
    if let Some(kill) = lock(&log.kills)
        .iter_mut()
        .rev()
        .find(|kill| kill.node == id && kill.restarted.is_none())
    {
        kill.restarted = Some(Instant::now());
    }
    cluster.restart(id).await;
}

/// Runs one seeded schedule on a fresh cluster and checks single owner, liveness, convergence
/// and values after it. Panics with the seed and the evidence on a violation.
async fn run_schedule(seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let nodes = if rng.chance(20) { 5 } else { 3 };
    let steps = 3 + rng.below(4);
    println!(
        "=== values seed {seed}: {nodes} nodes, {steps} steps (replay with VALUES_SEEDS={seed})"
    );
    let cluster = TestCluster::start_with(&format!("values-{seed}"), nodes, |config| {
        config.request_timeout = NODE_REQUEST_TIMEOUT;
    })
    .await;
    let log = Arc::new(Log::default());
    let workload = Workload::start(&cluster, &log, seed);
    let history = &*log;
    cluster
        .wait_until(
            "every key has an acknowledged write",
            DEADLINE,
            move || async move {
                let writes = lock(&history.writes);
                let keys: BTreeSet<usize> = writes
                    .iter()
                    .filter(|w| w.acked().is_some())
                    .map(|w| w.key)
                    .collect();
                (keys.len() == KEYS).then_some(())
            },
        )
        .await;
    let ids = cluster.ids();
    for number in 1..=steps {
        let step = next_step(&mut rng, &ids, &cluster.running_ids());
        // Mostly long enough for leases to lapse and failover to run, sometimes quick flaps.
        let dwell = if rng.chance(30) {
            rng.millis(20, 150)
        } else {
            rng.millis(150, 1200)
        };
        println!(
            "seed {seed} step {number} at {:.0} ms: {step:?}, then wait {dwell:?}",
            cluster.recorder().millis(Instant::now())
        );
        if matches!(
            step,
            Step::Isolate(_)
                | Step::CutLink(..)
                | Step::OneWay(..)
                | Step::Split(..)
                | Step::Restart(_)
        ) {
            lock(&log.blocks).push(Instant::now());
        }
        match &step {
            Step::Isolate(id) => {
                cluster.heal();
                cluster.isolate(*id);
            }
            Step::CutLink(a, b) => {
                cluster.heal();
                cluster.partition(&[*a], &[*b]);
            }
            Step::OneWay(a, b) => {
                cluster.heal();
                cluster.block(*a, *b);
            }
            Step::Blackhole(a, b) => cluster.blackhole(*a, *b),
            Step::BlackholeLink(a, b) => {
                cluster.blackhole(*a, *b);
                cluster.blackhole(*b, *a);
            }
            Step::BlackholeNode(id) => {
                cluster.heal();
                for other in ids.iter().copied().filter(|other| other != id) {
                    cluster.blackhole(*id, other);
                    cluster.blackhole(other, *id);
                }
            }
            Step::Slow(a, b, delay) => cluster.slow(*a, *b, *delay),
            Step::Split(a, b) => {
                cluster.heal();
                cluster.partition(a, b);
            }
            Step::Pause(id, duration) => cluster.pause(*id, *duration).await,
            Step::Kill(id) => kill(&cluster, &log, *id).await,
            Step::Restart(id) => restart(&cluster, &log, *id).await,
            Step::Heal => cluster.heal(),
        }
        // The dwell is part of the schedule (how long a fault lasts), not a synchronisation.
        tokio::time::sleep(dwell).await;
    }
    println!("seed {seed}: healing and checking");
    cluster.heal();
    for id in ids.iter().copied() {
        if !cluster.running_ids().contains(&id) {
            restart(&cluster, &log, id).await;
        }
    }
    // The workload keeps running while the cluster recovers: the planned moves back to
    // returning nodes carry the values too.
    cluster.heal_and_check(&format!("values seed {seed}")).await;
    workload.stop().await;
    final_reads(&cluster, &log).await;
    watch_once(&cluster, &log).await;
    // Stop every node (after the history: these kills lose nothing the checks look at) and
    // replay the raft log, so that every map epoch and every mark-down is known exactly.
    for id in cluster.running_ids() {
        cluster.kill(id).await;
    }
    match replay_log(&cluster).await {
        Ok((epochs, markdowns)) => lock(&log.maps).install_replay(epochs, markdowns),
        Err(why) => {
            println!("seed {seed}: cannot replay the raft log ({why}); checking with the maps the watcher saw");
            lock(&log.maps).use_watched();
        }
    }
    check_values(seed, &cluster, &log);
}

/// Reads the raft log of every (stopped) node and replays the longest one, up to the highest
/// committed index any node stored, through the product's own state machine
/// (`ClusterState::apply`): the exact owners and `down` list at every map epoch, and every
/// mark-down with the map epochs before and after it. Fails if a log was purged (the replay
/// would need the snapshot).
async fn replay_log(
    cluster: &TestCluster,
) -> Result<(BTreeMap<Epoch, EpochView>, Vec<(NodeId, Epoch, Epoch)>), String> {
    let mut longest: Vec<Entry<TypeConfig>> = Vec::new();
    let mut committed = None;
    for id in cluster.ids() {
        let (entries, stored) = read_log(&cluster.data_dir(id))
            .await
            .map_err(|why| format!("node {id}: {why}"))?;
        committed = committed.max(stored);
        if entries.len() > longest.len() {
            longest = entries;
        }
    }
    let down_of = |state: &ClusterState| -> BTreeSet<NodeId> {
        state
            .members
            .iter()
            .filter(|(_, member)| member.down)
            .map(|(id, _)| *id)
            .collect()
    };
    let mut state = ClusterState::default();
    let mut epochs = BTreeMap::new();
    let mut markdowns = Vec::new();
    for entry in longest
        .iter()
        .filter(|entry| committed.is_none_or(|index| entry.log_id.index <= index))
    {
        let (epoch_before, down_before) = (state.map_epoch(), down_of(&state));
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(command) => {
                let _ = state.apply(command);
            }
            EntryPayload::Membership(membership) => state.apply_membership(
                membership.nodes().map(|(id, node)| (*id, node)),
                membership.voter_ids(),
            ),
        }
        let down = down_of(&state);
        for node in down.difference(&down_before) {
            markdowns.push((*node, epoch_before, state.map_epoch()));
        }
        if let Some(map) = &state.map {
            epochs.insert(
                map.epoch,
                EpochView {
                    owners: Some(map.shards.clone()),
                    down: Some(down),
                },
            );
        }
    }
    Ok((epochs, markdowns))
}

/// The raft log stored in `dir` and the committed index stored with it. Retries opening while
/// the killed node's environment is still closing.
async fn read_log(dir: &Path) -> Result<(Vec<Entry<TypeConfig>>, Option<u64>), String> {
    let deadline = Instant::now() + DEADLINE;
    let store = loop {
        let path = dir.to_path_buf();
        let options = StoreOptions {
            map_size_bytes: 64 << 20,
            sync: false,
        };
        match tokio::task::spawn_blocking(move || LmdbStore::open(&path, options)).await {
            Ok(Ok(store)) => break store,
            Ok(Err(error)) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(Err(error)) => return Err(format!("cannot open the store: {error}")),
            Err(error) => return Err(format!("the opening task failed: {error}")),
        }
    };
    let mut log = store.log_store::<TypeConfig>();
    let state = log.get_log_state().await.map_err(|e| e.to_string())?;
    if let Some(purged) = state.last_purged_log_id {
        return Err(format!("the log was purged up to index {}", purged.index));
    }
    let Some(last) = state.last_log_id else {
        return Ok((Vec::new(), None));
    };
    let committed = log
        .read_committed()
        .await
        .map_err(|e| e.to_string())?
        .map(|id| id.index);
    let mut entries: Vec<Entry<TypeConfig>> = Vec::new();
    let mut next = 0;
    while next <= last.index {
        // Reads stop after a few MiB: page through the log.
        let page = log
            .try_get_log_entries(next..=last.index)
            .await
            .map_err(|e| e.to_string())?;
        let Some(tail) = page.last() else { break };
        next = tail.log_id.index + 1;
        entries.extend(page);
    }
    Ok((entries, committed))
}

/// Reads every key through every node once (retrying errors), as the last reads of the history.
async fn final_reads(cluster: &TestCluster, log: &Log) {
    for id in cluster.ids() {
        for key in 0..KEYS {
            let name = key_name(key);
            let (started, served, finished) = cluster
                .wait_until(
                    &format!("{name} can be read through node {id}"),
                    DEADLINE,
                    || {
                        let name = name.clone();
                        async move {
                            let started = Instant::now();
                            let served = cluster.send(id, &name, Get).await.ok()?;
                            Some((started, served, Instant::now()))
                        }
                    },
                )
                .await;
            lock(&log.reads).push(ReadRecord {
                key,
                shard: shard_for(name.as_bytes(), SHARD_COUNT),
                via: id,
                is_async: false,
                started,
                finished,
                served,
            });
        }
    }
}

/// Runs the value check over the schedule's history and fails the test with the evidence.
fn check_values(seed: u64, cluster: &TestCluster, log: &Log) {
    let writes = lock(&log.writes).clone();
    let reads = lock(&log.reads).clone();
    let kills = lock(&log.kills).clone();
    let maps = lock(&log.maps);
    let losses = losses(&maps, &kills, Instant::now());
    let recorder = cluster.recorder();
    // Times print as milliseconds since the recorder's start, as the harness prints them.
    let base = recorder.base();
    let blocks = lock(&log.blocks).clone();
    let report = check_reads(&writes, &reads, &losses, &blocks, base);
    let loss_lines: Vec<String> = losses
        .iter()
        .map(|loss| {
            format!(
                "{}, holding shards {:?}",
                loss.cause.describe(base),
                loss.shards
            )
        })
        .collect();
    let mut violations = report.violations.clone();
    violations.extend(
        maps.anomalies
            .iter()
            .map(|anomaly| format!("the maps the nodes reported disagree: {anomaly}")),
    );
    if !violations.is_empty() {
        let mut evidence = String::new();
        for (shard, (from, to)) in &report.shards {
            evidence.push_str(&format!(
                "  maps seen for shard {shard} (epoch: owner, down):\n"
            ));
            for (epoch, view) in maps.epochs.iter() {
                evidence.push_str(&format!(
                    "    {epoch}: {:?} {:?}\n",
                    view.owners.as_ref().map(|owners| owners[*shard as usize]),
                    view.down
                ));
            }
            evidence.push_str(&shard_events(recorder, *shard, *from, *to));
        }
        panic!(
            "values seed {seed} (replay with VALUES_SEEDS={seed}): {} violation(s):\n{}\n  losses ({}): {loss_lines:#?}\n{evidence}",
            violations.len(),
            violations.iter().take(8).cloned().collect::<Vec<_>>().join("\n"),
            if maps.replayed_markdowns.is_some() { "exact, from the raft log" } else { "from the maps the watcher saw" },
        );
    }
    for late in &report.late_reads {
        println!("seed {seed}: a read returned an older value whose write's outcome was unknown:\n    {late}");
    }
    println!(
        "seed {seed}: values hold: {:?}; {} map epochs ({} seen while running){}; losses: {loss_lines:?}; read errors {:?}",
        report.summary,
        maps.epochs.len(),
        maps.watched.len(),
        if maps.replayed_markdowns.is_some() { "" } else { " (log not replayed)" },
        lock(&log.read_errors)
    );
}

/// The serve events of `shard` from a little before `from` to a little after `to`, one per
/// line; of each run of deliveries and completions by one node under one epoch only the first
/// and the last are shown.
fn shard_events(recorder: &Recorder, shard: ShardId, from: Instant, to: Instant) -> String {
    let margin = Duration::from_millis(300);
    let (from, to) = (from.checked_sub(margin).unwrap_or(from), to + margin);
    let events: Vec<ServeEvent> = recorder
        .events()
        .into_iter()
        .filter(|e| e.shard == shard && e.at >= from && e.at <= to)
        .collect();
    let mut text = format!(
        "  serve events of shard {shard} from {:.3} ms to {:.3} ms:\n",
        recorder.millis(from),
        recorder.millis(to)
    );
    let same_run = |a: &ServeEvent, b: Option<&ServeEvent>| {
        let routine = |e: &ServeEvent| {
            matches!(
                e.kind,
                ServeEventKind::Delivered | ServeEventKind::Completed
            )
        };
        b.is_some_and(|b| routine(a) && routine(b) && a.node == b.node && a.epoch == b.epoch)
    };
    let mut skipped = 0usize;
    for (index, event) in events.iter().enumerate() {
        let previous = index.checked_sub(1).and_then(|i| events.get(i));
        if same_run(event, previous) && same_run(event, events.get(index + 1)) {
            skipped += 1;
            continue;
        }
        if skipped > 0 {
            text.push_str(&format!("      ... {skipped} more like these\n"));
            skipped = 0;
        }
        text.push_str(&format!(
            "    {:>10.3} ms node {} epoch {} {:?}\n",
            recorder.millis(event.at),
            event.node,
            event.epoch,
            event.kind
        ));
    }
    text
}

#[tokio::test]
async fn reads_never_go_back_under_partitions_blackholes_pauses_and_crashes() {
    // Goal: under partitions, one-way blocks, blackholed links and nodes (frames lost without
    // an error), slow links, paused nodes, kills and restarts from disk, no acknowledged write
    // is lost or overtaken by an older value unless a node holding its shard crashed or was
    // marked down, and no two nodes ever run handlers of one shard at once (from delivery to a
    // successful completion). Method: per seed, a fresh cluster (3 nodes, 5 for some seeds);
    // one writer per key writes increasing values through random nodes (plain `Put` and
    // `async` `SlowPut`), readers read random keys (`Get`, `async` `SlowGet`), and a watcher
    // records every map and `down` list it sees; a random schedule of 3–6 fault steps with
    // dwells of 20 ms–1.2 s runs meanwhile; then everything heals, killed nodes restart, the
    // harness checks liveness, convergence and single owner, and every key is read through
    // every node. Last, the nodes stop and their raft log is replayed for the exact map
    // history (which must agree with what the watcher saw), and the value checker compares
    // every read with the newest write of its key acknowledged before the read began, excusing
    // only reads of shards whose holder was killed or marked down in between. Each seed prints
    // itself; VALUES_SEEDS replays it.
    let seeds = seeds();
    let parallel: usize = std::env::var("VALUES_PARALLEL")
        .ok()
        .map(|n| n.trim().parse().expect("VALUES_PARALLEL must be a number"))
        .unwrap_or(1)
        .max(1);
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    let mut failed: Vec<u64> = Vec::new();
    let mut passed = 0usize;
    let mut record = |outcome: Result<u64, (u64, String)>| match outcome {
        Ok(_) => passed += 1,
        Err((seed, why)) => {
            eprintln!("values seed {seed} FAILED: {why}");
            failed.push(seed);
        }
    };
    for seed in seeds.iter().copied() {
        while running.len() >= parallel {
            if let Some(joined) = running.join_next().await {
                record(joined.expect("the schedule task is not cancelled"));
            }
        }
        running.spawn(async move {
            let task = tokio::spawn(run_schedule(seed));
            task.await.map(|()| seed).map_err(|error| {
                let why = match error.try_into_panic() {
                    Ok(panic) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                    Err(error) => error.to_string(),
                };
                (seed, why.lines().next().unwrap_or_default().to_string())
            })
        });
    }
    while let Some(joined) = running.join_next().await {
        record(joined.expect("the schedule task is not cancelled"));
    }
    println!(
        "values: {passed} of {} schedules passed in {:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "values: {} schedule(s) failed; replay each with VALUES_SEEDS=<seed>: {failed:?}",
        failed.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The checkers are not vacuous
// ---------------------------------------------------------------------------------------------

#[test]
fn the_single_owner_checker_flags_a_delivery_during_a_completed_handler_run() {
    // Goal: the interval part of the single-owner check catches what the per-delivery parts
    // cannot. Method: synthetic events of one shard: node 1 runs an `async` handler under epoch
    // 3 from 10 ms to 30 ms and completes it; node 2 delivers under the newer epoch 4 at 20 ms
    // (no per-delivery rule breaks: node 2's epoch is newer). That must be reported; the same
    // history where node 1's reply was withheld (no Completed), or where node 1 completed
    // before node 2 delivered, must pass.
    let recorder = Recorder::new();
    let start = Instant::now();
    let event = |node: NodeId, epoch: u64, millis: u64, kind: ServeEventKind| ServeEvent {
        node,
        shard: 9,
        epoch,
        at: start + Duration::from_millis(millis),
        kind,
    };
    use ServeEventKind::{Activated, Completed, Delivered};
    let overlapping = vec![
        event(1, 3, 0, Activated),
        event(1, 3, 10, Delivered),
        event(2, 4, 19, Activated),
        event(2, 4, 20, Delivered),
        event(2, 4, 21, Completed),
        event(1, 3, 30, Completed),
    ];
    let found = recorder.violations(&overlapping);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("node 2 delivered under epoch 4")
            && found[0].contains("while node 1 was still running a handler"),
        "{}",
        found[0]
    );

    let withheld: Vec<ServeEvent> = overlapping
        .iter()
        .copied()
        .filter(|e| !(e.node == 1 && e.kind == Completed))
        .collect();
    assert_eq!(recorder.violations(&withheld), Vec::<String>::new());

    let sequential = vec![
        event(1, 3, 10, Delivered),
        event(1, 3, 15, Completed),
        event(2, 4, 20, Delivered),
        event(2, 4, 21, Completed),
    ];
    assert_eq!(recorder.violations(&sequential), Vec::<String>::new());
}

#[test]
fn the_value_checker_flags_stale_reads_and_excuses_only_shards_that_lost_their_holder() {
    // Goal: the value checker reports a read that goes back, and excuses one only when a node
    // holding that read's shard crashed or was marked down in between. Method: synthetic
    // history with two keys on shards 0 (owned by node 1) and 1 (owned by node 2): value 2 is
    // acknowledged on both, then node 1 is killed; a later read of each returns value 1. The
    // read of shard 0 is excused (its holder crashed), the read of shard 1 is reported. Then
    // the same with a mark-down of node 2 between the epochs of write and read (excused), a
    // read of an older write whose outcome is unknown (allowed), a read of a refused write
    // (reported, unless a link was blocked while it was in flight) and of a value never
    // written (reported).
    let t0 = Instant::now();
    let at = |millis: u64| t0 + Duration::from_millis(millis);
    let served = |node: NodeId, epoch: Epoch, shard: ShardId, value: Option<u64>| Served {
        node,
        epoch,
        shard,
        value,
    };
    let write = |key: usize, value: u64, millis: u64, outcome: WriteOutcome| WriteRecord {
        key,
        shard: key as ShardId,
        value,
        via: 1,
        is_async: false,
        invoked: at(millis),
        finished: at(millis + 1),
        outcome,
    };
    let acked = |key: usize, value: u64, millis: u64, epoch: Epoch| {
        let node = key as NodeId + 1;
        write(
            key,
            value,
            millis,
            WriteOutcome::Acked {
                at: at(millis + 1),
                served: served(node, epoch, key as ShardId, Some(value)),
            },
        )
    };
    let read =
        |key: usize, millis: u64, node: NodeId, epoch: Epoch, value: Option<u64>| ReadRecord {
            key,
            shard: key as ShardId,
            via: node,
            is_async: false,
            started: at(millis),
            finished: at(millis + 1),
            served: served(node, epoch, key as ShardId, value),
        };
    let mut maps = MapHistory::default();
    maps.owners(at(0), 5, vec![1, 2]);
    maps.down(at(0), 5, BTreeSet::new());
    maps.use_watched();
    let writes = vec![
        acked(0, 1, 10, 5),
        acked(0, 2, 20, 5),
        acked(1, 1, 10, 5),
        acked(1, 2, 20, 5),
    ];
    let kills = vec![KillRecord {
        node: 1,
        began: at(30),
        ended: at(31),
        restarted: Some(at(40)),
    }];
    let losses_seen = losses(&maps, &kills, at(100));
    let reads = vec![read(0, 50, 1, 5, Some(1)), read(1, 50, 2, 5, Some(1))];
    let report = check_reads(&writes, &reads, &losses_seen, &[], t0);
    let (summary, found) = (report.summary, report.violations);
    assert_eq!(summary.reads_excused_by_loss, 1, "{summary:?}");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("shard 1") && found[0].contains("went back"),
        "{}",
        found[0]
    );

    // Node 2 marked down at epoch 6 (its shard 1 moves to node 1 with empty state).
    maps.owners(at(60), 6, vec![1, 1]);
    maps.down(at(60), 6, BTreeSet::from([2]));
    maps.use_watched();
    let losses_seen = losses(&maps, &kills, at(100));
    let found = check_reads(&writes, &[read(1, 70, 1, 6, None)], &losses_seen, &[], t0).violations;
    assert_eq!(
        found,
        Vec::<String>::new(),
        "a mark-down of the holder excuses"
    );
    let found = check_reads(&writes, &[read(1, 70, 2, 5, None)], &losses_seen, &[], t0).violations;
    assert_eq!(
        found.len(),
        1,
        "a read under the old epoch is not excused: {found:?}"
    );

    // An older write with an unknown outcome may take effect late; a refused one never.
    let mut writes = writes;
    writes.insert(2, write(1, 3, 22, WriteOutcome::Unknown("Timeout".into())));
    writes.push(acked(1, 4, 30, 5));
    writes.push(write(1, 5, 40, WriteOutcome::Refused("NotReady".into())));
    let report = check_reads(&writes, &[read(1, 50, 2, 5, Some(3))], &[], &[], t0);
    assert_eq!(
        (
            report.summary.reads_of_late_unknown_writes,
            report.violations.len()
        ),
        (1, 0),
        "{report:?}"
    );
    let found = check_reads(&writes, &[read(1, 50, 2, 5, Some(5))], &[], &[], t0).violations;
    assert!(found[0].contains("refused"), "{found:?}");
    // Unless a link was blocked while it was in flight (see `check_reads`).
    let report = check_reads(&writes, &[read(1, 50, 2, 5, Some(5))], &[], &[at(40)], t0);
    assert_eq!(
        (
            report.summary.refusals_around_blocks,
            report.violations.len()
        ),
        (1, 0),
        "{report:?}"
    );
    let found = check_reads(&writes, &[read(1, 50, 2, 5, Some(9))], &[], &[], t0).violations;
    assert!(found[0].contains("never written"), "{found:?}");
}
