//! Failover as a `Client` sees it (issue 12): `kv` node processes on 127.0.0.1, one external
//! `Client` in this process under closed-loop load, and a real fault — an owner frozen with
//! SIGSTOP (sockets open, nothing answered) or killed with SIGKILL.
//!
//! What users see is checked from the client's side and at the end: idempotent writes (`Put`)
//! never fail because of a failover; non-idempotent increments (`Incr`) that may have reached
//! the failed owner fail only with `OutcomeUnknown` (never `Timeout`, never a refusal of the
//! resumed node), at most one per writer (each has one request outstanding); and every key read
//! back once the cluster is whole again holds its last acknowledged value, unless its shard was
//! on the failed node and lost its state with it (no durable state yet) before that write.

#[allow(dead_code)]
mod common;

#[allow(dead_code)]
#[path = "../examples/support/kv_api.rs"]
mod kv_api;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clusterfunk::client::{CallOptions, Client, ClientError};
use clusterfunk::shard_map::shard_for;
use clusterfunk::transport::Secret;
use clusterfunk::Error;
use common::{Cluster, DEADLINE, SHARD_COUNT};
use kv_api::{Get, Incr, Put};

/// Writers of each kind.
const WRITERS: usize = 6;
/// Keys per put writer.
const KEYS_PER_WRITER: usize = 48;
/// Acknowledged requests every writer needs in each phase before the test moves on.
const ACKS_PER_PHASE: u64 = 30;
/// Most requests one writer sends (bounds the load loop together with the stop flag).
const REQUESTS_MAX: u64 = 200_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    FreezeFollower,
    FreezeLeader,
    KillFollower,
}

/// What the writers saw.
#[derive(Default)]
struct Seen {
    /// Per put key: the last acknowledged value and when it was acknowledged.
    last_put: BTreeMap<String, (String, Instant)>,
    /// Failed puts, with the error.
    put_failures: Vec<String>,
    /// Failed increments, with the writer, the key, when the request started and the error.
    incr_failures: Vec<(usize, String, Instant, ClientError)>,
}

struct Load {
    stop: AtomicBool,
    /// Acknowledged requests per writer (puts first, then increments).
    acks: Vec<AtomicU64>,
    seen: Mutex<Seen>,
}

impl Load {
    fn min_acks(&self) -> u64 {
        self.acks
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

fn put_key(writer: usize, index: usize) -> String {
    format!("put-{writer}-{index}")
}

async fn put_writer(client: Client, load: Arc<Load>, writer: usize) {
    for seq in 0..REQUESTS_MAX {
        if load.stop.load(Ordering::Relaxed) {
            return;
        }
        let key = put_key(writer, seq as usize % KEYS_PER_WRITER);
        let value = format!("v{seq}");
        match client
            .send(
                key.as_str(),
                Put {
                    value: value.clone(),
                },
            )
            .await
        {
            Ok(()) => {
                load.acks[writer].fetch_add(1, Ordering::Relaxed);
                lock(&load.seen)
                    .last_put
                    .insert(key, (value, Instant::now()));
            }
            Err(error) => lock(&load.seen)
                .put_failures
                .push(format!("{key}: {error}")),
        }
    }
}

async fn incr_writer(client: Client, load: Arc<Load>, writer: usize) {
    for seq in 0..REQUESTS_MAX {
        if load.stop.load(Ordering::Relaxed) {
            return;
        }
        let key = format!("count-{writer}-{}", seq % KEYS_PER_WRITER as u64);
        let started = Instant::now();
        match client.send(key.as_str(), Incr { by: 1 }).await {
            Ok(Some(_)) => {
                load.acks[WRITERS + writer].fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => panic!("{key} holds a value that is not a number"),
            Err(error) => lock(&load.seen)
                .incr_failures
                .push((writer, key, started, error)),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(name: &str, fault: Fault) {
    let cluster = Cluster::new(name, 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, before_map) =
        cluster.wait_for_one_map_where(&ids, "that is balanced", |_, map| map.is_balanced(&ids));
    let node = match fault {
        Fault::FreezeLeader => agreement.leader,
        Fault::FreezeFollower | Fault::KillFollower => *ids
            .iter()
            .find(|&&id| id != agreement.leader)
            .expect("a follower"),
    };
    let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != node).collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let addrs: Vec<SocketAddr> = ids
        .iter()
        .map(|&id| cluster.addr(id).parse().expect("a node address"))
        .collect();
    let secret = Secret::new(cluster.secret().as_bytes().to_vec()).expect("the test secret");
    let client = Client::with_config(addrs, Some(secret), "clusterfunk", Duration::from_secs(10))
        .expect("a client");
    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        acks: (0..2 * WRITERS).map(|_| AtomicU64::new(0)).collect(),
        seen: Mutex::new(Seen::default()),
    });
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        writers.push(runtime.spawn(put_writer(client.clone(), load.clone(), writer)));
        writers.push(runtime.spawn(incr_writer(client.clone(), load.clone(), writer)));
    }
    let wait_acks = |what: &str, at_least: u64| {
        cluster.wait_until(
            &format!("every writer has {at_least} acknowledged requests ({what})"),
            DEADLINE,
            || (load.min_acks() >= at_least).then_some(()),
        )
    };
    wait_acks("before the fault", ACKS_PER_PHASE);

    cluster.mark(&format!("fault {fault:?} on node {node}"));
    let fault_at = Instant::now();
    match fault {
        Fault::FreezeFollower | Fault::FreezeLeader => cluster.pause(node),
        Fault::KillFollower => cluster.kill9(node),
    }
    cluster.wait_for_one_map_where(
        &survivors,
        &format!("that gives node {node} no shard"),
        |_, map| map.count(node) == 0,
    );
    let moved_at = Instant::now();
    let before = load.min_acks();
    wait_acks("after the move", before + ACKS_PER_PHASE);

    match fault {
        Fault::FreezeFollower | Fault::FreezeLeader => cluster.resume(node),
        Fault::KillFollower => cluster.restart(node),
    }
    cluster.wait_for_one_map(&ids);
    let before = load.min_acks();
    wait_acks("after the node is back", before + ACKS_PER_PHASE);
    load.stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for writer in writers {
            writer.await.expect("a writer panicked");
        }
    });

