//! Lease renewals on a leader whose raft cannot confirm them.
//!
//! Node 1 is a real raft node (in-memory storage, the real transport and raft network, the
//! real `Consensus`). Node 2, the only other voter, is a fake peer on a real transport server:
//! it grants votes and acknowledges heartbeats, and, unless told to commit, fails every append
//! that carries entries, as a follower whose disk stalls would. So node 1 leads and its quorum
//! rounds succeed, but its no-op never commits: openraft's `ensure_linearizable` then waits for
//! it to be applied, without a deadline. This is the state of a leader that lost its quorum
//! before its no-op committed, made deterministic.

use std::sync::atomic::AtomicBool;

use futures_util::future::join_all;
use openraft::raft::{AppendEntriesResponse, VoteResponse};

use super::network::Network;
use super::*;
use crate::codec;
use crate::storage::memory::in_memory_for_tests;
use crate::transport::{serve, PeerInfo, ServerHandle, ServiceError, TransportConfig};
use crate::wire::{Request, Response};

/// The cluster name both sides use in the transport handshake.
const CLUSTER: &str = "renewal-tests";

/// Bound on every wait: far above what a passing run needs, so a busy machine does not fail
/// the tests; a renewal that takes this long never returns.
const DEADLINE: Duration = Duration::from_secs(10);

/// Node 1 leading with the fake node 2 as its only follower.
struct Leader {
    consensus: Consensus,
    /// The fake follower's server, shut down (waiting for its socket to close) at the end.
    peer: ServerHandle,
}

fn transport_config(node_id: NodeId) -> TransportConfig {
    TransportConfig {
        cluster_name: CLUSTER.into(),
        node_id: Some(node_id),
        secret: None,
        ..TransportConfig::default()
    }
}

/// Starts the fake node 2: grants every vote, acknowledges every heartbeat, and acknowledges
/// appends with entries only while `commits` is set.
async fn fake_follower(commits: Arc<AtomicBool>) -> ServerHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake follower");
    let service = move |_peer: PeerInfo, payload: Vec<u8>| {
        let commits = commits.clone();
        async move {
            let request: Request =
                codec::decode(&payload).map_err(|e| ServiceError::Undecodable(Box::new(e)))?;
            let response = match request {
                Request::Vote(vote) => Response::Vote {
                    result: Ok(VoteResponse::new(vote.vote, None, true)),
                    since_contact: None,
                },
                Request::AppendEntries(append)
                    if append.entries.is_empty() || commits.load(Ordering::Acquire) =>
                {
                    Response::AppendEntries(Ok(AppendEntriesResponse::Success))
                }
                Request::AppendEntries(_) => {
                    return Err(ServiceError::failed("the disk is stalled"))
                }
                other => {
                    return Err(ServiceError::failed(format!(
                        "the fake follower does not answer {other:?}"
                    )))
                }
            };
            codec::encode(&response).map_err(|e| ServiceError::Encode(Box::new(e)))
        }
    };
    serve(listener, transport_config(2), Arc::new(service))
        .await
        .expect("serve the fake follower")
}

/// Starts node 1 with the fake node 2 and waits until node 1 leads.
async fn leader(commits: bool) -> Leader {
    let peer = fake_follower(Arc::new(AtomicBool::new(commits))).await;
    let config = ConsensusConfig::default();
    let (log_store, state_machine) = in_memory_for_tests(ClusterApp);
    let applied = state_machine.subscribe();
    let transport = Transport::new(transport_config(1)).expect("node 1's transport");
    let raft = Raft::new(
        1,
        config.raft_config(CLUSTER).expect("valid raft timing"),
        Network::new(transport.clone()),
        log_store,
        state_machine,
    )
    .await
    .expect("start node 1's raft");
    let consensus = Consensus::new(
        1,
        raft,
        applied,
        transport,
        config,
        LeaseConfig::default(),
        4,
        Arc::default(),
    );
    let members = BTreeMap::from([
        (
            1,
            NodeInfo {
                // Never dialled: a node does not send raft messages to itself.
                addr: "127.0.0.1:9".into(),
                zone: None,
            },
        ),
        (
            2,
            NodeInfo {
                addr: peer.local_addr().to_string(),
                zone: None,
            },
        ),
    ]);
    consensus
        .bootstrap(members)
        .await
        .expect("bootstrap nodes 1 and 2");
    let mut metrics = consensus.raft().metrics();
    tokio::time::timeout(
        DEADLINE,
        metrics.wait_for(|m| m.current_leader == Some(1) && m.state == ServerState::Leader),
    )
    .await
    .expect("node 1 leads within the deadline")
    .expect("node 1's raft runs");
    Leader { consensus, peer }
}

