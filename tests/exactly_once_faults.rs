//! Exactly-once effects through process faults (issue 19), with real `kv serve` processes on
//! 127.0.0.1: an increment that a client sends again after an error whose outcome is unknown is
//! applied once, so every counter ends at exactly the number of acknowledged increments: none
//! lost, none applied twice.
//!
//! The load goes through an in-process `Client`: [`WRITERS`] writers (tokio tasks) increment
//! [`COUNTERS`] shared counters with `Incr`, which is not idempotent, so several increments of one
//! counter are in flight at once. Each increment is numbered once (`Client::request`) and sent
//! (`ClientRequest::send`) until it is acknowledged: after an error whose outcome is unknown
//! (`ClientError::is_outcome_unknown`), or one that says no node could take it yet (unreachable,
//! not ready: the node is being restarted), the same request is sent again, bounded by
//! [`SENDS_MAX`] sends and [`INCREMENT_BOUND`]. Any other error, or an increment still not
//! acknowledged at the bound, fails the test. The client itself also sends a request again under
//! its id within one call when an attempt's outcome is unknown; a tracing layer in this process
//! counts those re-sends from the client's debug events.
//!
//! Each fault strikes once the writers have a number of acknowledgements ([`ACKS_PER_PHASE`]
//! more than before: an event, not a sleep) while they keep sending, so requests are in flight
//! when it lands. Everything is read back only at the end, through every node: each counter must
//! hold exactly the number of its acknowledged increments, and the values those increments
//! answered must be `1..=that number`, each once (an increment applied twice leaves a gap and a
//! higher count; one answered from a wrong record repeats a value). At least one request must
//! have been sent again after an unknown outcome, or the faults struck nothing.
//!
//! Two tests: three nodes that keep their shards in a throwaway PostgreSQL through `kill -9` of a
//! follower, `kill -9` of the leader and SIGSTOP of a counter's owner; and one node on LMDB
//! killed with SIGKILL twice mid-load and restarted in place on its data dir. Every wait polls
//! with a generous deadline; no test asserts how long anything takes.
//!
//! The tests can fail: sent without their ids (`CallOptions::numbered(false)`) and sent again
//! blindly as new requests after an unknown outcome, the increments come out duplicated in both
//! tests. A fault duplicates an increment only when it lands after the commit that applied it and
//! before its reply, so the PostgreSQL server runs with `fsync=on`: its commits take long enough
//! for the faults to land there (with `fsync=off` that check once found no duplicate).

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod common;

// The messages of the `kv` example, so that the load goes through an in-process client.
#[allow(dead_code)]
#[path = "../examples/support/kv_api.rs"]
mod kv_api;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clusterfunk::client::{Client, ClientError};
use clusterfunk::shard_map::shard_for;
use clusterfunk::testing::PostgresServer;
use clusterfunk::Error;
use common::{runtime, Cluster, ShardMap, Store, SHARD_COUNT};
use kv_api::{Get, Incr};
use tokio::runtime::Runtime;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Concurrent writers (tokio tasks), each with one increment in flight.
const WRITERS: usize = 8;

/// The counters the writers increment, shared by all of them.
const COUNTERS: usize = 6;

/// Acknowledged increments the writers need before each fault, and again in each phase after it.
const ACKS_PER_PHASE: usize = 100;

/// The client's deadline of one send (`ClientRequest::send`), retries within it included.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// Time a send may take past its deadline before it counts as hung.
const CALL_GRACE: Duration = Duration::from_secs(5);

/// Bound on one increment, every send of it included: one not acknowledged by then fails.
const INCREMENT_BOUND: Duration = Duration::from_secs(60);

/// Bound on the sends of one increment.
const SENDS_MAX: u32 = 40;

/// Bound on the increments of one writer, so that the load stops by itself.
const INCREMENTS_PER_WRITER_MAX: usize = 20_000;

/// Bound on the wait for a phase's acknowledgements.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

