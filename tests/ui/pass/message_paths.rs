//! Message types named by path, from other modules; the handler itself lives in a module too.
use clusterfunk::prelude::*;

mod msgs {
    use clusterfunk::prelude::*;

    #[derive(Serialize, Deserialize, ShardMessage)]
    #[reply(u64)]
    pub struct Incr;

    pub mod nested {
        use clusterfunk::prelude::*;

        #[derive(Serialize, Deserialize, ShardMessage)]
        #[reply(u64)]
        #[tag = "nested.Incr"]
        pub struct Incr {
            pub by: u64,
        }

        /// Same name as `msgs::Incr` and no `#[tag]`: the same wire tag.
        #[derive(Serialize, Deserialize, ShardMessage)]
        #[reply(u64)]
        pub struct Get;
    }

    #[derive(Serialize, Deserialize, ShardMessage)]
    #[reply(u64)]
    pub struct Get;
}

mod handler {
    use clusterfunk::prelude::*;

    use crate::msgs;

    #[derive(Default)]
    pub struct Counter {
        n: u64,
    }

    #[shard_handler]
    impl Counter {
        fn incr_one(&mut self, _key: Key, _msg: msgs::Incr, _ctx: &mut ShardContext) -> u64 {
            self.n += 1;
            self.n
        }

        async fn incr_by(
            &mut self,
            _key: Key,
            msg: crate::msgs::nested::Incr,
            _ctx: &mut ShardContext,
        ) -> u64 {
            self.n += msg.by;
            self.n
        }

        fn get(&mut self, _key: Key, _msg: msgs::Get, _ctx: &mut ShardContext) -> u64 {
            self.n
        }
    }

    /// Two message types whose tags clash.
    #[derive(Default)]
    pub struct Clash;

    #[shard_handler]
    impl Clash {
        fn get(&mut self, _key: Key, _msg: msgs::Get, _ctx: &mut ShardContext) -> u64 {
            1
        }

        fn nested_get(
            &mut self,
            _key: Key,
            _msg: msgs::nested::Get,
            _ctx: &mut ShardContext,
        ) -> u64 {
            2
        }
    }
}

fn main() {
    assert_eq!(<msgs::Incr as ShardMessage>::TAG, "Incr");
    assert_eq!(<msgs::nested::Incr as ShardMessage>::TAG, "nested.Incr");
    // The generated wire enum has one variant per method, named after it.
    let _ = handler::CounterMessage::IncrOne(msgs::Incr);
    let _ = handler::CounterMessage::IncrBy(msgs::nested::Incr { by: 1 });
    actix::System::new().block_on(async {
        let node = Cluster::builder()
            .shards(1)
            .handler::<handler::Counter>()
            .standalone()
            .start()
            .await
            .unwrap();
        assert_eq!(node.send("k", msgs::Incr).await, Ok(1));
        assert_eq!(node.send("k", msgs::nested::Incr { by: 10 }).await, Ok(11));
        assert_eq!(
            node.handle()
                .send("k", msgs::nested::Incr { by: 100 })
                .await,
            Ok(111)
        );
        assert_eq!(node.send("k", msgs::Get).await, Ok(111));
        node.shutdown().await;

        // Messages whose tags clash cannot be told apart on the wire: `start` refuses them.
        let clash = Cluster::builder()
            .handler::<handler::Clash>()
            .standalone()
            .start()
            .await;
        assert!(clash.is_err());
    });
}
