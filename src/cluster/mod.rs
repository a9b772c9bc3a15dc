//! The entry points: [`Cluster::builder`], the [`Node`] handle it starts, and the type-erased
//! [`ClusterHandle`](crate::ClusterHandle) that handlers use to send further messages.
//!
//! This module wires the parts together and owns the node's configuration ([`NodeConfig`]); it
//! does no routing itself (the router does) and holds no handler state (shard actors do).

mod builder;
mod config;
mod node;
mod router_actor;
mod tasks;

pub use builder::{Cluster, ClusterBuilder};
pub use config::{NodeConfig, MAILBOX_CAPACITY_MAX, SHARD_COUNT_MAX};
pub use node::{GracefulShutdown, Node, NodeStatus};