/// Kill-and-restart rounds of the LMDB test.
const LMDB_ROUNDS: usize = 2;

/// What the client's debug event says when it sends a request again under its id because an
/// attempt's outcome was unknown (`src/client.rs`).
const CLIENT_RESEND_EVENT: &str = "outcome unknown; sending the request again under its id";

// Goal (issue 19, done-when): with the PostgreSQL store, the final counts equal the acknowledged
// increments through kill -9 of a follower, kill -9 of the leader and SIGSTOP of an owner.
// Method: a throwaway PostgreSQL and three `kv serve --store postgres://…` nodes; the writers run
// through all three faults. Kill -9 of the follower that owns the most counters' shards: wait
// until the survivors' map gives it no shard, ACKS_PER_PHASE more acknowledgements, restart it on
// its data dir, wait until the three agree, ACKS_PER_PHASE more. The same for the leader of that
// moment. Then SIGSTOP of the node owning the most counters' shards: wait until the others' map
// gives it none of them, ACKS_PER_PHASE more, SIGCONT, wait until the three agree,
// ACKS_PER_PHASE more. Stop the writers (each finishes its increment in flight), then read every
// counter through each node.
#[test]
fn exactly_once_on_postgres_through_kill9_of_follower_and_leader_and_a_frozen_owner() {
    let resends = client_resends();
    let server =
        PostgresServer::start_fsynced().unwrap_or_else(|e| panic!("start PostgreSQL: {e}"));
    let cluster = Cluster::new("once_postgres_faults", 3).with_store(Store::Postgres(server.url()));
    cluster.start_all_with_init();
    let ids = cluster.ids();
    cluster.wait_for_one_map(&ids);

    let runtime = runtime();
    let load = Load::start(&runtime, &cluster.client(&ids, CALL_DEADLINE));
    load.wait_for_more_acks(&cluster, "before the first fault");

    for role in ["follower", "leader"] {
        let (agreement, map) = cluster.wait_for_one_map(&ids);
        let victim = match role {
            "leader" => agreement.leader,
            _ => busiest_owner(&map, ids.iter().filter(|&&id| id != agreement.leader)),
        };
        let survivors = others(&ids, victim);
        cluster.mark(&format!("kill -9 of the {role} {victim} under load"));
        cluster.kill9(victim);
        cluster.wait_for_one_map_where(
            &survivors,
            &format!("that gives the killed {role} {victim} no shard"),
            |_, map| map.count(victim) == 0,
        );
        load.wait_for_more_acks(&cluster, &format!("while the {role} {victim} is down"));
        cluster.mark(&format!("restart of the {role} {victim}"));
        cluster.restart(victim);
        cluster.wait_for_one_map(&ids);
        load.wait_for_more_acks(&cluster, &format!("after the {role} {victim} restarted"));
    }

    let (_, map) = cluster.wait_for_one_map(&ids);
    let frozen = busiest_owner(&map, ids.iter());
    cluster.mark(&format!("SIGSTOP of node {frozen}, an owner of counters"));
    cluster.pause(frozen);
    cluster.wait_for_one_map_where(
        &others(&ids, frozen),
        &format!("that gives the frozen node {frozen} no counter's shard"),
        |_, map| counter_shards().all(|shard| map.owners[shard] != frozen),
    );
    load.wait_for_more_acks(&cluster, &format!("while node {frozen} is frozen"));
    cluster.mark(&format!("SIGCONT of node {frozen}"));
    cluster.resume(frozen);
    cluster.wait_for_one_map(&ids);
    load.wait_for_more_acks(&cluster, &format!("after node {frozen} resumed"));

    let log = load.stop(&runtime);
    let within_calls = resends.to(&cluster, &ids);
    let summary = log.summary(within_calls);
    eprintln!("postgres, after kill -9 of a follower and the leader and SIGSTOP of node {frozen}: {summary}");
    let extra = format!("PostgreSQL log:\n{}", server.log_tail());
    log.assert_no_failure(&cluster, &summary, &extra);
    for &id in &ids {
        let found = read_counters(&runtime, &cluster.client(&[id], CALL_DEADLINE));
        log.assert_exactly_once(
            &cluster,
            &format!("read through node {id}"),
            &found,
            &summary,
            &extra,
        );
    }
    assert!(
        log.resent_unknown + within_calls > 0,
        "no increment was sent again after an unknown outcome, so the faults proved nothing \
         about exactly-once (the client's re-sends are counted from its debug event \
         {CLIENT_RESEND_EVENT:?}: check that src/client.rs still says so): {summary}"
    );
}