impl Leader {
    /// A renewal from `node` for the newest applied epoch.
    fn request(&self, node: NodeId, request_id: u64) -> RenewLease {
        RenewLease {
            node,
            epoch: self.consensus.applied().state.epoch,
            incarnation: 1,
            request_id,
        }
    }

    /// Waits until no renewal is in flight; fails the test after [`DEADLINE`].
    async fn wait_no_renewal_in_flight(&self) {
        let deadline = Instant::now() + DEADLINE;
        while self.consensus.renewals_in_flight() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} renewal(s) still in flight after {DEADLINE:?}",
                self.consensus.renewals_in_flight()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.consensus.raft().shutdown().await.ok();
        self.peer.shutdown().await;
    }
}

#[actix_rt::test]
async fn a_leader_whose_no_op_cannot_commit_answers_its_own_renewals() {
    // Goal: the leader's own renewal returns (refused) while its raft cannot confirm, so its
    // lease task keeps trying instead of hanging for good. Method: node 1 leads but its no-op
    // never commits; call `renew` for node 1 several times, each under a generous deadline.
    let leader = leader(false).await;
    for attempt in 1..=5 {
        let answer =
            tokio::time::timeout(DEADLINE, leader.consensus.renew(leader.request(1, attempt)))
                .await
                .unwrap_or_else(|_| {
                    panic!("own renewal {attempt} did not return within {DEADLINE:?}")
                });
        assert!(
            matches!(answer, Err(LeaseRefusal::TimedOut { .. })),
            "own renewal {attempt}: expected a time-out refusal, got {answer:?}"
        );
    }
    assert_eq!(leader.consensus.renewals_in_flight(), 0);
    leader.stop().await;
}

#[actix_rt::test]
async fn a_leader_that_cannot_commit_does_not_pile_up_renewals() {
    // Goal: renewals that cannot be confirmed do not accumulate on the leader. Method: node 1
    // leads but its no-op never commits; two simulated followers keep renewing as the node
    // service does (each request runs detached on the leader; the asking node waits a renew
    // period for the answer, as `renew_remote` does, then asks again). Count the renewals in
    // flight after every request: each follower has at most two (the new one and the one just
    // expiring), and every request returns.
    const FOLLOWERS: u64 = 2;
    const REQUESTS_EACH: u64 = 16;
    let leader = leader(false).await;
    let renew_period = leader.consensus.lease_config().renew_period;
    let in_flight_max = AtomicUsize::new(0);
    let followers = (2..2 + FOLLOWERS).map(|node| {
        let leader = &leader;
        let in_flight_max = &in_flight_max;
        async move {
            let mut unanswered = Vec::new();
            for request_id in 1..=REQUESTS_EACH {
                let consensus = leader.consensus.clone();
                let request = leader.request(node, request_id);
                let mut answer = tokio::spawn(async move { consensus.renew(request).await });
                // Let the request reach `renew` before counting.
                tokio::task::yield_now().await;
                in_flight_max.fetch_max(leader.consensus.renewals_in_flight(), Ordering::AcqRel);
                if tokio::time::timeout(renew_period, &mut answer)
                    .await
                    .is_err()
                {
                    unanswered.push(answer);
                }
            }
            unanswered
        }
    });
    let unanswered: Vec<_> = join_all(followers).await.into_iter().flatten().collect();
    let in_flight_max = in_flight_max.load(Ordering::Acquire);
    assert!(
        in_flight_max as u64 <= 2 * FOLLOWERS,
        "at most two renewals per follower may wait on the leader; {in_flight_max} did \
         ({} of {} requests unanswered when their asker gave up)",
        unanswered.len(),
        FOLLOWERS * REQUESTS_EACH
    );
    let late = tokio::time::timeout(DEADLINE, join_all(unanswered))
        .await
        .unwrap_or_else(|_| panic!("renewals on the leader did not return within {DEADLINE:?}"));
    for answer in late {
        let answer = answer.expect("a renewal task does not panic");
        assert!(
            matches!(answer, Err(LeaseRefusal::TimedOut { .. })),
            "expected a time-out refusal, got {answer:?}"
        );
    }
    leader.wait_no_renewal_in_flight().await;
    leader.stop().await;
}

