use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
#[tag = incr]
struct Incr {
    by: u64,
}

fn main() {}