// Goal (issue 19, done-when): with the LMDB store, the final counts equal the acknowledged
// increments through kill -9 and a restart in place. Method: one `kv serve --store lmdb` node
// (a one-member cluster); LMDB_ROUNDS times: once ACKS_PER_PHASE more increments are
// acknowledged, SIGKILL the node while the writers go on, start it again on its data dir and wait
// until it serves. The writers send their requests again through each outage. After
// ACKS_PER_PHASE more acknowledgements, stop the writers and read every counter.
#[test]
fn exactly_once_on_lmdb_through_kill9_and_restart_in_place() {
    let resends = client_resends();
    let cluster = Cluster::new("once_lmdb_restart", 1).with_store(Store::Lmdb);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1]);

    let runtime = runtime();
    let load = Load::start(&runtime, &cluster.client(&[1], CALL_DEADLINE));
    for round in 1..=LMDB_ROUNDS {
        load.wait_for_more_acks(&cluster, &format!("before kill {round}"));
        cluster.mark(&format!("kill -9 {round} of node 1 under load"));
        cluster.kill9(1);
        cluster.restart(1);
        cluster.wait_for_one_map(&[1]);
    }
    load.wait_for_more_acks(&cluster, "after the last restart");

    let log = load.stop(&runtime);
    let within_calls = resends.to(&cluster, &[1]);
    let summary = log.summary(within_calls);
    eprintln!("lmdb, after {LMDB_ROUNDS} kills and restarts in place: {summary}");
    log.assert_no_failure(&cluster, &summary, "");
    let found = read_counters(&runtime, &cluster.client(&[1], CALL_DEADLINE));
    log.assert_exactly_once(&cluster, "read through node 1", &found, &summary, "");
    assert!(
        log.resent_unknown + within_calls > 0,
        "no increment was sent again after an unknown outcome, so the kills proved nothing \
         about exactly-once (the client's re-sends are counted from its debug event \
         {CLIENT_RESEND_EVENT:?}: check that src/client.rs still says so): {summary}"
    );
}

// ---------------------------------------------------------------------------------------------
// The load

/// The writers, and what they share with the test thread while they run.
struct Load {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<Log>>,
}

/// Shared by the writers and the test thread.
#[derive(Default)]
struct Shared {
    /// Acknowledged increments so far.
    acknowledged: AtomicUsize,
    /// Increments that failed for good (the test fails), one line each.
    failures: Mutex<Vec<String>>,
    /// Set when the writers should start no further increment.
    stop: AtomicBool,
}

impl Load {
    /// Starts [`WRITERS`] writers on `client`.
    fn start(runtime: &Runtime, client: &Client) -> Load {
        let shared = Arc::new(Shared::default());
        let tasks = (0..WRITERS)
            .map(|writer| runtime.spawn(write_loop(client.clone(), writer, shared.clone())))
            .collect();
        Load { shared, tasks }
    }

