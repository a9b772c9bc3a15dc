//! Process-level failover tests: real `kv serve` nodes killed with SIGKILL, frozen with
//! SIGSTOP, drained and reconfigured under load, checking that a dead node's shards move to live
//! nodes and come back when it returns, that a node never serves a shard it lost, that planned
//! moves lose no request and no value, and that a cluster without a quorum says "not ready"
//! instead of hanging.
//!
//! Every wait polls node status with a generous deadline (see `common::DEADLINE`); no test
//! asserts how long anything takes, except that a `kv` command ends within its own timeout
//! (plus a second to start the process) when the cluster is down. Needs the `kv` example built: `cargo test --workspace` does
//! that, `cargo test --test failover` alone does not (run `cargo build --examples` first).

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use clusterfunk::shard_map::shard_for;
use common::{id_list, Agreement, Cluster, ShardMap, DEADLINE, SHARD_COUNT};
use serde_json::Value;

/// `kv`'s own per-request timeout (`examples/kv.rs`); a `kv` command that outlives it by more
/// than [`HANG_SLACK`] counts as hung.
const KV_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Room for starting a `kv` process on a busy machine, on top of [`KV_CLIENT_TIMEOUT`].
const HANG_SLACK: Duration = Duration::from_secs(1);

/// The shard of `key`.
fn shard_of(key: &str) -> usize {
    shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize
}

/// `count` keys whose shards `node` owns in `map`, named `PREFIX-i`.
fn keys_owned_by(map: &ShardMap, node: u64, prefix: &str, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|key| map.owners[shard_of(key)] == node)
        .take(count)
        .collect()
}

/// Waits until nodes `ids` agree on one map in which exactly `owners` own shards, each a
/// balanced share, while every node of `ids` reports exactly `down` as marked down and no shard
/// moving; returns the agreement and the map.
fn wait_until_balanced(
    cluster: &Cluster,
    ids: &[u64],
    owners: &[u64],
    down: &[u64],
) -> (Agreement, ShardMap) {
    cluster.wait_for_one_map_where(
        ids,
        &format!("with shards balanced over {owners:?}, {down:?} down and no shard moving"),
        |_, map| {
            map.is_balanced(owners)
                && ids.iter().all(|&id| {
                    cluster.status(id).is_some_and(|status| {
                        id_list(&status["down"]) == down && status["shards_moving"] == 0
                    })
                })
        },
    )
}

/// Stores `value` under `key` through node `via`, which must succeed.
fn put(cluster: &Cluster, via: u64, key: &str, value: &str) {
    let (code, _, stderr) = cluster.kv(via, &["put", key, value]);
    assert_eq!(
        code,
        0,
        "kv put {key} through node {via}: {stderr}\n{}",
        cluster.report()
    );
}

/// Checks that `key` reads back as `value` through node `via`.
fn assert_value(cluster: &Cluster, via: u64, key: &str, value: &str) {
    let (code, stdout, stderr) = cluster.kv(via, &["get", key]);
    assert_eq!(
        (code, stdout.trim()),
        (0, value),
        "kv get {key} (shard {}) through node {via}: {stderr}\n{}",
        shard_of(key),
        cluster.report()
    );
}

