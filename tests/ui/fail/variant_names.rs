use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr {
    by: u64,
}

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Get;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct GetAgain;

#[derive(Default)]
struct Counter {
    n: u64,
}

// The wire enum gets one variant per method, named after it in CamelCase.
#[shard_handler]
impl Counter {
    fn self_(&mut self, _key: Key, msg: Incr, _ctx: &mut ShardContext) -> u64 {
        self.n += msg.by;
        self.n
    }

    fn get_n(&mut self, _key: Key, _msg: Get, _ctx: &mut ShardContext) -> u64 {
        self.n
    }

    fn get__n(&mut self, _key: Key, _msg: GetAgain, _ctx: &mut ShardContext) -> u64 {
        self.n
    }
}

fn main() {}
