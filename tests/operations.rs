//! Operator flows end to end: every acknowledged value of a `kv` cluster must read back after any
//! sequence of planned operations — `drain`, `undrain`, `add-node`, `remove-node`, a rolling
//! restart (SIGTERM, on which a `kv` node drains itself, then a start from the same data dir)
//! and `step-down` — when it is read only at the end. A read in between would hide a lost
//! value: it activates the shard, which then takes the snapshot parked for it by the last move.
//!
//! Three directed tests run one flow each on values written before it; a seeded randomized test
//! runs schedules of flows while writers store fresh keys through random nodes. The schedule is
//! a pure function of the seed, generated and printed before it runs, so a failure replays with
//! its seed. Every flow runs twice: on nodes that keep the values in memory (`kv serve --store
//! memory`: a move carries them in the handoff) and on nodes that keep them in their own LMDB
//! store (`--store lmdb`, fsync on: the next owner commits what the handoff carried to its store
//! before it serves); the names of the LMDB runs end in `_in_lmdb`. Environment:
//! - `OPS_SEEDS`: the seeds of the randomized test, a range `0..200` or a list `7,9`
//!   (default [`DEFAULT_SEEDS`]);
//! - `OPS_KEYS`: how many keys each randomized run writes (default [`DEFAULT_KEYS`]); half before
//!   the schedule, the rest spread over its steps;
//! - `OPS_DIRECTED_KEYS`: how many keys each directed test writes (default [`DIRECTED_KEYS`]),
//!   e.g. `OPS_DIRECTED_KEYS=100000 cargo test --release --test operations without_reads`.
//!
//! The long run:
//!
//! ```text
//! cargo build --release --examples
//! OPS_SEEDS=0..200 cargo test --release --test operations random_operator_flows -- --nocapture
//! ```
//!
//! Every wait polls node status with a generous deadline; no test asserts how long anything
//! takes. Needs the `kv` example built: `cargo test --workspace` does that, `cargo test --test
//! operations` alone does not (run `cargo build --examples` first).

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod common;

// The messages of the `kv` example, so that writes and reads go through an in-process client.
#[allow(dead_code)]
#[path = "../examples/support/kv_api.rs"]
mod kv_api;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clusterfunk::client::Client;
use clusterfunk::shard_map::shard_for;
use common::{id_list, runtime, Cluster, ShardMap, Store, DEADLINE, SHARD_COUNT};
use futures_util::stream::{self, StreamExt};
use kv_api::{Get, Put};
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// The seeds the randomized test runs when `OPS_SEEDS` is not set: together their schedules
/// drain, undrain, add and remove node 4, restart nodes and step the leader down.
const DEFAULT_SEEDS: [u64; 3] = [8, 13, 15];

/// Keys per randomized run when `OPS_KEYS` is not set.
const DEFAULT_KEYS: usize = 2_000;

/// Keys each directed test writes before its flow when `OPS_DIRECTED_KEYS` is not set.
const DIRECTED_KEYS: usize = 1_000;

/// The keys each directed test writes, from `OPS_DIRECTED_KEYS`, or [`DIRECTED_KEYS`].
fn directed_keys() -> usize {
    match std::env::var("OPS_DIRECTED_KEYS") {
        Err(_) => DIRECTED_KEYS,
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(count) if count >= 1 => count,
            _ => panic!("OPS_DIRECTED_KEYS={text:?}: give a number of keys, at least 1"),
        },
    }
}

/// Concurrent writers (tokio tasks), each writing one key at a time.
const WRITERS: usize = 4;

/// Concurrent reads when the values are checked at the end.
const READS_IN_FLIGHT: usize = 32;

/// Steps of a randomized schedule: at least this many ...
const STEPS_MIN: usize = 6;

/// ... and at most this many.
const STEPS_MAX: usize = 8;

/// The node that joins with `add-node` and leaves with `remove-node`; nodes 1–3 bootstrap.
const SPARE: u64 = 4;

/// Per-request timeout of the in-process clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on one write or read, retries included; one that takes longer counts as failed.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on a wait for the cluster to settle after an operation: moving a third of 1024 shards
/// takes a few seconds, far more on a busy 2-core machine.
const SETTLE_DEADLINE: Duration = Duration::from_secs(2 * DEADLINE.as_secs());

/// Bound on a wait for a batch of writes to finish.
const WRITES_DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Directed flows

// Goal: `drain` then `undrain` of a node loses no value written before, when nothing reads in
// between (issue 10: ~9 of 150 values lost). Method: 3 nodes; write DIRECTED_KEYS keys through
// random nodes, all acknowledged; `drain --id 2`, wait until nodes 1 and 3 own every shard with
// nothing moving; `undrain --id 2`, wait until the shards are balanced over all three again;
// only then read every key back: each must hold its value. Once with the values in memory, once
// in each node's LMDB store (a move carries them in the handoff and the next owner commits them
// to its own store before it serves).
#[test]
fn drain_then_undrain_without_reads_keeps_every_value() {
    drain_then_undrain_without_reads(Store::Memory);
}

#[test]
fn drain_then_undrain_without_reads_keeps_every_value_in_lmdb() {
    drain_then_undrain_without_reads(Store::Lmdb);
}

