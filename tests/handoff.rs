//! Planned moves keep a shard's state: real nodes in this process (see `inproc`) hand shards
//! over on drain and undrain while links are cut, a target node crashes, a handler is slow to
//! finish, or a snapshot is larger than a transport frame. Each test writes values first, moves
//! shards without reading them in between, and reads every value back at the end; then it
//! checks the single-owner rule from the recorded serve events.
//!
//! Each test pins one bug of the handoff ledger (`src/ledger.rs`) and is named after the
//! behaviour it guarantees. `CLUSTERFUNK_TEST_LOG=<filter>` turns the nodes' logs on. No test
//! asserts how long anything takes.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod inproc;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clusterfunk::admin::{AdminError, AdminRequest, AdminResponse};
use clusterfunk::shard_map::{allocate, Member, ShardMap};
use clusterfunk::{Error, NodeId, NotReadyReason, ServeEventKind, ShardId};
use futures_util::future::join_all;
use inproc::{
    key_of_shard, restore_panicked, shards_of, BlobDigest, Get, GetBlob, Incr, Put, PutBlob,
    SendError, Served, SlowPut, TestCluster, DEADLINE, RESTORE_PANIC_PREFIX, SHARD_COUNT,
};
use serde_bytes::ByteBuf;

/// How long a drain that cannot finish waits before its admin call gives up (the drain itself
/// stays recorded and goes on). Short, so that the admin command that follows (an undrain) is
/// not held up behind it: the leader runs membership commands one at a time.
const DRAIN_GIVES_UP: Duration = Duration::from_secs(2);

/// The leader and the two other nodes of a 3-node cluster, once it is ready.
async fn roles(cluster: &TestCluster) -> (NodeId, NodeId, NodeId) {
    let leader = cluster.wait_ready().await;
    let others: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    println!("leader {leader}, others {others:?}");
    (leader, others[0], others[1])
}

/// The shards of node `a` that a drain of `a` sends to node `b`, and those of them that the
/// undrain of `a` gives back to `a` (cancelling their moves), for a cluster of `ids` whose map
/// is `owners` and has no pending move. The allocator decides both: each allocation starts
/// from the previous target placement and moves as few shards as a balanced map allows, so
/// which of `a`'s shards return to it does not depend on where their moves stand.
fn drain_and_undrain_plan(
    ids: &[NodeId],
    owners: &[NodeId],
    a: NodeId,
    b: NodeId,
) -> (Vec<ShardId>, Vec<ShardId>) {
    let all: Vec<Member> = ids.iter().map(|&id| Member::new(id)).collect();
    let rest: Vec<Member> = ids
        .iter()
        .filter(|&&id| id != a)
        .map(|&id| Member::new(id))
        .collect();
    let now = ShardMap {
        epoch: 1,
        shards: owners.to_vec(),
        members: all.clone(),
    };
    let drained = allocate(Some(&now), &rest, SHARD_COUNT).expect("the drain's allocation");
    let undrained = allocate(Some(&drained), &all, SHARD_COUNT).expect("the undrain's allocation");
    let to_b: Vec<ShardId> = (0..SHARD_COUNT)
        .filter(|&s| owners[s as usize] == a && drained.shards[s as usize] == b)
        .collect();
    let back: Vec<ShardId> = to_b
        .iter()
        .copied()
        .filter(|&s| undrained.shards[s as usize] == a)
        .collect();
    (to_b, back)
}

/// Runs an admin command through node `via`.
async fn admin(
    cluster: &TestCluster,
    via: NodeId,
    request: AdminRequest,
) -> Result<AdminResponse, AdminError> {
    cluster
        .node(via)
        .unwrap_or_else(|| panic!("node {via} runs"))
        .admin(request)
        .await
}

/// Runs an admin command through node `via` and fails the test unless it succeeds.
async fn admin_ok(cluster: &TestCluster, via: NodeId, request: AdminRequest) {
    let result = admin(cluster, via, request.clone()).await;
    assert!(
        result.is_ok(),
        "{request:?} through node {via} failed: {result:?}\n{}",
        cluster.report()
    );
}