// Goal: a follower killed with SIGKILL loses its shards to the live nodes once its lease has
// certainly expired, and gets its share back, with the data written meanwhile, when it restarts
// from disk. Method: 3 nodes; write keys of every node's shards; kill -9 a follower; wait until
// the survivors mark it down and own all shards between them; check that keys of its shards
// read as absent through every survivor (exit 3) — their values lived only in the dead
// process's memory, and a failover activates a shard empty, without a release or a snapshot —
// and can be written again through any node, while the survivors' keys keep their values;
// write more keys; restart it; wait until it is up and owns a balanced share again with no
// shard moving; then every value written after the failover reads back through every node,
// including those whose shards went back to it (their data handed over with the shard).
#[test]
fn killed_follower_shards_move_and_come_back() {
    let cluster = Cluster::new("killed_follower_shards_move", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (before, map) = cluster.wait_for_one_map(&ids);
    let victim = *ids
        .iter()
        .find(|&&id| id != before.leader)
        .expect("a follower");
    let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != victim).collect();

    let lost = keys_owned_by(&map, victim, "lost", 4);
    let kept: Vec<String> = survivors
        .iter()
        .flat_map(|&node| keys_owned_by(&map, node, &format!("kept-on-{node}"), 3))
        .collect();
    for (i, key) in lost.iter().chain(&kept).enumerate() {
        put(&cluster, ids[i % ids.len()], key, &format!("before-{key}"));
    }
    for key in &lost {
        assert_value(&cluster, victim, key, &format!("before-{key}"));
    }

    cluster.mark(&format!("kill -9 of follower {victim}"));
    cluster.kill9(victim);
    let (_, failover_map) = wait_until_balanced(&cluster, &survivors, &survivors, &[victim]);
    assert!(
        failover_map.epoch > map.epoch,
        "the failover made a new map"
    );
    for &via in &survivors {
        let nodes = cluster.nodes(via).expect("a survivor answers `nodes`");
        let flagged: Vec<u64> = nodes["nodes"]
            .as_array()
            .expect("a member list")
            .iter()
            .filter(|entry| entry["down"] == true)
            .filter_map(|entry| entry["id"].as_u64())
            .collect();
        assert_eq!(flagged, [victim], "node {via}'s `nodes --json`: {nodes}");
    }

    // The dead node's values are gone (in-memory data, no handoff from a dead node): the shard
    // starts empty on its new owner, through whichever node asks.
    for key in &lost {
        for &via in &survivors {
            let (code, stdout, stderr) = cluster.kv(via, &["get", key]);
            assert_eq!(
                code,
                3,
                "kv get {key} through node {via} after node {victim} died must find nothing \
                 (its value lived in the dead process): stdout {stdout:?}, stderr {stderr}\n{}",
                cluster.report()
            );
        }
    }
    for key in &kept {
        for &via in &survivors {
            assert_value(&cluster, via, key, &format!("before-{key}"));
        }
    }
    // Writable again through any node, the dead one's old shards included.
    for (i, key) in lost.iter().enumerate() {
        put(&cluster, survivors[i % 2], key, &format!("rewritten-{key}"));
        assert_value(
            &cluster,
            survivors[(i + 1) % 2],
            key,
            &format!("rewritten-{key}"),
        );
    }
    let after: Vec<String> = (0..48).map(|i| format!("after-{i}")).collect();
    for (i, key) in after.iter().enumerate() {
        put(&cluster, survivors[i % 2], key, &format!("value-{key}"));
    }

    cluster.mark(&format!("restart of node {victim}"));
    cluster.restart(victim);
    let (_, final_map) = wait_until_balanced(&cluster, &ids, &ids, &[]);
    assert!(final_map.epoch > failover_map.epoch);
    let handed_back = after
        .iter()
        .filter(|key| final_map.owners[shard_of(key)] == victim)
        .count();
    assert!(
        handed_back > 0,
        "none of {} keys landed on the returned node's shards: the check below would not \
         cover a handoff",
        after.len()
    );
    for &via in &ids {
        for key in &after {
            assert_value(&cluster, via, key, &format!("value-{key}"));
        }
        for key in &lost {
            assert_value(&cluster, via, key, &format!("rewritten-{key}"));
        }
        for key in &kept {
            assert_value(&cluster, via, key, &format!("before-{key}"));
        }
    }
}

/// What the readers of the paused leader saw.
#[derive(Default)]
struct Readings {
    /// `kv get` answers with the new value.
    reads: AtomicUsize,
    /// `kv owner` answers that passed the check.
    owners: AtomicUsize,
    /// Requests the old leader refused or timed out (allowed: it may be not ready).
    refused: AtomicUsize,
    /// Full passes over the keys, by all readers together.
    passes: AtomicUsize,
    /// Everything that broke the rule, with the evidence.
    violations: Mutex<Vec<String>>,
}

impl Readings {
    fn violation(&self, text: String) {
        self.violations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(text);
    }
}

