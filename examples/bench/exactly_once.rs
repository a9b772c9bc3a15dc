//! The bench's `exactly_once` scenario: counter increments from clients that send each request
//! again under its id until it is acknowledged, through faults, on `kv serve` nodes with a
//! durable store (PostgreSQL, then LMDB restarted in place); the final counts must equal the
//! acknowledged increments. Also the cost of the session record: the same steady load with
//! numbered and with unnumbered requests. See the module docs of `bench.rs` for what it
//! measures. The `kv` cluster machinery (start, settle, the timed faults with their probes, the
//! read-back) is `durable_failover`'s, in the `postgres` module.

use std::sync::Mutex;

use clusterfunk::client::{CallOptions, ClientError};
use clusterfunk::shard_map::shard_for;
use tracing::Instrument;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::postgres::{
    counter_value, fault_report, lock, read_all, start_kv, KvCluster, KvFault, Observer, Reads,
};
use super::support::kv_api::Incr;
use super::*;

/// The deadline of one send of the fault load: shorter than a failover, so that a send
/// outstanding across a fault runs out and the requester sends the request again itself (with
/// the client's default of 10 s, the client's own retries within the send absorb every fault).
const SEND_DEADLINE: Duration = Duration::from_millis(250);
/// Longest one increment is sent again before it is given up (which fails the run).
const RETRY_FOR: Duration = Duration::from_secs(60);
/// Most attempts of one increment.
const ATTEMPTS_MAX: u32 = 2_000;
/// Pause before sending again a request that was refused or found no node (the cluster may be
/// down or moving); one whose outcome is unknown is sent again at once.
const REFUSED_PAUSE: Duration = Duration::from_millis(50);
/// Most failed attempts whose time a ledger keeps (for the counts per fault).
const FAILED_ATTEMPTS_MAX: usize = 1_000_000;
/// Reasons kept of the increments given up.
const REASONS_MAX: usize = 10;
/// Pairs of slices (one numbered, one unnumbered) of the record's cost measurement.
const COST_PAIRS: usize = 3;
/// The database of the PostgreSQL phase on the bench's own server.
const DATABASE: &str = "bench_exactly_once";
/// Load on the LMDB cluster before it is killed whole.
const LOAD_BEFORE_KILL: Duration = Duration::from_secs(2);
/// How long the whole LMDB cluster stays down.
const DOWN_FOR: Duration = Duration::from_millis(500);
/// The span each send of the loads runs in, so that the client's own retries of the load's
/// requests are told from the probes', and each send learns whether it had any.
const LOAD_SPAN: &str = "exactly_once_increment";
/// The `Client`'s debug event (target `clusterfunk::client`) when it sends a numbered request
/// again under its id, inside one `send`, after an attempt whose outcome is unknown.
const CLIENT_RETRY_EVENT: &str = "outcome unknown; sending the request again under its id";
/// The field of a scenario's JSON that says why its checks failed (the run then exits
/// non-zero, after the table).
pub(super) const FAILED_FIELD: &str = "failed";

// ---------------------------------------------------------------------------------------------
// The requesters and what they saw

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Its outcome is unknown (`OutcomeUnknown`, `Timeout`): sent again at once.
    Unknown,
    /// Refused, or no node could be reached (the cluster is down or moving): sent again after
    /// [`REFUSED_PAUSE`]. The request may have reached a node in an earlier attempt of the call,
    /// so a retry under its id is the only safe way on.
    Refused,
    /// Final for this id (`RequestIdReused`, `RequestTooOld`, `SessionExpired`, a handler's
    /// error, ...): the increment is given up.
    Final,
}

impl Failure {
    fn of(error: &ClientError) -> Failure {
        if error.is_outcome_unknown() {
            return Failure::Unknown;
        }
        match error {
            ClientError::Unreachable(_)
            | ClientError::Cluster(
                Error::NotReady { .. }
                | Error::Overloaded { .. }
                | Error::ShuttingDown
                | Error::Unreachable { .. },
            ) => Failure::Refused,
            _ => Failure::Final,
        }
    }
}

/// What the requesters of one load saw, per counter and in total.
#[derive(Debug, Default)]
struct OnceLedger {
    /// Per counter: the count each of its acknowledged increments answered.
    replies: Vec<Vec<u64>>,
    /// Per counter: its increments given up (their outcome unknown).
    gave_up: Vec<u64>,
    /// Requests sent again after an attempt whose outcome was unknown.
    retries_unknown: u64,
    /// Requests sent again after a refusal or an unreachable cluster.
    retries_refused: u64,
    /// Increments acknowledged after more than one attempt.
    retried_increments: u64,
    /// Sends that failed with an error whose outcome is not flagged unknown
    /// (`is_outcome_unknown()` false: no node reachable, not ready, ...) although the client
    /// had sent the request again within the send after an attempt whose outcome was unknown:
    /// the request may have been applied, which the error does not say.
    unknown_not_said: u64,
    /// Each failed attempt: when it ended and how it failed (at most [`FAILED_ATTEMPTS_MAX`]).
    failed_attempts: Vec<(Instant, Failure)>,
    failed_attempts_truncated: bool,
    /// Failed attempts by error (numbers masked).
    attempt_errors: BTreeMap<String, u64>,
    /// Why increments were given up (the first [`REASONS_MAX`]).
    reasons: Vec<String>,
}

impl OnceLedger {
    fn new(counters: usize) -> Self {
        OnceLedger {
            replies: vec![Vec::new(); counters],
            gave_up: vec![0; counters],
            ..OnceLedger::default()
        }
    }

    fn acknowledged(&self) -> u64 {
        self.replies.iter().map(|r| r.len() as u64).sum()
    }