/// The current map through node `via`.
async fn owners(cluster: &TestCluster, via: NodeId) -> Vec<NodeId> {
    cluster
        .wait_until(&format!("node {via} reports its map"), DEADLINE, || async {
            cluster.shards(via).await.map(|(_, owners)| owners)
        })
        .await
}

/// A key of each of `shards` (named with `prefix`) and the value to write there.
fn values_for(prefix: &str, shards: &[ShardId]) -> Vec<(String, u64)> {
    shards
        .iter()
        .map(|&shard| (key_of_shard(prefix, shard), 1000 + u64::from(shard)))
        .collect()
}

/// Writes every value through node `via` (retrying while a shard has no serving owner).
async fn write_all(cluster: &TestCluster, via: NodeId, values: &[(String, u64)]) {
    for (key, value) in values {
        let served = cluster
            .wait_until(&format!("{key} = {value} is written"), DEADLINE, || async {
                cluster.send(via, key, Put { value: *value }).await.ok()
            })
            .await;
        assert_eq!(served.value, Some(*value), "the write of {key} took");
    }
}

/// Reads `key` through node `via`, retrying while its shard has no serving owner.
async fn read(cluster: &TestCluster, via: NodeId, key: &str) -> Served {
    cluster
        .wait_until(
            &format!("{key} is read through node {via}"),
            DEADLINE,
            || async { cluster.send(via, key, Get).await.ok() },
        )
        .await
}

