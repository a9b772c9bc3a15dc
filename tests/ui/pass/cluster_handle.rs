//! A handler used through the type-erased `ClusterHandle`: an async method sends to a key of
//! another shard with `ShardContext::cluster()`, a send to its own shard is refused as
//! `Error::Reentrant`, and a message type the handler lacks is `Error::UnknownMessage`.
use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr {
    by: u64,
}

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Outcome)]
struct Forward {
    to: String,
    by: u64,
}

/// A message no handler method takes.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct NotHandled;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Outcome)]
struct ForwardNotHandled {
    to: String,
}

/// What a forwarded send came back with (`Error` itself is not serializable).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Outcome {
    Replied(u64),
    Reentrant(ShardId),
    UnknownMessage(String),
    Other(String),
}

impl Outcome {
    fn of<T>(result: Result<T, Error>, replied: impl FnOnce(T) -> u64) -> Self {
        match result {
            Ok(reply) => Outcome::Replied(replied(reply)),
            Err(Error::Reentrant { shard }) => Outcome::Reentrant(shard),
            Err(Error::UnknownMessage { tag }) => Outcome::UnknownMessage(tag),
            Err(other) => Outcome::Other(other.to_string()),
        }
    }
}

#[derive(Default)]
struct Counter {
    n: u64,
}

#[shard_handler]
impl Counter {
    fn incr(&mut self, _key: Key, msg: Incr, _ctx: &mut ShardContext) -> u64 {
        self.n += msg.by;
        self.n
    }

    async fn forward(&mut self, _key: Key, msg: Forward, ctx: &mut ShardContext) -> Outcome {
        let cluster = ctx.cluster();
        let sent = cluster.send(msg.to, Incr { by: msg.by }).await;
        // The shard's state stays usable across the `.await`.
        self.n += 1;
        Outcome::of(sent, |n| n)
    }

    async fn forward_not_handled(
        &mut self,
        _key: Key,
        msg: ForwardNotHandled,
        ctx: &mut ShardContext,
    ) -> Outcome {
        Outcome::of(ctx.cluster().send(msg.to, NotHandled).await, |()| 0)
    }
}

fn main() {
    actix::System::new().block_on(async {
        let node = Cluster::builder()
            .shards(16)
            .handler::<Counter>()
            .standalone()
            .start()
            .await
            .unwrap();
        let origin = "origin";
        let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        let other = keys
            .iter()
            .find(|k| node.shard_for(*k) != node.shard_for(origin))
            .unwrap()
            .clone();
        let same = keys
            .iter()
            .find(|k| node.shard_for(*k) == node.shard_for(origin))
            .unwrap()
            .clone();

        // From inside an async handler, to a key of another shard.
        let forward = |to: &str, by| Forward {
            to: to.to_string(),
            by,
        };
        assert_eq!(
            node.send(origin, forward(&other, 5)).await,
            Ok(Outcome::Replied(5))
        );
        assert_eq!(
            node.send(origin, forward(&other, 2)).await,
            Ok(Outcome::Replied(7))
        );
        assert_eq!(node.send(other.as_str(), Incr { by: 0 }).await, Ok(7));
        // To its own shard: refused, whether the key is the same or only hashes alike.
        let shard = node.shard_for(origin);
        assert_eq!(
            node.send(origin, forward(origin, 1)).await,
            Ok(Outcome::Reentrant(shard))
        );
        assert_eq!(
            node.send(origin, forward(&same, 1)).await,
            Ok(Outcome::Reentrant(shard))
        );
        // The origin shard counted its four forwards and nothing else: the refused sends added
        // nothing (and `same`, on the same shard, shares the shard's one handler).
        assert_eq!(node.send(origin, Incr { by: 0 }).await, Ok(4));
        assert_eq!(node.send(same.as_str(), Incr { by: 0 }).await, Ok(4));

        // The node's own type-erased handle has no origin shard: any key is fine.
        let handle: ClusterHandle = node.handle();
        assert_eq!(handle.send(origin, Incr { by: 10 }).await, Ok(14));
        assert_eq!(
            handle.send(other.as_str(), forward(origin, 1)).await,
            Ok(Outcome::Replied(15))
        );

        // A message type the handler has no method for.
        let unknown = Error::UnknownMessage {
            tag: "NotHandled".to_string(),
        };
        assert_eq!(handle.send(origin, NotHandled).await, Err(unknown));
        assert_eq!(
            node.send(origin, ForwardNotHandled { to: other.clone() })
                .await,
            Ok(Outcome::UnknownMessage("NotHandled".to_string()))
        );
        node.shutdown().await;
    });
}