    // Read every put key back, at the end, through the same client.
    let seen = std::mem::take(&mut *lock(&load.seen));
    eprintln!(
        "{fault:?} of node {node}: {} acknowledged requests, {} put failures, {} increments outcome-unknown",
        load.acks.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>(),
        seen.put_failures.len(),
        seen.incr_failures.len()
    );
    // The shards the failed node owned: their state went with it.
    let moved_shards: Vec<usize> = (0..SHARD_COUNT)
        .filter(|&s| before_map.owners[s] == node)
        .collect();
    let mut wrong = Vec::new();
    runtime.block_on(async {
        for (key, (value, acked_at)) in &seen.last_put {
            let read = client
                .send_with(key.as_str(), Get, CallOptions::new().deadline(DEADLINE))
                .await;
            let shard = shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize;
            let may_be_lost = moved_shards.contains(&shard) && *acked_at < moved_at;
            match read {
                Ok(Some(read)) if read == *value => {}
                Ok(None) if may_be_lost => {}
                other => wrong.push(format!(
                    "{key} (shard {shard}, lost with node {node}: {may_be_lost}): last acknowledged {value:?}, read {other:?}"
                )),
            }
        }
    });
    assert!(
        wrong.is_empty(),
        "{} of {} keys do not hold their last acknowledged value:\n{}\n{}",
        wrong.len(),
        seen.last_put.len(),
        wrong.join("\n"),
        cluster.report()
    );
    assert!(
        seen.put_failures.is_empty(),
        "idempotent puts failed during {fault:?}:\n{}",
        seen.put_failures.join("\n")
    );
    let not_unknown: Vec<String> = seen
        .incr_failures
        .iter()
        .filter(|(.., e)| !matches!(e, ClientError::Cluster(Error::OutcomeUnknown { .. })))
        .map(|(.., e)| e.to_string())
        .collect();
    assert!(
        not_unknown.is_empty(),
        "increments failed with something other than OutcomeUnknown during {fault:?}:\n{}",
        not_unknown.join("\n")
    );
    assert!(
        seen.incr_failures.len() <= WRITERS,
        "{} increments failed, more than the {WRITERS} writers had outstanding:\n{}",
        seen.incr_failures.len(),
        seen.incr_failures
            .iter()
            .map(|(writer, key, started, error)| format!(
                "writer {writer}, {key} (shard {}), started {:?} after the fault: {error}",
                shard_for(key.as_bytes(), SHARD_COUNT as u32),
                started.checked_duration_since(fault_at)
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_frozen_follower_s_requests_follow_their_shard() {
    run(
        "a_frozen_follower_s_requests_follow_their_shard",
        Fault::FreezeFollower,
    );
}

#[test]
fn a_frozen_leader_s_requests_follow_their_shard() {
    run(
        "a_frozen_leader_s_requests_follow_their_shard",
        Fault::FreezeLeader,
    );
}

#[test]
fn a_killed_follower_fails_only_requests_in_flight_and_as_outcome_unknown() {
    run(
        "a_killed_follower_fails_only_requests_in_flight",
        Fault::KillFollower,
    );
}