    fn given_up(&self) -> u64 {
        self.gave_up.iter().sum()
    }

    fn failed_attempt(&mut self, failure: Failure, error: &ClientError) {
        if self.failed_attempts.len() < FAILED_ATTEMPTS_MAX {
            self.failed_attempts.push((Instant::now(), failure));
        } else {
            self.failed_attempts_truncated = true;
        }
        add_error_kind(&mut self.attempt_errors, error_kind(&error.to_string()), 1);
    }

    /// The failed attempts that ended in `[from, to]`: outcome unknown, refused, final.
    fn failed_between(&self, from: Instant, to: Instant) -> (u64, u64, u64) {
        let mut counts = (0, 0, 0);
        for (at, failure) in &self.failed_attempts {
            if *at < from || *at > to {
                continue;
            }
            match failure {
                Failure::Unknown => counts.0 += 1,
                Failure::Refused => counts.1 += 1,
                Failure::Final => counts.2 += 1,
            }
        }
        counts
    }
}

/// Counts the `Client`'s own retries of the fault load's requests ([`CLIENT_RETRY_EVENT`] in a
/// [`LOAD_SPAN`]), which happen inside one `send` and never reach the requesters; keeps when
/// each happened (at most [`FAILED_ATTEMPTS_MAX`]) and in which send's span.
#[derive(Clone, Default)]
struct ClientRetries {
    at: Arc<Mutex<Vec<Instant>>>,
    /// The spans (ids) of the sends in which the client sent the request again.
    sends: Arc<Mutex<std::collections::HashSet<u64>>>,
}

impl ClientRetries {
    /// Whether the client sent the request again within the send of `span` (asked once, before
    /// the span closes and its id may be reused).
    fn took_place_in(&self, span: &tracing::Span) -> bool {
        span.id()
            .is_some_and(|id| lock(&self.sends).remove(&id.into_u64()))
    }

    fn count(&self) -> usize {
        lock(&self.at).len()
    }

    fn between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.at)
            .iter()
            .filter(|at| **at >= from && **at <= to)
            .count()
    }
}

impl<S> Layer<S> for ClientRetries
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
        /// Whether the event's message is [`CLIENT_RETRY_EVENT`].
        struct IsRetry(bool);
        impl tracing::field::Visit for IsRetry {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}") == CLIENT_RETRY_EVENT;
                }
            }
        }
        if event.metadata().target() != "clusterfunk::client" {
            return;
        }
        let mut retry = IsRetry(false);
        event.record(&mut retry);
        if !retry.0 {
            return;
        }
        let send = ctx
            .event_scope(event)
            .and_then(|mut scope| scope.find(|span| span.name() == LOAD_SPAN));
        if let Some(send) = send {
            lock(&self.sends).insert(send.id().into_u64());
            let mut at = lock(&self.at);
            if at.len() < FAILED_ATTEMPTS_MAX {
                at.push(Instant::now());
            }
        }
    }
}

/// While alive, [`ClientRetries`] counts on this thread (the load's and the client's).
fn count_client_retries(retries: &ClientRetries) -> tracing::subscriber::DefaultGuard {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("clusterfunk::client", tracing::Level::DEBUG)
        .with_target(module_path!(), tracing::Level::INFO);
    tracing::subscriber::set_default(
        tracing_subscriber::registry().with(retries.clone().with_filter(filter)),
    )
}

/// One requester: increments the counters of its [`KeySlice`] in turn, each as one request sent
/// until acknowledged ([`increment`]).
struct OnceRequester {
    client: Client,
    keys: Arc<Vec<String>>,
    slice: KeySlice,
    sending: Sending,
    index: u16,
    ledger: Arc<Mutex<OnceLedger>>,
    retries: ClientRetries,
    last: CallFacts,
}

impl Requester for OnceRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let counter = self.slice.next();
        let key = self.keys[counter].as_str();
        self.last = CallFacts {
            shard: shard_for(key.as_bytes(), SHARD_COUNT),
            idempotent: false,
            outcome_unknown: false,
            requester: self.index,
        };
        let result = increment(&self.client, key, self.sending, &self.ledger, &self.retries).await;
        let mut ledger = lock(&self.ledger);
        match result {
            Ok(count) => {
                ledger.replies[counter].push(count);
                Ok(())
            }
            Err((reason, unknown)) => {
                ledger.gave_up[counter] += 1;
                if ledger.reasons.len() < REASONS_MAX {
                    ledger.reasons.push(format!("{key}: {reason}"));
                }
                self.last.outcome_unknown = unknown;
                Err(reason)
            }
        }
    }

    fn last_call(&self) -> CallFacts {
        self.last
    }
}

/// How a load sends its increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sending {
    /// Whether the requests carry their id (else `numbered(false)`: no record, no re-send).
    numbered: bool,
    /// The deadline of one send (`None`: the client's, [`REQUEST_TIMEOUT`]).
    deadline: Option<Duration>,
}

impl Sending {
    fn options(self) -> CallOptions {
        let options = CallOptions::new().numbered(self.numbered);
        match self.deadline {
            Some(deadline) => options.deadline(deadline),
            None => options,
        }
    }
}

