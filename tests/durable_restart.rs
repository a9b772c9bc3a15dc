//! Durable shard values across crashes, with real `kv serve --store lmdb` processes on 127.0.0.1:
//! a node killed with SIGKILL in the middle of a load and started again on its data dir keeps
//! every value it acknowledged (issue 17), and a clustered node started with a node-local store
//! says at start-up what that store cannot do. A second test, ignored because it fails today,
//! pins a loss: a whole cluster killed and restarted in place after a planned move loses the
//! moved shards' values that no request had touched on their new owners.
//!
//! A third test runs three `kv serve --store postgres://…` nodes on a throwaway PostgreSQL and
//! kills a follower, then the leader, under load (issue 18).
//!
//! The load goes through an in-process client: writers send increments (`Incr`, not
//! idempotent) to a few shared counters and puts (`Put`) of fresh keys, and record on the
//! client's side what was acknowledged and what failed. Everything is read back only at the end,
//! after the last restart. Every wait polls with a generous deadline; no test asserts how long
//! anything takes. The harness builds the `kv` example itself.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod common;

// The messages of the `kv` example, so that the load goes through an in-process client.
#[allow(dead_code)]
#[path = "../examples/support/kv_api.rs"]
mod kv_api;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clusterfunk::client::Client;
use clusterfunk::shard_map::shard_for;
use clusterfunk::testing::PostgresServer;
use common::{runtime, Cluster, Store, DEADLINE, SHARD_COUNT};
use futures_util::stream::{self, StreamExt};
use kv_api::{Get, Incr, Put};
use tokio::runtime::Runtime;

/// Concurrent writers (tokio tasks); each alternates an increment and a put.
const WRITERS: usize = 8;

/// The counters the increments go to, shared by all writers (several increments of one counter
/// are in flight at once).
const COUNTERS: usize = 6;

/// Acknowledged requests in a round after which the node is killed, while the writers go on.
const ACKS_BEFORE_KILL: usize = 300;

/// Crash rounds: load, SIGKILL mid-load, restart on the same data dir. The second round's
/// increments build on what the first left, so a restart that lost or ignored the stored values
/// shows in the counters.
const ROUNDS: usize = 2;

/// Bound on the requests of one writer in one round, so the load stops by itself.
const REQUESTS_PER_WRITER_MAX: usize = 20_000;

/// Per-request timeout of the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on one request, retries included; one that takes longer counts as failed.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on the wait for a round's acknowledgements before the kill.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

/// Concurrent requests when the values are written before a planned move or checked at the end.
const READS_IN_FLIGHT: usize = 16;

/// Keys written before the planned move of the whole-cluster test.
const MOVED_KEYS: usize = 600;

/// The start-up warning of a clustered node whose shard store is node-local.
const NODE_LOCAL_WARNING: &str = "the shard store is local to this node";

// Goal: with the LMDB store, a crash and a restart in place lose no acknowledged value, and the
// restarted node serves the values it had (it does not start its shards empty). Method: a
// one-node cluster with `--store lmdb`; check that it logs the node-local store warning; then
// ROUNDS times: WRITERS writers send increments of COUNTERS shared counters and puts of fresh
// keys, the node is killed with SIGKILL once ACKS_BEFORE_KILL requests of the round were
// acknowledged (writers still sending), the writers stop once their request in flight returns,
// and the node restarts on its data dir. Only then read everything back: each acknowledged put
// holds its value; a failed put's key is absent or holds its value; each counter is at least the
// number of its acknowledged increments and the highest value any of them answered, and at most
// that number plus its failed increments (which may or may not have landed).
#[test]
fn killed_node_keeps_every_acknowledged_value_in_lmdb() {
    let cluster = Cluster::new("durable_kill9_restart", 1)
        .with_store(Store::Lmdb)
        // The warning is read from the log whatever CLUSTERFUNK_TEST_LOG says.
        .with_log_directive("clusterfunk::cluster=warn");
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1]);
    cluster.wait_until(
        "node 1 logs that its shard store is node-local",
        DEADLINE,
        || cluster.log(1).contains(NODE_LOCAL_WARNING).then_some(()),
    );

    let runtime = runtime();
    let mut log = Log::default();
    for round in 1..=ROUNDS {
        cluster.mark(&format!("round {round}: load"));
        let client = cluster.client(&[1], REQUEST_TIMEOUT);
        let load = Load::start(&runtime, &client, round);
        cluster.wait_until(
            &format!("round {round}: {ACKS_BEFORE_KILL} requests are acknowledged"),
            LOAD_DEADLINE,
            || (load.acknowledged() >= ACKS_BEFORE_KILL).then_some(()),
        );
        cluster.kill9(1);
        let round_log = load.stop(&runtime);
        eprintln!("round {round}: {}", round_log.summary());
        assert!(
            !round_log.failed_increments.is_empty() || !round_log.failed_puts.is_empty(),
            "round {round}: no request failed around the kill, so it did not strike the load"
        );
        log.extend(round_log);
        cluster.restart(1);
        cluster.wait_for_one_map(&[1]);
    }

    let client = cluster.client(&[1], REQUEST_TIMEOUT);
    let problems = check(&runtime, &client, &log);
    eprintln!("after {ROUNDS} kills: {}", log.summary());
    assert!(
        problems.is_empty(),
        "{} acknowledged values did not survive the restarts ({}):\n  {}\n{}",
        problems.len(),
        log.summary(),
        problems
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  "),
        cluster.report()
    );
}

