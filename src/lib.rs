//! # clusterfunk
//!
//! A framework for sharded services. You implement a shard handler, send messages to keys, and
//! clusterfunk routes each message to the one node that owns the key's shard.
//!
//! ```
//! use std::collections::HashMap;
//! use clusterfunk::prelude::*;
//!
//! #[derive(Serialize, Deserialize, ShardMessage)]
//! #[reply(u64)]
//! struct Incr { by: u64 }
//!
//! #[derive(Serialize, Deserialize, ShardMessage)]
//! #[reply(u64)]
//! struct Get;
//!
//! /// The state of one shard: the counters of every key that hashes to it.
//! #[derive(Default)]
//! struct Counters { values: HashMap<Key, u64> }
//!
//! #[shard_handler]
//! impl Counters {
//!     fn incr(&mut self, key: Key, msg: Incr, _ctx: &mut ShardContext) -> u64 {
//!         let value = self.values.entry(key).or_default();
//!         *value += msg.by;
//!         *value
//!     }
//!
//!     // Handler methods may be `async`; messages to one shard still run one at a time.
//!     async fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> u64 {
//!         self.values.get(&key).copied().unwrap_or(0)
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! actix::System::new().block_on(async {
//!     let node = Cluster::builder()
//!         .node_id(1)
//!         .shards(64)
//!         .handler::<Counters>()
//!         .standalone()
//!         .start()
//!         .await?;
//!     node.send("user-42", Incr { by: 2 }).await?;
//!     let n: u64 = node.send("user-42", Incr { by: 1 }).await?;
//!     assert_eq!(n, 3);
//!     assert_eq!(node.send("user-42", Get).await?, 3);
//!     node.shutdown().await;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! ## Layout
//! Public modules (what applications use):
//! - [`shard_map`]: keys, the key → shard hash, the shard map and its allocator (pure code).
//! - [`shard`]: the handler API ([`ShardHandler`], [`ShardMessage`], [`ShardContext`]) and the
//!   actor hosting one shard.
//! - [`cluster`]: the builder, the [`Node`] handle and [`ClusterHandle`].
//! - [`client`]: sending to keys from outside the cluster.
//! - [`admin`]: operator commands and their reports (pure data), the admin client and the
//!   credentials.
//! - [`plan`]: the topology planner: which failures a layout of voters over zones survives (pure).
//! - [`storage`]: the raft log and snapshots on LMDB.
//! - [`persist`]: durable shard state: the [`ShardStore`](persist::ShardStore) trait with its
//!   fencing rules, the in-memory store, the node-local LMDB store and (feature `postgres`) the
//!   shared PostgreSQL store.
//! - [`transport`]: authenticated, multiplexed TCP between nodes and clients; [`tls`] its
//!   certificates.
//! - [`error`]: the errors of the public API.
//! - [`metrics`]: the Prometheus endpoint and what it reports.
//! - [`recover`]: forming a new cluster from a survivor after a quorum was lost for good.
//! - [`tool`] (feature `cli`): the exit codes and error the command-line tools share.
//! - `testing` (feature `testing`, not for production): the process harness that the
//!   integration tests and the tools in `examples/` share.
//!
//! Private modules (the node's machinery; their types that users need are exported from the
//! root: [`ConsensusConfig`], [`NodeInfo`], [`LeaseConfig`], [`Handoff`]):
//! - `router`: key → shard → local shard actor, the lock-free routing table.
//! - `ledger`: where each shard's state is during planned moves, as a pure state machine the
//!   router and the router actor drive.
//! - `consensus`: openraft replicating the cluster state; the consensus actor.
//! - `lease`: the lease rules (who may serve, when a silent node's shards may move), pure.
//! - `wire`: the node protocol carried by the transport; `codec`: the one wire and disk format.
//! - `handoff`, `lease_task`, `service`, `tasks`: handoff rounds, lease renewal, the node's
//!   request service, the node's task set.
//!
//! The design notes in the guide give the module map and which module may use which.

#![cfg_attr(docsrs, feature(doc_cfg))]

// Lets the macros name `::clusterfunk` also inside this crate's own tests.
extern crate self as clusterfunk;

pub mod admin;
pub mod client;
pub mod cluster;
mod codec;
mod consensus;
pub mod error;
// Not a public API: the decoders for the fuzz targets (tests/fuzz) and tests/decoders.rs.
#[doc(hidden)]
pub mod fuzzing;
mod handoff;
mod lease;
mod lease_task;
mod ledger;
pub mod metrics;
pub mod persist;
pub mod plan;
pub mod recover;
mod router;
mod service;
pub mod session;
pub mod shard;
pub mod shard_map;
pub mod storage;
mod tasks;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod tls;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod tool;
pub mod transport;
mod wire;

pub use cluster::{Cluster, ClusterBuilder, GracefulShutdown, Node, NodeConfig, NodeStatus};
pub use consensus::{ConsensusConfig, MemberListError, NodeInfo};

/// Log filter directives that turn off openraft's per-retry lines about an unreachable peer
/// (a leader retries a dead member every 50 ms and openraft logs an error and warnings each
/// time). clusterfunk logs an unreachable peer itself, once per 30 s with a count of the
/// failures left out, under the target `clusterfunk::raft`. Append it to your filter, e.g.
/// `EnvFilter::new(format!("info,{QUIET_OPENRAFT_LOG}"))`; `kv serve` does so unless `RUST_LOG`
/// is set.
pub const QUIET_OPENRAFT_LOG: &str =
    "openraft::replication=off,openraft::engine::handler::replication_handler=off";
pub use codec::Handoff;
pub use error::{ConfigError, Error, NotReadyReason, StartError};
pub use lease::LeaseConfig;
pub use shard::{
    ClusterHandle, ServeEvent, ServeEventKind, ServeObserver, ShardActor, ShardContext,
    ShardHandler, ShardMessage,
};
pub use shard_map::{Key, NodeId, ShardId};

/// Derives [`ShardMessage`]: `#[derive(ShardMessage)] #[reply(T)] struct M { .. }`, with an
/// optional `#[tag = "name"]` to pin the wire tag (default: the type's name).
pub use clusterfunk_macros::ShardMessage;

/// Implements [`ShardHandler`] for the type of an `impl` block whose methods each handle one
/// message type: `fn name(&mut self, key: Key, msg: M, ctx: &mut ShardContext) -> M::Reply`,
/// plain or `async`. Methods named `on_activate`, `on_deactivate` and `on_restore` override the
/// lifecycle hooks. It generates the wire enum `<Type>Message` and the dispatch.
pub use clusterfunk_macros::shard_handler;

/// Everything a handler module needs: `use clusterfunk::prelude::*;`.
pub mod prelude {
    pub use crate::{
        shard_handler, Cluster, ClusterHandle, Error, Handoff, Key, Node, NodeId, ShardContext,
        ShardHandler, ShardId, ShardMessage,
    };
    pub use serde::{Deserialize, Serialize};
}

/// The wire protocol and the replicated state's types, for this repository's own protocol tests,
/// fuzz targets and benches (they speak the protocol byte by byte). Not public API: may change
/// in any release; applications use [`Node`], [`client::Client`] and [`admin::AdminClient`].
#[doc(hidden)]
pub mod internals {
    pub use crate::codec::{decode, encode};
    pub use crate::consensus::{ClusterState, TypeConfig};
    pub use crate::lease::RenewLease;
    pub use crate::wire::{Request, Response};
}

/// Items the macros expand to. Not public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use futures_util::future::{BoxFuture, LocalBoxFuture};

    pub use crate::shard::{
        decode, route_any, route_wire, unknown_tag, Dispatch, Handled, Handles, Origin, Slot,
        WireMessage,
    };
}

/// The guide's chapters (`guide/src/*.md`), compiled as doctests so that every Rust sample in
/// the book keeps matching the API. Only built by `cargo test --doc`.
#[cfg(doctest)]
pub mod guide {
    #[doc = include_str!("../guide/src/introduction.md")]
    pub mod introduction {}
    #[doc = include_str!("../guide/src/quick-start.md")]
    pub mod quick_start {}
    #[doc = include_str!("../guide/src/handlers.md")]
    pub mod handlers {}
    #[doc = include_str!("../guide/src/persistence.md")]
    pub mod persistence {}
    #[doc = include_str!("../guide/src/exactly-once.md")]
    pub mod exactly_once {}
    #[doc = include_str!("../guide/src/concepts.md")]
    pub mod concepts {}
    #[doc = include_str!("../guide/src/operating.md")]
    pub mod operating {}
    #[doc = include_str!("../guide/src/production.md")]
    pub mod production {}
    #[doc = include_str!("../guide/src/failures.md")]
    pub mod failures {}
    #[doc = include_str!("../guide/src/recovery.md")]
    pub mod recovery {}
    #[doc = include_str!("../guide/src/configuration.md")]
    pub mod configuration {}
    #[doc = include_str!("../guide/src/metrics.md")]
    pub mod metrics {}
    #[doc = include_str!("../guide/src/design-notes.md")]
    pub mod design_notes {}
}
