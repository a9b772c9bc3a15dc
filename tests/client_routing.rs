//! A `Client` whose map comes from a node cut off from the rest of the cluster (reachable by
//! the client, not by its peers) still reaches every shard: refusals as not ready make it ask
//! the other nodes for the map, and its map watch leaves a node that cannot vouch for its map.
//! Real nodes in this process (see `inproc`); the cut is real (the nodes' transports refuse
//! each other), the client's links stay up.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod inproc;

use std::collections::BTreeMap;
use std::time::Duration;

use clusterfunk::client::{Client, ClientError};
use clusterfunk::{Error, NotReadyReason};
use inproc::{key_of_shard, shards_of, Get, Incr, SendError, Served, Set, TestCluster};

/// Rounds of writes after the client saw the shards move; each writes every key once.
const ROUNDS: u64 = 20;
/// Each call's deadline: generous for a busy machine, and far below a stall.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_client_seeded_with_a_cut_off_node_follows_the_majority() {
    let cluster = TestCluster::start("client_seeded_with_cut_off_node", 3).await;
    let leader = cluster.wait_ready().await;
    let (cut, _) = cluster.follower_and_others(leader);
    let (_, owners) = cluster.wait_converged().await;
    // The client knows only the node that is about to be cut off: its first map comes from
    // there, and so would every later one without the fix.
    let client = Client::with_config([cluster.addr(cut)], None, "clusterfunk", CALL_DEADLINE)
        .expect("a client for the cluster");
    let shards = shards_of(&owners, cut);
    assert!(shards.len() >= 2, "node {cut} owns shards: {owners:?}");
    let set_keys: Vec<String> = shards
        .iter()
        .map(|&shard| key_of_shard("cut-set", shard))
        .collect();
    let incr_key = key_of_shard("cut-incr", shards[0]);
    for key in &set_keys {
        let served = client
            .send(key.as_str(), Set { value: 0 })
            .await
            .unwrap_or_else(|e| panic!("{key} before the cut: {e}"));
        assert_eq!(
            served.node, cut,
            "{key} is served by its owner before the cut"
        );
    }

    cluster.isolate(cut);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut set_failures = Vec::new();
    let mut increments: Vec<Served> = Vec::new();
    let mut incr_failures = Vec::new();
    // Write until every key has been served by another node (the shards moved), then
    // `ROUNDS` rounds more; bounded in count and time.
    let started = tokio::time::Instant::now();
    let mut moved_at_round = None;
    let mut round = 0u64;
    while moved_at_round.is_none_or(|at| round < at + ROUNDS) {
        round += 1;
        assert!(
            round < 10_000 && started.elapsed() < Duration::from_secs(60),
            "the shards of node {cut} never reached the client as moved (round {round}); failures: {set_failures:?}"
        );
        let mut all_moved = true;
        for key in &set_keys {
            match client.send(key.as_str(), Set { value: round }).await {
                Ok(served) => {
                    all_moved &= served.node != cut;
                    expected.insert(key.clone(), round);
                }
                Err(error) => {
                    all_moved = false;
                    set_failures.push(format!("{key} round {round}: {error}"))
                }
            }
        }
        match client.send(incr_key.as_str(), Incr).await {
            Ok(served) => increments.push(served),
            Err(error) => incr_failures.push((error.is_outcome_unknown(), error.to_string())),
        }
        if all_moved && moved_at_round.is_none() {
            moved_at_round = Some(round);
        }
    }
    println!("set failures: {set_failures:?}; increment failures: {incr_failures:?}");
    assert!(
        set_failures.is_empty(),
        "idempotent writes failed while node {cut} was cut off: {set_failures:?}"
    );
    // The cut-off owner answers every request it got (served under its lease, or refused as
    // not ready afterwards): no increment's fate is unknown, and a refusal is retried.
    assert!(
        incr_failures.is_empty(),
        "increments failed while node {cut} was cut off: {incr_failures:?}"
    );
    let moved = client
        .epoch()
        .expect("the client holds a map after answers");
    println!("client map epoch {moved}");

    // At the end, with the cut healed: every value written last stands, read from another
    // client seeded with every node, and the counter is the last acknowledged.
    cluster
        .heal_and_check("a_client_seeded_with_a_cut_off_node_follows_the_majority")
        .await;
    let reader = Client::with_config(
        cluster.ids().into_iter().map(|id| cluster.addr(id)),
        None,
        "clusterfunk",
        CALL_DEADLINE,
    )
    .expect("a reader for the cluster");
    for (key, value) in &expected {
        let read = reader
            .send(key.as_str(), Get)
            .await
            .unwrap_or_else(|e| panic!("reading {key} back: {e}"));
        assert_eq!(read.value, Some(*value), "{key} read back at the end");
    }
    // The counter restarted empty on the node that took the cut-off owner's shard over (the
    // state of a marked-down owner is lost, by design): each acknowledged increment served
    // by one owner under one map adds exactly one, and the last one stands.
    for pair in increments.windows(2) {
        if (pair[0].node, pair[0].epoch) == (pair[1].node, pair[1].epoch) {
            assert_eq!(
                pair[1].value,
                pair[0].value.map(|v| v + 1),
                "acknowledged increments in a row: {pair:?}"
            );
        }
    }
    let last = increments.last().expect("increments were acknowledged");
    let read = reader
        .send(incr_key.as_str(), Get)
        .await
        .unwrap_or_else(|e: ClientError| panic!("reading {incr_key} back: {e}"));
    assert_eq!(
        read.value, last.value,
        "the counter read back at the end is the last acknowledged"
    );
}

/// How long the majority stays frozen: shorter than the node's request timeout, so that a
/// forward that waits for the owner (the regression) ends with the owner's reply, not an error.
const OUTAGE: Duration = Duration::from_secs(8);

/// In a majority outage the map never moves, so "the shard moved" never resolves a message
/// forwarded to a silent owner: the forwarding node gives up on it once it cannot vouch for
/// its own map either, and says the outcome is unknown (or, had it not sent it yet, that the
/// owner is unreachable), instead of holding the caller until the owner comes back or its
/// request timeout (regression: every call waited the node's request timeout).
#[tokio::test]
async fn a_message_forwarded_to_a_silent_owner_in_a_majority_outage_ends_as_outcome_unknown_not_timeout(
) {
    const _: () = assert!(OUTAGE.as_millis() < inproc::REQUEST_TIMEOUT.as_millis());
    let cluster = TestCluster::start("forwarded_in_majority_outage", 3).await;
    let leader = cluster.wait_ready().await;
    let (survivor, others) = cluster.follower_and_others(leader);
    let (_, owners) = cluster.wait_converged().await;
    let owner = others[0];
    let shard = shards_of(&owners, owner)[0];
    let key = key_of_shard("outage", shard);
    // The survivor forwards once, so that its forwarding connection to the owner is open.
    cluster
        .send(survivor, key.as_str(), Incr)
        .await
        .unwrap_or_else(|e| panic!("{key} forwarded before the outage: {e:?}"));
    for &node in &others {
        cluster.pause(node, OUTAGE).await;
    }
    // The survivor forwards again at once, on the open connection, to an owner that is now
    // frozen along with the rest of the majority.
    match cluster.send(survivor, key.as_str(), Incr).await {
        Err(SendError::Node(Error::OutcomeUnknown { .. }))
        | Err(SendError::Node(Error::NotReady {
            reason: NotReadyReason::OwnerUnreachable,
        })) => {}
        other => panic!(
            "an increment forwarded to frozen node {owner} in a majority outage ends as outcome unknown, got {other:?}\n{}",
            cluster.report()
        ),
    }
}
