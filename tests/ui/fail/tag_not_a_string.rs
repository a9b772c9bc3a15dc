use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
#[tag = 42]
struct Incr {
    by: u64,
}

fn main() {}
