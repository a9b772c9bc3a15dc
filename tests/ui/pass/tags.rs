//! `#[tag = "..."]` pins the wire tag; without it the tag is the type's name. `#[idempotent]`
//! declares a message idempotent; without it a message is not.
use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u32)]
#[tag = "custom.tag"]
struct Tagged(u32);

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u32)]
#[idempotent]
struct Untagged(u32);

#[derive(Serialize, Deserialize, ShardMessage)]
#[tag = "enum.tag"]
#[reply(bool)]
enum Either {
    Left,
    Right,
}

#[derive(Default)]
struct Echo;

#[shard_handler]
impl Echo {
    fn tagged(&mut self, _key: Key, msg: Tagged, _ctx: &mut ShardContext) -> u32 {
        msg.0 + 1
    }

    fn untagged(&mut self, _key: Key, msg: Untagged, _ctx: &mut ShardContext) -> u32 {
        msg.0 + 2
    }

    fn either(&mut self, _key: Key, msg: Either, _ctx: &mut ShardContext) -> bool {
        matches!(msg, Either::Left)
    }
}

fn main() {
    assert_eq!(<Tagged as ShardMessage>::TAG, "custom.tag");
    assert_eq!(<Untagged as ShardMessage>::TAG, "Untagged");
    assert_eq!(<Either as ShardMessage>::TAG, "enum.tag");
    assert!(<Untagged as ShardMessage>::IDEMPOTENT);
    assert!(!<Tagged as ShardMessage>::IDEMPOTENT);
    actix::System::new().block_on(async {
        let node = Cluster::builder()
            .shards(8)
            .handler::<Echo>()
            .standalone()
            .start()
            .await
            .unwrap();
        assert_eq!(node.send("k", Tagged(1)).await, Ok(2));
        assert_eq!(node.send("k", Untagged(1)).await, Ok(3));
        assert_eq!(node.handle().send("k", Tagged(10)).await, Ok(11));
        assert_eq!(node.handle().send("k", Either::Left).await, Ok(true));
        assert_eq!(node.handle().send("k", Either::Right).await, Ok(false));
        node.shutdown().await;
    });
}