// Goal: a leader frozen past its lease (a stopped VM, a long GC pause) never serves a shard it
// lost once it runs again, although its own map still says the shard is its own. Method: 3
// nodes; write "old" values to keys of the leader's shards; SIGSTOP the leader; wait until the
// others elect a new leader, mark the frozen node down and own all shards; write "new" values
// through them; start readers that keep asking the frozen node itself (`kv get --node OLD` and
// `kv owner --node OLD`): their first requests wait in its socket backlog and are handled the
// moment it runs; SIGCONT it. Every successful read must return the new value (never the old
// one, and never "absent"), and no owner answer may name the old leader at an epoch older than
// the map that took its shards. The readers keep going until it has rejoined (up, a balanced
// share, nothing moving) and each key was read once more; then the old node serves the new
// values itself.
#[test]
fn paused_leader_never_serves_a_stale_shard() {
    let cluster = Cluster::new("paused_leader_never_serves_stale", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (before, map) = cluster.wait_for_one_map(&ids);
    let old = before.leader;
    let others: Vec<u64> = ids.iter().copied().filter(|&id| id != old).collect();
    let keys = keys_owned_by(&map, old, "stale", 4);
    for (i, key) in keys.iter().enumerate() {
        put(&cluster, ids[i % ids.len()], key, &format!("old-{key}"));
        assert_value(&cluster, old, key, &format!("old-{key}"));
    }

    cluster.mark(&format!("SIGSTOP of leader {old}"));
    cluster.pause(old);
    let (during, moved) = wait_until_balanced(&cluster, &others, &others, &[old]);
    assert!(during.term > before.term, "a new leader means a new term");
    assert!(moved.epoch > map.epoch, "the failover made a new map");
    for (i, key) in keys.iter().enumerate() {
        put(&cluster, others[i % 2], key, &format!("new-{key}"));
        assert_value(&cluster, others[(i + 1) % 2], key, &format!("new-{key}"));
    }

    let readings = Readings::default();
    let started = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let readers = 3;
    thread::scope(|scope| {
        for reader in 0..readers {
            let (readings, started, stop, keys, cluster) =
                (&readings, &started, &stop, &keys, &cluster);
            scope.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                let mut round = reader;
                while !stop.load(Ordering::SeqCst) {
                    let key = &keys[round % keys.len()];
                    if reader == 0 {
                        check_owner(cluster, old, key, moved.epoch, readings);
                    } else {
                        check_read(cluster, old, key, readings);
                    }
                    round += 1;
                    if round % keys.len() == reader % keys.len() {
                        readings.passes.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        cluster.wait_until("the readers started", DEADLINE, || {
            (started.load(Ordering::SeqCst) == readers).then_some(())
        });
        cluster.mark(&format!("SIGCONT of old leader {old}"));
        cluster.resume(old);
        wait_until_balanced(&cluster, &ids, &ids, &[]);
        let passes = readings.passes.load(Ordering::SeqCst);
        cluster.wait_until(
            "every reader went over the keys again after the rejoin",
            DEADLINE,
            || (readings.passes.load(Ordering::SeqCst) >= passes + readers).then_some(()),
        );
        stop.store(true, Ordering::SeqCst);
    });

    let violations = readings
        .violations
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(
        violations.is_empty(),
        "the resumed old leader {old} served stale state {} time(s):\n  {}\n{}",
        violations.len(),
        violations.join("\n  "),
        cluster.report()
    );
    let (reads, owners) = (
        readings.reads.load(Ordering::SeqCst),
        readings.owners.load(Ordering::SeqCst),
    );
    assert!(
        reads > 0 && owners > 0,
        "the readers saw {reads} good reads and {owners} good owner answers; they must see some"
    );
    eprintln!(
        "through the resumed old leader: {reads} reads and {owners} owner answers, {} refused",
        readings.refused.load(Ordering::SeqCst)
    );
    for key in &keys {
        assert_value(&cluster, old, key, &format!("new-{key}"));
    }
}

/// One `kv get KEY --node VIA`: a success must give the new value.
fn check_read(cluster: &Cluster, via: u64, key: &str, readings: &Readings) {
    let (code, stdout, stderr) = cluster.kv(via, &["get", key]);
    let got = stdout.trim();
    match code {
        0 if got == format!("new-{key}") => {
            readings.reads.fetch_add(1, Ordering::SeqCst);
        }
        0 => readings.violation(format!(
            "kv get {key} through node {via} returned {got:?} instead of new-{key}"
        )),
        3 => readings.violation(format!(
            "kv get {key} through node {via} found nothing (a shard served without its data)"
        )),
        _ => {
            readings.refused.fetch_add(1, Ordering::SeqCst);
            assert!(
                !stderr.is_empty(),
                "kv get {key} exited {code} without saying why"
            );
        }
    }
}

/// One `kv owner KEY --node VIA`: an answer naming `via` itself must carry an epoch at least
/// `moved_epoch`, the map that took `via`'s shards away.
fn check_owner(cluster: &Cluster, via: u64, key: &str, moved_epoch: u64, readings: &Readings) {
    let (code, stdout, _) = cluster.kv(via, &["owner", key]);
    if code != 0 {
        readings.refused.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let answer: Value = match serde_json::from_str(stdout.trim()) {
        Ok(answer) => answer,
        Err(e) => {
            readings.violation(format!("kv owner {key} printed no JSON ({e}): {stdout}"));
            return;
        }
    };
    let (node, epoch) = (answer["node"].as_u64(), answer["epoch"].as_u64());
    match (node, epoch) {
        (Some(node), Some(epoch)) if node != via || epoch >= moved_epoch => {
            readings.owners.fetch_add(1, Ordering::SeqCst);
        }
        _ => readings.violation(format!(
            "kv owner {key} through node {via}: {answer} (its shards moved at epoch {moved_epoch})"
        )),
    }
}

/// What one load client did.
#[derive(Default)]
struct LoadReport {
    /// Requests sent (puts and gets).
    requests: usize,
    /// Every failed request, with the evidence.
    failures: Vec<String>,
    /// The last value written under each key.
    last_values: BTreeMap<String, String>,
    /// The longest a request took (a `kv` process end to end), for the test's output.
    slowest: Duration,
}

/// Client `client` of the load: until `stop` is set (or `requests_max` requests), `kv put` of
/// one of its keys through one node, then `kv get` of it through the next, rotating over
/// `via`; `progress` counts finished put-and-get pairs of all clients.
fn load(
    cluster: &Cluster,
    client: usize,
    via: &[u64],
    stop: &AtomicBool,
    progress: &AtomicUsize,
    requests_max: usize,
) -> LoadReport {
    const KEYS_PER_CLIENT: usize = 8;
    let mut report = LoadReport::default();
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) && report.requests < requests_max {
        let key = format!("load-{client}-{}", round % KEYS_PER_CLIENT);
        let value = format!("{client}-{round}");
        let put_via = via[(client + round) % via.len()];
        let get_via = via[(client + round + 1) % via.len()];
        round += 1;
        report.requests += 2;
        let started = Instant::now();
        let (code, _, stderr) = cluster.kv(put_via, &["put", &key, &value]);
        report.slowest = report.slowest.max(started.elapsed());
        if code != 0 {
            report.failures.push(format!(
                "kv put {key} {value} through node {put_via} exited {code}: {}",
                stderr.trim()
            ));
            // Whether it took effect is unknown: no value is expected from here on.
            report.last_values.remove(&key);
            continue;
        }
        report.last_values.insert(key.clone(), value.clone());
        let started = Instant::now();
        let (code, stdout, stderr) = cluster.kv(get_via, &["get", &key]);
        report.slowest = report.slowest.max(started.elapsed());
        if (code, stdout.trim()) != (0, value.as_str()) {
            report.failures.push(format!(
                "kv get {key} through node {get_via} exited {code} with {:?}, expected {value:?}: {}",
                stdout.trim(),
                stderr.trim()
            ));
        }
        progress.fetch_add(1, Ordering::SeqCst);
    }
    report
}

/// Runs `clients` load clients (see [`load`]) through nodes `via` while `steps` runs, then stops
/// them and returns their reports. `steps` gets a `steady` callback that waits until the
/// clients have made some progress (two rounds each) since it was called.
fn under_load(
    cluster: &Cluster,
    clients: usize,
    via: &[u64],
    steps: impl FnOnce(&dyn Fn()),
) -> Vec<LoadReport> {
    let stop = AtomicBool::new(false);
    let progress = AtomicUsize::new(0);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                let (stop, progress) = (&stop, &progress);
                scope.spawn(move || load(cluster, client, via, stop, progress, 100_000))
            })
            .collect();
        let steady = || {
            let seen = progress.load(Ordering::SeqCst);
            cluster.wait_until("the clients make progress", DEADLINE, || {
                (progress.load(Ordering::SeqCst) >= seen + 2 * clients).then_some(())
            });
        };
        steps(&steady);
        steady();
        stop.store(true, Ordering::SeqCst);
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a load client panicked"))
            .collect()
    })
}

