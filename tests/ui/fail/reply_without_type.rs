use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply]
struct Incr {
    by: u64,
}

fn main() {}
