//! Leader election and loss of leadership with real `kv serve` processes on 127.0.0.1: a fresh
//! cluster elects one leader and agrees on one balanced map, `step-down` hands leadership over,
//! a paused leader is replaced and follows when it resumes, and a node without a leader, or a
//! leader without a quorum, stops serving.
//!
//! Every wait polls node status with a generous deadline (see `common::DEADLINE`); no test
//! asserts how long anything takes. The harness builds the `kv` example itself.

#[allow(dead_code)]
mod common;

use common::checks::{
    assert_balanced, assert_nodes_reports, assert_only_shards_of_moved, assert_owner, key_owned_by,
    put_and_get, status,
};
use common::{id_list, Cluster, DEADLINE, SHARD_COUNT};
use serde_json::Value;

/// The shared body of the N-node election tests.
fn elect_one_leader_and_agree_on_the_map(name: &str, nodes: usize) {
    let cluster = Cluster::new(name, nodes);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, map) = cluster.wait_for_one_map(&ids);
    assert_eq!(agreement.voters, ids, "every node is a voter");
    assert!(agreement.learners.is_empty(), "no learners");
    assert!(agreement.epoch >= 1, "a bootstrapped cluster has a map");
    assert_balanced(&map, &ids);
    for &id in &ids {
        let status = status(&cluster, id);
        assert_eq!(status["shard_count"], SHARD_COUNT, "node {id}: {status}");
        assert_eq!(status["shards_owned"], map.count(id), "node {id}: {status}");
        assert_eq!(
            status["failures_tolerated"],
            (nodes - 1) / 2,
            "node {id}: {status}"
        );
    }
    assert_nodes_reports(&cluster, &ids, &map, &ids);
    let key = key_owned_by(&map, ids[nodes - 1], "election");
    assert_owner(&cluster, &ids, &map, &key);
    put_and_get(&cluster, ids[nodes - 1], &key, "elected");
}

// Goal: a freshly bootstrapped 3-node cluster elects exactly one leader, and every node serves
// with the same balanced shard map. Method: start 3 nodes with `--init`, wait until all agree,
// then compare every node's `status`, `shards` and `nodes` output and route one key.
#[test]
fn three_nodes_elect_one_leader_and_agree_on_the_map() {
    elect_one_leader_and_agree_on_the_map("three_nodes_elect_one_leader", 3);
}

// Goal: the same with 5 nodes, which tolerate 2 failures. Method: as for 3 nodes.
#[test]
fn five_nodes_elect_one_leader_and_agree_on_the_map() {
    elect_one_leader_and_agree_on_the_map("five_nodes_elect_one_leader", 5);
}