/// Fails the test, with every failure, when any request of `reports` failed; returns how many
/// requests they made.
fn assert_no_failed_requests(cluster: &Cluster, reports: &[LoadReport], during: &str) -> usize {
    let requests: usize = reports.iter().map(|report| report.requests).sum();
    let failures: Vec<&str> = reports
        .iter()
        .flat_map(|r| &r.failures)
        .map(String::as_str)
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed {during}:\n  {}\n{}",
        failures.len(),
        failures.join("\n  "),
        cluster.report()
    );
    requests
}

// Goal: planned moves — a node joining, a learner joining, a drain, an undrain and a removal —
// hand shards over without failing a single request and without losing a value. Method: 5
// node slots, 3 bootstrapping; 4 client threads each write and read back their own keys
// continuously through nodes 1–3 in turn (`kv put` through one node, `kv get` through the
// next); meanwhile add node 4 as a voter, node 5 as a learner, `drain --id 2`, `undrain --id
// 2` and remove node 4, waiting after each until the shards are balanced over the owners it
// implies and nothing moves, and for some client progress before each change. Then stop the
// clients: no request may have failed, and every key's last written value reads back through
// every remaining node.
#[test]
fn planned_moves_under_load_lose_nothing() {
    let cluster = Cluster::with_initial_members("planned_moves_under_load", 5, 3);
    cluster.start_all_with_init();
    wait_until_balanced(&cluster, &[1, 2, 3], &[1, 2, 3], &[]);
    cluster.start(4);
    cluster.start(5);
    let reports = under_load(&cluster, 4, &[1, 2, 3], |steady| {
        let change = |via: u64, args: &[&str]| {
            steady();
            cluster.mark(&format!("clusterfunk {}", args.join(" ")));
            let (code, _, stderr) = cluster.cf_at(via, args);
            assert_eq!(code, 0, "clusterfunk {args:?} through node {via}: {stderr}");
        };
        let (addr4, addr5) = (cluster.addr(4), cluster.addr(5));
        change(1, &["add-node", "--id", "4", "--addr", &addr4]);
        wait_until_balanced(&cluster, &[1, 2, 3, 4], &[1, 2, 3, 4], &[]);
        change(3, &["add-node", "--id", "5", "--addr", &addr5, "--learner"]);
        let all = [1, 2, 3, 4, 5];
        wait_until_balanced(&cluster, &all, &all, &[]);
        change(2, &["drain", "--id", "2"]);
        wait_until_balanced(&cluster, &all, &[1, 3, 4, 5], &[]);
        change(1, &["undrain", "--id", "2"]);
        wait_until_balanced(&cluster, &all, &all, &[]);
        change(2, &["remove-node", "--id", "4"]);
        wait_until_balanced(&cluster, &[1, 2, 3, 5], &[1, 2, 3, 5], &[]);
        let exit = cluster.stop(4);
        assert!(exit.success(), "the removed node stops cleanly: {exit}");
    });
    let requests = assert_no_failed_requests(&cluster, &reports, "during planned moves");
    eprintln!(
        "{requests} requests during the planned moves, none failed; the slowest took {:?}",
        reports.iter().map(|report| report.slowest).max()
    );
    for report in &reports {
        for (key, value) in &report.last_values {
            for via in [1, 2, 3, 5] {
                assert_value(&cluster, via, key, value);
            }
        }
    }
}

