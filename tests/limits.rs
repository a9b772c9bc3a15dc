//! Limits that fail well: a message or reply larger than a frame may carry is refused with a
//! typed error that names the limit (it used to close the connection, so the client saw a
//! broken pipe), and the connection keeps serving afterwards.
//!
//! Two real nodes in this process on loopback addresses of their own (127.77.P.1 and .2, P from
//! the process id), with a cluster secret; a remote `Client` and node-to-node forwarding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clusterfunk::admin::{AdminRequest, AdminResponse};
use clusterfunk::client::{Client, ClientError};
use clusterfunk::prelude::*;
use clusterfunk::transport::{Secret, TransportConfig};
use clusterfunk::NodeInfo;
use serde_bytes::ByteBuf;

/// Bound on waiting for the cluster to serve; far above what a passing test needs.
const DEADLINE: Duration = Duration::from_secs(30);

/// Appends bytes to the key's blob; replies with the blob's new length.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Append {
    bytes: ByteBuf,
}

/// Replies with the key's whole blob.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(ByteBuf)]
struct Fetch;

#[derive(Default)]
struct Blobs {
    blobs: HashMap<Key, Vec<u8>>,
}

#[shard_handler]
impl Blobs {
    fn append(&mut self, key: Key, msg: Append, _ctx: &mut ShardContext) -> u64 {
        let blob = self.blobs.entry(key).or_default();
        blob.extend_from_slice(&msg.bytes);
        blob.len() as u64
    }

    fn fetch(&mut self, key: Key, _msg: Fetch, _ctx: &mut ShardContext) -> ByteBuf {
        ByteBuf::from(self.blobs.get(&key).cloned().unwrap_or_default())
    }
}

fn addr(node: u64) -> SocketAddr {
    let block = (std::process::id() % 250) as u8;
    SocketAddr::from(([127, 77, block, node as u8], 7401))
}

fn secret() -> Secret {
    Secret::new("limits-test-secret-0123456789abcdef").expect("a strong secret")
}

fn bytes(len: usize) -> ByteBuf {
    ByteBuf::from(vec![0x5a; len])
}

/// Waits until `node` serves `key` (a small append succeeds).
async fn wait_serving(node: &Node<Blobs>, key: &str) {
    let until = Instant::now() + DEADLINE;
    loop {
        match node.send(key, Append { bytes: bytes(1) }).await {
            Ok(_) => return,
            Err(error) if Instant::now() < until => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("the cluster does not serve {key}: {error}"),
        }
    }
}

#[test]
fn messages_and_replies_above_the_frame_limit_are_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let members: Vec<(u64, NodeInfo)> = [1, 2]
        .into_iter()
        .map(|id| {
            (
                id,
                NodeInfo {
                    addr: addr(id).to_string(),
                    zone: None,
                },
            )
        })
        .collect();
    actix::System::new().block_on(async move {
        let mut nodes = Vec::new();
        for id in [1, 2] {
            let node = clusterfunk::Cluster::builder()
                .node_id(id)
                .listen(addr(id))
                .data_dir(dir.path().join(format!("node-{id}")))
                .shards(16)
                .secret(secret())
                .initial_members(members.clone())
                .handler::<Blobs>()
                .start()
                .await
                .expect("the node starts");
            nodes.push(node);
        }
        let limit = TransportConfig::default().payload_max();
        let key = "blob".to_owned();
        wait_serving(&nodes[0], &key).await;
        wait_serving(&nodes[1], &key).await;

        let client =
            Client::with_config([addr(1), addr(2)], Some(secret()), "clusterfunk", DEADLINE)
                .expect("a client");
        // A message that cannot fit: refused before it is sent, naming the limit.
        let too_big = client
            .send(
                key.as_str(),
                Append {
                    bytes: bytes(limit + 1),
                },
            )
            .await;
        match &too_big {
            Err(ClientError::Cluster(Error::TooLarge {
                what, limit: named, ..
            })) => {
                assert_eq!(what, "message");
                assert_eq!(*named, limit as u64);
            }
            other => panic!("a message above the limit ended with {other:?}"),
        }
        let message = too_big.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains(&format!("limit of {limit} bytes")),
            "{message}"
        );

        // A reply that cannot fit: two appends that fit, then a fetch of both.
        let half = limit / 2 + 1;
        let first = client
            .send(key.as_str(), Append { bytes: bytes(half) })
            .await
            .expect("half the limit fits");
        let second = client
            .send(key.as_str(), Append { bytes: bytes(half) })
            .await
            .expect("half the limit fits");
        assert_eq!(second, first + half as u64);
        match client.send(key.as_str(), Fetch).await {
            Err(ClientError::Cluster(Error::TooLarge { what, .. })) => assert_eq!(what, "reply"),
            other => panic!(
                "a reply above the limit ended with {:?}",
                other.map(|b| b.len())
            ),
        }
        // The connection was not closed: the client goes on being served.
        let length = client
            .send(key.as_str(), Append { bytes: bytes(3) })
            .await
            .expect("served after the refusals");
        assert_eq!(length, second + 3, "the refused message was not applied");

        // Node to node: a node forwarding a message too large for a frame says so too.
        let owners = owners(&nodes[0]).await;
        for via in [1u64, 2] {
            let other = 3 - via;
            let remote = (0..)
                .map(|i| format!("remote-{via}-{i}"))
                .find(|key| owners[&nodes[0].shard_for(key.as_str())] == other)
                .expect("a key owned by the other node");
            match nodes[(via - 1) as usize]
                .send(
                    remote.as_str(),
                    Append {
                        bytes: bytes(limit + 1),
                    },
                )
                .await
            {
                Err(Error::TooLarge {
                    what, limit: named, ..
                }) => {
                    assert_eq!(what, "message");
                    assert_eq!(named, limit as u64);
                }
                other => panic!("a forwarded message above the limit ended with {other:?}"),
            }
            nodes[(via - 1) as usize]
                .send(remote.as_str(), Append { bytes: bytes(1) })
                .await
                .expect("forwarding still works");
        }
        for node in &nodes {
            node.shutdown().await;
        }
    });
}

