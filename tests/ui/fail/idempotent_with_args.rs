use clusterfunk::prelude::*;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
#[idempotent(true)]
struct Put {
    value: String,
}

fn main() {}