/// The shared body of the outage tests: kills both nodes but one (the leader, or a follower),
/// and returns what went wrong, with the evidence (empty when nothing did).
fn outage_answers_not_ready(name: &str, survivor_leads: bool) -> Vec<String> {
    let cluster = Cluster::new(name, 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, map) = cluster.wait_for_one_map(&ids);
    let survivor = if survivor_leads {
        agreement.leader
    } else {
        *ids.iter()
            .find(|&&id| id != agreement.leader)
            .expect("a follower")
    };
    for &id in &ids {
        if id != survivor {
            cluster.kill9(id);
        }
    }
    cluster.wait_until(
        &format!("the lone node {survivor}'s lease has run out"),
        DEADLINE,
        || {
            cluster
                .status(survivor)
                .filter(|s| s["lease_remaining_ms"].is_null() && s["state"] != "serving")
        },
    );

    // A key of every former owner, read and written through the survivor, all at once.
    let keys: Vec<(u64, String)> = ids
        .iter()
        .map(|&id| (id, keys_owned_by(&map, id, "outage", 1).remove(0)))
        .collect();
    let limit = KV_CLIENT_TIMEOUT + HANG_SLACK;
    let outcomes: Vec<_> = thread::scope(|scope| {
        let runs: Vec<_> = keys
            .iter()
            .flat_map(|(owner, key)| {
                [
                    (*owner, vec!["get", key.as_str()]),
                    (*owner, vec!["put", key.as_str(), "during-the-outage"]),
                ]
            })
            .map(|(owner, args)| {
                let cluster = &cluster;
                scope.spawn(move || {
                    let started = Instant::now();
                    let outcome = cluster.run_within(cluster.kv_command(survivor, &args), limit);
                    eprintln!(
                        "kv {} through the lone node {survivor}: {:?} after {:?}",
                        args.join(" "),
                        outcome.as_ref().map(|(code, _, _)| code),
                        started.elapsed()
                    );
                    (owner, args, outcome)
                })
            })
            .collect();
        runs.into_iter()
            .map(|run| run.join().expect("a kv runner panicked"))
            .collect()
    });
    let wrong: Vec<String> = outcomes
        .iter()
        .filter_map(|(owner, args, outcome)| {
            let problem = match outcome {
                None => format!("hung past {limit:?}"),
                Some((code, stdout, stderr)) => {
                    if *code != 0 && *code != 3 && stderr.contains("not ready") {
                        return None;
                    }
                    format!(
                        "exited {code}, stdout {:?}, stderr {:?}",
                        stdout.trim(),
                        stderr.trim()
                    )
                }
            };
            Some(format!(
                "kv {} (a key of node {owner}'s shard): {problem}",
                args.join(" ")
            ))
        })
        .collect();
    if wrong.is_empty() {
        return wrong;
    }
    vec![format!(
        "through the lone node {survivor} (the {} left), {} of {} requests did not fail with \
         \"not ready\" within {limit:?}:\n  {}\n{}",
        if survivor_leads { "leader" } else { "follower" },
        wrong.len(),
        outcomes.len(),
        wrong.join("\n  "),
        cluster.report()
    )]
}

