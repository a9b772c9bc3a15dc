use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
struct Incr {
    by: u64,
}

#[shard_handler]
struct Counter {
    n: u64,
}

fn main() {}
