use clusterfunk::prelude::*;

#[derive(ShardMessage)]
#[reply(u64)]
struct Incr {
    by: u64,
}

fn main() {}