fn drain_then_undrain_without_reads(store: Store) {
    let cluster =
        Cluster::new(&cluster_name("ops_drain_undrain", &store), 3).with_store(store.clone());
    cluster.start_all_with_init();
    let mut model = Model::initial();
    settle(&cluster, &model, None, "before the writes");
    let runtime = runtime();
    let written = write_all(&runtime, &cluster, &model, directed_keys());

    operator(&cluster, 1, &["drain", "--id", "2"], "drain node 2");
    model.drained.insert(2);
    settle(&cluster, &model, None, "after `drain --id 2`");
    operator(&cluster, 3, &["undrain", "--id", "2"], "undrain node 2");
    model.drained.remove(&2);
    let map = settle(&cluster, &model, None, "after `undrain --id 2`");

    assert_every_value(
        &runtime,
        &cluster,
        &model,
        &map,
        &written,
        &format!(
            "drain 2 then undrain 2, {} store, values written before, read only at the end",
            store.label()
        ),
    );
}

// Goal: adding a node then removing it loses no value written before, when nothing reads in
// between (issue 10: 43 of 150 values lost). Method: 4 node slots, 3 bootstrap; write
// DIRECTED_KEYS keys, all acknowledged; start node 4 empty, `add-node` it and wait until the
// shards are balanced over all four; `remove-node --id 4` and wait until they are balanced over
// 1–3 again; stop node 4 (it must exit cleanly); only then read every key back. With either
// store.
#[test]
fn add_then_remove_node_without_reads_keeps_every_value() {
    add_then_remove_node_without_reads(Store::Memory);
}

#[test]
fn add_then_remove_node_without_reads_keeps_every_value_in_lmdb() {
    add_then_remove_node_without_reads(Store::Lmdb);
}

fn add_then_remove_node_without_reads(store: Store) {
    let cluster = Cluster::with_initial_members(&cluster_name("ops_add_remove", &store), 4, 3)
        .with_store(store.clone());
    cluster.start_all_with_init();
    let mut model = Model::initial();
    settle(&cluster, &model, None, "before the writes");
    let runtime = runtime();
    let written = write_all(&runtime, &cluster, &model, directed_keys());

    cluster.start(SPARE);
    let addr = cluster.addr(SPARE);
    operator(
        &cluster,
        1,
        &["add-node", "--id", "4", "--addr", &addr],
        "add node 4",
    );
    model.voters.push(SPARE);
    settle(&cluster, &model, None, "after `add-node --id 4`");
    operator(&cluster, 2, &["remove-node", "--id", "4"], "remove node 4");
    model.voters.retain(|&id| id != SPARE);
    let map = settle(&cluster, &model, None, "after `remove-node --id 4`");
    let exit = cluster.stop(SPARE);
    assert!(exit.success(), "the removed node 4 stops cleanly: {exit}");

    assert_every_value(
        &runtime,
        &cluster,
        &model,
        &map,
        &written,
        &format!(
            "add node 4 then remove it, {} store, values written before, read only at the end",
            store.label()
        ),
    );
}

// Goal: a rolling restart — each node in turn stopped with SIGTERM (it drains itself and exits
// 0) and started again from its data dir (it undrains itself) — loses no value written before,
// when nothing reads in between (issue 10: 124 of 150 values lost). Method: 3 nodes; write
// DIRECTED_KEYS keys, all acknowledged; for nodes 1, 2, 3: SIGTERM, require exit status 0,
// wait until the other two own every shard with nothing moving, restart it, wait until the
// shards are balanced over all three; only then read every key back. With either store: with
// LMDB, a restarted node's own store holds records of the shards it had before, at an older
// epoch, which it must not serve in place of what is handed back to it.
#[test]
fn rolling_restart_without_reads_keeps_every_value() {
    rolling_restart_without_reads(Store::Memory);
}

#[test]
fn rolling_restart_without_reads_keeps_every_value_in_lmdb() {
    rolling_restart_without_reads(Store::Lmdb);
}