/// Reads every key (through the running nodes in turn) and fails the test, naming every
/// difference, unless each holds one of its expected values.
async fn assert_values(cluster: &TestCluster, expected: &[(String, Vec<u64>)], context: &str) {
    let via = cluster.running_ids();
    let mut wrong = Vec::new();
    for (i, (key, allowed)) in expected.iter().enumerate() {
        let served = read(cluster, via[i % via.len()], key).await;
        if !served.value.is_some_and(|value| allowed.contains(&value)) {
            wrong.push(format!(
                "{key} (shard {}): expected one of {allowed:?}, read {:?} from node {} under epoch {}",
                served.shard, served.value, served.node, served.epoch
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{context}: {} of {} values lost or wrong:\n  {}\n{}",
        wrong.len(),
        expected.len(),
        wrong.join("\n  "),
        cluster.report()
    );
    println!("{context}: all {} values read back", expected.len());
}

/// `values` as expectations with one allowed value each.
fn exactly(values: &[(String, u64)]) -> Vec<(String, Vec<u64>)> {
    values
        .iter()
        .map(|(key, value)| (key.clone(), vec![*value]))
        .collect()
}

/// Drains node `id` through node `via`: the admin call answers once `id` owns nothing. Then
/// waits until every node applied the resulting map.
async fn drain_and_settle(cluster: &TestCluster, via: NodeId, id: NodeId) {
    admin_ok(cluster, via, AdminRequest::Drain { id }).await;
    let (_, owners) = cluster.wait_converged().await;
    assert!(
        shards_of(&owners, id).is_empty(),
        "drained node {id} owns no shard: {owners:?}"
    );
}

/// Undrains node `id` through node `via` and waits until its share of shards has moved back to
/// it and every node applied the map.
async fn undrain_and_settle(cluster: &TestCluster, via: NodeId, id: NodeId) {
    admin_ok(cluster, via, AdminRequest::Undrain { id }).await;
    let owners = cluster
        .wait_until(
            &format!("node {id} owns shards again and nothing moves"),
            DEADLINE,
            || async {
                let (_, owners) = cluster.converged_once().await?;
                (!shards_of(&owners, id).is_empty()).then_some(owners)
            },
        )
        .await;
    println!(
        "node {id} undrained: it owns {} shards",
        shards_of(&owners, id).len()
    );
}

#[tokio::test]
async fn a_panicking_restore_keeps_the_snapshot_for_the_next_try() {
    // Goal: when `on_restore` panics on the new owner, the handed-over state is kept for the
    // next activation instead of the shard starting empty. Method: 3 nodes; write a value and
    // a marker (which makes the first restore of its snapshot panic, once) to one shard of a
    // follower; drain the follower; read the value through the leader until it answers (the
    // first activation fails with ShardFailed, the next one restores); the marker proves the
    // panic happened, and the value must be there.
    let shared = TestCluster::start("panicking_restore", 3).await;
    let cluster = &*shared;
    let (leader, a, _) = roles(cluster).await;
    let shard = shards_of(&owners(cluster, leader).await, a)[0];
    let token = u64::from(std::process::id()) << 16 | u64::from(shard);
    let values = vec![
        (key_of_shard("restore", shard), 41),
        (key_of_shard(RESTORE_PANIC_PREFIX, shard), token),
    ];
    write_all(cluster, leader, &values).await;
    drain_and_settle(cluster, leader, a).await;
    assert_values(cluster, &exactly(&values), "after the drain").await;
    assert!(
        restore_panicked(token),
        "the first restore of shard {shard} on its new owner should have panicked"
    );
    cluster.check_single_owner("panicking restore");
}

#[tokio::test]
async fn a_shard_handed_on_before_any_read_keeps_its_state() {
    // Goal: a shard received by handoff keeps its state when it is handed on again before any
    // request started its actor there (the snapshot waits parked on the node and must move on
    // with the shard). Method: 3 nodes; write a value to a key of every shard; drain node 1,
    // undrain it, drain node 2, undrain it, each step waiting until its moves finished and
    // every node applied the map, reading nothing in between, so snapshots parked on one node
    // are handed on unread; then read every value. The recorder proves no shard actor ran
    // between the writes and the final reads: every move after the first carried a parked
    // snapshot.
    let shared = TestCluster::start("handed_on_unread", 3).await;
    let cluster = &*shared;
    let (leader, ..) = roles(cluster).await;
    let all: Vec<ShardId> = (0..SHARD_COUNT).collect();
    let values = values_for("unread", &all);
    write_all(cluster, leader, &values).await;
    let written_at = Instant::now();

    drain_and_settle(cluster, 3, 1).await;
    undrain_and_settle(cluster, 3, 1).await;
    drain_and_settle(cluster, 3, 2).await;
    undrain_and_settle(cluster, 3, 2).await;

    let reads_from = Instant::now();
    let ran: Vec<String> = cluster
        .recorder()
        .events()
        .iter()
        .filter(|e| e.at > written_at && e.at < reads_from && e.kind != ServeEventKind::Deactivated)
        .take(10)
        .map(|e| format!("node {} shard {} {:?}", e.node, e.shard, e.kind))
        .collect();
    assert!(
        ran.is_empty(),
        "no shard actor may start or serve between the writes and the reads (nothing was sent), yet: {ran:?}"
    );
    assert_values(cluster, &exactly(&values), "after four rounds of moves").await;
    cluster.check_single_owner("handed on unread");
}

#[tokio::test]
async fn a_cancelled_move_keeps_the_state_where_it_was() {
    // Goal: while a move cannot complete (its snapshot stays parked at the old owner between
    // failed sends), requests for the shard wait instead of starting an empty actor; when the
    // move is cancelled, the old owner serves again from its parked snapshot. Method: 3 nodes;
    // write a value to a key of every shard; cut the link from follower A to follower B (A
    // still reaches the leader, so it keeps its lease) and drain A: its shards bound for the
    // leader move, those bound for B are stuck (the drain's admin call gives up, the drain
    // stays). A read through A of every stuck shard must wait and end NotReady. Then increment
    // every stuck key (through every node in turn) while undraining A. The undrain gives some
    // stuck shards back to A, cancelling their moves (which ones is the allocator's choice: A
    // and B are picked among the followers so that there are some); A must serve their
    // increments from its snapshots, seeing the written values, while the link is still cut.
    // The increments of the shards still bound for B wait and end NotReady. Heal, let those
    // moves finish, and read every value: each written one, plus one where an increment was
    // answered.
    let shared = TestCluster::start_with("cancelled_move", 3, |config| {
        config.consensus.drain_timeout = DRAIN_GIVES_UP;
        // Margin for the undrain to land while the increments wait.
        config.unavailable_wait = Duration::from_secs(5);
        // A long lease: moves that cannot be delivered are reported stuck (and re-targeted)
        // after four lease periods, here well after the undrain cancelled them.
        config.lease.lease = Duration::from_secs(4);
        config.lease.renew_period = Duration::from_secs(1);
    })
    .await;
    let cluster = &*shared;
    let (leader, first, second) = roles(cluster).await;
    let (_, before) = cluster.wait_converged().await;
    let ids = cluster.ids();
    let (a, b, stuck, cancelled) = [(first, second), (second, first)]
        .into_iter()
        .find_map(|(a, b)| {
            let (stuck, cancelled) = drain_and_undrain_plan(&ids, &before, a, b);
            (!cancelled.is_empty()).then_some((a, b, stuck, cancelled))
        })
        .expect(
            "the undrain of one of the followers gives back some of its shards bound for the other",
        );
    println!("node {a} drains; shards bound for node {b}: {stuck:?}, of which the undrain gives back {cancelled:?}");
    let all: Vec<ShardId> = (0..SHARD_COUNT).collect();
    let values = values_for("cancel", &all);
    write_all(cluster, leader, &values).await;
    let values = &values;
    let value_of = |shard: ShardId| values[shard as usize].1;

    cluster.block(a, b);
    let drained = admin(cluster, leader, AdminRequest::Drain { id: a }).await;
    assert!(
        drained.is_err(),
        "the drain of node {a} cannot finish while it cannot reach node {b}, yet: {drained:?}"
    );
    println!("drain of node {a} gave up as expected: {drained:?}");
    let owned = shards_of(&owners(cluster, leader).await, a);
    assert!(
        stuck.iter().all(|shard| owned.contains(shard)),
        "node {a} still owns every shard bound for node {b} ({stuck:?}); it owns {owned:?}"
    );

    // Requests for a stuck shard wait (and give up with NotReady): no empty actor answers them.
    let probes = join_all(stuck.iter().map(|&shard| async move {
        let result = cluster.send(a, &values[shard as usize].0, Get).await;
        (shard, result)
    }))
    .await;
    for (shard, result) in &probes {
        assert!(
            matches!(
                result,
                Err(SendError::Node(Error::NotReady {
                    reason: NotReadyReason::ShardMoving
                }))
            ),
            "a read through node {a} of its stuck shard {shard} must wait and end NotReady (ShardMoving); it ended with {result:?}\n{}",
            cluster.report()
        );
    }

    // Increments while the undrain cancels some of the moves.
    let increments = join_all(stuck.iter().enumerate().map(|(i, &shard)| {
        let via = ids[i % ids.len()];
        async move {
            let result = cluster.send(via, &values[shard as usize].0, Incr).await;
            (shard, via, result)
        }
    }));
    let undrain = admin_ok(cluster, leader, AdminRequest::Undrain { id: a });
    let (increments, ()) = tokio::join!(increments, undrain);
    println!("increments during the undrain: {increments:?}");
    let mut expected = exactly(values);
    for (shard, via, result) in &increments {
        let value = value_of(*shard);
        if cancelled.contains(shard) {
            assert!(
                matches!(result, Ok(served) if served.node == a && served.value == Some(value + 1)),
                "an increment of shard {shard} (through node {via}), whose move the undrain cancelled, is served by node {a} from its snapshot with {value} + 1; it ended with {result:?}\n{}",
                cluster.report()
            );
            expected[*shard as usize].1 = vec![value + 1];
        } else {
            assert!(
                matches!(result, Err(SendError::Node(Error::NotReady { .. }))),
                "an increment of shard {shard} (through node {via}), still bound for node {b} over the cut link, waits and ends NotReady; it ended with {result:?}\n{}",
                cluster.report()
            );
        }
    }

    cluster.heal();
    cluster.wait_converged().await;
    assert_values(cluster, &expected, "after the cancelled move").await;
    cluster.check_single_owner("cancelled move");
}

#[tokio::test]
async fn a_retargeted_move_keeps_the_state() {
    // Goal: when the target of a move crashes before the move completed, the move is
    // re-targeted and the old owner hands its parked snapshot to the new target. Method: 3
    // nodes; write a value to a key of every shard; cut the link from follower A to follower B
    // and drain A, so that A's shards bound for B are stuck at A; kill B: the leader marks it
    // down and re-targets the stuck moves to itself, and the drain finishes without the link.
    // Heal, restart B (it takes a share of the shards back by handoff), wait until the map
    // settles, and read back every value of a shard A owned before the drain (B's own values
    // are lost with it, by design).
    let shared = TestCluster::start_with("retargeted_move", 3, |config| {
        config.consensus.drain_timeout = DRAIN_GIVES_UP;
    })
    .await;
    let cluster = &*shared;
    let (leader, a, b) = roles(cluster).await;
    let a_shards = shards_of(&owners(cluster, leader).await, a);
    let all: Vec<ShardId> = (0..SHARD_COUNT).collect();
    let values = values_for("retarget", &all);
    write_all(cluster, leader, &values).await;

    cluster.block(a, b);
    let drained = admin(cluster, leader, AdminRequest::Drain { id: a }).await;
    assert!(
        drained.is_err(),
        "the drain of node {a} cannot finish while it cannot reach node {b}, yet: {drained:?}"
    );
    let stuck = shards_of(&owners(cluster, leader).await, a);
    assert!(
        !stuck.is_empty(),
        "some of node {a}'s shards are bound for node {b} and stuck"
    );
    println!("shards stuck on node {a}: {stuck:?}");

    cluster.kill(b).await;
    cluster
        .wait_until(
            &format!("the leader marks node {b} down and node {a} hands over every shard"),
            DEADLINE,
            || async {
                let status = cluster.status(leader)?;
                let (_, owners) = cluster.shards(leader).await?;
                (status.down.contains(&b) && shards_of(&owners, a).is_empty()).then_some(())
            },
        )
        .await;

    cluster.heal();
    cluster.restart(b).await;
    cluster.wait_converged().await;
    let a_values: Vec<(String, u64)> = a_shards
        .iter()
        .map(|&shard| values[shard as usize].clone())
        .collect();
    assert_values(cluster, &exactly(&a_values), "after the re-targeted move").await;
    cluster.check_single_owner("re-targeted move");
}

#[tokio::test]
async fn a_slow_deactivation_delays_the_move_and_hands_over_the_state() {
    // Goal: a shard whose handler is still running when its move begins is handed over only
    // once it retired, with everything the handler wrote — not empty while the old handler
    // still runs. Method: 3 nodes with a deactivate_timeout far below the handler's run time;
    // write a value to one key of a shard of follower A, then start a slow write (an async
    // handler that sleeps 3 s, then stores) to another key of it; once A delivered it, drain
    // A. The slow write must be answered, the drain must finish, and the new owner must hold
    // both values.
    let shared = TestCluster::start_with("slow_deactivation", 3, |config| {
        config.deactivate_timeout = Duration::from_millis(300);
    })
    .await;
    let cluster = &*shared;
    let (leader, a, _) = roles(cluster).await;
    let shard = shards_of(&owners(cluster, leader).await, a)[0];
    let (quick, slow) = (key_of_shard("quick", shard), key_of_shard("slow", shard));
    write_all(cluster, a, &[(quick.clone(), 7)]).await;

    let sent_at = Instant::now();
    let slow_write = {
        let (cluster, slow) = (shared.clone(), slow.clone());
        tokio::spawn(async move {
            let message = SlowPut {
                value: 42,
                millis: 3000,
            };
            cluster.send(a, &slow, message).await
        })
    };
    cluster.wait_delivered(a, shard, sent_at).await;
    admin_ok(cluster, leader, AdminRequest::Drain { id: a }).await;
    let slow_reply = slow_write.await.expect("the slow write's task");
    assert!(
        matches!(slow_reply, Ok(Served { node, value: Some(42), .. }) if node == a),
        "node {a} answers the slow write it was running: {slow_reply:?}"
    );

    let expected = [(quick, 7), (slow, 42)];
    for (key, value) in &expected {
        let served = read(cluster, leader, key).await;
        assert!(
            served.node != a && served.value == Some(*value),
            "the new owner of shard {shard} holds {key} = {value}, read {served:?}"
        );
    }
    cluster.check_single_owner("slow deactivation");
}

#[tokio::test]
async fn a_snapshot_larger_than_a_frame_moves_in_chunks() {
    // Goal: a shard whose snapshot is larger than a transport frame (16 MiB) is handed over
    // whole. Method: 3 nodes; store two 9 MiB blobs (different contents) under two keys of one
    // shard of follower A, sent through A itself so that no request carries more than one
    // blob; drain A; read both blobs' lengths and checksums from the new owner.
    let shared = TestCluster::start("large_snapshot", 3).await;
    let cluster = &*shared;
    let (leader, a, _) = roles(cluster).await;
    let shard = shards_of(&owners(cluster, leader).await, a)[0];
    let blob_size = 9 << 20;
    let mut expected: BTreeMap<String, BlobDigest> = BTreeMap::new();
    for (i, prefix) in ["blob-one", "blob-two"].into_iter().enumerate() {
        let key = key_of_shard(prefix, shard);
        let bytes: Vec<u8> = (0..blob_size)
            .map(|n: usize| (n.wrapping_mul(31 + i) >> 3) as u8)
            .collect();
        let digest = BlobDigest::of(&bytes);
        let stored = cluster
            .send(
                a,
                &key,
                PutBlob {
                    bytes: ByteBuf::from(bytes),
                },
            )
            .await;
        assert!(
            matches!(stored, Ok(ref served) if served.node == a && served.blob == Some(digest)),
            "node {a} stores the blob under {key}: {stored:?}"
        );
        expected.insert(key, digest);
    }

    admin_ok(cluster, leader, AdminRequest::Drain { id: a }).await;

    for (key, digest) in &expected {
        let served = cluster
            .wait_until(
                &format!("{key} is read through node {leader}"),
                DEADLINE,
                || async { cluster.send(leader, key, GetBlob).await.ok() },
            )
            .await;
        assert!(
            served.node != a && served.blob == Some(*digest),
            "the new owner of shard {shard} holds the blob of {key} ({digest:?}), read {served:?}"
        );
    }
    cluster.check_single_owner("large snapshot");
}

#[tokio::test]
async fn a_move_its_source_cannot_deliver_is_retargeted() {
    // Goal: a planned move whose source cannot reach its target, while both stay up and keep
    // renewing their leases, is re-targeted after a few lease periods instead of being retried
    // forever (which left its shards unserved and the drain unfinished). Method: 3 nodes; write
    // a value to every shard; cut only the link from follower A to follower B; drain A. The
    // drain must finish (A's moves to B are reported stuck and re-targeted to the leader), no
    // shard may be left with B's share unserved, and every value reads back at the end.
    let shared = TestCluster::start("stuck_move_retargeted", 3).await;
    let cluster = &*shared;
    let (leader, a, b) = roles(cluster).await;
    let all: Vec<ShardId> = (0..SHARD_COUNT).collect();
    let values = values_for("stuck", &all);
    write_all(cluster, leader, &values).await;

    cluster.block(a, b);
    admin_ok(cluster, leader, AdminRequest::Drain { id: a }).await;
    let (_, owners) = cluster.wait_converged().await;
    assert!(
        shards_of(&owners, a).is_empty(),
        "drained node {a} owns no shard: {owners:?}"
    );
    cluster.heal();
    assert_values(
        cluster,
        &exactly(&values),
        "after a drain whose moves to one node were stuck",
    )
    .await;
    cluster.check_single_owner("stuck move re-targeted");
}
