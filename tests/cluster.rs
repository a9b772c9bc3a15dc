//! Process-level tests of a whole cluster: real `kv serve` nodes on 127.0.0.1, killed,
//! paused, restarted and reconfigured through the `clusterfunk` and `kv` tools, checking leader
//! election, agreement on the shard map, durability across restarts, membership changes and
//! refusal of bad clients.
//!
//! Every wait polls node status with a generous deadline (see `common::DEADLINE`); no test
//! asserts how long anything takes. Needs the `kv` example built: `cargo test --workspace` does
//! that, `cargo test --test cluster` alone does not (run `cargo build --examples` first).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clusterfunk::shard_map::shard_for;
use common::{id_list, Cluster, ShardMap, DEADLINE, SHARD_COUNT};
use serde_json::Value;

/// Checks that exactly `members` own shards, each ⌊count/members⌋ or ⌈count/members⌉ of them.
fn assert_balanced(map: &ShardMap, members: &[u64]) {
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
fn key_owned_by(map: &ShardMap, node: u64, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|key| map.owners[shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize] == node)
        .expect("some key hashes to a shard of every owner")
}

/// Checks that only shards `node` owned in `before` have another owner in `after`: when `node`
/// fails, the leader may move its shards (failover), and nothing else.
fn assert_only_shards_of_moved(before: &ShardMap, after: &ShardMap, node: u64) {
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
fn status(cluster: &Cluster, id: u64) -> Value {
    cluster
        .status(id)
        .unwrap_or_else(|| panic!("node {id} does not answer status\n{}", cluster.report()))
}

/// Stores `value` under `key` through `node` and reads it back there.
fn put_and_get(cluster: &Cluster, node: u64, key: &str, value: &str) {
    let (code, _, stderr) = cluster.kv(node, &["put", key, value]);
    assert_eq!(code, 0, "kv put {key} through node {node}: {stderr}");
    let (code, stdout, stderr) = cluster.kv(node, &["get", key]);
    assert_eq!(code, 0, "kv get {key} through node {node}: {stderr}");
    assert_eq!(stdout.trim(), value, "kv get {key} through node {node}");
}

/// Checks that `kv owner` answers through every node of `ids` (non-owners forward the request)
/// with `key`'s owner in `map`, its shard and the map's epoch.
fn assert_owner(cluster: &Cluster, ids: &[u64], map: &ShardMap, key: &str) {
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
fn assert_nodes_reports(cluster: &Cluster, ids: &[u64], map: &ShardMap, voters: &[u64]) {
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

// Goal: the CLI's membership commands do what they say: a 4th voter (with a warning about the
// even count) and a learner both receive shards; a removed node loses all of them; an unknown
// node cannot be removed. Method: bootstrap 3 nodes, start nodes 4 and 5 empty, then
// `add-node`, `add-node --learner` and `remove-node` through different nodes, waiting each
// time until every member holds the new map, and checking membership, epoch and balance.
#[test]
fn add_node_learner_and_remove_node_through_the_cli() {
    let cluster = Cluster::with_initial_members("add_node_learner_and_remove_node", 5, 3);
    cluster.start_all_with_init();
    let (initial, _) = cluster.wait_for_one_map(&[1, 2, 3]);
    cluster.start(4);
    cluster.start(5);
    let empty = status(&cluster, 4);
    assert_eq!(empty["state"], "not_ready", "a node not yet added: {empty}");

    // A 4th voter: allowed, with a warning that 4 voters tolerate no more failures than 3.
    let (code, _, stderr) =
        cluster.cf_at(1, &["add-node", "--id", "4", "--addr", &cluster.addr(4)]);
    assert_eq!(code, 0, "add-node 4: {stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("even number of voters (4)"),
        "add-node 4 should warn about the even voter count: {stderr}"
    );
    let (four, map) =
        cluster.wait_for_one_map_where(&[1, 2, 3, 4], "with voters 1-4", |agreement, _| {
            agreement.voters == [1, 2, 3, 4]
        });
    assert!(four.epoch > initial.epoch, "adding a node makes a new map");
    assert!(map.count(4) > 0, "node 4 owns shards");
    assert_balanced(&map, &[1, 2, 3, 4]);
    for id in 1..=4 {
        let status = status(&cluster, id);
        assert_eq!(
            status["failures_tolerated"], 1,
            "4 voters tolerate 1: {status}"
        );
    }

    // A learner: it hosts shards but does not vote.
    let (code, _, stderr) = cluster.cf_at(
        3,
        &[
            "add-node",
            "--id",
            "5",
            "--addr",
            &cluster.addr(5),
            "--learner",
        ],
    );
    assert_eq!(code, 0, "add-node 5 --learner: {stderr}");
    let ids = cluster.ids();
    let (five, map) = cluster.wait_for_one_map_where(&ids, "with learner 5", |agreement, _| {
        agreement.learners == [5]
    });
    assert_eq!(five.voters, [1, 2, 3, 4], "a learner does not vote");
    assert!(five.epoch > four.epoch, "adding a learner makes a new map");
    assert!(map.count(5) > 0, "learner 5 owns shards");
    assert_balanced(&map, &ids);
    let learner = status(&cluster, 5);
    assert_eq!(learner["raft_state"], "learner", "{learner}");
    assert_nodes_reports(&cluster, &ids, &map, &[1, 2, 3, 4]);

    // Removing node 4: every remaining member's map gives its shards to the others.
    let (code, _, stderr) = cluster.cf_at(2, &["remove-node", "--id", "4"]);
    assert_eq!(code, 0, "remove-node 4: {stderr}");
    assert!(
        !stderr.contains("warning"),
        "3 voters deserve no warning: {stderr}"
    );
    let remaining = [1, 2, 3, 5];
    let (three, map) =
        cluster.wait_for_one_map_where(&remaining, "without node 4", |agreement, _| {
            agreement.voters == [1, 2, 3]
        });
    assert_eq!(three.learners, [5]);
    assert!(three.epoch > five.epoch, "removing a node makes a new map");
    assert_eq!(map.count(4), 0, "node 4 owns no shards");
    assert_balanced(&map, &remaining);
    let exit = cluster.stop(4);
    assert!(
        exit.success(),
        "the removed node stops cleanly on SIGTERM: {exit}"
    );

    // An unknown node: refused, with a message that names it.
    let (code, stdout, stderr) = cluster.cf_at(1, &["remove-node", "--id", "42"]);
    assert_ne!(code, 0, "removing unknown node 42 succeeded: {stdout}");
    assert!(
        stderr.starts_with("error:") && stderr.contains("42") && stderr.trim().lines().count() == 1,
        "one error line naming node 42: {stderr}"
    );
    let (after, _) = cluster.wait_for_one_map(&remaining);
    assert_eq!(
        after.epoch, three.epoch,
        "a refused command changes nothing"
    );
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

// Goal: clients without the secret and peers speaking garbage are refused, while correct
// clients keep being served. Method: run `clusterfunk status` and `kv get` with a wrong
// secret; open raw TCP connections that send garbage and check that each node closes them;
// then check that every node still serves and a key can be written and read.
#[test]
fn unauthenticated_client_and_garbage_are_refused_while_the_cluster_works() {
    let cluster = Cluster::new("unauthenticated_client_and_garbage", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (_, map) = cluster.wait_for_one_map(&ids);
    let wrong_secret = "this-is-not-the-cluster-secret";
    assert_ne!(wrong_secret, cluster.secret());

    let mut command = cluster.cf_command(&["--node", &cluster.addr(1), "status"]);
    command.env("CLUSTERFUNK_SECRET", wrong_secret);
    let (code, stdout, stderr) = cluster.run(command);
    assert_ne!(code, 0, "status with a wrong secret succeeded: {stdout}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert!(
        stderr.contains("secret"),
        "the error mentions the secret: {stderr}"
    );

    let mut command = cluster.kv_command(2, &["get", "anything"]);
    command.env("CLUSTERFUNK_SECRET", wrong_secret);
    let (code, _, stderr) = cluster.run(command);
    assert!(
        code != 0 && code != 3,
        "kv get with a wrong secret: {code}, {stderr}"
    );
    assert!(
        stderr.contains("secret"),
        "the error mentions the secret: {stderr}"
    );

    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: clusterfunk\r\n\r\n",
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        &[
            0, 0, 0, 16, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        ],
    ];
    for &id in &ids {
        for bytes in garbage {
            assert_connection_closed(&cluster, id, bytes);
        }
    }

    for &id in &ids {
        let status = status(&cluster, id);
        assert_eq!(
            status["state"], "serving",
            "node {id} after the garbage: {status}"
        );
    }
    cluster.wait_for_one_map(&ids);
    let key = key_owned_by(&map, 3, "after-garbage");
    put_and_get(&cluster, 3, &key, "still works");
}

/// Sends `bytes` to node `id` on a raw TCP connection and fails unless the node closes it
/// (a read returns 0 or an error other than a timeout) within [`DEADLINE`].
fn assert_connection_closed(cluster: &Cluster, id: u64, bytes: &[u8]) {
    let mut stream = TcpStream::connect(cluster.addr(id)).expect("connect to the node");
    stream.write_all(bytes).expect("send garbage");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set a read timeout");
    let deadline = Instant::now() + DEADLINE;
    let mut buffer = [0_u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            // An error frame may come first; the end of the stream is what counts.
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
        assert!(
            Instant::now() < deadline,
            "node {id} kept a connection open after {bytes:?}\n{}",
            cluster.report()
        );
    }
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

// Goal: talking to an address where no node listens fails at once with one clear line.
// Method: allocate a port but start nothing; run `clusterfunk status` and `kv get` at it.
#[test]
fn status_against_a_closed_port_fails_cleanly() {
    let cluster = Cluster::new("status_against_a_closed_port", 1);
    let addr = cluster.addr(1);
    let (code, stdout, stderr) = cluster.cf_at(1, &["status"]);
    assert_ne!(code, 0, "status against a closed port succeeded: {stdout}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "one error line: {stderr}");
    assert!(
        stderr.starts_with("error:") && stderr.contains("cannot reach") && stderr.contains(&addr),
        "the error says what it could not reach: {stderr}"
    );
    assert!(cluster.status(1).is_none());
    let (code, _, stderr) = cluster.kv(1, &["get", "key"]);
    assert!(
        code != 0 && code != 3,
        "kv get against a closed port: {code}"
    );
    assert!(
        stderr.contains(&addr),
        "the error names the address: {stderr}"
    );
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

// Goal (regression, open bug): a node removed from the cluster must stop serving the shards it
// owned, which the remaining members have given to others. Method: bootstrap 3 nodes, add
// node 4 as a learner, remove it, and wait until node 4 no longer answers `kv owner` for a key
// that its last map gave it. Before leases the removed learner kept "serving" under its stale
// map, so two nodes answered for one shard; now its lease lapses because no leader renews it.
#[test]
fn removed_learner_stops_serving_its_old_shards() {
    let cluster = Cluster::with_initial_members("removed_learner_stops_serving", 4, 3);
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
    let (_, map) =
        cluster.wait_for_one_map_where(&cluster.ids(), "with learner 4", |a, _| a.learners == [4]);
    let key = key_owned_by(&map, 4, "removed");
    let (code, _, stderr) = cluster.cf_at(1, &["remove-node", "--id", "4"]);
    assert_eq!(code, 0, "remove-node 4: {stderr}");
    let (_, map_after) =
        cluster.wait_for_one_map_where(&[1, 2, 3], "without node 4", |a, _| a.learners.is_empty());
    let new_owner = map_after.owners[shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize];
    assert_owner(&cluster, &[1, 2, 3], &map_after, &key);
    // The removed node may still forward requests it receives, but it never serves them itself:
    // every answer through it comes from the shard's new owner, and its own status says so.
    cluster.wait_until(
        &format!("removed node 4 serves nothing and no longer answers as {key}'s owner"),
        DEADLINE,
        || {
            // Its own map may stay stale (a removed node no longer receives the log), so what
            // counts is that it holds no lease and does not serve.
            let status = cluster.status(4)?;
            if status["state"] == "serving" || !status["lease_remaining_ms"].is_null() {
                return None;
            }
            let (code, stdout, _) = cluster.kv(4, &["owner", &key]);
            if code == 0 {
                let answer: Value = serde_json::from_str(stdout.trim()).ok()?;
                (answer["node"] == new_owner).then_some(())
            } else {
                Some(())
            }
        },
    );
}

/// `GET /metrics` from `addr`: the body, or `None` when the endpoint does not answer.
fn scrape(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the sample `name{labels}` (labels as rendered, e.g. `{route="client"}`), summed
/// over every sample whose label set contains all of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name || !labels.iter().all(|label| rest.contains(label)) {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

// Goal: every node serves Prometheus metrics that match what it does: requests counted by
// route and outcome with a latency histogram, and its shards, map epoch, term, leadership,
// lease and readiness as gauges. Method: 3 nodes with `--metrics`; route 20 `kv put`s through
// node 1 (the `kv` client sends each straight to its owner: route `client`); scrape every
// node until its gauges agree with its `status` (the sampler publishes every 500 ms) and the
// `client`/`ok` counters of all nodes add up to at least the 20 puts.
#[test]
fn metrics_endpoint_reports_requests_and_state() {
    let cluster = Cluster::new("metrics_endpoint", 3).with_metrics();
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, _) = cluster.wait_for_one_map(&ids);
    for i in 0..20 {
        let (code, _, stderr) = cluster.kv(1, &["put", &format!("metrics-{i}"), "x"]);
        assert_eq!(code, 0, "kv put: {stderr}");
    }
    for &id in &ids {
        cluster.wait_until(
            &format!("node {id}'s gauges agree with its status"),
            DEADLINE,
            || {
                let body = scrape(&cluster.metrics_addr(id))?;
                let status = cluster.status(id)?;
                let owned = sample(&body, "clusterfunk_shards_owned", &[])?;
                let leader = sample(&body, "clusterfunk_is_leader", &[])?;
                let ok = owned == status["shards_owned"].as_f64()?
                    && sample(&body, "clusterfunk_map_epoch", &[])? == status["epoch"].as_f64()?
                    && sample(&body, "clusterfunk_raft_term", &[])? == status["term"].as_f64()?
                    && sample(&body, "clusterfunk_raft_leader_id", &[])? == agreement.leader as f64
                    && leader == f64::from(u8::from(id == agreement.leader))
                    && sample(&body, "clusterfunk_ready", &[])? == 1.0
                    && sample(&body, "clusterfunk_lease_remaining_seconds", &[])? > 0.0
                    && sample(&body, "clusterfunk_voters", &[])? == 3.0;
                ok.then_some(())
            },
        );
    }
    let bodies: Vec<String> = ids
        .iter()
        .map(|&id| scrape(&cluster.metrics_addr(id)).expect("the endpoint answers"))
        .collect();
    let client_ok: f64 = bodies
        .iter()
        .filter_map(|body| {
            sample(
                body,
                "clusterfunk_requests_total",
                &["route=\"client\"", "outcome=\"ok\""],
            )
        })
        .sum();
    assert!(
        client_ok >= 20.0,
        "the 20 puts are counted as client requests: {client_ok}\n{}",
        bodies.join("\n---\n")
    );
    let observed: f64 = bodies
        .iter()
        .filter_map(|body| {
            sample(
                body,
                "clusterfunk_request_duration_seconds_count",
                &["route=\"client\""],
            )
        })
        .sum();
    assert!(
        observed >= 20.0,
        "every counted request has a latency sample: {observed}"
    );
    assert!(
        bodies
            .iter()
            .all(|body| body.contains("clusterfunk_request_duration_seconds_bucket")),
        "latency is exported as a histogram"
    );
}

// Goal: a drain that no node could take is refused at once and changes nothing, and the admin
// path stays free. Regression: on 3 nodes, `drain 1`, `drain 2`, then `drain 3` was accepted and
// hung for `drain_timeout` (50 s), holding up every other membership command meanwhile. Method:
// drain 1 and 2 (node 3 then owns every shard); `drain --id 3` through a follower and
// `remove-node --id 3` must each fail well within the drain timeout with one error line saying
// why and what to do, and exit code 1; then `status` answers and `undrain 1` succeeds at once,
// no shard was left without an owner that is up, and node 1 gets its share back.
#[test]
fn draining_the_last_eligible_node_is_refused_up_front() {
    let cluster = Cluster::new("draining_the_last_eligible_node", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    cluster.wait_for_one_map(&ids);
    for id in ["1", "2"] {
        let (code, _, stderr) = cluster.cf_at(3, &["drain", "--id", id]);
        assert_eq!(code, 0, "drain {id}: {stderr}");
    }
    let (drained, map) =
        cluster.wait_for_one_map_where(&ids, "with node 3 owning every shard", |_, map| {
            map.owners() == [3]
        });
    let follower = if drained.leader == 1 { 2 } else { 1 };

    // Far below the 50 s drain timeout the old behaviour waited out, and generous for CI.
    let limit = Duration::from_secs(20);
    let within = |id: u64, args: &[&str]| {
        let addr = cluster.addr(id);
        let mut full = vec!["--node", addr.as_str()];
        full.extend_from_slice(args);
        cluster
            .run_within(cluster.cf_command(&full), limit)
            .unwrap_or_else(|| {
                panic!(
                    "`clusterfunk {}` through node {id} ran longer than {limit:?}\n{}",
                    args.join(" "),
                    cluster.report()
                )
            })
    };
    for (through, args) in [
        (follower, ["drain", "--id", "3"]),
        (drained.leader, ["remove-node", "--id", "3"]),
    ] {
        let (code, stdout, stderr) = within(through, &args);
        assert_eq!(
            code,
            1,
            "`{}` must fail with exit code 1: stdout {stdout:?} stderr {stderr:?}",
            args.join(" ")
        );
        assert!(
            stderr.starts_with("error:")
                && stderr.trim().lines().count() == 1
                && stderr.contains("draining node 3 would leave no node to take its shards")
                && stderr.contains("undrain a node or add one"),
            "`{}`: one error line saying why and what to do: {stderr}",
            args.join(" ")
        );
    }
    let (after, map_after) = cluster.wait_for_one_map(&ids);
    assert_eq!(
        after.epoch, drained.epoch,
        "a refused drain changes nothing"
    );
    assert_eq!(map_after, map);
    for &id in &ids {
        let status = status(&cluster, id);
        assert_eq!(
            id_list(&status["draining"]),
            [1, 2],
            "node 3 is not draining on node {id}: {status}"
        );
    }
    let key = key_owned_by(&map, 3, "refused");
    put_and_get(&cluster, follower, &key, "still served");

    // The admin path is free: a read and a membership command answer at once.
    let (code, _, stderr) = within(follower, &["status"]);
    assert_eq!(code, 0, "status after the refusal: {stderr}");
    let (code, _, stderr) = within(follower, &["undrain", "--id", "1"]);
    assert_eq!(code, 0, "undrain 1 after the refusal: {stderr}");
    let (_, map) =
        cluster.wait_for_one_map_where(&ids, "with nodes 1 and 3 owning every shard", |_, map| {
            map.owners() == [1, 3]
        });
    assert_balanced(&map, &[1, 3]);
    put_and_get(&cluster, 1, &key, "served after the undrain");
}
