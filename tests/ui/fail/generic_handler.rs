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

struct Generic<T>(T);

#[shard_handler]
impl<T: Send + Unpin + 'static> Generic<T> {
    fn incr(&mut self, _key: Key, msg: Incr, _ctx: &mut ShardContext) -> u64 {
        msg.by
    }
}

fn main() {}
