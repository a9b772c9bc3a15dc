use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(42)]
struct Incr {
    by: u64,
}

fn main() {}