/// Increments `key` by one as one request ([`Client::request`]), sent (numbered) again under
/// its id after an attempt whose outcome is unknown or that was refused, until it is
/// acknowledged, for at most [`RETRY_FOR`] and [`ATTEMPTS_MAX`] attempts; an unnumbered one is
/// sent once. Returns the count it answered, or why it was given up (and whether its outcome is
/// unknown).
async fn increment(
    client: &Client,
    key: &str,
    sending: Sending,
    ledger: &Mutex<OnceLedger>,
    retries: &ClientRetries,
) -> Result<u64, (String, bool)> {
    let request = client
        .request(key, Incr { by: 1 })
        .map_err(|e| (e.to_string(), false))?;
    let options = sending.options();
    let started = Instant::now();
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let span = tracing::info_span!(LOAD_SPAN);
        let sent = request.send_with(options).instrument(span.clone()).await;
        let retried_within = retries.took_place_in(&span);
        let error = match sent {
            Ok(Some(count)) => {
                if attempts > 1 {
                    lock(ledger).retried_increments += 1;
                }
                return Ok(count);
            }
            Ok(None) => return Err((format!("{key} does not hold a number"), false)),
            Err(error) => error,
        };
        let failure = Failure::of(&error);
        let unknown = failure != Failure::Final || attempts > 1;
        let give_up = if failure == Failure::Final || !sending.numbered {
            Some(format!("attempt {attempts}: {error}"))
        } else if started.elapsed() >= RETRY_FOR || attempts >= ATTEMPTS_MAX || interrupted() {
            Some(format!(
                "not acknowledged after {attempts} attempts in {:.1} s: {error}",
                started.elapsed().as_secs_f64()
            ))
        } else {
            None
        };
        {
            let mut seen = lock(ledger);
            seen.failed_attempt(failure, &error);
            if retried_within && failure != Failure::Unknown {
                seen.unknown_not_said += 1;
            }
            match (&give_up, failure) {
                (Some(_), _) => {}
                (None, Failure::Unknown) => seen.retries_unknown += 1,
                (None, _) => seen.retries_refused += 1,
            }
        }
        if let Some(reason) = give_up {
            return Err((reason, unknown));
        }
        if failure == Failure::Refused {
            tokio::time::sleep(REFUSED_PAUSE).await;
        }
    }
}

/// `concurrency` requesters on `keys`, sharing `client`.
fn requesters(
    client: &Client,
    keys: &Arc<Vec<String>>,
    sending: Sending,
    ledger: &Arc<Mutex<OnceLedger>>,
    retries: &ClientRetries,
    concurrency: usize,
) -> Vec<OnceRequester> {
    (0..concurrency)
        .map(|r| OnceRequester {
            client: client.clone(),
            keys: keys.clone(),
            slice: KeySlice::of(r, concurrency, keys.len()),
            sending,
            index: r as u16,
            ledger: ledger.clone(),
            retries: retries.clone(),
            last: CallFacts::default(),
        })
        .collect()
}

/// The counters of a load: one key per shard, named after `prefix`, so that every node owns a
/// third of them (with 3 nodes) whatever the map (with fewer counters, a map reshaped by the
/// restarts can leave a node none).
fn counter_keys(prefix: &str) -> Result<Arc<Vec<String>>, String> {
    let keys = keys_per_shard(prefix, SHARD_COUNT)
        .ok_or_else(|| format!("no {prefix} key for some shard"))?;
    Ok(Arc::new(keys))
}

// ---------------------------------------------------------------------------------------------
// The read-back

/// What the read-back says of one ledger's counters.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdict {
    counters: usize,
    /// Acknowledged increments missing: a counter below its acknowledged increments (or below
    /// the highest count one of them answered).
    lost: u64,
    /// Increments a counter holds beyond its acknowledged and given-up ones: applied twice.
    duplicated: u64,
    /// Given-up increments that landed (a counter above its acknowledged increments, within
    /// its given-up ones).
    gave_up_landed: u64,
    /// Acknowledged increments that answered a count another one of the same counter answered
    /// too (each should see its own).
    repeated_replies: u64,
    /// Counters whose reads through different nodes disagree.
    disagreeing: u64,
    /// Counters that could not be read (through some node).
    unreadable: u64,
    /// The first problems, in words.
    examples: Vec<String>,
}

impl Verdict {
    fn problems(&self) -> u64 {
        self.lost + self.duplicated + self.repeated_replies + self.disagreeing + self.unreadable
    }

    fn note(&mut self, problem: String) {
        if self.examples.len() < REASONS_MAX {
            self.examples.push(problem);
        }
    }
}

/// Compares the counters of `ledger` (named `keys`) with their values read back through each
/// node (`reads`).
fn judge(keys: &[String], ledger: &OnceLedger, reads: &[(NodeId, Reads)]) -> Verdict {
    let mut verdict = Verdict {
        counters: keys.len(),
        ..Verdict::default()
    };
    for (counter, key) in keys.iter().enumerate() {
        let mut values = Vec::new();
        let mut unreadable = None;
        for (node, read) in reads {
            match counter_value(read, key) {
                Ok(value) => values.push(value),
                Err(problem) => unreadable = Some(format!("through node {node}: {problem}")),
            }
        }
        if let Some(problem) = unreadable {
            verdict.unreadable += 1;
            verdict.note(problem);
            continue;
        }
        let (Some(&low), Some(&high)) = (values.iter().min(), values.iter().max()) else {
            continue;
        };
        if low != high {
            verdict.disagreeing += 1;
            verdict.note(format!("{key} reads {values:?} through the nodes"));
        }
        let mut replies = ledger.replies[counter].clone();
        replies.sort_unstable();
        let acknowledged = replies.len() as u64;
        let highest = replies.last().copied().unwrap_or(0);
        let repeated = replies.windows(2).filter(|w| w[0] == w[1]).count() as u64;
        let gave_up = ledger.gave_up[counter];
        let floor = acknowledged.max(highest);
        if low < floor {
            verdict.lost += floor - low;
            verdict.note(format!(
                "{key} holds {low}, but {acknowledged} increments were acknowledged (the \
                 highest answered {highest})"
            ));
        }
        if high > acknowledged + gave_up {
            verdict.duplicated += high - acknowledged - gave_up;
            verdict.note(format!(
                "{key} holds {high}, above its {acknowledged} acknowledged and {gave_up} given-up \
                 increments"
            ));
        }
        verdict.gave_up_landed += high.saturating_sub(acknowledged).min(gave_up);
        if repeated > 0 {
            verdict.repeated_replies += repeated;
            verdict.note(format!(
                "{key}: {repeated} acknowledged increments answered a count another one answered"
            ));
        }
    }
    verdict
}