/// Every shard's owner in `node`'s map.
async fn owners(node: &Node<Blobs>) -> HashMap<ShardId, u64> {
    match node.admin(AdminRequest::Shards).await {
        Ok(AdminResponse::Shards(report)) => report
            .shards
            .iter()
            .map(|owner| (owner.shard, owner.node))
            .collect(),
        other => panic!("no shard map: {other:?}"),
    }
}

// Goal: at the connection cap (`connections_max`, on the builder and `kv serve`) the clients
// already connected keep being served; a new one waits until a connection closes, then is
// served. Method: one node with a cap of 2; clients A and B fill it; C's calls fail while A
// sends 50 messages, all served; B leaves; C is served.
#[test]
fn at_the_connection_cap_connected_clients_are_served_and_a_new_one_waits_its_turn() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let listen = addr(3);
    let info = NodeInfo {
        addr: listen.to_string(),
        zone: None,
    };
    actix::System::new().block_on(async move {
        let node = clusterfunk::Cluster::builder()
            .node_id(1)
            .listen(listen)
            .data_dir(dir.path().join("node-1"))
            .shards(16)
            .secret(secret())
            .initial_members([(1, info)])
            .connections_max(2)
            .handler::<Blobs>()
            .start()
            .await
            .expect("the node starts");
        wait_serving(&node, "warm-up").await;
        let connect = |timeout| {
            Client::with_config([listen], Some(secret()), "clusterfunk", timeout).expect("a client")
        };
        let a = connect(DEADLINE);
        let b = connect(DEADLINE);
        for client in [&a, &b] {
            client
                .send("a-key", Append { bytes: bytes(1) })
                .await
                .expect("served below the cap");
        }
        let c = connect(Duration::from_millis(500));
        let refused = c.send("c-key", Append { bytes: bytes(1) }).await;
        assert!(
            refused.is_err(),
            "a third connection was served past the cap"
        );
        for _ in 0..50 {
            a.send("a-key", Append { bytes: bytes(1) })
                .await
                .expect("a connected client is served at the cap");
        }
        drop(b);
        let until = Instant::now() + DEADLINE;
        let served = loop {
            match c.send("c-key", Append { bytes: bytes(1) }).await {
                Ok(length) => break length,
                Err(error) if Instant::now() < until => {
                    let _ = error;
                }
                Err(error) => panic!("C was not served after B left: {error}"),
            }
        };
        assert_eq!(served, 1, "C's refused attempt was not applied");
        assert_eq!(
            a.send("a-key", Fetch).await.expect("served").len(),
            52,
            "every message of A applied once"
        );
        node.shutdown().await;
    });
}