// Goal: when a 3-node cluster loses two nodes, the one left answers every request with "not
// ready", within the client's timeout, whether it was the leader (which keeps believing it
// leads: openraft does not step a leader down without a quorum) or a follower. Method: for
// each case a fresh cluster; kill -9 the other two, wait until the survivor's lease has run out
// (`lease_remaining_ms` absent, not serving), then `kv get` and `kv put` keys of all three
// former owners through it at once, each bounded by kv's timeout plus a second: each must exit
// non-zero (not 3, "absent") with "not ready" on stderr. Open bugs at the time of writing (the
// client of f30a2f2): for keys of the dead nodes' shards the client goes straight to the dead
// owner named by the survivor's map and gives up after four attempts with "no node
// reachable: cannot reach <dead node>"; for the survivor's own shards it retries each 3 s
// "not ready" wait of the router four times, so a `kv` command takes about 12 s (6 s when a
// follower is left), longer than its 10 s timeout.
#[test]
fn full_outage_answers_not_ready_quickly() {
    let mut problems = outage_answers_not_ready("full_outage_leader_left", true);
    problems.extend(outage_answers_not_ready("full_outage_follower_left", false));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// Goal: SIGTERM makes a node leave gracefully — it hands its shards (with their data) and its
// leadership to the others before it exits 0, so a rolling restart fails no request — and it
// takes its share back by itself when it starts again. Method: 3 nodes; write keys of the
// leader's shards; 3 clients write and read their own keys continuously through the two other
// nodes; SIGTERM the leader: it must exit 0 (drained); the other two agree on a new leader and
// own all shards, with the old leader draining; its keys read back through both. Restart it:
// the shards are balanced over all three again (it undrained itself). Then stop the clients: no
// request failed, every last value reads back through every node.
#[test]
fn sigterm_drains_the_node_and_a_restart_takes_its_share_back() {
    let cluster = Cluster::new("graceful_shutdown", 3);
    cluster.start_all_with_init();
    let (agreement, map) = wait_until_balanced(&cluster, &[1, 2, 3], &[1, 2, 3], &[]);
    let leaving = agreement.leader;
    let staying: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != leaving).collect();
    let keys = keys_owned_by(&map, leaving, "graceful", 6);
    for key in &keys {
        put(&cluster, staying[0], key, &format!("{key}-value"));
    }
    let reports = under_load(&cluster, 3, &staying, |steady| {
        steady();
        cluster.mark(&format!("SIGTERM node {leaving}"));
        let exit = cluster.stop(leaving);
        assert!(
            exit.success(),
            "node {leaving} drained before exiting: {exit}\n{}",
            cluster.report()
        );
        cluster.wait_for_one_map_where(
            &staying,
            &format!("node {leaving} drained and {staying:?} own every shard"),
            |_, map| {
                map.is_balanced(&staying)
                    && cluster.status(staying[0]).is_some_and(|status| {
                        id_list(&status["draining"]) == [leaving]
                            && id_list(&status["down"]).is_empty()
                    })
            },
        );
        steady();
        for key in &keys {
            for &via in &staying {
                assert_value(&cluster, via, key, &format!("{key}-value"));
            }
        }
        cluster.mark(&format!("restart node {leaving}"));
        cluster.restart(leaving);
        wait_until_balanced(&cluster, &[1, 2, 3], &[1, 2, 3], &[]);
    });
    assert_no_failed_requests(&cluster, &reports, "around the graceful restart");
    let status = cluster.status(leaving).expect("the restarted node answers");
    assert!(
        id_list(&status["draining"]).is_empty(),
        "the restarted node undrained itself: {status}"
    );
    for via in [1, 2, 3] {
        for key in &keys {
            assert_value(&cluster, via, key, &format!("{key}-value"));
        }
        for report in &reports {
            for (key, value) in &report.last_values {
                assert_value(&cluster, via, key, value);
            }
        }
    }
}

