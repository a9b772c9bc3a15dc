//! A node's tasks have one owner and one shutdown path (issue 16): a node that shut down leaves
//! no task running on the caller's runtime. Real nodes on loopback, in memory, started on a
//! runtime of the test's own so its task count can be read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clusterfunk::prelude::*;
use clusterfunk::NodeInfo;
use clusterfunk::{Cluster, ConsensusConfig, LeaseConfig};

/// Generous: the machine running the tests may be busy.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr;

#[derive(Default)]
struct Counters {
    values: std::collections::HashMap<Key, u64>,
}

#[shard_handler]
impl Counters {
    fn incr(&mut self, key: Key, _msg: Incr, _ctx: &mut ShardContext) -> u64 {
        let value = self.values.entry(key).or_default();
        *value += 1;
        *value
    }
}

/// Free loopback addresses for `n` nodes (bound, then released for the nodes to take).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address"))
        .collect()
}

async fn start_cluster(addrs: &[SocketAddr]) -> Vec<Node<Counters>> {
    let members: BTreeMap<NodeId, NodeInfo> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let info = NodeInfo {
                addr: addr.to_string(),
                zone: None,
            };
            (i as NodeId + 1, info)
        })
        .collect();
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as NodeId + 1;
        let mut builder = Cluster::builder()
            .node_id(id)
            .shards(8)
            .listen(*addr)
            .cluster_name("lifecycle")
            .handler::<Counters>()
            .in_memory_for_tests()
            .insecure()
            .lease(LeaseConfig::fast())
            .consensus(ConsensusConfig::fast());
        if id == 1 {
            builder = builder.initial_members(members.clone());
        }
        nodes.push(builder.start().await.expect("node starts"));
    }
    nodes
}

/// Sends until every node has answered once (the cluster serves), bounded by [`DEADLINE`].
async fn wait_serving(nodes: &[Node<Counters>]) {
    let deadline = Instant::now() + DEADLINE;
    for node in nodes {
        loop {
            match node.send("probe", Incr).await {
                Ok(_) => break,
                Err(error) => {
                    assert!(Instant::now() < deadline, "cluster not serving: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

#[test]
fn a_stopped_node_leaves_no_task_behind() {
    // The nodes' actors need an actix System; it runs on a tokio runtime of the test's own, whose
    // task count the test reads.
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let system = actix::System::with_tokio_rt(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let _ = handle_tx.send(runtime.handle().clone());
        runtime
    });
    let handle = handle_rx.recv().expect("the runtime's handle");
    let alive = || handle.metrics().num_alive_tasks();
    let (before, after) = system.block_on(async {
        let before = alive();
        let nodes = start_cluster(&free_addrs(3)).await;
        wait_serving(&nodes).await;
        let running = alive();
        assert!(running > before, "the nodes run tasks on this runtime");
        println!("tasks: {before} before, {running} with the cluster serving");
        // Load through every node, so forwarding connections and shard actors exist too.
        for round in 0..50u32 {
            let node = &nodes[round as usize % nodes.len()];
            node.send(format!("key-{round}"), Incr)
                .await
                .expect("a request to a serving cluster");
        }
        for node in &nodes {
            node.shutdown().await;
        }
        // The node handles are still held: a task that ended only once a handle was dropped
        // (a `Weak` failing to upgrade) would still count here.
        // Tasks a connection spawned end once its peer's end closed, which the shutdowns above
        // did; nothing announces it, so the count is read until it drops, within a bound.
        let deadline = Instant::now() + DEADLINE;
        while alive() > before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = alive();
        drop(nodes);
        (before, after)
    });
    assert_eq!(
        after, before,
        "tasks still running on the runtime after every node shut down"
    );
}
