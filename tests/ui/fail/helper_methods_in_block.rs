use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr {
    by: u64,
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

    // Both helpers are reported, not only the first.
    fn total(&self) -> u64 {
        self.n
    }

    fn reset(&mut self) {
        self.n = 0;
    }
}

fn main() {}
