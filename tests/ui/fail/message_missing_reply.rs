use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
struct Incr {
    by: u64,
}

fn main() {}
