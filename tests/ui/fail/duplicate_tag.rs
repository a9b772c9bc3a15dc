use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
#[tag = "incr"]
#[tag = "increment"]
struct Incr {
    by: u64,
}

fn main() {}