// Goal: a planned move followed by a restart in place of the whole cluster loses no
// acknowledged value (issue 17: planned moves lose nothing, and with the LMDB store a restart in
// place keeps every acknowledged value). Method: three nodes with `--store lmdb`; put
// MOVED_KEYS keys through a client of every node, all acknowledged (each shard commits them to
// its owner's store); `drain --id 2` and wait until nodes 1 and 3 own every shard with nothing
// moving, reading nothing (so the moved shards' state waits on the new owners as the snapshot
// handed over); kill -9 all three nodes and restart them on their data dirs; wait until they
// agree on the map they had before the kill (no failover happened: same epoch, same owners);
// only then read every key back.
//
// Regression: 197 of the 600 keys were lost in each of 3 runs, all on shards node 2 owned
// before the drain: a node-local store's state moves in the handoff, and the new owner kept it
// only in memory until the shard's first request activated it there. Now the new owner
// activates such a shard as soon as it serves it (Router::wake_parked), committing the carried
// state to its own store; what remains is the moment between the release and that commit.
#[test]
fn whole_cluster_killed_after_a_drain_keeps_every_acknowledged_value_in_lmdb() {
    let cluster = Cluster::new("durable_whole_after_drain", 3).with_store(Store::Lmdb);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (_, before_drain) = cluster.wait_for_one_map(&ids);
    let runtime = runtime();
    let keys: Vec<String> = (0..MOVED_KEYS).map(|i| format!("moved-{i}")).collect();
    let written: Vec<(String, String)> = keys
        .iter()
        .map(|key| (key.clone(), format!("value-of-{key}")))
        .collect();
    put_all(&runtime, &cluster.client(&ids, REQUEST_TIMEOUT), &written);

    let (code, stdout, stderr) = cluster.cf_at(1, &["drain", "--id", "2"]);
    assert_eq!(code, 0, "drain --id 2: {stdout}{stderr}");
    cluster.wait_until("node 2 owns no shard and none is moving", DEADLINE, || {
        let map = cluster.shard_map(1)?;
        let moving = ids
            .iter()
            .any(|&id| cluster.status(id).is_none_or(|s| s["shards_moving"] != 0));
        (map.count(2) == 0 && !moving).then_some(())
    });
    let (_, drained) = cluster.wait_for_one_map(&ids);
    assert_eq!(drained.count(2), 0, "node 2 stays drained");

    for &id in &ids {
        cluster.kill9(id);
    }
    for &id in &ids {
        cluster.restart(id);
    }
    let (_, restarted) = cluster.wait_for_one_map(&ids);
    assert_eq!(
        restarted, drained,
        "the restart changed the map: not a restart in place"
    );

    let log = Log {
        puts: written,
        ..Log::default()
    };
    let problems = check(&runtime, &cluster.client(&ids, REQUEST_TIMEOUT), &log);
    let from_node_2 = problems
        .iter()
        .filter(|problem| {
            keys.iter().any(|key| {
                problem.contains(&format!("{key} ")) && before_drain.owners[shard_of(key)] == 2
            })
        })
        .count();
    assert!(
        problems.is_empty(),
        "{} of {MOVED_KEYS} acknowledged values did not survive the drain and the restart, \
         {from_node_2} of them on shards node 2 owned before the drain:\n  {}\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  "),
        cluster.report()
    );
}

