//! `_` is accepted for every argument of a handler method, plain or `async`.
use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(String)]
struct Ping;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u8)]
struct Pong(u8);

#[derive(Default)]
struct Quiet {
    pongs: u8,
}

#[shard_handler]
impl Quiet {
    fn ping(&mut self, _: Key, _: Ping, _: &mut ShardContext) -> String {
        "pong".to_string()
    }

    async fn pong(&mut self, _: Key, _: Pong, _: &mut ShardContext) -> u8 {
        self.pongs += 1;
        self.pongs
    }
}

fn main() {
    actix::System::new().block_on(async {
        let node = Cluster::builder()
            .shards(2)
            .handler::<Quiet>()
            .standalone()
            .start()
            .await
            .unwrap();
        assert_eq!(node.send(7u64, Ping).await.as_deref(), Ok("pong"));
        assert_eq!(node.send(7u64, Pong(0)).await, Ok(1));
        assert_eq!(node.send(7u64, Pong(0)).await, Ok(2));
        node.shutdown().await;
    });
}
