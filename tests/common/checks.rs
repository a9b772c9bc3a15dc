//! Assertions the process-level tests share (`tests/leadership.rs`, `tests/restart.rs`,
//! `tests/membership.rs`, `tests/auth.rs`): on shard maps, node status and key routing, through
//! the [`Cluster`] harness. Each fails the test with what it found.

use clusterfunk::shard_map::shard_for;
use serde_json::Value;

use super::{Cluster, ShardMap, DEADLINE, SHARD_COUNT};

/// Checks that exactly `members` own shards, each ⌊count/members⌋ or ⌈count/members⌉ of them.
pub fn assert_balanced(map: &ShardMap, members: &[u64]) {
    assert_eq!(map.owners.len(), SHARD_COUNT, "the map covers every shard");
    assert_eq!(map.owners(), members, "exactly the members own shards");
    let low = SHARD_COUNT / members.len();
    let high = SHARD_COUNT.div_ceil(members.len());
    for &node in members {
        let count = map.count(node);
        assert!(
            (low..=high).contains(&count),
            "node {node} owns {count} shards, expected {low}..={high} (epoch {})",
            map.epoch
        );
    }
}

/// A key whose shard `node` owns in `map`.
pub fn key_owned_by(map: &ShardMap, node: u64, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|key| map.owners[shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize] == node)
        .expect("some key hashes to a shard of every owner")
}

/// Checks that only shards `node` owned in `before` have another owner in `after`: when `node`
/// fails, the leader may move its shards (failover), and nothing else.
pub fn assert_only_shards_of_moved(before: &ShardMap, after: &ShardMap, node: u64) {
    for (shard, (was, is)) in before.owners.iter().zip(&after.owners).enumerate() {
        assert!(
            was == is || *was == node,
            "shard {shard} moved from {was} to {is} (epoch {} to {}), but only the failed \
             node {node}'s shards may move",
            before.epoch,
            after.epoch
        );
    }
}

/// Node `id`'s status, which it must give.
pub fn status(cluster: &Cluster, id: u64) -> Value {
    cluster
        .status(id)
        .unwrap_or_else(|| panic!("node {id} does not answer status\n{}", cluster.report()))
}

/// Stores `value` under `key` through `node` and reads it back there.
pub fn put_and_get(cluster: &Cluster, node: u64, key: &str, value: &str) {
    let (code, _, stderr) = cluster.kv(node, &["put", key, value]);
    assert_eq!(code, 0, "kv put {key} through node {node}: {stderr}");
    let (code, stdout, stderr) = cluster.kv(node, &["get", key]);
    assert_eq!(code, 0, "kv get {key} through node {node}: {stderr}");
    assert_eq!(stdout.trim(), value, "kv get {key} through node {node}");
}

/// Checks that `kv owner` answers through every node of `ids` (non-owners forward the request)
/// with `key`'s owner in `map`, its shard and the map's epoch.
pub fn assert_owner(cluster: &Cluster, ids: &[u64], map: &ShardMap, key: &str) {
    let shard = shard_for(key.as_bytes(), SHARD_COUNT as u32);
    let owner = map.owners[shard as usize];
    for &id in ids {
        let (code, stdout, stderr) = cluster.kv(id, &["owner", key]);
        assert_eq!(code, 0, "kv owner {key} through node {id}: {stderr}");
        let answer: Value = serde_json::from_str(stdout.trim()).expect("owner prints JSON");
        assert_eq!(
            answer["node"], owner,
            "owner of {key} through node {id}: {answer}"
        );
        assert_eq!(answer["shard"], shard, "shard of {key}: {answer}");
        assert_eq!(answer["epoch"], map.epoch, "epoch of {key}: {answer}");
    }
}

/// Checks every node's `nodes --json` against the map and membership, waiting out a leader
/// change (a busy machine may see one): all `members` with their address, role and shards,
/// and exactly the reported leader flagged as such.
pub fn assert_nodes_reports(cluster: &Cluster, ids: &[u64], map: &ShardMap, voters: &[u64]) {
    for &id in ids {
        cluster.wait_until(
            &format!("node {id}'s `nodes --json` matches the map and names one leader"),
            DEADLINE,
            || {
                let report = cluster.nodes(id)?;
                let leader = report["leader"].as_u64()?;
                let entries = report["nodes"].as_array()?;
                let listed: Vec<u64> = entries.iter().filter_map(|n| n["id"].as_u64()).collect();
                assert_eq!(
                    listed,
                    map.owners(),
                    "node {id} lists the members: {report}"
                );
                for entry in entries {
                    let member = entry["id"].as_u64().expect("member id");
                    let role = if voters.contains(&member) {
                        "voter"
                    } else {
                        "learner"
                    };
                    assert_eq!(entry["addr"], cluster.addr(member), "{report}");
                    assert_eq!(entry["role"], role, "node {id} on {member}: {report}");
                    assert_eq!(entry["shards"], map.count(member), "{report}");
                    if entry["leader"] != (member == leader) {
                        return None;
                    }
                }
                Some(())
            },
        );
    }
}
