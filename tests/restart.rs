//! Restarts from disk with real `kv serve` processes on 127.0.0.1: a killed leader is replaced
//! and rejoins from its data dir, and a whole cluster killed at once comes back with the
//! membership and map it had.
//!
//! Every wait polls node status with a generous deadline (see `common::DEADLINE`); no test
//! asserts how long anything takes. The harness builds the `kv` example itself.

#[allow(dead_code)]
mod common;

use common::checks::{
    assert_only_shards_of_moved, assert_owner, key_owned_by, put_and_get, status,
};
use common::Cluster;
use serde_json::Value;

// Goal: when the leader dies, the others elect another one, and the old leader rejoins from
// its data dir as a follower with the same map, ignoring `--init`. Method: kill -9 the leader,
// wait for the survivors to agree on a new leader in a higher term, restart the old one with
// its original arguments (including `--init`), wait for one map on all three, then route keys,
// one owned by the rejoined node.
#[test]
fn killed_leader_is_replaced_and_rejoins_from_disk() {
    let cluster = Cluster::new("killed_leader_is_replaced", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (before, map) = cluster.wait_for_one_map(&ids);
    let old = before.leader;
    let survivors: Vec<u64> = ids.iter().copied().filter(|&id| id != old).collect();
    // A value on a survivor outlives the leader's crash (values live in their owner's memory).
    let kept_key = key_owned_by(&map, survivors[0], "kept");
    put_and_get(&cluster, survivors[0], &kept_key, "kept");

    cluster.kill9(old);
    let (after, map_during) = cluster.wait_for_one_map_where(
        &survivors,
        &format!("under a leader other than {old} in a later term"),
        |agreement, _| agreement.leader != old && agreement.term > before.term,
    );
    assert_eq!(
        after.voters, ids,
        "a dead voter stays a member until removed"
    );
    // The new leader may already have marked the dead node down and moved its shards (that is
    // failover, and fast); the election itself moves nothing else.
    assert_only_shards_of_moved(&map, &map_during, old);

    cluster.restart(old);
    let (rejoined, map_after) = cluster.wait_for_one_map_where(
        &ids,
        &format!(
            "under the new leader {}, balanced again over all three",
            after.leader
        ),
        |agreement, map| agreement.leader == after.leader && map.is_balanced(&ids),
    );
    let old_status = status(&cluster, old);
    assert_eq!(old_status["raft_state"], "follower", "{old_status}");
    // A re-bootstrap from `--init` would start a new history at the first epoch and term.
    assert!(
        rejoined.epoch >= after.epoch && rejoined.term >= after.term,
        "the restart did not re-bootstrap: {rejoined:?} after {after:?}"
    );
    assert_eq!(rejoined.voters, ids);

    let (code, stdout, stderr) = cluster.kv(survivors[0], &["get", &kept_key]);
    assert_eq!((code, stdout.trim()), (0, "kept"), "{stderr}");
    let key = key_owned_by(&map_after, old, "rejoined");
    assert_owner(&cluster, &ids, &map_after, &key);
    put_and_get(&cluster, old, &key, "after the restart");
}

// Goal: a cluster killed as a whole comes back with the membership and map it had, read from
// disk rather than rebuilt from `--init`. Method: bootstrap 3 nodes, add a 4th as a learner
// (so the membership differs from `--init`), record `status`, `shards` and `nodes`; kill -9
// all four, restart them with their original arguments, and compare once they agree.
#[test]
fn whole_cluster_restarts_with_membership_and_map_intact() {
    let cluster = Cluster::with_initial_members("whole_cluster_restarts", 4, 3);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1, 2, 3]);
    cluster.start(4);
    let (code, _, stderr) = cluster.cf_at(
        1,
        &[
            "add-node",
            "--id",
            "4",
            "--addr",
            &cluster.addr(4),
            "--learner",
        ],
    );
    assert_eq!(code, 0, "add-node 4 --learner: {stderr}");
    let ids = cluster.ids();
    let (before, map) = cluster.wait_for_one_map_where(&ids, "with learner 4", |agreement, _| {
        agreement.learners == [4]
    });
    assert_eq!(before.voters, [1, 2, 3]);
    let members_before: Vec<Value> = ids.iter().map(|&id| members(&cluster, id)).collect();

    for &id in &ids {
        cluster.kill9(id);
    }
    for &id in &ids {
        cluster.restart(id);
    }
    let (after, map_after) = cluster.wait_for_one_map(&ids);
    assert_eq!(after.voters, before.voters, "voters survive the restart");
    assert_eq!(
        after.learners, before.learners,
        "learners survive the restart"
    );
    assert_eq!(after.epoch, before.epoch, "the epoch survives the restart");
    assert!(after.term >= before.term, "terms never go back");
    assert_eq!(map_after, map, "the assignment survives the restart");
    for (&id, before) in ids.iter().zip(&members_before) {
        assert_eq!(&members(&cluster, id), before, "node {id}'s `nodes --json`");
    }
    let key = key_owned_by(&map, 4, "restarted");
    put_and_get(&cluster, 4, &key, "after the restart");
}

/// Node `id`'s `nodes --json` without the leader fields, which an election may change.
fn members(cluster: &Cluster, id: u64) -> Value {
    let mut report = cluster
        .nodes(id)
        .unwrap_or_else(|| panic!("node {id} does not answer nodes\n{}", cluster.report()));
    report["leader"] = Value::Null;
    for entry in report["nodes"].as_array_mut().expect("a member list") {
        entry["leader"] = Value::Null;
    }
    report
}
