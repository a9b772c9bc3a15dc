//! The messages of the `kv` example, shared by `kv` itself (which handles them) and the tools
//! that talk to `kv` nodes through a `Client` (`demo`, `failover_timing`). One definition keeps
//! their wire tags and layouts from drifting apart.

use clusterfunk::prelude::*;

/// Stores `value` under the key. Idempotent: storing it twice leaves the same value.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
#[tag = "kv.put"]
#[idempotent]
pub struct Put {
    /// The value to store.
    pub value: String,
}

/// Reads the key's value, if any.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Option<String>)]
#[tag = "kv.get"]
#[idempotent]
pub struct Get;

/// Adds `by` to the number stored under the key (absent counts as 0) and answers the new
/// number, or `None` (changing nothing) when the value is not a number. Not idempotent: a
/// second application adds again.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Option<u64>)]
#[tag = "kv.incr"]
pub struct Incr {
    /// How much to add.
    pub by: u64,
}

/// Asks the shard actor that serves the key who it is.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Owner)]
#[tag = "kv.owner"]
pub struct WhoOwns;

/// The answer to [`WhoOwns`] (`kv owner` prints it as one JSON line).
#[derive(Serialize, Deserialize)]
pub struct Owner {
    /// The key asked about.
    pub key: String,
    /// The shard that served it.
    pub shard: ShardId,
    /// The node that served it.
    pub node: NodeId,
    /// The map epoch of the serving shard actor.
    pub epoch: u64,
}
