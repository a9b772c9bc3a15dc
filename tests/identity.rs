//! Identity mistakes an operator can make, each refused with a non-zero exit and a message that
//! says what to do, while the cluster keeps working: a second process on a live data dir, a
//! data dir of another node or cluster, one address twice in `--init`, and `add-node` with an
//! address that is not the new node (another member's, nothing at all, another node id).
//!
//! Real `kv serve` processes on 127.0.0.1 through the process harness (`tests/common`).

#[allow(dead_code)]
mod common;

use std::time::Duration;

use clusterfunk::prelude::{
    shard_handler, Deserialize, Key, Serialize, ShardContext, ShardMessage,
};
use clusterfunk::NodeInfo;
use common::{id_list, Cluster};

/// Bound on a command that is expected to fail: starting a node that must refuse, or an
/// add-node that waits for the catch-up timeout (30 s) before it gives up.
const LIMIT: Duration = Duration::from_secs(90);

fn voters_and_learners(cluster: &Cluster, via: u64) -> (Vec<u64>, Vec<u64>) {
    let status = cluster
        .status(via)
        .unwrap_or_else(|| panic!("node {via} does not answer\n{}", cluster.report()));
    (id_list(&status["voters"]), id_list(&status["learners"]))
}

// Goal: the same node started twice on one data dir (the old bug: the second process wrote its
// votes into the live node's LMDB) is refused before it touches the log, naming the holder.
#[test]
fn a_second_process_on_a_live_data_dir_exits_naming_the_holders_pid() {
    let cluster = Cluster::new("second_process_on_live_data_dir", 3);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1, 2, 3]);
    let holder = cluster.process_id(1);
    let command = cluster.serve_command(
        1,
        &cluster.addr(1),
        &cluster.data_dir(1),
        &["--init", &cluster.initial_member_list()],
    );
    let (code, _, stderr) = cluster
        .run_within(command, LIMIT)
        .expect("the second process exits at once");
    assert_ne!(
        code, 0,
        "a second node on a live data dir started: {stderr}"
    );
    assert!(
        stderr.contains(&format!("in use by process {holder}"))
            && stderr.contains("Stop that process first"),
        "the refusal names the holder and what to do: {stderr}"
    );
    // The first node never noticed: it still serves with the cluster.
    let (voters, _) = voters_and_learners(&cluster, 1);
    assert_eq!(voters, [1, 2, 3]);
    let (code, _, stderr) = cluster.kv(1, &["put", "after-the-refusal", "still-here"]);
    assert_eq!(code, 0, "node 1 serves: {stderr}");
    let (code, stdout, stderr) = cluster.kv(2, &["get", "after-the-refusal"]);
    assert_eq!(code, 0, "read back: {stderr}");
    assert_eq!(stdout.trim(), "still-here");
}

// Goal: a data dir remembers the node id and cluster name it was first started with; starting
// it as another node, or in another cluster, is refused, and the rightful node still starts.
#[test]
fn a_data_dir_of_another_node_or_cluster_is_refused_and_the_right_node_still_starts() {
    let cluster = Cluster::new("data_dir_of_another_node", 3);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1, 2, 3]);
    cluster.kill9(3);
    let dir = cluster.data_dir(3);
    let addr = cluster.addr(3);

    let (code, _, stderr) = cluster
        .run_within(cluster.serve_command(4, &addr, &dir, &[]), LIMIT)
        .expect("exits at once");
    assert_ne!(code, 0, "node 4 started on node 3's data dir: {stderr}");
    assert!(
        stderr.contains("belongs to node 3, not node 4") && stderr.contains("start node 3 on it"),
        "{stderr}"
    );

    let command = cluster.serve_command(3, &addr, &dir, &["--cluster-name", "another-cluster"]);
    let (code, _, stderr) = cluster.run_within(command, LIMIT).expect("exits at once");
    assert_ne!(code, 0, "another cluster's node started on it: {stderr}");
    assert!(
        stderr.contains("belongs to cluster \"clusterfunk\", not \"another-cluster\"")
            && stderr.contains("--cluster-name"),
        "{stderr}"
    );

    // Neither attempt changed the data dir: node 3 rejoins from it.
    cluster.restart(3);
    cluster.wait_for_one_map_where(&[1, 2, 3], "node 3 back", |agreement, _| {
        agreement.voters == [1, 2, 3]
    });
}

// Goal: one address twice in `--init` (one process counting twice toward the quorum, which let
// a single node commit alone) is refused before anything starts.
#[test]
fn an_initial_member_list_with_one_address_twice_is_refused() {
    let cluster = Cluster::new("init_with_one_address_twice", 1);
    let addr = cluster.addr(1);
    let dir = cluster.data_dir(1);
    let init = format!("1={addr},2={addr}");
    let (code, _, stderr) = cluster
        .run_within(
            cluster.serve_command(1, &addr, &dir, &["--init", &init]),
            LIMIT,
        )
        .expect("exits at once");
    assert_ne!(
        code, 0,
        "a cluster with one address twice started: {stderr}"
    );
    assert!(
        stderr.contains(&format!("nodes 1 and 2 have the same address {addr}")),
        "{stderr}"
    );
}