    /// Waits until [`ACKS_PER_PHASE`] more increments than now are acknowledged (`phase` says
    /// when, for the failure message); fails at once when an increment failed.
    fn wait_for_more_acks(&self, cluster: &Cluster, phase: &str) {
        let target = self.shared.acknowledged.load(Ordering::SeqCst) + ACKS_PER_PHASE;
        cluster.wait_until(
            &format!("{ACKS_PER_PHASE} more increments are acknowledged {phase}"),
            LOAD_DEADLINE,
            || {
                let failures = lock(&self.shared.failures).clone();
                assert!(
                    failures.is_empty(),
                    "{} increment(s) failed {phase}:\n  {}\n{}",
                    failures.len(),
                    failures.join("\n  "),
                    cluster.report()
                );
                let acknowledged = self.shared.acknowledged.load(Ordering::SeqCst);
                (acknowledged >= target).then_some(())
            },
        );
    }

    /// Tells the writers to start nothing more, waits until each one's increment in flight is
    /// acknowledged or failed, and returns what they saw.
    fn stop(self, runtime: &Runtime) -> Log {
        self.shared.stop.store(true, Ordering::SeqCst);
        let logs = runtime.block_on(async {
            tokio::time::timeout(
                INCREMENT_BOUND + CALL_DEADLINE + CALL_GRACE,
                futures_util::future::join_all(self.tasks),
            )
            .await
            .expect("the writers stop once their increment in flight ends (each is bounded)")
        });
        let mut log = Log::default();
        for task in logs {
            log.extend(task.expect("a writer task panicked"));
        }
        log
    }
}

/// What the writers saw, from the client's side.
#[derive(Default)]
struct Log {
    /// Acknowledged increments: the counter and the value it answered.
    acks: Vec<(usize, u64)>,
    /// Increments that failed for good, one line each.
    failures: Vec<String>,
    /// Sends of a request again by the writers after an error whose outcome is unknown.
    resent_unknown: usize,
    /// Sends of a request again by the writers after an error saying no node could take it yet.
    resent_down: usize,
    /// The errors that made the writers send again, by their text, counted.
    errors: BTreeMap<String, usize>,
}

impl Log {
    fn extend(&mut self, other: Log) {
        self.acks.extend(other.acks);
        self.failures.extend(other.failures);
        self.resent_unknown += other.resent_unknown;
        self.resent_down += other.resent_down;
        for (error, count) in other.errors {
            *self.errors.entry(error).or_default() += count;
        }
    }

    /// The acknowledged increments of each counter, counted.
    fn acknowledged(&self) -> [u64; COUNTERS] {
        let mut counts = [0; COUNTERS];
        for &(counter, _) in &self.acks {
            counts[counter] += 1;
        }
        counts
    }

    /// One paragraph for the test's output and its failure messages.
    fn summary(&self, within_calls: usize) -> String {
        format!(
            "{} increments acknowledged ({:?} by counter), {} failed; sent again after an \
             unknown outcome: {} by the client within a call, {} by the writers; sent again \
             after a refusal while down: {}; errors before a re-send: {:?}",
            self.acks.len(),
            self.acknowledged(),
            self.failures.len(),
            within_calls,
            self.resent_unknown,
            self.resent_down,
            self.errors
        )
    }

    fn assert_no_failure(&self, cluster: &Cluster, summary: &str, extra: &str) {
        assert!(
            self.failures.is_empty(),
            "{} increment(s) failed ({summary}):\n  {}\n{}{extra}",
            self.failures.len(),
            self.failures.join("\n  "),
            cluster.report()
        );
    }