// ---------------------------------------------------------------------------------------------
// One phase: a cluster on one store

/// The store of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// `kv serve --store postgres://…`: faults of single nodes, the survivors take over.
    Postgres,
    /// `kv serve --store lmdb`: node-local, so the whole cluster is killed and restarted in
    /// place.
    Lmdb,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::Lmdb => "lmdb",
        }
    }
}

/// The faults of a phase, timed.
enum Faults {
    /// The PostgreSQL phase's: each fault with its timing.
    Nodes(Vec<(KvFault, Kill)>),
    /// The LMDB phase's: the whole cluster killed and restarted in place.
    Whole(WholeRestart),
}

/// The LMDB phase's whole-cluster kill.
struct WholeRestart {
    /// The settled map before the kill and after the restart: (epoch, owners).
    before: (u64, Vec<NodeId>),
    after: (u64, Vec<NodeId>),
    t_kill: Instant,
    t_restart: Instant,
    t_settled: Instant,
}

/// The record's cost in one phase: the steady load's slices, numbered and unnumbered.
#[derive(Debug, Default)]
struct Cost {
    numbered: Vec<Summary>,
    unnumbered: Vec<Summary>,
}

impl Cost {
    fn median(summaries: &[Summary], figure: impl Fn(&Summary) -> Option<f64>) -> Option<f64> {
        let series = Series {
            values: summaries.iter().filter_map(figure).collect(),
            failures: Vec::new(),
        };
        series.quantile(0.5)
    }

    fn rate(summaries: &[Summary]) -> Option<f64> {
        Cost::median(summaries, |s| Some(s.throughput_rps))
    }

    fn cpu(summaries: &[Summary]) -> Option<f64> {
        Cost::median(summaries, |s| s.cpu_us_per_request)
    }

    /// Numbered increments/s over unnumbered (medians of the slices).
    fn ratio(&self) -> Option<f64> {
        let (numbered, unnumbered) = (Cost::rate(&self.numbered)?, Cost::rate(&self.unnumbered)?);
        (unnumbered > 0.0).then(|| numbered / unnumbered)
    }

    fn cpu_ratio(&self) -> Option<f64> {
        let (numbered, unnumbered) = (Cost::cpu(&self.numbered)?, Cost::cpu(&self.unnumbered)?);
        (unnumbered > 0.0).then(|| numbered / unnumbered)
    }

    fn errors(&self) -> u64 {
        self.numbered
            .iter()
            .chain(&self.unnumbered)
            .map(|s| s.errors)
            .sum()
    }