// Goal (issue 18): a 3-node cluster whose shards keep their values in PostgreSQL loses no
// acknowledged value through `kill -9` of a follower and, later, of the leader: each killed
// node's shards fail over and their new owners load every acknowledged value from the database.
// Method: a throwaway PostgreSQL (testing::PostgresServer) and three `kv serve --store
// postgres://…` nodes. Two rounds, the first striking a follower, the second the leader of that
// moment: WRITERS writers send increments of COUNTERS shared counters and puts of fresh keys
// through a client of every node; once ACKS_BEFORE_KILL requests of the round are acknowledged
// the victim gets SIGKILL while the writers go on; the test waits until the survivors' map
// gives the victim no shard (the failover happened under load) and ACKS_BEFORE_KILL more
// requests are acknowledged, stops the writers, restarts the victim on its data dir and waits
// until the three agree again. Only then, read everything back through each node in turn
// (every read is routed to the owner of the moment): the same rules as the LMDB test.
#[test]
fn cluster_on_postgres_keeps_every_acknowledged_value_through_kill9_of_a_follower_and_the_leader() {
    let server = PostgresServer::start().unwrap_or_else(|e| panic!("start PostgreSQL: {e}"));
    let cluster =
        Cluster::new("durable_postgres_kill9", 3).with_store(Store::Postgres(server.url()));
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let runtime = runtime();
    let mut log = Log::default();
    for (round, role) in [(1, "follower"), (2, "leader")] {
        let (agreement, _) = cluster.wait_for_one_map(&ids);
        let victim = match role {
            "leader" => agreement.leader,
            _ => ids
                .iter()
                .copied()
                .find(|&id| id != agreement.leader)
                .expect("a 3-node cluster has followers"),
        };
        let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != victim).collect();
        cluster.mark(&format!(
            "round {round}: load, then kill -9 of the {role} {victim}"
        ));
        let client = cluster.client(&ids, REQUEST_TIMEOUT);
        let load = Load::start(&runtime, &client, round);
        cluster.wait_until(
            &format!("round {round}: {ACKS_BEFORE_KILL} requests are acknowledged"),
            LOAD_DEADLINE,
            || (load.acknowledged() >= ACKS_BEFORE_KILL).then_some(()),
        );
        cluster.kill9(victim);
        cluster.wait_until(
            &format!("round {round}: the survivors' map gives the killed {role} {victim} no shard"),
            LOAD_DEADLINE,
            || {
                survivors
                    .iter()
                    .all(|&id| {
                        cluster
                            .shard_map(id)
                            .is_some_and(|map| map.count(victim) == 0)
                    })
                    .then_some(())
            },
        );
        let after_failover = load.acknowledged();
        cluster.wait_until(
            &format!("round {round}: {ACKS_BEFORE_KILL} more requests are acknowledged after the failover"),
            LOAD_DEADLINE,
            || (load.acknowledged() >= after_failover + ACKS_BEFORE_KILL).then_some(()),
        );
        let round_log = load.stop(&runtime);
        eprintln!(
            "round {round} ({role} {victim} killed): {}",
            round_log.summary()
        );
        log.extend(round_log);
        cluster.restart(victim);
    }
    cluster.wait_for_one_map(&ids);

    eprintln!("after both kills: {}", log.summary());
    for &id in &ids {
        let problems = check(&runtime, &cluster.client(&[id], REQUEST_TIMEOUT), &log);
        assert!(
            problems.is_empty(),
            "read through node {id}: {} acknowledged values did not survive the kills ({}):\n  {}\n{}\nPostgreSQL log:\n{}",
            problems.len(),
            log.summary(),
            problems
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  "),
            cluster.report(),
            server.log_tail()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The load

/// What the writers saw, from the client's side.
#[derive(Default)]
struct Log {
    /// Acknowledged increments: the counter and the value the node answered.
    increments: Vec<(usize, u64)>,
    /// Increments that failed (they may or may not have landed), by counter.
    failed_increments: Vec<usize>,
    /// Acknowledged puts: the key and its value.
    puts: Vec<(String, String)>,
    /// Puts that failed: the key and the value it may or may not hold.
    failed_puts: Vec<(String, String)>,
    /// Increments answered with `None` (the counter did not hold a number).
    not_numbers: Vec<usize>,
    /// The errors of the failed requests, in the order each writer saw them.
    errors: Vec<String>,
}

impl Log {
    fn extend(&mut self, other: Log) {
        self.increments.extend(other.increments);
        self.failed_increments.extend(other.failed_increments);
        self.puts.extend(other.puts);
        self.failed_puts.extend(other.failed_puts);
        self.not_numbers.extend(other.not_numbers);
        self.errors.extend(other.errors);
    }

    fn summary(&self) -> String {
        let mut summary = format!(
            "{} increments and {} puts acknowledged, {} increments and {} puts failed",
            self.increments.len(),
            self.puts.len(),
            self.failed_increments.len(),
            self.failed_puts.len(),
        );
        if let Some(error) = self.errors.first() {
            summary.push_str(&format!(" (the first: {error})"));
        }
        summary
    }
}

/// The writers of one round.
struct Load {
    acknowledged: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Log>>,
}

impl Load {
    /// Starts [`WRITERS`] writers on `client`; their put keys are unique to `round`.
    fn start(runtime: &Runtime, client: &Client, round: usize) -> Load {
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|writer| {
                runtime.spawn(write_loop(
                    client.clone(),
                    round,
                    writer,
                    acknowledged.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load {
            acknowledged,
            stop,
            tasks,
        }
    }

    /// Requests acknowledged so far in this round.
    fn acknowledged(&self) -> usize {
        self.acknowledged.load(Ordering::SeqCst)
    }

    /// Tells the writers to start nothing more, waits until each one's request in flight
    /// returned, and returns what they saw.
    fn stop(self, runtime: &Runtime) -> Log {
        self.stop.store(true, Ordering::SeqCst);
        let logs = runtime.block_on(async {
            tokio::time::timeout(
                CALL_DEADLINE + DEADLINE,
                futures_util::future::join_all(self.tasks),
            )
            .await
            .expect("the writers stop once their last request returns (each is bounded)")
        });
        let mut log = Log::default();
        for task in logs {
            log.extend(task.expect("a writer task panicked"));
        }
        log
    }
}

/// One writer: alternates an increment of a shared counter and a put of a fresh key until told
/// to stop, recording every outcome.
async fn write_loop(
    client: Client,
    round: usize,
    writer: usize,
    acknowledged: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Log {
    let mut log = Log::default();
    for step in 0..REQUESTS_PER_WRITER_MAX {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let error = if step % 2 == 0 {
            let counter = (writer + step / 2) % COUNTERS;
            let call = client.send(counter_key(counter), Incr { by: 1 });
            match tokio::time::timeout(CALL_DEADLINE, call).await {
                Ok(Ok(Some(value))) => {
                    log.increments.push((counter, value));
                    None
                }
                Ok(Ok(None)) => {
                    log.not_numbers.push(counter);
                    None
                }
                Ok(Err(error)) => {
                    log.failed_increments.push(counter);
                    Some(error.to_string())
                }
                Err(_) => {
                    log.failed_increments.push(counter);
                    Some(format!("no answer within {CALL_DEADLINE:?}"))
                }
            }
        } else {
            let key = format!("put-{round}-{writer}-{step}");
            let value = format!("value-{round}-{writer}-{step}");
            let call = client.send(
                key.clone(),
                Put {
                    value: value.clone(),
                },
            );
            match tokio::time::timeout(CALL_DEADLINE, call).await {
                Ok(Ok(())) => {
                    log.puts.push((key, value));
                    None
                }
                Ok(Err(error)) => {
                    log.failed_puts.push((key, value));
                    Some(error.to_string())
                }
                Err(_) => {
                    log.failed_puts.push((key, value));
                    Some(format!("no answer within {CALL_DEADLINE:?}"))
                }
            }
        };
        match error {
            None => {
                acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            Some(error) => log.errors.push(error),
        }
    }
    log
}

/// The key of counter `counter`.
fn counter_key(counter: usize) -> String {
    format!("counter-{counter}")
}

/// The shard of `key`.
fn shard_of(key: &str) -> usize {
    shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize
}

/// Puts every `(key, value)` of `written` through `client`; each must be acknowledged.
fn put_all(runtime: &Runtime, client: &Client, written: &[(String, String)]) {
    let failed: Vec<String> = runtime.block_on(
        stream::iter(written.iter().cloned())
            .map(|(key, value)| {
                let client = client.clone();
                async move {
                    let call = client.send(key.clone(), Put { value });
                    match tokio::time::timeout(CALL_DEADLINE, call).await {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(format!("{key}: {error}")),
                        Err(_) => Some(format!("{key}: no answer within {CALL_DEADLINE:?}")),
                    }
                }
            })
            .buffer_unordered(READS_IN_FLIGHT)
            .filter_map(|failure| async move { failure })
            .collect(),
    );
    assert!(
        failed.is_empty(),
        "{} of {} puts to a quiet cluster failed, e.g. {:?}",
        failed.len(),
        written.len(),
        &failed[..failed.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------------
// Reading back

/// Reads every key the writers touched and returns what contradicts the log: one line each.
fn check(runtime: &Runtime, client: &Client, log: &Log) -> Vec<String> {
    let keys: Vec<String> = (0..COUNTERS)
        .map(counter_key)
        .chain(log.puts.iter().map(|(key, _)| key.clone()))
        .chain(log.failed_puts.iter().map(|(key, _)| key.clone()))
        .collect();
    let reads: BTreeMap<String, Result<Option<String>, String>> = runtime.block_on(
        stream::iter(keys)
            .map(|key| {
                let client = client.clone();
                async move {
                    let value = read(&client, &key).await;
                    (key, value)
                }
            })
            .buffer_unordered(READS_IN_FLIGHT)
            .collect(),
    );
    let mut problems = Vec::new();
    for counter in &log.not_numbers {
        problems.push(format!(
            "an increment of {} found no number there",
            counter_key(*counter)
        ));
    }
    for counter in 0..COUNTERS {
        let key = counter_key(counter);
        let acknowledged = log.increments.iter().filter(|(c, _)| *c == counter);
        let count = acknowledged.clone().count() as u64;
        let highest = acknowledged.map(|&(_, value)| value).max().unwrap_or(0);
        let failed = log
            .failed_increments
            .iter()
            .filter(|&&c| c == counter)
            .count() as u64;
        let value = match &reads[&key] {
            Ok(None) => 0,
            Ok(Some(text)) => match text.parse::<u64>() {
                Ok(value) => value,
                Err(_) => {
                    problems.push(format!("{key} holds {text:?}, not a number"));
                    continue;
                }
            },
            Err(error) => {
                problems.push(format!("{key} is unreadable: {error}"));
                continue;
            }
        };
        if value < count.max(highest) || value > count + failed {
            problems.push(format!(
                "{key} holds {value}, but {count} increments were acknowledged (the highest \
                 answered {highest}) and {failed} failed: expected {}..={}",
                count.max(highest),
                count + failed
            ));
        }
    }
    for (key, value) in &log.puts {
        match &reads[key] {
            Ok(Some(found)) if found == value => {}
            Ok(found) => problems.push(format!(
                "acknowledged {key} holds {found:?}, expected {value:?}"
            )),
            Err(error) => problems.push(format!("acknowledged {key} is unreadable: {error}")),
        }
    }
    for (key, value) in &log.failed_puts {
        match &reads[key] {
            Ok(None) => {}
            Ok(Some(found)) if found == value => {}
            Ok(found) => problems.push(format!(
                "failed {key} holds {found:?}, expected nothing or {value:?}"
            )),
            Err(error) => problems.push(format!("failed {key} is unreadable: {error}")),
        }
    }
    problems
}

/// Reads `key`, retrying an error twice (the node serves again, so none is expected).
async fn read(client: &Client, key: &str) -> Result<Option<String>, String> {
    let mut last = String::new();
    for _ in 0..3 {
        match tokio::time::timeout(CALL_DEADLINE, client.send(key.to_string(), Get)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => last = error.to_string(),
            Err(_) => last = format!("no answer within {CALL_DEADLINE:?}"),
        }
    }
    Err(last)
}
