//! A node forwarding a message to a shard's owner that goes silent (frozen: sockets open,
//! nothing answered) resolves the message when the shard moves, not when its timeout fires:
//! an idempotent message goes to the next owner, any other fails with `OutcomeUnknown`.
//! Real nodes in this process (see `inproc`); the owner's thread is blocked for longer than
//! the nodes' request timeout, so a message that waited on it would end in `Timeout`.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod inproc;

use std::time::Duration;

use clusterfunk::Error;
use inproc::{key_of_shard, shards_of, Get, Incr, SendError, Set, TestCluster};

/// The nodes' request timeout in this test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the owner stays frozen: past the request timeout.
const FREEZE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_forwarded_message_to_a_frozen_owner_follows_its_shard() {
    let cluster = TestCluster::start_with("forwarded_to_frozen_owner", 3, |config| {
        config.request_timeout = REQUEST_TIMEOUT;
    })
    .await;
    let leader = cluster.wait_ready().await;
    let (frozen, others) = cluster.follower_and_others(leader);
    let via = others[0];
    let (_, owners) = cluster.wait_converged().await;
    let shards = shards_of(&owners, frozen);
    let incr_key = key_of_shard("frozen-incr", shards[0]);
    let set_key = key_of_shard("frozen-set", shards[1]);
    // Both keys served by the frozen node through `via` first: the connection is warm.
    for (key, served) in [
        (&incr_key, cluster.send(via, &incr_key, Incr).await),
        (
            &set_key,
            cluster.send(via, &set_key, Set { value: 1 }).await,
        ),
    ] {
        let served = served.unwrap_or_else(|e| panic!("{key} before the freeze: {e:?}"));
        assert_eq!(served.node, frozen, "{key} is served by its owner");
    }

    cluster.pause(frozen, FREEZE).await;
    let (incr, set) = tokio::join!(
        cluster.send(via, &incr_key, Incr),
        cluster.send(via, &set_key, Set { value: 2 }),
    );
    println!("increment: {incr:?}; set: {set:?}");
    match &incr {
        // Sent to the frozen owner before its silence was noticed: its fate is unknown.
        Err(SendError::Node(Error::OutcomeUnknown { .. })) => {}
        // Held back because the silence was already noticed, then served by the next owner.
        Ok(served) if served.node != frozen => {}
        other => panic!("the increment to the frozen owner's shard ended with {other:?}"),
    }
    let set = set.unwrap_or_else(|e| panic!("the idempotent set failed: {e:?}"));
    assert_ne!(
        set.node, frozen,
        "the set was served by its shard's next owner"
    );

    // At the end, with the frozen node back: the set's value stands, and no two nodes ever
    // served one shard.
    cluster
        .heal_and_check("a_forwarded_message_to_a_frozen_owner_follows_its_shard")
        .await;
    let read = cluster
        .send(via, &set_key, Get)
        .await
        .unwrap_or_else(|e| panic!("reading {set_key} back: {e:?}"));
    assert_eq!(read.value, Some(2), "{set_key} read back at the end");
}