fn rolling_restart_without_reads(store: Store) {
    let cluster =
        Cluster::new(&cluster_name("ops_rolling_restart", &store), 3).with_store(store.clone());
    cluster.start_all_with_init();
    let model = Model::initial();
    settle(&cluster, &model, None, "before the writes");
    let runtime = runtime();
    let written = write_all(&runtime, &cluster, &model, directed_keys());

    for id in cluster.ids() {
        cluster.mark(&format!("SIGTERM node {id}"));
        let exit = cluster.stop(id);
        assert!(
            exit.success(),
            "node {id} drains itself on SIGTERM and exits 0: {exit}\n{}",
            cluster.report()
        );
        settle(
            &cluster,
            &model,
            Some(id),
            &format!("after SIGTERM of node {id}"),
        );
        cluster.mark(&format!("restart node {id}"));
        cluster.restart(id);
        settle(
            &cluster,
            &model,
            None,
            &format!("after restarting node {id}"),
        );
    }
    let map = settle(&cluster, &model, None, "after the rolling restart");

    assert_every_value(
        &runtime,
        &cluster,
        &model,
        &map,
        &written,
        &format!(
            "rolling restart of nodes 1, 2, 3, {} store, values written before, read only at \
             the end",
            store.label()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Randomized flows

// Goal: under any schedule of operator flows — drain, undrain, add-node, remove-node, rolling
// restart steps and step-down, some waited out until nothing moves and some followed at once by
// the next — while values are written continuously, every acknowledged value reads back at the
// end. Method: per seed of OPS_SEEDS, a fresh cluster of 3 nodes (slot 4 spare); generate a
// schedule of 6–8 steps from the seed (see `schedule`: at least two nodes own shards after any
// drain, at most one node is down at a time and only after the cluster settled, so a quorum
// always stays); 4 writer tasks store fresh keys with unique values through a client of a
// random member, half of OPS_KEYS before the first step and the rest spread over the steps,
// each step's share released in parts while it runs and finished before the next; no reads.
// Then stop the writers, wait until the cluster settles as the schedule implies, and read every
// acknowledged key back: none may be missing or hold another value. Failed writes are counted
// and shown, never checked. Once with the values in memory, once in each node's LMDB store.
#[test]
fn random_operator_flows_keep_every_acknowledged_value() {
    random_operator_flows(Store::Memory);
}

#[test]
fn random_operator_flows_keep_every_acknowledged_value_in_lmdb() {
    random_operator_flows(Store::Lmdb);
}

fn random_operator_flows(store: Store) {
    let seeds = seeds();
    let keys = keys();
    for &seed in &seeds {
        run_schedule(seed, keys, store.clone());
    }
    eprintln!(
        "random operator flows, {} store: {} seed(s) passed with {keys} keys each",
        store.label(),
        seeds.len()
    );
}

/// The name of a test's cluster (its ports, secret and directory): `base`, with the store.
fn cluster_name(base: &str, store: &Store) -> String {
    format!("{base}_{}", store.label())
}

// Goal: the schedule generator keeps its promises, so a randomized run never fails for a
// reason of its own making. Method: generate the schedules of seeds 0..2000 and replay each on
// the model: every step is allowed where it stands, and the same seed gives the same schedule.
#[test]
fn schedules_are_replayable_and_keep_an_owner_and_a_quorum() {
    for seed in 0..2_000 {
        let steps = schedule(seed);
        assert!((STEPS_MIN..=STEPS_MAX).contains(&steps.len()));
        assert_eq!(describe(&steps), describe(&schedule(seed)), "seed {seed}");
        let mut model = Model::initial();
        for step in &steps {
            assert!(
                model.allows(&step.operation),
                "seed {seed}: {step} is not allowed in {model:?}\n{}",
                describe(&steps)
            );
            model.apply(&step.operation);
        }
    }
    assert_eq!(parse_seeds("0..3"), Ok(vec![0, 1, 2]));
    assert_eq!(parse_seeds(" 7, 9 "), Ok(vec![7, 9]));
    assert!(parse_seeds("9..7").is_err());
    assert!(parse_seeds("x").is_err());
}

/// Runs the schedule of `seed` with `keys` writes on nodes with `store`, and checks every
/// acknowledged value.
fn run_schedule(seed: u64, keys: usize, store: Store) {
    let steps = schedule(seed);
    let test = match store {
        Store::Memory => "random_operator_flows_keep_every_acknowledged_value",
        Store::Lmdb => "random_operator_flows_keep_every_acknowledged_value_in_lmdb",
        Store::Postgres(_) => "a schedule on PostgreSQL (no test runs one yet)",
    };
    let replay = format!(
        "seed {seed}, {} store (replay: OPS_SEEDS={seed} OPS_KEYS={keys} cargo test --test \
         operations {test} -- --exact --nocapture), schedule:\n{}",
        store.label(),
        describe(&steps)
    );
    eprintln!("{replay}");
    // Any failure, also inside the harness, ends with the seed and the schedule.
    let _note = ReplayNote(replay.clone());
    let cluster =
        Cluster::with_initial_members(&cluster_name(&format!("ops_random_{seed}"), &store), 4, 3)
            .with_store(store.clone());
    cluster.start_all_with_init();
    let mut model = Model::initial();
    settle(&cluster, &model, None, "before the writes");
    let runtime = runtime();
    let writers = Writers::start(&runtime, &cluster, &model.members(), seed, keys);

    let before = keys / 2;
    writers.release(before);
    writers.wait_until_done(&cluster, "the writes before the schedule");
    // The rest of the keys, spread evenly over the steps; each step releases its share in parts.
    let per_step = (keys - before) / steps.len();
    let mut settled = true;
    for (number, step) in (1..).zip(&steps) {
        writers.set_phase(number);
        let budget = if number == steps.len() {
            keys - before - per_step * (steps.len() - 1)
        } else {
            per_step
        };
        let context = format!("seed {seed}, step {number} ({step})");
        cluster.mark(&context);
        run_step(
            &cluster,
            &mut model,
            &writers,
            step,
            budget,
            &mut settled,
            &context,
        );
        // Every step gets its share of writes, however fast it went.
        writers.wait_until_done(&cluster, &format!("after {context}"));
    }
    let log = writers.stop(&runtime);
    let map = settle(&cluster, &model, None, "after the schedule");
    let verdict = check_values(&runtime, &cluster, &model, &map, &log);
    eprintln!("seed {seed}, {} store: {}", store.label(), verdict.summary);
    assert!(
        verdict.passed(),
        "operator flows lost acknowledged values: {}\n{replay}",
        verdict.details
    );
}

/// Carries out one step of a schedule, releasing `budget` writes in parts while it runs, and
/// waits as the step says. `settled` tracks whether the last wait was a full settle: steps that
/// take a node down or change the membership settle first when it was not.
fn run_step(
    cluster: &Cluster,
    model: &mut Model,
    writers: &Writers,
    step: &Step,
    budget: usize,
    settled: &mut bool,
    context: &str,
) {
    let first = budget / 2;
    writers.release(first);
    let release_rest = || writers.release(budget - first);
    match step.operation {
        Operation::Drain { node, via } => {
            operator(cluster, via, &["drain", "--id", &node.to_string()], context);
            release_rest();
        }
        Operation::Undrain { node, via } => {
            operator(
                cluster,
                via,
                &["undrain", "--id", &node.to_string()],
                context,
            );
            release_rest();
        }
        Operation::StepDown { via } => {
            operator(cluster, via, &["step-down"], context);
            release_rest();
        }
        Operation::AddNode { learner, via } => {
            if !*settled {
                settle(cluster, model, None, &format!("{context}, before it"));
            }
            cluster.start(SPARE);
            let addr = cluster.addr(SPARE);
            let mut args = vec!["add-node", "--id", "4", "--addr", &addr];
            if learner {
                args.push("--learner");
            }
            operator(cluster, via, &args, context);
            writers.add_node(cluster, SPARE);
            release_rest();
        }
        Operation::RemoveNode { via } => {
            if !*settled {
                settle(cluster, model, None, &format!("{context}, before it"));
            }
            writers.remove_node(SPARE);
            operator(cluster, via, &["remove-node", "--id", "4"], context);
            release_rest();
        }
        Operation::Restart {
            node,
            settle_while_down,
        } => {
            if !*settled {
                settle(cluster, model, None, &format!("{context}, before it"));
            }
            let exit = cluster.stop(node);
            assert!(
                exit.success(),
                "{context}: node {node} drains itself on SIGTERM and exits 0: {exit}\n{}",
                cluster.report()
            );
            release_rest();
            if settle_while_down {
                settle(
                    cluster,
                    model,
                    Some(node),
                    &format!("{context}, while node {node} is down"),
                );
            }
            cluster.restart(node);
        }
    }
    model.apply(&step.operation);
    match step.then {
        Wait::Settle => {
            settle(cluster, model, None, &format!("after {context}"));
            *settled = true;
        }
        Wait::Agree => {
            let live = model.members();
            cluster.wait_until(
                &format!("after {context}: nodes {live:?} agree on a leader, term and epoch"),
                SETTLE_DEADLINE,
                || cluster.agreement(&live),
            );
            *settled = false;
        }
    }
    if let Operation::RemoveNode { .. } = step.operation {
        let exit = cluster.stop(SPARE);
        assert!(
            exit.success(),
            "{context}: the removed node 4 stops cleanly: {exit}\n{}",
            cluster.report()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Schedules

/// One operator action of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    /// `drain --id node`, sent to node `via`.
    Drain { node: u64, via: u64 },
    /// `undrain --id node`, sent to node `via`.
    Undrain { node: u64, via: u64 },
    /// Start the spare node 4 empty and `add-node` it (as a learner or a voter) through `via`.
    AddNode { learner: bool, via: u64 },
    /// `remove-node --id 4` through `via`, then stop node 4 once the cluster has moved on.
    RemoveNode { via: u64 },
    /// A rolling restart step: SIGTERM `node` (it drains itself), optionally wait until the
    /// others settle without it, then start it again from its data dir.
    Restart { node: u64, settle_while_down: bool },
    /// `step-down` through `via`.
    StepDown { via: u64 },
}

/// What a step waits for once its operation is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Until every member agrees on one map that matches the model, with nothing moving.
    Settle,
    /// Only until every member names one leader, term and epoch; moves may still run.
    Agree,
}

/// One step of a schedule.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// What the operator does.
    operation: Operation,
    /// What the step waits for afterwards.
    then: Wait,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.operation {
            Operation::Drain { node, via } => write!(f, "drain {node} via {via}")?,
            Operation::Undrain { node, via } => write!(f, "undrain {node} via {via}")?,
            Operation::AddNode { learner, via } => write!(
                f,
                "add-node 4{} via {via}",
                if learner { " as a learner" } else { "" }
            )?,
            Operation::RemoveNode { via } => write!(f, "remove-node 4 via {via}")?,
            Operation::Restart {
                node,
                settle_while_down,
            } => write!(
                f,
                "restart {node} (SIGTERM, {}start)",
                if settle_while_down { "settle, " } else { "" }
            )?,
            Operation::StepDown { via } => write!(f, "step-down via {via}")?,
        }
        match self.then {
            Wait::Settle => write!(f, ", then settle"),
            Wait::Agree => write!(f, ", then agree"),
        }
    }
}

/// The schedule as numbered lines.
fn describe(steps: &[Step]) -> String {
    steps
        .iter()
        .zip(1..)
        .map(|(step, number)| format!("  {number}. {step}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The schedule of `seed`: a pure function of it. Each step is one the model allows where it
/// stands (see [`Model::allows`]); the kind of operation is drawn first, uniformly among the
/// allowed kinds, then its node and the node the command goes through.
fn schedule(seed: u64) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut model = Model::initial();
    let count = STEPS_MIN + rng.below(STEPS_MAX - STEPS_MIN + 1);
    let mut steps = Vec::with_capacity(count);
    for _ in 0..count {
        let owners = model.owners(None);
        let mut kinds: Vec<fn(&mut Rng, &Model) -> Operation> = Vec::new();
        if owners.len() > 2 {
            kinds.push(|rng, model| Operation::Drain {
                node: rng.pick(&model.owners(None)),
                via: rng.pick(&model.members()),
            });
        }
        if !model.drained.is_empty() {
            kinds.push(|rng, model| Operation::Undrain {
                node: rng.pick(&model.drained.iter().copied().collect::<Vec<_>>()),
                via: rng.pick(&model.members()),
            });
        }
        if !model.spare_added {
            kinds.push(|rng, model| Operation::AddNode {
                learner: rng.coin(),
                via: rng.pick(&model.members()),
            });
        }
        if model.members().contains(&SPARE) {
            kinds.push(|rng, model| Operation::RemoveNode {
                via: rng.pick(
                    &model
                        .members()
                        .into_iter()
                        .filter(|&id| id != SPARE)
                        .collect::<Vec<_>>(),
                ),
            });
        }
        if owners.len() >= 2 {
            kinds.push(|rng, model| Operation::Restart {
                node: rng.pick(&model.owners(None)),
                settle_while_down: rng.coin(),
            });
        }
        kinds.push(|rng, model| Operation::StepDown {
            via: rng.pick(&model.members()),
        });
        let operation = rng.pick(&kinds)(&mut rng, &model);
        // Membership changes and restarts always settle afterwards; the others only at random.
        let then = match operation {
            Operation::AddNode { .. }
            | Operation::RemoveNode { .. }
            | Operation::Restart { .. } => Wait::Settle,
            _ if rng.coin() => Wait::Settle,
            _ => Wait::Agree,
        };
        model.apply(&operation);
        steps.push(Step { operation, then });
    }
    steps
}

/// What the cluster should look like once it settles: the membership and the drained nodes.
#[derive(Debug, Clone)]
struct Model {
    /// The voters, ascending.
    voters: Vec<u64>,
    /// The learners, ascending.
    learners: Vec<u64>,
    /// The nodes drained by the operator (not those draining because they were stopped).
    drained: BTreeSet<u64>,
    /// Whether the spare node was added; it is added at most once per run (a removed node's
    /// data dir is not reused).
    spare_added: bool,
}

impl Model {
    /// Nodes 1–3 as voters, none drained.
    fn initial() -> Model {
        Model {
            voters: vec![1, 2, 3],
            learners: Vec::new(),
            drained: BTreeSet::new(),
            spare_added: false,
        }
    }

    /// Every member, ascending.
    fn members(&self) -> Vec<u64> {
        let members: BTreeSet<u64> = self.voters.iter().chain(&self.learners).copied().collect();
        members.into_iter().collect()
    }

    /// The members that own shards once settled: neither drained nor `stopped`.
    fn owners(&self, stopped: Option<u64>) -> Vec<u64> {
        self.members()
            .into_iter()
            .filter(|id| !self.drained.contains(id) && Some(*id) != stopped)
            .collect()
    }

    /// Whether `operation` keeps the promises of a schedule here: at least two nodes own shards
    /// after a drain (so a later restart leaves one); a restarted node owns shards (a drained
    /// node would undrain itself on restart); node 4 joins once and leaves once.
    fn allows(&self, operation: &Operation) -> bool {
        let members = self.members();
        let owners = self.owners(None);
        match *operation {
            Operation::Drain { node, via } => {
                owners.len() > 2 && owners.contains(&node) && members.contains(&via)
            }
            Operation::Undrain { node, via } => {
                self.drained.contains(&node) && members.contains(&via)
            }
            Operation::AddNode { via, .. } => !self.spare_added && members.contains(&via),
            Operation::RemoveNode { via } => {
                members.contains(&SPARE) && via != SPARE && members.contains(&via)
            }
            Operation::Restart { node, .. } => owners.len() >= 2 && owners.contains(&node),
            Operation::StepDown { via } => members.contains(&via),
        }
    }

    /// The model after `operation`.
    fn apply(&mut self, operation: &Operation) {
        match *operation {
            Operation::Drain { node, .. } => {
                self.drained.insert(node);
            }
            Operation::Undrain { node, .. } => {
                self.drained.remove(&node);
            }
            Operation::AddNode { learner, .. } => {
                self.spare_added = true;
                if learner {
                    self.learners.push(SPARE);
                } else {
                    self.voters.push(SPARE);
                }
            }
            Operation::RemoveNode { .. } => {
                self.voters.retain(|&id| id != SPARE);
                self.learners.retain(|&id| id != SPARE);
                self.drained.remove(&SPARE);
            }
            Operation::Restart { .. } | Operation::StepDown { .. } => {}
        }
    }
}

/// splitmix64 (Steele, Lea and Flood, 2014): a tiny seeded generator, so that the schedule
/// depends on nothing but the seed.
struct Rng {
    state: u64,
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    fn below(&mut self, bound: usize) -> usize {
        assert!(bound > 0, "nothing to pick from");
        (self.next() % bound as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Prints its text to stderr when it is dropped during a panic: the seed and the schedule
/// follow any failure of a randomized run, including a timeout inside the harness.
struct ReplayNote(String);

impl Drop for ReplayNote {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the failed run: {}", self.0);
        }
    }
}

/// The seeds of `OPS_SEEDS`, or [`DEFAULT_SEEDS`].
fn seeds() -> Vec<u64> {
    match std::env::var("OPS_SEEDS") {
        Ok(text) => parse_seeds(&text).unwrap_or_else(|error| {
            panic!("OPS_SEEDS={text:?}: {error}; give a range like 0..200 or a list like 7,9")
        }),
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

/// `A..B` (B excluded) or `A,B,..`.
fn parse_seeds(text: &str) -> Result<Vec<u64>, String> {
    let number = |part: &str| {
        part.trim()
            .parse::<u64>()
            .map_err(|e| format!("`{}` is not a seed: {e}", part.trim()))
    };
    if let Some((start, end)) = text.split_once("..") {
        let (start, end) = (number(start)?, number(end)?);
        if start >= end {
            return Err(format!("the range {start}..{end} is empty"));
        }
        return Ok((start..end).collect());
    }
    text.split(',').map(number).collect()
}

/// The keys per randomized run, from `OPS_KEYS`, or [`DEFAULT_KEYS`].
fn keys() -> usize {
    match std::env::var("OPS_KEYS") {
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(keys) if keys >= 2 => keys,
            _ => panic!("OPS_KEYS={text:?}: give a number of keys, at least 2"),
        },
        Err(_) => DEFAULT_KEYS,
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Waits until the cluster settled as `model` says, with `stopped` (if any) down, and returns
/// the map: every running member serves and names one leader (which says it leads), term and
/// epoch; the voters and learners are the model's; no shard moves; the draining nodes are the
/// drained ones plus `stopped`; nobody but `stopped` is marked down; every running member holds
/// the same map, in which the owners (members neither drained nor stopped) hold balanced shares.
fn settle(cluster: &Cluster, model: &Model, stopped: Option<u64>, context: &str) -> ShardMap {
    let live: Vec<u64> = model
        .members()
        .into_iter()
        .filter(|&id| Some(id) != stopped)
        .collect();
    let owners = model.owners(stopped);
    let draining: Vec<u64> = model
        .drained
        .iter()
        .copied()
        .chain(stopped)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let description = format!(
        "{context}: nodes {live:?} settle with voters {:?}, learners {:?}, draining \
         {draining:?}, shards balanced over {owners:?} and none moving",
        model.voters, model.learners
    );
    cluster.wait_until(&description, SETTLE_DEADLINE, || {
        let statuses: Vec<(u64, Value)> = live
            .iter()
            .map(|&id| Some((id, cluster.status(id)?)))
            .collect::<Option<_>>()?;
        let first = &statuses[0].1;
        for (_, status) in &statuses {
            let same = ["leader", "term", "epoch"]
                .iter()
                .all(|field| status[field] == first[field]);
            let settled = status["state"] == "serving"
                && same
                && sorted(id_list(&status["voters"])) == model.voters
                && sorted(id_list(&status["learners"])) == model.learners
                && status["shards_moving"] == 0
                && sorted(id_list(&status["draining"])) == draining
                && id_list(&status["down"])
                    .iter()
                    .all(|&id| Some(id) == stopped);
            if !settled {
                return None;
            }
        }
        let leader = first["leader"].as_u64()?;
        let (_, leader_status) = statuses.iter().find(|(id, _)| *id == leader)?;
        if leader_status["raft_state"] != "leader" {
            return None;
        }
        let epoch = first["epoch"].as_u64()?;
        let maps: Vec<(u64, ShardMap)> = live
            .iter()
            .map(|&id| Some((id, cluster.shard_map(id)?)))
            .collect::<Option<_>>()?;
        let (first_id, map) = &maps[0];
        for (id, other) in &maps[1..] {
            if other.epoch == map.epoch && other != map {
                panic!(
                    "{context}: nodes {first_id} and {id} hold different maps under epoch {}\n{}",
                    map.epoch,
                    cluster.report()
                );
            }
        }
        if maps.iter().any(|(_, map)| map.epoch != epoch) {
            return None;
        }
        map.is_balanced(&owners).then(|| map.clone())
    })
}

fn sorted(mut ids: Vec<u64>) -> Vec<u64> {
    ids.sort_unstable();
    ids
}

/// Runs `clusterfunk ARGS` through node `via`, which must succeed.
fn operator(cluster: &Cluster, via: u64, args: &[&str], context: &str) {
    cluster.mark(&format!(
        "{context}: clusterfunk {} via {via}",
        args.join(" ")
    ));
    let (code, stdout, stderr) = cluster.cf_at(via, args);
    assert_eq!(
        code,
        0,
        "{context}: `clusterfunk {}` through node {via} failed: {}{}\n{}",
        args.join(" "),
        stdout.trim(),
        stderr.trim(),
        cluster.report()
    );
}

// ---------------------------------------------------------------------------------------------
// Writing

/// One acknowledged write: key `ops-<index>` holds `value`.
struct Acked {
    index: usize,
    value: String,
    /// When it was sent: 0 before the schedule, `n` during step `n`.
    phase: usize,
}

/// One write that failed: its key may or may not hold its value.
struct Failed {
    index: usize,
    value: String,
    phase: usize,
    /// Through which node's client, and why.
    error: String,
}

/// What the writers did.
#[derive(Default)]
struct WriteLog {
    acked: Vec<Acked>,
    failed: Vec<Failed>,
}

/// How many writes the writers may start, and whether they must stop.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    writes: usize,
    stop: bool,
}

/// What the writer tasks share with the test thread.
struct Shared {
    /// One client per member, seeded with only that member's address.
    clients: RwLock<BTreeMap<u64, Client>>,
    /// The index of the next key to write.
    next: AtomicUsize,
    /// Writes finished, acknowledged or failed.
    done: AtomicUsize,
    /// The current phase (see [`Acked::phase`]).
    phase: AtomicUsize,
    /// The run's seed, part of every value.
    seed: u64,
}

/// [`WRITERS`] tasks writing fresh keys with unique values through random members, as many as
/// the test released.
struct Writers {
    shared: Arc<Shared>,
    allowance: watch::Sender<Allowance>,
    tasks: Vec<tokio::task::JoinHandle<WriteLog>>,
    /// The most writes any run of them makes.
    total: usize,
}

impl Writers {
    /// Starts the writers with clients of `nodes`; they write nothing until [`Writers::release`].
    fn start(
        runtime: &Runtime,
        cluster: &Cluster,
        nodes: &[u64],
        seed: u64,
        total: usize,
    ) -> Writers {
        let clients = nodes
            .iter()
            .map(|&id| (id, cluster.client(&[id], REQUEST_TIMEOUT)))
            .collect();
        let shared = Arc::new(Shared {
            clients: RwLock::new(clients),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            phase: AtomicUsize::new(0),
            seed,
        });
        let (allowance, _) = watch::channel(Allowance {
            writes: 0,
            stop: false,
        });
        let tasks = (0..WRITERS as u64)
            .map(|writer| {
                let rng = Rng::new(seed ^ (writer + 1).wrapping_mul(0xA076_1D64_78BD_642F));
                runtime.spawn(write_loop(shared.clone(), allowance.subscribe(), rng))
            })
            .collect();
        Writers {
            shared,
            allowance,
            tasks,
            total,
        }
    }

    /// Lets the writers start `count` more writes (never more than the total).
    fn release(&self, count: usize) {
        let total = self.total;
        self.allowance.send_modify(|allowance| {
            allowance.writes = (allowance.writes + count).min(total);
        });
    }

    /// Marks the writes started from now on as written during step `phase`.
    fn set_phase(&self, phase: usize) {
        self.shared.phase.store(phase, Ordering::SeqCst);
    }

    /// Writes through node `id` too.
    fn add_node(&self, cluster: &Cluster, id: u64) {
        let client = cluster.client(&[id], REQUEST_TIMEOUT);
        write_lock(&self.shared.clients).insert(id, client);
    }

    /// No longer writes through node `id`.
    fn remove_node(&self, id: u64) {
        write_lock(&self.shared.clients).remove(&id);
    }

    /// Waits until every write released so far has finished.
    fn wait_until_done(&self, cluster: &Cluster, what: &str) {
        let released = self.allowance.borrow().writes;
        cluster.wait_until(
            &format!("{what}: {released} writes finish"),
            WRITES_DEADLINE,
            || (self.shared.done.load(Ordering::SeqCst) >= released).then_some(()),
        );
    }

    /// Stops the writers once their writes in flight have finished, and returns what they did.
    fn stop(self, runtime: &Runtime) -> WriteLog {
        self.allowance
            .send_modify(|allowance| allowance.stop = true);
        let logs = runtime.block_on(async {
            tokio::time::timeout(
                CALL_DEADLINE + DEADLINE,
                futures_util::future::join_all(self.tasks),
            )
            .await
            .expect("the writers stop once their last write returns (each is bounded)")
        });
        let mut log = WriteLog::default();
        for task in logs {
            let task = task.expect("a writer task panicked");
            log.acked.extend(task.acked);
            log.failed.extend(task.failed);
        }
        log
    }
}

/// One writer: claims the next key while the allowance lets it, writes it through a random
/// member's client, and records the outcome.
async fn write_loop(
    shared: Arc<Shared>,
    mut allowance: watch::Receiver<Allowance>,
    mut rng: Rng,
) -> WriteLog {
    let mut log = WriteLog::default();
    loop {
        let current = *allowance.borrow_and_update();
        if current.stop {
            return log;
        }
        let index = shared.next.load(Ordering::SeqCst);
        if index >= current.writes {
            if allowance.changed().await.is_err() {
                return log;
            }
            continue;
        }
        if shared
            .next
            .compare_exchange(index, index + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            continue;
        }
        let phase = shared.phase.load(Ordering::SeqCst);
        let (node, client) = {
            let clients = read_lock(&shared.clients);
            let nodes: Vec<u64> = clients.keys().copied().collect();
            let node = rng.pick(&nodes);
            (node, clients[&node].clone())
        };
        let value = format!("value-{index}-seed-{}-via-{node}", shared.seed);
        let put = Put {
            value: value.clone(),
        };
        match tokio::time::timeout(CALL_DEADLINE, client.send(key(index), put)).await {
            Ok(Ok(())) => log.acked.push(Acked {
                index,
                value,
                phase,
            }),
            Ok(Err(error)) => log.failed.push(Failed {
                index,
                value,
                phase,
                error: format!("through node {node}'s client: {error}"),
            }),
            Err(_) => log.failed.push(Failed {
                index,
                value,
                phase,
                error: format!("through node {node}'s client: no answer within {CALL_DEADLINE:?}"),
            }),
        }
        shared.done.fetch_add(1, Ordering::SeqCst);
    }
}

/// Writes `count` keys through random members of a quiet cluster; every write must succeed.
fn write_all(runtime: &Runtime, cluster: &Cluster, model: &Model, count: usize) -> WriteLog {
    let writers = Writers::start(runtime, cluster, &model.members(), 0, count);
    writers.release(count);
    writers.wait_until_done(cluster, "the writes before the flow");
    let log = writers.stop(runtime);
    assert!(
        log.failed.is_empty(),
        "{} of {count} writes to a quiet cluster failed, e.g. {}\n{}",
        log.failed.len(),
        log.failed
            .iter()
            .take(5)
            .map(|f| format!("{}: {}", key(f.index), f.error))
            .collect::<Vec<_>>()
            .join("; "),
        cluster.report()
    );
    assert_eq!(log.acked.len(), count, "every write was made");
    log
}

/// The key of write `index`.
fn key(index: usize) -> String {
    format!("ops-{index}")
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Reading back

/// The outcome of reading every written key back.
struct Verdict {
    /// One line of counts, printed for every run.
    summary: String,
    /// The counts and examples of everything wrong.
    details: String,
    /// Acknowledged keys absent, wrong or unreadable.
    problems: usize,
}

impl Verdict {
    fn passed(&self) -> bool {
        self.problems == 0
    }
}

/// What one read found.
enum Read {
    Value(Option<String>),
    Error(String),
}

/// Reads every key of `log` back through a client seeded with every member, and judges it:
/// every acknowledged key must hold its value. Failed writes are only counted (present or not).
fn check_values(
    runtime: &Runtime,
    cluster: &Cluster,
    model: &Model,
    map: &ShardMap,
    log: &WriteLog,
) -> Verdict {
    let client = cluster.client(&model.members(), REQUEST_TIMEOUT);
    let indexes: Vec<usize> = log
        .acked
        .iter()
        .map(|a| a.index)
        .chain(log.failed.iter().map(|f| f.index))
        .collect();
    let reads: BTreeMap<usize, Read> = runtime.block_on(
        stream::iter(indexes)
            .map(|index| {
                let client = client.clone();
                async move { (index, read(&client, index).await) }
            })
            .buffer_unordered(READS_IN_FLIGHT)
            .collect(),
    );
    let where_is = |index: usize| {
        let shard = shard_for(key(index).as_bytes(), SHARD_COUNT as u32) as usize;
        format!(
            "{} (shard {shard}, owner {})",
            key(index),
            map.owners[shard]
        )
    };
    let when = |phase: usize| match phase {
        0 => "before the flow".to_string(),
        step => format!("during step {step}"),
    };
    let mut lost = Vec::new();
    let mut wrong = Vec::new();
    let mut unreadable = Vec::new();
    for acked in &log.acked {
        match &reads[&acked.index] {
            Read::Value(Some(value)) if *value == acked.value => {}
            Read::Value(Some(value)) => wrong.push(format!(
                "{} written {}: holds {value:?}, expected {:?}",
                where_is(acked.index),
                when(acked.phase),
                acked.value
            )),
            Read::Value(None) => lost.push(acked),
            Read::Error(error) => unreadable.push(format!("{}: {error}", where_is(acked.index))),
        }
    }
    let failed_present = log
        .failed
        .iter()
        .filter(|f| matches!(&reads[&f.index], Read::Value(Some(v)) if *v == f.value))
        .count();
    let lost_shards: BTreeSet<usize> = lost
        .iter()
        .map(|a| shard_for(key(a.index).as_bytes(), SHARD_COUNT as u32) as usize)
        .collect();
    let mut lost_by_phase: BTreeMap<usize, usize> = BTreeMap::new();
    for acked in &lost {
        *lost_by_phase.entry(acked.phase).or_default() += 1;
    }
    let summary = format!(
        "{} acknowledged, {} failed writes ({failed_present} of them present), {} lost (in {} \
         shards), {} wrong, {} unreadable",
        log.acked.len(),
        log.failed.len(),
        lost.len(),
        lost_shards.len(),
        wrong.len(),
        unreadable.len()
    );
    let mut details = summary.clone();
    let examples = |title: &str, lines: Vec<String>, details: &mut String| {
        if !lines.is_empty() {
            details.push_str(&format!("\n{title} (up to 20):\n  "));
            details.push_str(&lines.into_iter().take(20).collect::<Vec<_>>().join("\n  "));
        }
    };
    if !lost.is_empty() {
        let by_phase: Vec<String> = lost_by_phase
            .iter()
            .map(|(&phase, count)| format!("{count} written {}", when(phase)))
            .collect();
        details.push_str(&format!("\nlost: {}", by_phase.join(", ")));
    }
    examples(
        "lost keys",
        lost.iter()
            .map(|a| format!("{} written {}", where_is(a.index), when(a.phase)))
            .collect(),
        &mut details,
    );
    examples("wrong values", wrong.clone(), &mut details);
    examples("unreadable keys", unreadable.clone(), &mut details);
    examples(
        "failed writes",
        log.failed
            .iter()
            .map(|f| format!("{} written {}: {}", key(f.index), when(f.phase), f.error))
            .collect(),
        &mut details,
    );
    Verdict {
        summary,
        details,
        problems: lost.len() + wrong.len() + unreadable.len(),
    }
}

/// Reads key `index`, retrying an error twice (the cluster settled, so none is expected).
async fn read(client: &Client, index: usize) -> Read {
    let mut last = String::new();
    for _ in 0..3 {
        match tokio::time::timeout(CALL_DEADLINE, client.send(key(index), Get)).await {
            Ok(Ok(value)) => return Read::Value(value),
            Ok(Err(error)) => last = error.to_string(),
            Err(_) => last = format!("no answer within {CALL_DEADLINE:?}"),
        }
    }
    Read::Error(last)
}

/// Reads every key of `written` back and fails the test, with the counts and examples, when
/// any acknowledged value is missing or wrong.
fn assert_every_value(
    runtime: &Runtime,
    cluster: &Cluster,
    model: &Model,
    map: &ShardMap,
    written: &WriteLog,
    flow: &str,
) {
    let verdict = check_values(runtime, cluster, model, map, written);
    eprintln!("{flow}: {}", verdict.summary);
    assert!(
        verdict.passed(),
        "{flow}: acknowledged values did not read back: {}",
        verdict.details
    );
}
