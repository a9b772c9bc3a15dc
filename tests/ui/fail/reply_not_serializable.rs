use clusterfunk::prelude::*;

struct Opaque;

#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Opaque)]
struct Get;

fn main() {}