// Goal: `step-down` moves leadership to another voter, and nothing else changes. Method: send
// `step-down --json` to a follower (so it is forwarded to the leader), check the reported new
// leader, then wait until all nodes agree on a different leader in a later term, same map.
#[test]
fn step_down_hands_leadership_to_another_voter() {
    let cluster = Cluster::new("step_down_hands_leadership", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (before, map) = cluster.wait_for_one_map(&ids);
    let follower = *ids
        .iter()
        .find(|&&id| id != before.leader)
        .expect("a follower");

    let (code, stdout, stderr) = cluster.cf_at(follower, &["step-down", "--json"]);
    assert_eq!(code, 0, "step-down through node {follower}: {stderr}");
    let change: Value = serde_json::from_str(stdout.trim()).expect("step-down --json prints JSON");
    let reported = change["leader"].as_u64();
    assert!(
        reported.is_some_and(|leader| leader != before.leader),
        "step-down reports another leader than {}: {change}",
        before.leader
    );
    assert_eq!(id_list(&change["voters"]), ids, "{change}");

    let (after, map_after) = cluster.wait_for_one_map_where(
        &ids,
        &format!("under a leader other than {}", before.leader),
        |agreement, _| agreement.leader != before.leader,
    );
    assert!(after.term > before.term, "a new leader means a new term");
    assert_eq!(
        after.epoch, before.epoch,
        "a step-down does not change the map"
    );
    assert_eq!(map_after, map);
}

// Goal: a node that knows no leader says so and refuses requests instead of serving or
// hanging. Method: in a 3-node cluster kill -9 the leader and one follower, wait until the
// surviving follower's status is no longer "serving", then `kv get` a key of its own shards
// (bounded by the harness) and run `step-down`: both must fail.
#[test]
fn no_leader_means_not_ready() {
    let cluster = Cluster::new("no_leader_means_not_ready", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, map) = cluster.wait_for_one_map(&ids);
    let survivor = *ids
        .iter()
        .find(|&&id| id != agreement.leader)
        .expect("a follower");
    for &id in &ids {
        if id != survivor {
            cluster.kill9(id);
        }
    }

    let status = cluster.wait_until(
        &format!("node {survivor} stops serving without a quorum"),
        DEADLINE,
        || cluster.status(survivor).filter(|s| s["state"] != "serving"),
    );
    assert_eq!(status["state"], "not_ready", "{status}");
    assert!(status["reason"].is_string(), "it says why: {status}");

    let key = key_owned_by(&map, survivor, "leaderless");
    let (code, stdout, stderr) = cluster.kv(survivor, &["get", &key]);
    assert!(
        code != 0 && code != 3,
        "kv get without a leader exited {code}: {stdout} {stderr}"
    );
    assert!(stderr.contains("not ready"), "kv get says why: {stderr}");
    let (code, _, stderr) = cluster.cf_at(survivor, &["step-down"]);
    assert_ne!(code, 0, "step-down without a leader succeeded");
    assert!(stderr.contains("no leader"), "step-down says why: {stderr}");
}

// Goal: a leader frozen for a while (a long GC pause, a stopped VM) is replaced, and once it
// runs again it follows the new leader instead of disrupting it. Method: SIGSTOP the leader,
// wait for the others to agree on a new one in a later term, SIGCONT it, and wait until all
// three agree on one map with the frozen node as a follower.
#[test]
fn paused_leader_is_replaced_and_follows_after_it_resumes() {
    let cluster = Cluster::new("paused_leader_is_replaced", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (before, map) = cluster.wait_for_one_map(&ids);
    let paused = before.leader;
    let others: Vec<u64> = ids.iter().copied().filter(|&id| id != paused).collect();

    cluster.pause(paused);
    let (during, map_during) = cluster.wait_for_one_map_where(
        &others,
        &format!("under a leader other than the paused {paused}"),
        |agreement, _| agreement.leader != paused && agreement.term > before.term,
    );
    assert_only_shards_of_moved(&map, &map_during, paused);
    cluster.resume(paused);
    let (after, _) = cluster.wait_for_one_map_where(
        &ids,
        &format!("with {paused} following again"),
        |agreement, _| agreement.leader != paused,
    );
    assert!(after.term >= during.term);
    assert!(
        after.epoch >= during.epoch,
        "the map's epoch never goes back"
    );
    let resumed = status(&cluster, paused);
    assert_eq!(resumed["raft_state"], "follower", "{resumed}");
}

// Goal (regression): a leader cut off from its quorum must stop serving, as the status contract
// says ("serving" needs a leader). Method: in a 3-node cluster kill -9 both followers and wait
// for the leader's status to leave "serving". openraft does not step a leader down when its
// quorum is gone; the lease does: it cannot be renewed without a quorum round.
#[test]
fn leader_without_quorum_stops_serving() {
    let cluster = Cluster::new("leader_without_quorum_stops_serving", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, _) = cluster.wait_for_one_map(&ids);
    for &id in &ids {
        if id != agreement.leader {
            cluster.kill9(id);
        }
    }
    cluster.wait_until(
        &format!("the isolated leader {} stops serving", agreement.leader),
        DEADLINE,
        || {
            cluster
                .status(agreement.leader)
                .filter(|s| s["state"] != "serving")
        },
    );
}
