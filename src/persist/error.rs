//! [`StoreError`]: why a shard store refused or failed an operation, and what the caller or the
//! operator does next. Refusals (fencing) and failures (I/O) are different variants, because the
//! caller's next step differs: a refused write changed nothing and the shard must stop serving;
//! a failed one may or may not have landed, so the shard reloads before it serves again.
//!
//! Errors are `Clone` (sources are behind `Arc`) because one failed transaction fails every
//! commit a store grouped into it, and each waiting caller gets its own copy.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::shard_map::{Epoch, NodeId, ShardId};
use crate::storage::{CodecError, StorageError, Verb};

/// The stored thing an error of the [`LmdbShardStore`](super::LmdbShardStore) is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Table {
    /// The LMDB environment as a whole (opening it, starting or committing a transaction).
    Environment,
    /// The `fences` database: each shard's [`Fence`](super::Fence) record.
    Fences,
    /// The `records` database: each shard's whole-shard and per-key records.
    Records,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Environment => "shard store's LMDB environment",
            Table::Fences => "shard fences (database `fences`)",
            Table::Records => "shard records (database `records`)",
        })
    }
}

/// An error of a [`ShardStore`](super::ShardStore). Every message ends with what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A newer activation raised the shard's fence above this epoch: the write or activation was
    /// refused and changed nothing.
    #[error("shard {shard}: refused at epoch {epoch}, the store's fence is at epoch {fence}: a newer activation owns the shard; stop serving it and send its requests to the current owner")]
    Fenced {
        /// The shard.
        shard: ShardId,
        /// The epoch of the refused call.
        epoch: Epoch,
        /// The shard's fence: the newest activation epoch the store has seen.
        fence: Epoch,
    },
    /// Another node already activated the shard at this epoch; an activation epoch belongs to
    /// one owner.
    #[error("shard {shard}: node {owner} already activated it at epoch {epoch}; activate with the epoch of the map that made this node the owner, which is newer")]
    EpochTaken {
        /// The shard.
        shard: ShardId,
        /// The epoch of the refused activation.
        epoch: Epoch,
        /// The node that holds the activation of `epoch`.
        owner: NodeId,
    },
    /// A commit or release at an epoch that no activation raised the fence to (the fence is
    /// older, or the shard was never activated). It changed nothing.
    #[error("shard {shard}: no activation at epoch {epoch} (the store's fence is {}); activate the shard at that epoch before writing to it", match fence { Some(fence) => format!("at epoch {fence}"), None => "unset".to_owned() })]
    NotActivated {
        /// The shard.
        shard: ShardId,
        /// The epoch of the refused call.
        epoch: Epoch,
        /// The shard's fence, if it has one.
        fence: Option<Epoch>,
    },
    /// The activation of this epoch released the shard (a planned move handed it on): the
    /// commit was refused and changed nothing.
    #[error("shard {shard}: the activation of epoch {epoch} released it; stop serving the shard, or activate it again if the move was cancelled")]
    Released {
        /// The shard.
        shard: ShardId,
        /// The released activation's epoch.
        epoch: Epoch,
    },
    /// A key is too long for the store (LMDB limits a key to 511 bytes, of which the store uses
    /// 5; PostgreSQL's index entries limit the PostgreSQL store's keys). The commit was refused
    /// and changed nothing.
    #[error("shard {shard}: a key of {key_bytes} bytes is over this store's limit of {key_bytes_max} bytes; use shorter keys (hash long ones)")]
    KeyTooLong {
        /// The shard.
        shard: ShardId,
        /// The length of the key.
        key_bytes: usize,
        /// The longest key the store accepts.
        key_bytes_max: usize,
    },
    /// The store's options are unusable.
    #[error("invalid shard store options: {source}")]
    InvalidOptions {
        /// What is wrong and how to fix it.
        #[source]
        source: StorageError,
    },
    /// The store's directory could not be created.
    #[error("cannot create the shard store dir {}: {source}; check that its parent exists and is writable by this user", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// This process already has the directory open (as a shard store, or as a raft data dir).
    #[error("the shard store dir {} is already open in this process; drop the other store first, and give the shard store a directory of its own, not the node's raft data dir", dir.display())]
    AlreadyOpen {
        /// The directory.
        dir: PathBuf,
    },
    /// LMDB failed; the transaction was aborted, so none of the calls grouped into it changed
    /// anything.
    #[error("cannot {verb} the {table}: {source}; {hint}")]
    Lmdb {
        /// What was being accessed.
        table: Table,
        /// What was being done.
        verb: Verb,
        /// heed's error.
        #[source]
        source: Arc<heed::Error>,
        /// What the operator should check, derived from `source`.
        hint: &'static str,
    },
    /// A shard's fence record does not decode. Only calls for that shard fail.
    #[error("the fence record of shard {shard} does not decode: {source}; the shard store's dir is damaged or was written by an incompatible version: move it aside (this node's shards then start empty)")]
    CorruptFence {
        /// The shard.
        shard: ShardId,
        /// Why it does not decode.
        #[source]
        source: Arc<CodecError>,
    },
    /// A record key of a shard is not one this store writes. Only calls for that shard fail.
    #[error("a record key of shard {shard} is damaged ({reason}); the shard store's dir is damaged or was written by an incompatible version: move it aside (this node's shards then start empty)")]
    CorruptRecord {
        /// The shard.
        shard: ShardId,
        /// What is wrong with the key.
        reason: &'static str,
    },
    /// The store's writer thread (or, for the PostgreSQL store, its runtime thread) could not be
    /// started.
    #[error("cannot start the shard store's writer thread: {source}; the process is out of threads or memory: check ulimit -u and free memory")]
    SpawnThread {
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The store's writer thread (or, for the PostgreSQL store, its runtime thread) is gone (it
    /// panicked, or the store is being dropped). A commit that fails this way may or may not
    /// have landed.
    #[error("the shard store's writer thread has exited; the outcome of the last commit is unknown: reopen the store and reload the shard, and see earlier log lines for why it stopped")]
    Closed,
    /// The PostgreSQL server could not be reached: no connection could be opened, or the
    /// connection broke during the call (the server stopped, crashed or restarted, or the network
    /// failed). A commit that failed this way may or may not have landed.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL at {server} is unreachable ({reason}); check the store's URL and that the server runs and accepts connections from this host. Shards stop serving until it answers (each reloads from the store first, since a commit in flight may or may not have landed)")]
    PostgresUnreachable {
        /// The server, as `USER@HOST:PORT/DATABASE` (never the password).
        server: String,
        /// What failed, in words (the server's message and SQLSTATE, if it sent one).
        reason: String,
        /// tokio-postgres's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A call to PostgreSQL did not finish within its time limit:
    /// [`PostgresOptions::call_timeout`](super::PostgresOptions::call_timeout), or
    /// [`connect_timeout`](super::PostgresOptions::connect_timeout) while opening a connection. A
    /// commit that failed this way may or may not have landed.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL at {server}: waited {timeout:?} for {waiting_for} in vain; check that the server runs and is not overloaded (locks held by other clients, a full disk), or raise the store's call_timeout (connect_timeout for a new connection). The shard reloads from the store before it serves again")]
    PostgresTimeout {
        /// The server, as `USER@HOST:PORT/DATABASE`.
        server: String,
        /// What the call was waiting for (`a connection of the pool`, `a new connection`, `an
        /// answer`).
        waiting_for: &'static str,
        /// The time limit that ran out.
        timeout: std::time::Duration,
    },
    /// PostgreSQL answered a call with an error (a refused login, a missing database or table, a
    /// missing privilege, a full disk…). The transaction was rolled back, so the call changed
    /// nothing, but the caller cannot tell that apart from a lost answer: treat a commit's
    /// outcome as unknown.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL at {server} failed to {verb} {target}: {reason}; {hint}")]
    Postgres {
        /// The server, as `USER@HOST:PORT/DATABASE`.
        server: String,
        /// What was being accessed: `table NAME` (with the store's prefix), `the store's
        /// tables` (their set-up) or `a connection` (a login).
        target: String,
        /// What was being done.
        verb: Verb,
        /// What failed, in words (the server's message and SQLSTATE).
        reason: String,
        /// tokio-postgres's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
        /// What the operator should check, derived from the error's SQLSTATE.
        hint: &'static str,
    },
    /// The PostgreSQL store's URL does not parse.
    #[cfg(feature = "postgres")]
    #[error("the PostgreSQL URL does not parse: {source}; write it as postgres://USER[:PASSWORD]@HOST:PORT/DATABASE")]
    PostgresUrl {
        /// tokio-postgres's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A table of the store's name exists in the database but not with the columns this store
    /// writes (another program's table, or one written by an incompatible version).
    #[cfg(feature = "postgres")]
    #[error("the PostgreSQL table {table} is not a shard store table of this version ({problem}); give the store a table_prefix of its own, or move the table aside")]
    PostgresSchema {
        /// The table (with the store's prefix).
        table: String,
        /// Which column is missing or of another type.
        problem: String,
    },
    /// The store's tables belong to another cluster: two clusters writing one set of tables
    /// would share fences (node ids and epochs) and overwrite each other's values.
    #[cfg(feature = "postgres")]
    #[error("the PostgreSQL tables {table} belong to cluster {found:?}, not {expected:?}: give each cluster its own database or table_prefix (or, if this cluster was renamed, update the row of {table})")]
    PostgresOtherCluster {
        /// The table that records the owning cluster.
        table: String,
        /// The cluster recorded there.
        found: String,
        /// The cluster of this node.
        expected: String,
    },
    /// A row of the PostgreSQL store does not decode (a column of an unexpected type, or an
    /// unexpected NULL). Only calls for that shard fail.
    #[cfg(feature = "postgres")]
    #[error("a row of shard {shard} in the PostgreSQL table {table} does not decode: {source}; the table was changed by another program or an incompatible version: repair or delete the shard's rows (the shard then starts empty)")]
    PostgresCorruptRow {
        /// The shard.
        shard: ShardId,
        /// The table (with the store's prefix).
        table: String,
        /// tokio-postgres's error.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },
    /// A store implemented outside this crate failed. Whether a commit landed is unknown unless
    /// the store says so.
    #[error(
        "the shard store failed: {source}; reload the shard from the store before serving it again"
    )]
    Backend {
        /// The store's own error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Wraps the error of a store implemented outside this crate.
    pub fn backend(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend {
            source: Arc::new(source),
        }
    }

    /// Whether the store refused the call by its rules (fencing, a release, a key too long): then
    /// it certainly changed nothing, and retrying the same call cannot succeed. Otherwise the
    /// call failed for a reason outside the rules, and a commit's outcome may be unknown.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::Fenced { .. }
                | StoreError::EpochTaken { .. }
                | StoreError::NotActivated { .. }
                | StoreError::Released { .. }
                | StoreError::KeyTooLong { .. }
        )
    }

    pub(crate) fn lmdb(table: Table, verb: Verb, source: heed::Error) -> Self {
        StoreError::Lmdb {
            table,
            verb,
            hint: crate::storage::hint_for(&source),
            source: Arc::new(source),
        }
    }
}