// Goal: a cluster that lost a majority for good comes back from one survivor's disk with
// `clusterfunk recover`, and grows again with fresh nodes. Method: 5 node slots, 3 bootstrap;
// kill -9 nodes 2 and 3 for good; node 1 alone answers not ready. Stop it (kill -9); `recover`
// without the confirmation flag refuses and writes nothing (`--inspect` shows the same state
// before and after); with it, node 1's membership becomes {1}. Restart node 1 from its data
// dir: it leads and owns every shard; keys route and store through it. Start nodes 4 and 5
// empty and `add-node` them: the three agree on a map balanced over 1, 4 and 5, and keys of
// every owner store and read back through every node.
#[test]
fn lost_quorum_recovers_from_a_survivor_and_grows_again() {
    let cluster = Cluster::with_initial_members("recover_lost_quorum", 5, 3);
    cluster.start_all_with_init();
    wait_until_balanced(&cluster, &[1, 2, 3], &[1, 2, 3], &[]);
    put(&cluster, 1, "before-the-loss", "x");
    cluster.mark("kill -9 nodes 2 and 3 for good");
    cluster.kill9(2);
    cluster.kill9(3);
    cluster.wait_until("node 1 alone is not ready", DEADLINE, || {
        let status = cluster.status(1)?;
        (status["state"] == "not_ready").then_some(())
    });
    cluster.kill9(1);

    let data_dir = cluster.data_dir(1);
    let data_dir = data_dir.to_str().expect("a UTF-8 temporary path");
    let inspect = || {
        let (code, stdout, stderr) =
            cluster.cf(&["recover", "--data-dir", data_dir, "--inspect", "--json"]);
        assert_eq!(code, 0, "recover --inspect: {stderr}");
        serde_json::from_str::<Value>(stdout.trim()).expect("inspect prints JSON")
    };
    let before = inspect();
    assert_eq!(id_list(&before["voters"]), [1, 2, 3], "{before}");
    let members = format!("1={}", cluster.addr(1));
    let recover = [
        "recover",
        "--data-dir",
        data_dir,
        "--id",
        "1",
        "--members",
        &members,
    ];
    let (code, _, stderr) = cluster.cf(&recover);
    assert_ne!(code, 0, "recover without confirmation must refuse");
    assert!(
        stderr.contains("--i-understand-this-may-lose-data"),
        "{stderr}"
    );
    assert_eq!(inspect(), before, "an unconfirmed recover writes nothing");
    let mut confirmed = recover.to_vec();
    confirmed.extend(["--i-understand-this-may-lose-data", "--json"]);
    let (code, stdout, stderr) = cluster.cf(&confirmed);
    assert_eq!(code, 0, "recover: {stderr}");
    let recovered: Value = serde_json::from_str(stdout.trim()).expect("recover prints JSON");
    assert_eq!(id_list(&recovered["voters"]), [1], "{recovered}");
    let after = inspect();
    assert_eq!(id_list(&after["voters"]), [1], "{after}");
    assert!(
        after["vote_term"].as_u64() > before["vote_term"].as_u64(),
        "the new membership is in a newer term: {before} → {after}"
    );

    cluster.mark("restart node 1 after recover");
    cluster.restart(1);
    wait_until_balanced(&cluster, &[1], &[1], &[]);
    put(&cluster, 1, "after-the-recovery", "y");
    assert_value(&cluster, 1, "after-the-recovery", "y");

    cluster.start(4);
    cluster.start(5);
    for id in [4, 5] {
        let addr = cluster.addr(id);
        let (code, _, stderr) =
            cluster.cf_at(1, &["add-node", "--id", &id.to_string(), "--addr", &addr]);
        assert_eq!(code, 0, "add-node {id}: {stderr}");
    }
    let (agreement, map) = wait_until_balanced(&cluster, &[1, 4, 5], &[1, 4, 5], &[]);
    assert_eq!(agreement.voters, [1, 4, 5]);
    for owner in [1, 4, 5] {
        for key in keys_owned_by(&map, owner, &format!("grown-{owner}"), 3) {
            put(&cluster, 4, &key, &key);
            for via in [1, 4, 5] {
                assert_value(&cluster, via, &key, &key);
            }
        }
    }
}

