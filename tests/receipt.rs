//! Regression tests of the receipt rule's voter side (issue 15; `tests/model`, variant
//! `amended_receipt`): a new leader may start its wait before it takes a silent node's shards at
//! the latest time any voter of its election heard from an earlier leader, so what a voter
//! reports with its vote must never make that time later than the truth.
//!
//! Real nodes run in this process (`inproc`); the test plays a candidate on the wire and asks a
//! voter for its vote, as a real candidate's network layer does, and checks the time since its
//! last leader contact that the voter reports with the grant against events the test saw. All
//! nodes share this process's clock, so the voter's report converts to the test's clock exactly.
//! The candidate side (the latest receipt over every granting voter, the candidate's own
//! included, credited as measured) is pinned by the unit tests in `src/consensus/contact.rs`.

// Each test file uses only part of the harness.
#[allow(dead_code)]
mod inproc;

use std::time::{Duration, Instant};

use clusterfunk::admin::AdminRequest;
use clusterfunk::internals::{Request, Response};
use clusterfunk::transport::{Transport, TransportConfig};
use clusterfunk::{NodeId, ShardId};
use inproc::{Get, Put, TestCluster, DEADLINE, SHARD_COUNT};
use openraft::raft::VoteRequest;
use openraft::{CommittedLeaderId, LogId, Vote};

/// The node id the test's candidate claims: no member has it.
const CANDIDATE: NodeId = 99;

/// What a vote request to `voter` got back: whether it was granted, the voter's report, and
/// when the answer arrived.
struct Answer {
    granted: bool,
    since_contact: Option<Duration>,
    arrived: Instant,
}

/// Asks `voter` for its vote in `term` as [`CANDIDATE`], with a log ahead of any real one (so
/// only the voter's term and its leader lease can refuse).
async fn ask_for_vote(cluster: &TestCluster, voter: NodeId, term: u64) -> Option<Answer> {
    let transport = Transport::new(TransportConfig {
        node_id: Some(CANDIDATE),
        ..TransportConfig::default()
    })
    .expect("a valid insecure transport config");
    let request = Request::Vote(VoteRequest {
        vote: Vote::new(term, CANDIDATE),
        last_log_id: Some(LogId::new(
            CommittedLeaderId::new(term, CANDIDATE),
            u64::MAX / 2,
        )),
    });
    let payload = clusterfunk::internals::encode(&request).expect("a vote request encodes");
    let bytes = transport
        .request_node(voter, cluster.addr(voter), payload, Duration::from_secs(5))
        .await
        .ok()?;
    let arrived = Instant::now();
    match clusterfunk::internals::decode::<Response>(&bytes).ok()? {
        Response::Vote {
            result: Ok(response),
            since_contact,
        } => Some(Answer {
            granted: response.vote_granted,
            since_contact,
            arrived,
        }),
        _ => None,
    }
}

/// Asks `voter` for its vote, each time in a term above the one it is in, until it grants one.
async fn vote_granted_by(cluster: &TestCluster, voter: NodeId) -> (Instant, Answer) {
    cluster
        .wait_until(
            &format!("node {voter} grants the test's candidate its vote"),
            DEADLINE,
            move || async move {
                let term = cluster.status(voter)?.term + 1;
                let sent = Instant::now();
                let answer = ask_for_vote(cluster, voter, term).await?;
                answer.granted.then_some((sent, answer))
            },
        )
        .await
}

/// A voter records every append it receives from a leader, and reports with a granted vote the
/// time since the last one: the report covers the voter's silence, and never reaches back before
/// an append the voter is known to have received.
#[tokio::test]
async fn a_granted_vote_reports_the_time_since_the_voters_last_leader_append() {
    let cluster = &*TestCluster::start("receipt_reported_with_the_vote", 3).await;
    let leader = cluster.wait_ready().await;
    let (voter, _) = cluster.follower_and_others(leader);

    // An entry written after `written` that the voter applied reached it in an append after
    // `written`.
    let written = Instant::now();
    cluster
        .node(leader)
        .expect("the leader runs")
        .admin(AdminRequest::Undrain { id: voter })
        .await
        .expect("the leader commits an undrain of a node that is not draining");
    let index = cluster
        .status(leader)
        .and_then(|status| status.last_log_index)
        .expect("the leader reports its last log index");
    cluster
        .wait_until(
            &format!("node {voter} applies entry {index}"),
            DEADLINE,
            move || async move {
                let applied = cluster.status(voter)?.last_applied_index?;
                (applied >= index).then_some(())
            },
        )
        .await;

    // The voter is cut off (so that it can neither hear from the leader nor win an election of
    // its own). Once it campaigns it has not heard from a leader for an election timeout; wait
    // for a second campaign so that its silence is long enough to see in its report.
    cluster.isolate(voter);
    let term = cluster.status(voter).expect("the voter runs").term;
    let silent = cluster
        .wait_until(
            &format!("node {voter} campaigns after losing its leader's appends"),
            DEADLINE,
            move || async move {
                let now = Instant::now();
                (cluster.status(voter)?.term > term).then_some(now)
            },
        )
        .await;
    let campaigned = cluster.status(voter).expect("the voter runs").term;
    cluster
        .wait_until(
            &format!("node {voter} campaigns again"),
            DEADLINE,
            move || async move { (cluster.status(voter)?.term > campaigned).then_some(()) },
        )
        .await;

    let (sent, answer) = vote_granted_by(cluster, voter).await;
    let since_contact = answer
        .since_contact
        .expect("a granted vote reports the time since the voter's last leader contact");
    // The voter's last receipt is at arrival − report (at the latest) and after `written`.
    assert!(
        since_contact <= answer.arrived.duration_since(written),
        "node {voter} reported {since_contact:?} since its last leader append, but it applied \
         an entry written {:?} before its answer arrived",
        answer.arrived.duration_since(written)
    );
    // It heard nothing from a leader after it first campaigned.
    assert!(
        since_contact >= sent.duration_since(silent),
        "node {voter} reported {since_contact:?}, less than the {:?} it has not heard from a \
         leader",
        sent.duration_since(silent)
    );
}

