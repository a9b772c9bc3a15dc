//! The process harness that the integration tests in `tests/` and the tools in `examples/`
//! (`demo`, `bench`, `failover_timing`, `raft_timing`) share, behind the `testing` feature.
//!
//! It holds what every multi-process test or tool needs, done one way:
//! - [`reserve_ports`] and [`reserve_port_on_hosts`]: free loopback ports, held until the
//!   [`PortReservation`] drops, so that parallel clusters of one process never share a port;
//! - [`Binaries`]: the `kv` example and the `clusterfunk` tool, found beside the running
//!   program or built for a test run;
//! - [`NodeProcess`]: one node process with its data dir and log file, started, killed,
//!   paused (SIGSTOP), resumed (SIGCONT) and restarted; [`run_bounded`] runs a command-line
//!   tool with a time limit;
//! - [`wait_until`] and [`wait_for`]: polling with a deadline, synchronous and async, every
//!   loop bounded; [`watch_interrupt`] turns Ctrl-C into an error of every wait, so that a
//!   tool's clean-up still runs;
//! - [`status`], [`statuses`] and [`shard_owners`]: a node's state through [`AdminClient`];
//!   [`wait_settled`] waits until a cluster is at rest with balanced shares;
//! - [`keys_per_shard`] and [`key_of_shard`]: keys that land on chosen shards;
//! - [`PostgresServer`]: a throwaway PostgreSQL server in a temporary directory, for the
//!   PostgreSQL shard store's tests;
//! - [`store_contract`]: the contract every [`ShardStore`](crate::persist::ShardStore) must keep,
//!   as a suite of checks to run against a store of your own.
//!
//! It does not own test assertions (they live in `tests/common`) nor the tools' reporting
//! (series, tables and JSON live in `examples/support`). It is not meant for production: it
//! spawns processes, runs `kill(1)` and binds probe sockets.
//!
//! [`AdminClient`]: crate::admin::AdminClient

mod binaries;
mod error;
mod keys;
mod ports;
mod postgres;
mod process;
mod status;
mod store_contract;
mod wait;

pub use binaries::{build_kv_example, Binaries};
pub use error::{TestingError, WaitError};
pub use keys::{key_of_shard, keys_per_shard};
pub use ports::{
    reserve_port_on_hosts, reserve_ports, PortReservation, IN_PROCESS_PORT_RANGE,
    PROCESS_PORT_RANGE,
};
pub use postgres::PostgresServer;
pub use process::{run_bounded, serve_command, NodeProcess, Outcome, Signal};
pub use status::{shard_owners, status, statuses, wait_settled, Settled};
#[cfg(test)]
pub(crate) use store_contract::{activate_ok, commit_ok};
pub use store_contract::{puts_batch, records_text, store_contract, text_map};
pub use wait::{interrupted, wait_for, wait_until, watch_interrupt};
