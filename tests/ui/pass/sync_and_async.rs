//! Sync and async methods in one handler; a struct, a unit-struct and an enum message; a method
//! without a return type for a `()` reply; full paths for `Key` and `ShardContext`.
use std::collections::HashMap;

use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(i64)]
struct Add {
    by: i64,
}

/// A unit-struct message.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(i64)]
struct Get;

/// An enum message.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Result<i64, String>)]
enum Op {
    Double,
    Sub(i64),
    Set { to: i64 },
}

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct Reset;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Vec<String>)]
struct Keys;

#[derive(Default)]
struct Counters {
    values: HashMap<Key, i64>,
}

#[shard_handler]
impl Counters {
    fn add(&mut self, key: Key, msg: Add, _ctx: &mut ShardContext) -> i64 {
        let value = self.values.entry(key).or_default();
        *value += msg.by;
        *value
    }

    async fn get(&mut self, key: Key, _msg: Get, ctx: &mut ShardContext) -> i64 {
        assert_eq!(ctx.key(), &key);
        actix::clock::sleep(std::time::Duration::from_millis(1)).await;
        self.values.get(&key).copied().unwrap_or(0)
    }

    async fn op(
        &mut self,
        key: Key,
        mut msg: Op,
        _ctx: &mut clusterfunk::ShardContext,
    ) -> Result<i64, String> {
        let value = self.values.entry(key).or_default();
        if let Op::Sub(by) = &mut msg {
            *by = -*by;
        }
        match msg {
            Op::Double => *value *= 2,
            Op::Sub(by) => *value += by,
            Op::Set { to } if to < 0 => return Err(format!("{to} is negative")),
            Op::Set { to } => *value = to,
        }
        Ok(*value)
    }

    fn reset(&mut self, key: clusterfunk::Key, _msg: Reset, _ctx: &mut ShardContext) {
        self.values.remove(&key);
    }

    fn keys(&mut self, _key: Key, _msg: Keys, _ctx: &mut ShardContext) -> Vec<String> {
        let mut keys: Vec<String> = self.values.keys().map(|k| k.to_string()).collect();
        keys.sort();
        keys
    }
}

impl Counters {
    /// A helper in a separate impl block next to the handler's.
    fn total(&self) -> i64 {
        self.values.values().sum()
    }
}

fn main() {
    let _ = Counters::default().total();
    actix::System::new().block_on(async {
        let node = Cluster::builder()
            .node_id(1)
            .shards(16)
            .handler::<Counters>()
            .standalone()
            .start()
            .await
            .unwrap();
        assert_eq!(node.send("a", Add { by: 2 }).await, Ok(2));
        assert_eq!(node.send("a", Add { by: 3 }).await, Ok(5));
        assert_eq!(node.send("a", Get).await, Ok(5));
        assert_eq!(node.send("b", Get).await, Ok(0));
        assert_eq!(node.send("a", Op::Double).await, Ok(Ok(10)));
        assert_eq!(node.send("a", Op::Sub(4)).await, Ok(Ok(6)));
        assert_eq!(node.send("a", Op::Set { to: 40 }).await, Ok(Ok(40)));
        assert_eq!(
            node.send("a", Op::Set { to: -1 }).await,
            Ok(Err("-1 is negative".to_string()))
        );
        assert_eq!(node.send("a", Get).await, Ok(40));
        node.send("a", Reset).await.unwrap();
        assert_eq!(node.send("a", Get).await, Ok(0));
        // Through the type-erased handle as well.
        assert_eq!(node.handle().send("c", Add { by: 7 }).await, Ok(7));
        assert_eq!(node.handle().send("c", Get).await, Ok(7));
        assert_eq!(node.handle().send("c", Op::Double).await, Ok(Ok(14)));
        let keys = node.send("c", Keys).await.unwrap();
        assert!(keys.contains(&"c".to_string()), "{keys:?}");
        node.shutdown().await;
    });
}