/// A voter restarted since it last heard from a leader reports its own start, not what it heard
/// before: openraft grants votes at once after a restart, so only the start bounds its receipt.
#[tokio::test]
async fn a_restarted_voter_reports_its_start_not_what_it_heard_before() {
    let cluster = &*TestCluster::start("restarted_voter_reports_its_start", 3).await;
    let leader = cluster.wait_ready().await;
    let (voter, _) = cluster.follower_and_others(leader);

    // The voter restarts where no leader's append reaches it.
    cluster.isolate(voter);
    cluster.kill(voter).await;
    let restarting = Instant::now();
    cluster.restart(voter).await;
    let restarted = Instant::now();

    let (sent, answer) = vote_granted_by(cluster, voter).await;
    let since_contact = answer
        .since_contact
        .expect("a granted vote reports the time since the voter's last leader contact");
    assert!(
        since_contact <= answer.arrived.duration_since(restarting),
        "node {voter} reported {since_contact:?}, which reaches back before its restart \
         ({:?} before the answer arrived)",
        answer.arrived.duration_since(restarting)
    );
    assert!(
        since_contact >= sent.duration_since(restarted),
        "node {voter} heard from no leader since its restart, yet reported {since_contact:?} \
         (the restart finished {:?} before the request)",
        sent.duration_since(restarted)
    );
}

/// Regression (found landing the receipt rule): the wait from the voters' last contact can end
/// right after the election, before live members renewed with the new leader; the new leader then
/// marked a live node down and moved its shards without a handoff, losing their values. Now every
/// member gets a renew grace after the election. Method: three times, write a value to every
/// shard the leader does not own, kill the leader, wait until the survivors moved its shards,
/// restart it and wait until the cluster converged; then read every value back.
#[tokio::test]
async fn a_new_leader_marks_only_the_silent_old_leader_down_never_a_live_node() {
    let cluster = &*TestCluster::start("a_new_leader_marks_only_the_old_one_down", 3).await;
    let mut written = Vec::new();
    for round in 0..3u64 {
        let leader = cluster.wait_ready().await;
        let (_, owners) = cluster
            .shards(leader)
            .await
            .expect("the leader holds a map");
        for (shard, owner) in owners.iter().enumerate() {
            if *owner == leader {
                continue;
            }
            let key = cluster.key_of(shard as ShardId).to_string();
            let value = round * 1000 + shard as u64;
            let reply = cluster
                .send(*owner, &key, Put { value })
                .await
                .unwrap_or_else(|e| panic!("put {key} through its owner {owner}: {e:?}"));
            assert_eq!(reply.value, Some(value));
            written.retain(|(k, _): &(String, u64)| *k != key);
            written.push((key, value));
        }
        cluster.kill(leader).await;
        let survivors: Vec<NodeId> = cluster.running_ids();
        // A loaded network: renewals to the new leader take a few round trips of 40 ms.
        for &from in &survivors {
            for &to in &survivors {
                if from != to {
                    cluster.slow(from, to, Duration::from_millis(40));
                }
            }
        }
        cluster
            .wait_until(
                &format!("the survivors {survivors:?} mark {leader} down and own all its shards"),
                DEADLINE,
                || {
                    let survivors = survivors.clone();
                    async move {
                        for &id in &survivors {
                            let status = cluster.status(id)?;
                            if !status.down.contains(&leader) {
                                return None;
                            }
                            let (_, owners) = cluster.shards(id).await?;
                            if owners.contains(&leader) {
                                return None;
                            }
                        }
                        Some(())
                    }
                },
            )
            .await;
        for &from in &survivors {
            for &to in &survivors {
                if from != to {
                    cluster.slow(from, to, Duration::ZERO);
                }
            }
        }
        cluster.restart(leader).await;
        // Values written to the killed leader's shards before are gone with it (state lives in
        // memory); the others must all be there at the end.
        written.retain(|(key, _)| {
            let shard = clusterfunk::shard_map::shard_for(key.as_bytes(), SHARD_COUNT);
            owners[shard as usize] != leader
        });
    }
    cluster.wait_converged().await;
    let ids = cluster.running_ids();
    for (i, (key, value)) in written.iter().enumerate() {
        let via = ids[i % ids.len()];
        let reply = cluster
            .send(via, key, Get)
            .await
            .unwrap_or_else(|e| panic!("get {key} through node {via}: {e:?}"));
        assert_eq!(
            reply.value,
            Some(*value),
            "{key}: a value on a live node was lost, so a live node was marked down"
        );
    }
}