// Goal: a pause of the whole cluster (a host or hypervisor stall) longer than the markdown wait
// loses nothing. Regression: the leader resumed, found no renewal since before its own pause,
// and marked the healthy followers down before their queued renewals were read; their shards
// moved and restarted empty, losing two thirds of the values without any client error.
// Method: 3 nodes; write keys on every node's shards; SIGSTOP all three for 1 s (about twice
// the markdown wait); SIGCONT; wait for one agreed map; no shard moved (the map's epoch is
// unchanged) and every value reads back through every node at the end.
#[test]
fn a_cluster_paused_longer_than_the_markdown_wait_marks_no_node_down_and_loses_nothing() {
    let cluster = Cluster::new("whole_cluster_paused", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (_, map) =
        cluster.wait_for_one_map_where(&ids, "that is balanced", |_, map| map.is_balanced(&ids));
    let mut keys = Vec::new();
    for &owner in &ids {
        keys.extend(keys_owned_by(&map, owner, &format!("paused-{owner}"), 8));
    }
    for (i, key) in keys.iter().enumerate() {
        put(&cluster, ids[i % ids.len()], key, &format!("v-{key}"));
    }

    cluster.mark("SIGSTOP of every node");
    for &id in &ids {
        cluster.pause(id);
    }
    // The fault's length, not a synchronisation: about twice the markdown wait (553 ms).
    thread::sleep(Duration::from_secs(1));
    for &id in &ids {
        cluster.resume(id);
    }
    cluster.mark("SIGCONT of every node");

    let (_, after) = cluster.wait_for_one_map(&ids);
    for &via in &ids {
        for key in &keys {
            assert_value(&cluster, via, key, &format!("v-{key}"));
        }
    }
    assert_eq!(
        after.epoch,
        map.epoch,
        "a shard moved although no node failed\n{}",
        cluster.report()
    );
}