#[actix_rt::test]
async fn renewals_beyond_the_limit_are_refused_at_once() {
    // Goal: however many renewals arrive, at most `RENEWALS_IN_FLIGHT_MAX` wait on the leader;
    // a stranger cannot take a place, and the leader's own renewal is never refused for load.
    // Method: node 1 cannot confirm; start a few more renewals than the limit at once (one
    // `join_all` polls each before any can finish): exactly the excess is refused as
    // overloaded, the rest time out, and nothing stays in flight.
    const EXCESS: usize = 5;
    let leader = leader(false).await;
    // Node 2 floods; then the leader's own renewal (never refused for load) and a stranger's
    // (node 99, no member: takes no place at all).
    let renewals = (0..RENEWALS_IN_FLIGHT_MAX + EXCESS)
        .map(|id| leader.request(2, id as u64))
        .chain([leader.request(1, 0), leader.request(99, 0)])
        .map(|request| leader.consensus.renew(request));
    let answers = tokio::time::timeout(DEADLINE, join_all(renewals))
        .await
        .unwrap_or_else(|_| panic!("renewals did not return within {DEADLINE:?}"));
    let overloaded = answers
        .iter()
        .filter(|a| matches!(a, Err(LeaseRefusal::Overloaded { .. })))
        .count();
    let timed_out = answers
        .iter()
        .filter(|a| matches!(a, Err(LeaseRefusal::TimedOut { .. })))
        .count();
    assert_eq!(
        (overloaded, timed_out),
        (EXCESS, RENEWALS_IN_FLIGHT_MAX + 1)
    );
    assert!(matches!(answers.last(), Some(Err(LeaseRefusal::NotMember))));
    assert_eq!(leader.consensus.renewals_in_flight(), 0);
    leader.stop().await;
}

#[actix_rt::test]
async fn renewals_arriving_together_share_one_confirmation_round() {
    // Goal: concurrent renewals share confirmation rounds (rule 4 (ii)), and a renewal that
    // arrives while a round runs waits for the next one. Method: node 1 leads and commits
    // (the fake follower acknowledges entries); once node 2 is marked down (it never renews)
    // the state stops changing; one renewal is granted, then twenty start together: the first
    // starts a round, the others arrived after it began and share the next one.
    const TOGETHER: u64 = 20;
    let leader = leader(true).await;
    let mut applied = leader.consensus.subscribe();
    tokio::time::timeout(
        DEADLINE,
        applied.wait_for(|a| a.state.members.get(&2).is_some_and(|m| m.down)),
    )
    .await
    .expect("node 2 is marked down within the deadline")
    .expect("node 1's state machine runs");
    let deadline = Instant::now() + DEADLINE;
    while let Err(refusal) = leader.consensus.renew(leader.request(1, 0)).await {
        assert!(
            Instant::now() < deadline,
            "no renewal granted within {DEADLINE:?}: {refusal}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rounds = || {
        leader
            .consensus
            .renewals
            .rounds_started
            .load(Ordering::Acquire)
    };
    let before = rounds();
    let renewals = (1..=TOGETHER).map(|id| leader.consensus.renew(leader.request(1, id)));
    let answers = tokio::time::timeout(DEADLINE, join_all(renewals))
        .await
        .unwrap_or_else(|_| panic!("renewals did not return within {DEADLINE:?}"));
    assert!(
        answers.iter().all(Result::is_ok),
        "every renewal is granted: {answers:?}"
    );
    assert_eq!(
        rounds() - before,
        2,
        "{TOGETHER} renewals at once take the round the first one starts and the next"
    );
    leader.stop().await;
}
