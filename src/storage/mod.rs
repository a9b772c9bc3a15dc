//! Durable raft storage on LMDB: the raft log, vote, committed log id, purge marker and
//! state-machine snapshots of one node, in one LMDB environment in the node's data dir.
//!
//! This module implements openraft's storage traits (`storage-v2`) for any `RaftTypeConfig`:
//! [`LogStore`] is the `RaftLogStorage` + `RaftLogReader`, [`StateMachineStore`] the
//! `RaftStateMachine` + `RaftSnapshotBuilder`, and the application plugs its replicated state in
//! through the [`StateMachineApp`] trait. [`LmdbStore`] opens the environment and hands out both.
//!
//! It does **not** own: the raft type config or the meaning of commands (the consensus module),
//! when to snapshot or purge (openraft's config), the network, or the router's view of the state
//! (the router subscribes with [`StateMachineStore::subscribe`]).
//!
//! # Layout on disk
//!
//! One LMDB environment in the data dir (`data.mdb`, `lock.mdb`) with three named databases:
//! `log` (key: entry index as big-endian `u64`, so key order is log order), `meta` (keys `vote`,
//! `committed`, `last_purged`) and `snapshot` (key `current`: snapshot metadata plus the encoded
//! application state). Values are encoded by the `codec` submodule: a format version byte and
//! bincode 2, the same encoding as the wire.
//!
//! # Threads
//!
//! LMDB writes block (they end in an fsync), so they never run on an async executor thread: a
//! dedicated thread named `clusterfunk-storage` owns the write side, takes jobs over a bounded
//! channel in FIFO order, groups whatever is queued into one transaction (one fsync for all of
//! it) and replies through a tokio oneshot or openraft's `LogFlushed` callback. A dedicated
//! thread rather than `spawn_blocking` because it keeps writes in call order, as raft requires,
//! and makes group commit natural; the `lmdb` submodule explains this and why reads run inline.
//!
//! # Throughput
//!
//! openraft 0.9 appends each client write as its own entry and waits for its fsync before the
//! next, so with `sync` on a node commits about one write per fsync. Measured on the development
//! VM (debug build, dependencies at opt-level 2; `append_throughput` in `tests/storage_suite.rs`):
//! 150–200 single-entry appends/s and about as many raft writes/s with 300 in flight (an LMDB
//! commit costs two `fdatasync`s); with `sync` off, 37 000–120 000 appends/s and 40 000–48 000
//! raft writes/s. Commands that come in bursts (e.g. one `Released` per shard in a rebalance)
//! should therefore be batched into one command by the proposer.
//!
//! # Use from the consensus module
//!
//! ```ignore
//! let store = LmdbStore::open(&data_dir, StoreOptions::default())?; // blocking: at start-up
//! let log_store: LogStore<C> = store.log_store();
//! let state_machine: StateMachineStore<C, A> = store.state_machine(app)?;
//! let applied = state_machine.subscribe(); // watch::Receiver<Arc<Applied<C, A::State>>>
//! let raft = openraft::Raft::<C>::new(id, config, network, log_store, state_machine).await?;
//! ```
//!
//! `C` must use `Entry = openraft::Entry<C>` and `SnapshotData = std::io::Cursor<Vec<u8>>` (the
//! defaults of `declare_raft_types!`). Tests may use [`memory::in_memory_for_tests`] instead.

pub(crate) mod codec;
pub mod data_dir;
mod error;
pub(crate) mod group_commit;
mod lmdb;
mod log_store;
pub mod memory;
mod options;
mod state_machine;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use openraft::RaftTypeConfig;

pub use codec::CodecError;
pub use data_dir::{DataDirError, DataDirLock, Identity};
pub use error::{StorageError, Table, Verb};
pub use log_store::LogStore;
pub use options::StoreOptions;
pub use state_machine::{Applied, StateMachineApp, StateMachineStore};

pub(crate) use error::hint_for;
pub(crate) use lmdb::open_environment;
use lmdb::Lmdb;

/// One node's LMDB storage: opens the environment in the data dir and makes the log store and the
/// state machine, which share it. Cheap to clone.
///
/// The environment closes when this and every [`LogStore`] and [`StateMachineStore`] made from it
/// are dropped; the last drop waits for the storage thread to finish its current commit.
#[derive(Clone)]
pub struct LmdbStore {
    lmdb: Arc<Lmdb>,
}

impl std::fmt::Debug for LmdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbStore")
            .field("dir", &self.lmdb.dir())
            .finish()
    }
}

impl LmdbStore {
    /// Opens the storage in `dir`, creating the directory and the databases if needed, and starts
    /// the `clusterfunk-storage` thread.
    ///
    /// Blocking (it maps the file and may create it): call it at start-up or from a blocking
    /// context. `dir` must be on a local file system (LMDB's locking does not work over network
    /// file systems) and must not be opened by another process. Opening a dir that this process
    /// already has open fails with [`StorageError::AlreadyOpen`].
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StorageError> {
        Ok(LmdbStore {
            lmdb: Arc::new(Lmdb::open(dir, &options)?),
        })
    }

    /// The data dir this store was opened in.
    pub fn dir(&self) -> &Path {
        self.lmdb.dir()
    }

    /// A future that resolves once the environment is closed: when this store and every
    /// [`LogStore`] and [`StateMachineStore`] made from it have been dropped, so the data dir can
    /// be opened again. It holds no handle itself. Use it on restart: after
    /// `openraft::Raft::shutdown`, openraft's background tasks may hold store handles for a few
    /// more moments.
    ///
    /// ```ignore
    /// let closed = store.closed();
    /// drop(store);
    /// tokio::time::timeout(Duration::from_secs(5), closed).await?;
    /// let store = LmdbStore::open(&dir, options)?;
    /// ```
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.lmdb.closed()
    }

    /// The raft log store. Every call returns a handle to the same log; give one to
    /// `openraft::Raft::new`.
    pub fn log_store<C: RaftTypeConfig>(&self) -> LogStore<C> {
        LogStore::lmdb(Arc::clone(&self.lmdb))
    }

    /// The state machine for `app`, restored from the stored snapshot if there is one (openraft
    /// then re-applies the committed entries after it). Blocking: it reads and decodes the
    /// snapshot. Call it once per data dir: two state machines would overwrite each other's
    /// snapshots.
    pub fn state_machine<C, A>(&self, app: A) -> Result<StateMachineStore<C, A>, StorageError>
    where
        C: RaftTypeConfig,
        A: StateMachineApp<C>,
    {
        StateMachineStore::open(app, Arc::clone(&self.lmdb))
    }
}