    fn to_json(&self) -> Value {
        let rates = |s: &[Summary]| s.iter().map(|s| s.throughput_rps).collect::<Vec<_>>();
        let cpus = |s: &[Summary]| s.iter().map(|s| s.cpu_us_per_request).collect::<Vec<_>>();
        json!({
            "numbered_increments_per_s": rates(&self.numbered),
            "unnumbered_increments_per_s": rates(&self.unnumbered),
            "numbered_increments_per_s_median": Cost::rate(&self.numbered),
            "unnumbered_increments_per_s_median": Cost::rate(&self.unnumbered),
            "ratio": self.ratio().map(round3),
            "numbered_cpu_us_per_increment": cpus(&self.numbered),
            "unnumbered_cpu_us_per_increment": cpus(&self.unnumbered),
            "cpu_ratio": self.cpu_ratio().map(round3),
            "numbered_p50_us_median": Cost::median(&self.numbered, |s| Some(s.p50_us)),
            "unnumbered_p50_us_median": Cost::median(&self.unnumbered, |s| Some(s.p50_us)),
            "errors": self.errors(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "numbered {} increments/s, unnumbered {} (medians of {COST_PAIRS} slices each): \
             {} ×; CPU per increment {} µs vs {} µs: {} ×",
            fmt_rate(Cost::rate(&self.numbered)),
            fmt_rate(Cost::rate(&self.unnumbered)),
            self.ratio().map_or("-".into(), |r| format!("{r:.3}")),
            fmt_rate(Cost::cpu(&self.numbered)),
            fmt_rate(Cost::cpu(&self.unnumbered)),
            self.cpu_ratio().map_or("-".into(), |r| format!("{r:.3}")),
        )
    }
}

fn fmt_rate(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

/// What one phase gave.
struct Phase {
    store: Store,
    /// The fault load's.
    summary: Summary,
    figures: serde_json::Map<String, Value>,
    notes: Vec<String>,
    /// What fails the run, in words.
    problems: Vec<String>,
    lost: u64,
    duplicated: u64,
    given_up: u64,
    /// Requests sent again after an unknown outcome, by the client and by the requesters.
    retries_unknown: u64,
    /// Whether every counter (the probes' too) read back exactly as acknowledged (up to the
    /// given-up increments), the same through every node.
    counts_equal: bool,
    cost_ratio: Option<f64>,
}

/// The processes whose CPU the cost measurement counts: this one, the nodes, and the
/// PostgreSQL server's (`extra`).
fn cost_pids(harness: &Harness, extra: &[u32]) -> Vec<u32> {
    std::iter::once(std::process::id())
        .chain(harness.nodes.iter().filter_map(|n| n.pid()))
        .chain(extra.iter().copied())
        .collect()
}

/// The record's cost: [`COST_PAIRS`] pairs of slices of `--seconds` (after `--warmup-seconds`
/// each) of the steady load on `keys`, numbered and unnumbered in turn, alternating which goes
/// first.
async fn record_cost(
    options: &Options,
    client: &Client,
    keys: &Arc<Vec<String>>,
    ledger: &Arc<Mutex<OnceLedger>>,
    pids: &[u32],
) -> Result<Cost, String> {
    let mut cost = Cost::default();
    for pair in 0..COST_PAIRS {
        let first = pair % 2 == 0;
        for numbered in [first, !first] {
            check_interrupt()?;
            let make = async || {
                let sending = Sending {
                    numbered,
                    deadline: None,
                };
                // No subscriber counts the client's retries here: none are expected.
                Ok(requesters(
                    client,
                    keys,
                    sending,
                    ledger,
                    &ClientRetries::default(),
                    options.concurrency,
                ))
            };
            let summary =
                warm_then_measure(make, options.duration(), options.warmup(), pids).await?;
            match numbered {
                true => cost.numbered.push(summary),
                false => cost.unnumbered.push(summary),
            }
        }
    }
    Ok(cost)
}

/// The LMDB phase's fault: every node killed with SIGKILL under the load, restarted on its data
/// dir after [`DOWN_FOR`], and the cluster settled again; then more load.
async fn whole_restart(cluster: &KvCluster<'_>) -> Result<WholeRestart, String> {
    let before = cluster.settled().await?;
    tokio::time::sleep(LOAD_BEFORE_KILL).await;
    check_interrupt()?;
    let ids = cluster.harness.ids();
    let t_kill = Instant::now();
    for &id in &ids {
        cluster.harness.kill(id)?;
    }
    tokio::time::sleep(DOWN_FOR).await;
    check_interrupt()?;
    for &id in &ids {
        cluster.harness.start(id, true)?;
    }
    let t_restart = Instant::now();
    let after = cluster
        .settled()
        .await
        .inspect_err(|_| cluster.harness.print_log_tails(&[]))?;
    let t_settled = Instant::now();
    tokio::time::sleep(MEMBERSHIP_MARGIN).await;
    Ok(WholeRestart {
        before: (before.epoch, before.owners),
        after: (after.epoch, after.owners),
        t_kill,
        t_restart,
        t_settled,
    })
}

/// The longest increment (retries included) in flight at some moment of `[from, to]`, ms.
fn longest_between(timeline: &[Sample], from: Instant, to: Instant) -> f64 {
    timeline
        .iter()
        .filter(|s| s.start <= to && s.end() >= from)
        .map(|s| ms(s.latency))
        .fold(0.0, f64::max)
}

/// One phase: `--nodes` `kv serve --store STORE` nodes; the record's cost on them; then the
/// retrying load through the phase's faults; then every counter read back through each node.
async fn phase(options: &Options, store: Store, spec: &str) -> Result<Phase, String> {
    let name = format!("exactly_once ({})", store.name());
    let harness = start_kv(options, spec, &name).await?;
    let cluster = KvCluster::new(&harness, options)?;
    let client = cluster.client_of_all()?;

    // The record's cost, on counters of its own, before any fault.
    let cost_keys = counter_keys("cost")?;
    let cost_ledger = Arc::new(Mutex::new(OnceLedger::new(cost_keys.len())));
    let server_pids = match store {
        Store::Postgres => Observer::start(spec).await?.pids,
        Store::Lmdb => Vec::new(),
    };
    let pids = cost_pids(&harness, &server_pids);
    println!("{name}: the record's cost ...");
    let cost = record_cost(options, &client, &cost_keys, &cost_ledger, &pids).await?;

    // The retrying load through the faults.
    let keys = counter_keys("once")?;
    let ledger = Arc::new(Mutex::new(OnceLedger::new(keys.len())));
    let load_client = cluster.client_of_all()?;
    let client_retries = ClientRetries::default();
    let counting = count_client_retries(&client_retries);
    let stop = AtomicBool::new(false);
    let load = closed_loop(
        requesters(
            &load_client,
            &keys,
            Sending {
                numbered: true,
                deadline: Some(SEND_DEADLINE),
            },
            &ledger,
            &client_retries,
            options.concurrency,
        ),
        MEMBERSHIP_LOAD_MAX,
        &stop,
        true,
    );
    println!("{name}: the retrying load through the faults ...");
    let orchestration = async {
        let result = async {
            let faults = match store {
                Store::Postgres => {
                    let mut done = Vec::new();
                    for fault in [
                        KvFault::Kill { leader: false },
                        KvFault::Kill { leader: true },
                        KvFault::Freeze,
                    ] {
                        done.push((fault, cluster.fault_once(fault).await?));
                    }
                    // Load on the settled cluster after the last fault too.
                    tokio::time::sleep(MEMBERSHIP_MARGIN).await;
                    Faults::Nodes(done)
                }
                Store::Lmdb => Faults::Whole(whole_restart(&cluster).await?),
            };
            Ok::<_, String>(faults)
        }
        .await;
        stop.store(true, Ordering::SeqCst);
        result
    };
    let (recorded, faults) = tokio::join!(load, orchestration);
    drop(counting);
    let faults = faults?;

    // Every counter, read back through a client of each node.
    cluster.settled().await?;
    let mut reads = Vec::new();
    let every_key: Vec<String> = keys.iter().chain(cost_keys.iter()).cloned().collect();
    for node in &harness.nodes {
        let reader = cluster.client(vec![node.addr()])?;
        reads.push((node.id(), read_all(&reader, every_key.clone()).await));
    }
    let probes = cluster.check(&cluster.client_of_all()?).await;
    let ledger = lock(&ledger);
    let cost_ledger = lock(&cost_ledger);
    let verdict = judge(&keys, &ledger, &reads);
    let cost_verdict = judge(&cost_keys, &cost_ledger, &reads);

    let seen = Seen {
        label: store.name(),
        timeline: &recorded.timeline,
        ledger: &ledger,
        retries: &client_retries,
    };
    let mut figures = serde_json::Map::new();
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    match &faults {
        Faults::Nodes(done) => {
            for (fault, kill) in done {
                let (what, entry, note) = seen.node_fault(*fault, kill);
                figures.insert(what.into(), Value::Object(entry));
                notes.push(note);
            }
        }
        Faults::Whole(whole) => {
            let (entry, note) = seen.whole_restart(whole, harness.nodes.len());
            figures.insert("whole_cluster_kill".into(), Value::Object(entry));
            notes.push(note);
            if whole.before != whole.after {
                problems.push(format!(
                    "{}: the whole-cluster restart changed the map (epoch {} → {}): not a \
                     restart in place",
                    seen.label, whole.before.0, whole.after.0
                ));
            }
        }
    }
    let (phase_figures, phase_notes) = seen.totals(&verdict, keys.len(), reads.len());
    figures.extend(phase_figures);
    notes.extend(phase_notes);
    figures.insert("nodes".into(), json!(harness.nodes.len()));
    figures.insert(
        "load".into(),
        Value::Object(Summary::of(&recorded).to_json()),
    );
    figures.insert(
        "timeline_truncated".into(),
        json!(recorded.timeline_truncated),
    );
    figures.insert(
        "record_cost".into(),
        cost_report(&cost, &cost_ledger, &cost_verdict, store),
    );
    notes.push(format!(
        "exactly_once ({}): the record's cost: {}; {} increments, {} failed; read back: {} \
         lost, {} duplicated",
        seen.label,
        cost.describe(),
        cost_ledger.acknowledged(),
        cost_ledger.given_up(),
        cost_verdict.lost,
        cost_verdict.duplicated,
    ));
    figures.insert(
        "probe_counters".into(),
        json!({
            "checked": probes.counters_checked,
            "lost_increments": probes.increments_lost,
            "above_acknowledged_and_failed": probes.counters_too_high,
            "unreadable": probes.unreadable,
        }),
    );

    let label = seen.label;
    for problem in verdict.examples.iter().chain(&cost_verdict.examples) {
        notes.push(format!("exactly_once ({label}): {problem}"));
    }
    for reason in ledger.reasons.iter().chain(&cost_ledger.reasons) {
        notes.push(format!("exactly_once ({label}): given up: {reason}"));
    }
    let given_up = ledger.given_up() + cost_ledger.given_up();
    let lost = verdict.lost + cost_verdict.lost + probes.increments_lost;
    let duplicated = verdict.duplicated + cost_verdict.duplicated;
    if verdict.problems() + cost_verdict.problems() > 0 {
        problems.push(format!(
            "{label}: the read-back found {lost} lost and {duplicated} duplicated increments, {} \
             disagreeing, {} unreadable, {} repeated replies",
            verdict.disagreeing + cost_verdict.disagreeing,
            verdict.unreadable + cost_verdict.unreadable,
            verdict.repeated_replies + cost_verdict.repeated_replies,
        ));
    }
    if given_up > 0 {
        problems.push(format!("{label}: {given_up} increments given up"));
    }
    if probes.problems() > 0 {
        problems.push(format!(
            "{label}: the probe counters: {} acknowledged increments lost, {} above acknowledged \
             + failed, {} unreadable",
            probes.increments_lost, probes.counters_too_high, probes.unreadable
        ));
        for problem in &probes.examples {
            notes.push(format!("exactly_once ({label}), probes: {problem}"));
        }
    }
    if !problems.is_empty() {
        harness.print_log_tails(&[]);
    }
    let mut summary = Summary::of(&recorded);
    summary.error_kinds = recorded.error_kinds.clone();
    Ok(Phase {
        store,
        summary,
        figures,
        notes,
        problems,
        lost,
        duplicated,
        given_up,
        retries_unknown: ledger.retries_unknown + client_retries.count() as u64,
        counts_equal: verdict.problems() + cost_verdict.problems() + probes.problems() == 0,
        cost_ratio: cost.ratio(),
    })
}

/// What the fault load of one phase saw, for its figures and notes.
struct Seen<'a> {
    label: &'static str,
    timeline: &'a [Sample],
    ledger: &'a OnceLedger,
    retries: &'a ClientRetries,
}

impl Seen<'_> {
    /// From `from` to `to`: the client's retries and the requesters' failed sends, as JSON
    /// fields and as a clause of a note.
    fn window(&self, from: Instant, to: Instant) -> (serde_json::Map<String, Value>, String) {
        let (unknown, refused, other) = self.ledger.failed_between(from, to);
        let retried = self.retries.between(from, to);
        let in_window = self
            .timeline
            .iter()
            .filter(|s| s.start <= to && s.end() >= from)
            .count();
        let fields = fields(json!({
            "client_retries_after_unknown": retried,
            "failed_sends_outcome_unknown": unknown,
            "failed_sends_refused": refused,
            "failed_sends_final": other,
            "increments_in_the_window": in_window,
        }));
        let clause = format!(
            "{retried} requests sent again by the client after an unknown outcome; failed \
             sends: {unknown} outcome-unknown, {refused} refused, {other} final"
        );
        (fields, clause)
    }

    /// One fault of the PostgreSQL phase: its name in the JSON, its figures and its note.
    fn node_fault(
        &self,
        fault: KvFault,
        kill: &Kill,
    ) -> (&'static str, serde_json::Map<String, Value>, String) {
        let (what, role) = match fault {
            KvFault::Kill { leader: false } => ("follower_kill", "follower"),
            KvFault::Kill { leader: true } => ("leader_kill", "leader"),
            KvFault::Freeze => ("freeze", "owner"),
        };
        let (mut entry, note) = fault_report(
            kill,
            self.timeline,
            fault,
            &format!("exactly_once ({}), {role}", self.label),
        );
        let (fields, clause) = self.window(kill.t_kill, kill.t_settled);
        entry.extend(fields);
        (
            what,
            entry,
            format!("{note}; from the fault until settled: {clause}"),
        )
    }

    /// The LMDB phase's whole-cluster kill of `nodes` nodes: its figures and its note.
    fn whole_restart(
        &self,
        whole: &WholeRestart,
        nodes: usize,
    ) -> (serde_json::Map<String, Value>, String) {
        let in_place = whole.before == whole.after;
        let longest = longest_between(self.timeline, whole.t_kill, whole.t_settled);
        let in_flight = self
            .timeline
            .iter()
            .filter(|s| s.start <= whole.t_kill && s.end() >= whole.t_kill)
            .count();
        let (mut entry, clause) = self.window(whole.t_kill, whole.t_settled);
        entry.extend(fields(json!({
            "nodes_killed": nodes,
            "down_ms": round3(ms(DOWN_FOR)),
            "restart_to_settled_ms": round3(ms(whole.t_settled - whole.t_restart)),
            "kill_to_settled_ms": round3(ms(whole.t_settled - whole.t_kill)),
            "map_epoch_before": whole.before.0,
            "map_epoch_after": whole.after.0,
            "restart_in_place": in_place,
            "increments_in_flight_at_kill": in_flight,
            "longest_increment_ms": round3(longest),
        })));
        let note = format!(
            "exactly_once ({}): all {nodes} nodes killed, restarted after {:.0} ms, settled \
             {:.0} ms after the kill with {} (epoch {} → {}); {in_flight} increments in flight \
             at the kill; from the kill until settled: {clause}; longest increment \
             {longest:.0} ms",
            self.label,
            ms(DOWN_FOR),
            ms(whole.t_settled - whole.t_kill),
            if in_place {
                "the same map (a restart in place)"
            } else {
                "ANOTHER map (not a restart in place: a node-local store drops what a shard \
                 held before it moved)"
            },
            whole.before.0,
            whole.after.0,
        );
        (entry, note)
    }

    /// The phase's totals: figures and notes.
    fn totals(
        &self,
        verdict: &Verdict,
        counters: usize,
        nodes_read: usize,
    ) -> (serde_json::Map<String, Value>, Vec<String>) {
        let ledger = self.ledger;
        let figures = fields(json!({
            "store": self.label,
            "counters": counters,
            "acknowledged_increments": ledger.acknowledged(),
            "increments_given_up": ledger.given_up(),
            "lost_increments": verdict.lost,
            "duplicated_increments": verdict.duplicated,
            "given_up_increments_landed": verdict.gave_up_landed,
            "repeated_replies": verdict.repeated_replies,
            "counters_disagreeing": verdict.disagreeing,
            "counters_unreadable": verdict.unreadable,
            "client_retries_after_unknown": self.retries.count(),
            "retries_after_unknown": ledger.retries_unknown,
            "retries_after_refusal": ledger.retries_refused,
            "increments_retried": ledger.retried_increments,
            "sends_failed_definite_after_unknown": ledger.unknown_not_said,
            "failed_sends": ledger.failed_attempts.len(),
            "failed_sends_truncated": ledger.failed_attempts_truncated,
            "send_errors": ledger.attempt_errors,
            "given_up_reasons": ledger.reasons,
            "problems": verdict.examples,
        }));
        let note = format!(
            "exactly_once ({}): {} increments acknowledged on {counters} counters, {} given up; \
             requests sent again after an unknown outcome: {} by the client within a send, {} \
             by the requesters, and {} after a refusal ({} increments needed more than one \
             send; {} sends failed with an error not flagged outcome-unknown after the client had \
             sent the request again within the send after an unknown outcome); read back through \
             each of {nodes_read} nodes: {} lost, {} duplicated, {} disagreeing, {} unreadable, \
             {} repeated replies",
            self.label,
            ledger.acknowledged(),
            ledger.given_up(),
            self.retries.count(),
            ledger.retries_unknown,
            ledger.retries_refused,
            ledger.retried_increments,
            ledger.unknown_not_said,
            verdict.lost,
            verdict.duplicated,
            verdict.disagreeing,
            verdict.unreadable,
            verdict.repeated_replies,
        );
        (figures, vec![note])
    }
}

/// The fields of a JSON object (none for any other value).
fn fields(object: Value) -> serde_json::Map<String, Value> {
    match object {
        Value::Object(fields) => fields,
        _ => serde_json::Map::new(),
    }
}

/// The record's cost in the JSON, with what its own counters read back.
fn cost_report(cost: &Cost, ledger: &OnceLedger, verdict: &Verdict, store: Store) -> Value {
    let mut report = fields(cost.to_json());
    report.extend(fields(json!({
        "counters": verdict.counters,
        "acknowledged_increments": ledger.acknowledged(),
        "increments_failed": ledger.given_up(),
        "lost_increments": verdict.lost,
        "duplicated_increments": verdict.duplicated,
        "cpu_of": match store {
            Store::Postgres => "this process, the nodes and the PostgreSQL server",
            Store::Lmdb => "this process and the nodes",
        },
    })));
    Value::Object(report)
}

/// `exactly_once` (see the module docs of `bench.rs`): the PostgreSQL phase, then the LMDB
/// phase.
pub(super) async fn exactly_once(bench: &Bench<'_>) -> Result<Outcome, String> {
    let options = bench.options;
    let server = bench.postgres()?;
    let postgres = server
        .with_kv_database(DATABASE, "exactly_once", async |url| {
            phase(options, Store::Postgres, url).await
        })
        .await?;
    check_interrupt()?;
    let lmdb = phase(options, Store::Lmdb, "lmdb").await?;

    let mut extra = serde_json::Map::new();
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let (mut lost, mut duplicated, mut given_up, mut retries) = (0, 0, 0, 0);
    let mut counts_equal = true;
    for phase in [&postgres, &lmdb] {
        lost += phase.lost;
        duplicated += phase.duplicated;
        given_up += phase.given_up;
        retries += phase.retries_unknown;
        counts_equal &= phase.counts_equal;
        extra.insert(
            format!("{}_phase", phase.store.name()),
            Value::Object(phase.figures.clone()),
        );
        extra.insert(
            format!("record_cost_ratio_{}", phase.store.name()),
            json!(phase.cost_ratio.map(round3)),
        );
        notes.extend(phase.notes.iter().cloned());
        problems.extend(phase.problems.iter().cloned());
    }
    extra.extend(fields(json!({
        "postgres": server.describe(),
        "lost_increments": lost,
        "duplicated_increments": duplicated,
        "increments_given_up": given_up,
        "retries_after_unknown": retries,
        "final_counts_equal_acknowledged": counts_equal,
    })));
    if !problems.is_empty() {
        extra.insert(FAILED_FIELD.into(), json!(problems.join("; ")));
    }
    Ok(Outcome {
        summary: postgres.summary,
        extra,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(replies: &[&[u64]], gave_up: &[u64]) -> OnceLedger {
        OnceLedger {
            replies: replies.iter().map(|r| r.to_vec()).collect(),
            gave_up: gave_up.to_vec(),
            ..OnceLedger::default()
        }
    }

    fn reads(values: &[(&str, Option<&str>)]) -> Reads {
        values
            .iter()
            .map(|(key, value)| (key.to_string(), Ok(value.map(str::to_owned))))
            .collect()
    }

    #[test]
    fn the_read_back_counts_lost_and_duplicated_increments_exactly() {
        // Goal: a counter must hold exactly its acknowledged increments (plus any of its
        // given-up ones); fewer are lost, more are duplicated; two acknowledgements of one count
        // and reads that differ between nodes are problems too. Method: a ledger and reads
        // through two nodes around those bounds.
        let keys: Vec<String> = ["exact", "lost", "duplicated", "landed", "repeated", "split"]
            .map(str::to_owned)
            .to_vec();
        let ledger = ledger(
            &[&[1, 2, 3], &[1, 2, 3], &[2, 1], &[1, 2], &[1, 1, 2], &[1]],
            &[0, 0, 0, 1, 0, 0],
        );
        let one = reads(&[
            ("exact", Some("3")),
            ("lost", Some("1")),
            ("duplicated", Some("4")),
            ("landed", Some("3")),
            ("repeated", Some("3")),
            ("split", Some("1")),
        ]);
        let mut two = one.clone();
        two.insert("split".into(), Ok(Some("2".into())));
        let verdict = judge(&keys, &ledger, &[(1, one), (2, two)]);
        assert_eq!(verdict.lost, 2, "`lost` misses 2");
        // `duplicated` holds 2 too many; `split` reads 2 through node 2 for 1 acknowledged.
        assert_eq!(verdict.duplicated, 3);
        assert_eq!(verdict.gave_up_landed, 1, "`landed`'s given-up increment");
        assert_eq!(verdict.repeated_replies, 1);
        assert_eq!(verdict.disagreeing, 1);
        assert_eq!(verdict.unreadable, 0);
        assert_eq!(verdict.problems(), 7);
    }

    #[test]
    fn an_unreadable_or_missing_counter_is_a_problem_and_absent_counts_as_zero() {
        // Goal: a counter no increment reached may be absent (0); one that cannot be read or
        // was not read back is counted, not taken as 0. Method: three counters, one absent with
        // no acknowledgement, one unreadable, one missing from the reads.
        let keys: Vec<String> = ["absent", "broken", "missing"].map(str::to_owned).to_vec();
        let ledger = ledger(&[&[], &[1], &[1]], &[0, 0, 0]);
        let mut read = reads(&[("absent", None)]);
        read.insert("broken".into(), Err("timed out".into()));
        let verdict = judge(&keys, &ledger, &[(1, read)]);
        assert_eq!(verdict.unreadable, 2);
        assert_eq!(verdict.lost + verdict.duplicated, 0);
    }

    #[test]
    fn failures_that_leave_the_request_retriable_are_told_apart_from_final_ones() {
        // Goal: an unknown outcome is sent again at once, a refusal after a pause, and an
        // answer that is final for the id gives the increment up. Method: one error of each.
        let unknown = ClientError::Cluster(Error::OutcomeUnknown { shard: 3 });
        let refused = ClientError::Cluster(Error::ShuttingDown);
        let reused = ClientError::Cluster(Error::RequestIdReused { shard: 3, seq: 9 });
        assert_eq!(Failure::of(&unknown), Failure::Unknown);
        assert_eq!(Failure::of(&refused), Failure::Refused);
        assert_eq!(Failure::of(&reused), Failure::Final);
    }
}