// The same rule for the builder: a program cannot bootstrap such a cluster either.
#[derive(Default)]
struct Nothing;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct Ping;

#[shard_handler]
impl Nothing {
    fn ping(&mut self, _key: Key, _msg: Ping, _ctx: &mut ShardContext) {}
}

#[test]
fn the_builder_refuses_initial_members_sharing_an_address() {
    let listen: std::net::SocketAddr = "127.0.0.1:1".parse().expect("an address");
    let info = NodeInfo {
        addr: listen.to_string(),
        zone: None,
    };
    let started = actix::System::new().block_on(async {
        clusterfunk::Cluster::builder()
            .node_id(1)
            .listen(listen)
            .handler::<Nothing>()
            .in_memory_for_tests()
            .insecure()
            .initial_members([(1, info.clone()), (2, info)])
            .start()
            .await
            .map(|_| ())
    });
    let error = started.expect_err("refused").to_string();
    assert!(
        error.contains("nodes 1 and 2 have the same address"),
        "{error}"
    );
}

// Goal: add-node with another member's address is refused up front; with an address where
// another node id answers, the new member never catches up (the leader's raft calls refuse
// the wrong node), so it is not promoted and the command says so. Fixing it works.
#[test]
fn add_node_at_another_nodes_address_is_refused_or_left_a_learner() {
    let cluster = Cluster::with_initial_members("add_node_at_another_nodes_address", 5, 3);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1, 2, 3]);

    let (code, _, stderr) =
        cluster.cf_at(1, &["add-node", "--id", "4", "--addr", &cluster.addr(2)]);
    assert_ne!(code, 0, "node 4 added at node 2's address: {stderr}");
    assert!(
        stderr.contains(&format!("{} is the address of member 2", cluster.addr(2))),
        "{stderr}"
    );

    // Node 5 runs (empty, waiting to be added) where the operator says node 4 is.
    cluster.start(5);
    let add = cluster.cf_command(&[
        "--node",
        &cluster.addr(1),
        "add-node",
        "--id",
        "4",
        "--addr",
        &cluster.addr(5),
    ]);
    let (code, _, stderr) = cluster
        .run_within(add, LIMIT)
        .expect("add-node gives up in time");
    assert_ne!(
        code, 0,
        "node 4 promoted although node 5 answers there: {stderr}"
    );
    assert!(
        stderr.contains("node 4 did not catch up")
            && stderr.contains("it never answered")
            && stderr.contains("NOT promoted to voter"),
        "{stderr}"
    );
    let (voters, learners) = voters_and_learners(&cluster, 1);
    assert_eq!(voters, [1, 2, 3], "no voter was added");
    assert_eq!(learners, [4], "node 4 stays a learner");

    // The operator's fix: remove the wrong member, add node 5 under its own id.
    let (code, _, stderr) = cluster.cf_at(2, &["remove-node", "--id", "4"]);
    assert_eq!(code, 0, "remove-node 4: {stderr}");
    let (code, _, stderr) =
        cluster.cf_at(2, &["add-node", "--id", "5", "--addr", &cluster.addr(5)]);
    assert_eq!(code, 0, "add-node 5: {stderr}");
    cluster.wait_for_one_map_where(&[1, 2, 3, 5], "node 5 a voter", |agreement, _| {
        agreement.voters == [1, 2, 3, 5]
    });
}

// Goal: add-node with an address where nothing listens makes no voter (openraft's own wait
// took a learner that never answered as caught up: 4 voters, one of them nothing).
#[test]
fn add_node_where_nothing_listens_is_not_promoted() {
    let cluster = Cluster::with_initial_members("add_node_where_nothing_listens", 4, 3);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1, 2, 3]);
    // Node 4's port is reserved by the harness and never started.
    let add = cluster.cf_command(&[
        "--node",
        &cluster.addr(2),
        "add-node",
        "--id",
        "4",
        "--addr",
        &cluster.addr(4),
    ]);
    let (code, _, stderr) = cluster
        .run_within(add, LIMIT)
        .expect("add-node gives up in time");
    assert_ne!(code, 0, "a node that does not exist was promoted: {stderr}");
    assert!(
        stderr.contains("it never answered") && stderr.contains("remove-node --id 4"),
        "{stderr}"
    );
    let (voters, learners) = voters_and_learners(&cluster, 1);
    assert_eq!(voters, [1, 2, 3]);
    assert_eq!(learners, [4]);
    // Still 3 voters: losing one of them leaves a quorum that serves.
    let (code, _, stderr) = cluster.kv(3, &["put", "still-writable", "yes"]);
    assert_eq!(code, 0, "{stderr}");
}