    /// Checks the counters `found` against the acknowledged increments: each holds exactly their
    /// number, and they answered `1..=number`, each value once.
    fn assert_exactly_once(
        &self,
        cluster: &Cluster,
        through: &str,
        found: &[Result<u64, String>],
        summary: &str,
        extra: &str,
    ) {
        let acknowledged = self.acknowledged();
        let mut problems = Vec::new();
        for counter in 0..COUNTERS {
            let key = counter_key(counter);
            let count = acknowledged[counter];
            match &found[counter] {
                Ok(value) if *value == count => {}
                Ok(value) if *value > count => problems.push(format!(
                    "{key} holds {value}, but {count} increments were acknowledged: {} \
                     duplicated",
                    value - count
                )),
                Ok(value) => problems.push(format!(
                    "{key} holds {value}, but {count} increments were acknowledged: {} lost",
                    count - value
                )),
                Err(error) => problems.push(format!("{key} is unreadable: {error}")),
            }
            let mut answered: Vec<u64> = self
                .acks
                .iter()
                .filter(|(c, _)| *c == counter)
                .map(|&(_, value)| value)
                .collect();
            answered.sort_unstable();
            if !answered.iter().copied().eq(1..=count) {
                let mut seen = BTreeMap::new();
                for value in &answered {
                    *seen.entry(*value).or_insert(0) += 1;
                }
                let repeated: Vec<u64> = seen
                    .iter()
                    .filter(|(_, &times)| times > 1)
                    .map(|(&value, _)| value)
                    .collect();
                let missing: Vec<u64> = (1..=count).filter(|v| !seen.contains_key(v)).collect();
                problems.push(format!(
                    "{key}: its {count} acknowledged increments did not answer 1..={count} once \
                     each: answered more than once {:?}, never answered {:?}",
                    &repeated[..repeated.len().min(20)],
                    &missing[..missing.len().min(20)]
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "{through}: the counters do not match the acknowledged increments ({summary}):\n  \
             {}\n{}{extra}",
            problems.join("\n  "),
            cluster.report()
        );
    }
}

/// One writer: increments counter after counter (each once, sent until acknowledged) until told
/// to stop; stops at its first failure.
async fn write_loop(client: Client, writer: usize, shared: Arc<Shared>) -> Log {
    let mut log = Log::default();
    for step in 0..INCREMENTS_PER_WRITER_MAX {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let counter = (writer + step) % COUNTERS;
        match increment(&client, counter, &mut log).await {
            Ok(value) => {
                log.acks.push((counter, value));
                shared.acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            Err(failure) => {
                let failure = format!("writer {writer}: {failure}");
                lock(&shared.failures).push(failure.clone());
                log.failures.push(failure);
                break;
            }
        }
    }
    log
}

/// Increments `counter` once: numbers the request, sends it, and sends the same request again
/// after an unknown outcome or a refusal while no node could take it, within the bounds.
/// Returns the value the counter answered, or why the increment failed for good.
async fn increment(client: &Client, counter: usize, log: &mut Log) -> Result<u64, String> {
    let key = counter_key(counter);
    let request = client
        .request(key.clone(), Incr { by: 1 })
        .map_err(|e| format!("{key}: the request could not be numbered: {e}"))?;
    let started = Instant::now();
    for send in 1..=SENDS_MAX {
        let error = match tokio::time::timeout(CALL_DEADLINE + CALL_GRACE, request.send()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => return Err(format!("{key} holds a value that is not a number")),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(format!(
                    "{key}, request {}: send {send} did not return within its deadline \
                     {CALL_DEADLINE:?} and {CALL_GRACE:?} more",
                    request.id()
                ))
            }
        };
        let unknown = error.is_outcome_unknown();
        if !unknown && !refused_while_down(&error) {
            return Err(format!(
                "{key}, request {}: send {send} failed: {error}",
                request.id()
            ));
        }
        if started.elapsed() >= INCREMENT_BOUND {
            return Err(format!(
                "{key}, request {}: not acknowledged within {INCREMENT_BOUND:?} ({send} sends); \
                 the last error: {error}",
                request.id()
            ));
        }
        if unknown {
            log.resent_unknown += 1;
        } else {
            log.resent_down += 1;
        }
        *log.errors.entry(error.to_string()).or_default() += 1;
    }
    Err(format!(
        "{key}, request {}: not acknowledged in {SENDS_MAX} sends",
        request.id()
    ))
}

/// Whether `error` says that no node could take the request yet (every node unreachable, or the
/// shard had no serving owner): the cluster is being restarted, and the same request may be sent
/// again.
fn refused_while_down(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Unreachable(_) | ClientError::Cluster(Error::NotReady { .. })
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The key of counter `counter`.
fn counter_key(counter: usize) -> String {
    format!("counter-{counter}")
}

/// The shards of the counters.
fn counter_shards() -> impl Iterator<Item = usize> {
    (0..COUNTERS)
        .map(|counter| shard_for(counter_key(counter).as_bytes(), SHARD_COUNT as u32) as usize)
}

/// The node among `candidates` that owns the most counters' shards in `map` (the first of equals).
fn busiest_owner<'a>(map: &ShardMap, candidates: impl Iterator<Item = &'a u64>) -> u64 {
    let mut best: Option<(usize, u64)> = None;
    for &id in candidates {
        let owned = counter_shards()
            .filter(|&shard| map.owners[shard] == id)
            .count();
        if best.is_none_or(|(most, _)| owned > most) {
            best = Some((owned, id));
        }
    }
    best.expect("at least one candidate").1
}

/// `ids` without `id`.
fn others(ids: &[u64], id: u64) -> Vec<u64> {
    ids.iter().copied().filter(|&other| other != id).collect()
}

/// Reads every counter through `client` (a missing counter reads 0); an error is retried twice.
fn read_counters(runtime: &Runtime, client: &Client) -> Vec<Result<u64, String>> {
    runtime.block_on(async {
        let mut found = Vec::new();
        for counter in 0..COUNTERS {
            let key = counter_key(counter);
            let mut last = String::new();
            let mut value = None;
            for _ in 0..3 {
                match client.send(key.clone(), Get).await {
                    Ok(None) => value = Some(Ok(0)),
                    Ok(Some(text)) => {
                        value = Some(
                            text.parse::<u64>()
                                .map_err(|_| format!("{key} holds {text:?}, not a number")),
                        )
                    }
                    Err(error) => {
                        last = error.to_string();
                        continue;
                    }
                }
                break;
            }
            found.push(value.unwrap_or(Err(last)));
        }
        found
    })
}

// ---------------------------------------------------------------------------------------------
// The client's own re-sends

/// Counts the client's re-sends of a request under its id within one call, after an attempt
/// whose outcome was unknown, by the address that attempt went to (each test's cluster has ports
/// of its own, so tests running at once in this process count apart).
#[derive(Default)]
struct ClientResends {
    by_addr: Mutex<HashMap<String, usize>>,
}

impl ClientResends {
    /// The re-sends after attempts that went to the nodes `ids` of `cluster`.
    fn to(&self, cluster: &Cluster, ids: &[u64]) -> usize {
        let by_addr = lock(&self.by_addr);
        ids.iter()
            .filter_map(|&id| by_addr.get(&cluster.addr(id)))
            .sum()
    }
}

/// The process's [`ClientResends`], counting from the first call on (it installs the tracing
/// subscriber that feeds it, once per test binary).
fn client_resends() -> Arc<ClientResends> {
    static RESENDS: OnceLock<Arc<ClientResends>> = OnceLock::new();
    RESENDS
        .get_or_init(|| {
            let resends = Arc::new(ClientResends::default());
            let layer = ResendLayer(resends.clone()).with_filter(
                Targets::new().with_target("clusterfunk::client", tracing::Level::DEBUG),
            );
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other tracing subscriber in this test binary");
            resends
        })
        .clone()
}

/// The tracing layer that feeds [`ClientResends`] from the client's debug events.
struct ResendLayer(Arc<ClientResends>);

impl<S: tracing::Subscriber> Layer<S> for ResendLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        if fields.message == CLIENT_RESEND_EVENT {
            let mut by_addr = lock(&self.0.by_addr);
            *by_addr.entry(fields.target).or_default() += 1;
        }
    }
}

/// The fields of a client event that [`ResendLayer`] reads.
#[derive(Default)]
struct EventFields {
    message: String,
    /// The address the attempt went to.
    target: String,
}

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "target" => self.target = format!("{value:?}"),
            _ => {}
        }
    }
}
