use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
#[reply(String)]
struct Incr {
    by: u64,
}

fn main() {}
