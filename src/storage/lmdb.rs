//! The LMDB environment and the storage actor that owns its write side.
//!
//! One [`Lmdb`] exists per data dir. It holds the heed environment, the three named databases,
//! the sender half of the storage actor's job queue, and two small in-memory tables that let
//! callers see writes that are queued but not yet committed (see [`Unflushed`] and
//! [`CommittedSlot`]).
//!
//! # Why an actor on a dedicated thread, not `spawn_blocking`
//!
//! The writer is the design card's storage actor: an actix actor alone on a thread named
//! `clusterfunk-storage`, in an actix system of its own (the `group_commit` module, shared with
//! the node-local shard store). Its mailbox is the job queue, read as a stream of ready chunks;
//! [`RaftCommitter`] commits each chunk.
//!
//! - Raft requires writes to land in the order they were issued (an append must not overtake the
//!   truncate before it). One thread draining one FIFO queue gives that order for free; separate
//!   `spawn_blocking` calls would race for LMDB's write lock in any order.
//! - The actor batches whatever jobs are queued into one write transaction, so writes that
//!   queue up share one fsync (group commit). openraft 0.9 waits for each append's flush before
//!   its next step, so today that mostly merges snapshot and vote writes with appends; a
//!   pipelining openraft (0.10 calls `append` again before the previous flush) gains from it
//!   without a change here.
//! - LMDB environments opened without thread-local reader slots (which we need so read
//!   transactions can be used on any executor thread) must have their write transactions
//!   serialised on one OS thread, and heed's `RwTxn` is not `Send`.
//! - It does not depend on which runtime the caller uses (actix's single-threaded one, a
//!   simulated one in tests): jobs go over a tokio channel and replies come back through a
//!   callback or a tokio oneshot, both of which work from a plain thread.
//!
//! # Why reads run inline on the caller's thread
//!
//! LMDB readers never wait for the writer: a read transaction sees the last committed version of
//! the B-tree through the memory map (MVCC), and the only lock it takes is the reader-table mutex,
//! held for a few instructions while it registers a slot. So a read cannot block on a commit or an
//! fsync. The one way a read can stall is a page fault on a page that is not in the page cache;
//! reads here are small (one meta record, or a log range bounded by `READ_BYTES_MAX` and by
//! openraft's batch size) and mostly hit recently written, hot pages. Moving every read to
//! another thread would cost a cross-thread round trip (about 15 µs here) on the replication hot
//! path to guard against that rare fault.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, watch};

use super::codec;
use super::error::{StorageError, Table, Verb};
use super::group_commit::{GroupCommit, GroupWriter};
use super::options::StoreOptions;

/// Name of the storage thread, as shown by `top -H`, debuggers and panic messages.
pub(crate) const WRITER_THREAD_NAME: &str = "clusterfunk-storage";

/// Jobs that may wait in the storage thread's queue; a caller past this waits (asynchronously)
/// for room, which is the back-pressure that keeps memory bounded when the disk is slow.
const WRITE_QUEUE_JOBS_MAX: usize = 1024;

/// Jobs committed in one write transaction at most, so one fsync never covers an unbounded
/// amount of work and replies are not held back for long.
const BATCH_JOBS_MAX: usize = 256;

/// A bounded log read (`limited_get_log_entries`) stops after this many bytes of entries, so one
/// replication request does not load an unbounded range into memory.
pub(crate) const READ_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The named databases: log, meta, snapshot.
const DATABASES_MAX: u32 = 3;

/// Key of the vote record in the `meta` database.
pub(crate) const VOTE_KEY: &str = "vote";
/// Key of the committed-log-id record in the `meta` database.
pub(crate) const COMMITTED_KEY: &str = "committed";
/// Key of the purge marker (last purged log id) in the `meta` database.
pub(crate) const LAST_PURGED_KEY: &str = "last_purged";
/// Key of the one current snapshot in the `snapshot` database.
pub(crate) const SNAPSHOT_KEY: &str = "current";

/// The log database: entry index (big-endian, so byte order is index order) → encoded entry.
pub(crate) type LogDatabase = Database<U64<BigEndian>, Bytes>;

/// The three named databases. `Database` handles in heed 0.22 are plain ids (`Copy`, no borrow
/// of the environment), which is why this crate uses heed 0.22 rather than 0.23.
#[derive(Clone, Copy)]
pub(crate) struct Databases {
    /// Raft log entries.
    pub(crate) log: LogDatabase,
    /// Vote, committed log id, purge marker.
    pub(crate) meta: Database<Str, Bytes>,
    /// The current state-machine snapshot.
    pub(crate) snapshot: Database<Str, Bytes>,
}

/// One change inside a write job.
pub(crate) enum WriteOp {
    /// Insert or overwrite the log entry at `index`.
    PutLog {
        /// Log index (the key).
        index: u64,
        /// Encoded entry, shared with [`Unflushed`].
        value: Arc<[u8]>,
    },
    /// Delete log entries with index `>= index` (raft truncate).
    DeleteLogFrom {
        /// First index deleted.
        index: u64,
    },
    /// Delete log entries with index `<= index` (raft purge).
    DeleteLogThrough {
        /// Last index deleted.
        index: u64,
    },
    /// Write one record of the meta database.
    PutMeta {
        /// Which record, for error messages.
        table: Table,
        /// Its key.
        key: &'static str,
        /// Encoded value.
        value: Vec<u8>,
    },
    /// Replace the current snapshot.
    PutSnapshot {
        /// Encoded snapshot record.
        value: Vec<u8>,
    },
}

/// Called on the storage thread once the job's transaction committed (or failed).
pub(crate) type Completion = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// A unit of work for the storage thread: all its ops land in one transaction, in order.
pub(crate) struct WriteJob {
    ops: Vec<WriteOp>,
    done: Completion,
}

/// Log entries handed to `append` whose transaction has not committed yet.
///
/// openraft requires appended entries to be readable as soon as `append` returns, but durability
/// is reported later through the callback. Readers consult this table *before* opening their LMDB
/// read transaction, and the storage thread removes entries only *after* their commit, so every
/// entry is always visible in at least one of the two places.
#[derive(Default)]
pub(crate) struct Unflushed {
    entries: BTreeMap<u64, (u64, Arc<[u8]>)>,
    next_batch: u64,
}

impl Unflushed {
    /// Records entries about to be queued; returns the batch number to pass to [`Self::flushed`].
    pub(crate) fn insert(&mut self, entries: &[(u64, Arc<[u8]>)]) -> u64 {
        let batch = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        for (index, bytes) in entries {
            self.entries.insert(*index, (batch, Arc::clone(bytes)));
        }
        batch
    }

    /// Forgets the entries of `batch` in `first..=last` once they are committed (or failed). An entry
    /// that was replaced by a later append (after a truncate) has another batch number and stays.
    pub(crate) fn flushed(&mut self, batch: u64, first: u64, last: u64) {
        let done: Vec<u64> = self
            .entries
            .range(first..=last)
            .filter(|(_, (b, _))| *b == batch)
            .map(|(index, _)| *index)
            .collect();
        for index in done {
            self.entries.remove(&index);
        }
    }

    /// Entries in `range`, in index order.
    pub(crate) fn range(&self, range: (Bound<u64>, Bound<u64>)) -> Vec<(u64, Arc<[u8]>)> {
        self.entries
            .range(range)
            .map(|(index, (_, bytes))| (*index, Arc::clone(bytes)))
            .collect()
    }

    /// The entry with the highest index.
    pub(crate) fn last(&self) -> Option<(u64, Arc<[u8]>)> {
        self.entries
            .last_key_value()
            .map(|(index, (_, bytes))| (*index, Arc::clone(bytes)))
    }

    /// Drops entries with index `>= index` (truncate).
    pub(crate) fn remove_from(&mut self, index: u64) {
        self.entries.split_off(&index);
    }

    /// Drops entries with index `<= index` (purge).
    pub(crate) fn remove_through(&mut self, index: u64) {
        match index.checked_add(1) {
            Some(next) => self.entries = self.entries.split_off(&next),
            None => self.entries.clear(),
        }
    }
}

/// The committed log id, which is written along with other writes instead of on its own.
///
/// openraft 0.9 awaits every append's fsync before it does anything else, and saves the committed
/// log id after each commit. Writing that as its own transaction would put a second fsync between
/// every two appends and halve the write rate. Instead `save_committed` only updates this slot,
/// and the storage thread adds the newest value to the next transaction it commits anyway (and
/// to a last one when the store closes). That is safe because the record is a lower bound that
/// openraft re-learns from the leader: after a crash it may be older than the last value given,
/// so fewer entries are re-applied at start-up, never entries that were not committed. And since
/// the value joins a transaction built after `save_committed` was called, it never reaches the
/// disk before the entries it covers, which were queued earlier.
#[derive(Default)]
pub(crate) struct CommittedSlot {
    /// The newest value (an encoded `Option<LogId>`), or `None` if never saved.
    value: Option<Vec<u8>>,
    /// Bumped by every save; the storage thread compares it to know whether it wrote the newest.
    version: u64,
    /// The version last committed to disk.
    version_on_disk: u64,
}

impl CommittedSlot {
    fn loaded(value: Option<Vec<u8>>) -> Self {
        CommittedSlot {
            value,
            version: 0,
            version_on_disk: 0,
        }
    }

    /// Records a new value, to be written with the next transaction.
    pub(crate) fn save(&mut self, value: Vec<u8>) {
        self.value = Some(value);
        self.version += 1;
    }

    /// The newest value, written or not.
    pub(crate) fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// The value and its version if it still has to be written.
    fn unwritten(&self) -> Option<(u64, Vec<u8>)> {
        match &self.value {
            Some(value) if self.version != self.version_on_disk => {
                Some((self.version, value.clone()))
            }
            _ => None,
        }
    }
}

/// Locks a mutex, ignoring poisoning: the tables behind these mutexes are updated by single
/// map operations, so a panic elsewhere cannot leave them half-changed.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The open environment of one data dir, shared by the log store and the state machine.
pub(crate) struct Lmdb {
    dir: PathBuf,
    env: Env<WithoutTls>,
    dbs: Databases,
    /// Entries queued by `append` and not yet committed.
    pub(crate) unflushed: Arc<Mutex<Unflushed>>,
    /// The last value given to `save_committed`; `read_committed` answers from here.
    pub(crate) committed: Arc<Mutex<CommittedSlot>>,
    writer: GroupWriter<WriteJob>,
    /// Dropped last (fields drop in declaration order, after `Drop::drop` joined the storage
    /// thread and `env` closed the environment): its receivers then learn that the data dir can
    /// be opened again. Must stay the last field.
    closed: watch::Sender<()>,
}

impl Lmdb {
    /// Creates `dir` if needed, opens (or creates) the environment and its databases, and starts
    /// the storage thread. Blocking.
    pub(crate) fn open(dir: &Path, options: &StoreOptions) -> Result<Self, StorageError> {
        options.validate()?;
        std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
            dir: dir.to_path_buf(),
            source: Arc::new(source),
        })?;
        let env = open_environment(dir, options, DATABASES_MAX).map_err(|source| match source {
            heed::Error::EnvAlreadyOpened => StorageError::AlreadyOpen {
                dir: dir.to_path_buf(),
            },
            source => StorageError::open_environment(dir, source),
        })?;
        let dbs = create_databases(&env)?;
        let lmdb_committed = {
            let txn = read_txn(&env)?;
            dbs.meta
                .get(&txn, COMMITTED_KEY)
                .map_err(|e| StorageError::lmdb(Table::Committed, Verb::Read, e))?
                .map(<[u8]>::to_vec)
        };
        let committed = Arc::new(Mutex::new(CommittedSlot::loaded(lmdb_committed)));
        let committer = RaftCommitter {
            env: env.clone(),
            dbs,
            committed: Arc::clone(&committed),
            failure: None,
        };
        let writer = GroupWriter::spawn(
            WRITER_THREAD_NAME,
            WRITE_QUEUE_JOBS_MAX,
            BATCH_JOBS_MAX,
            committer,
        )
        .map_err(|source| StorageError::SpawnThread {
            source: Arc::new(source),
        })?;
        tracing::info!(dir = %dir.display(), map_size_bytes = options.map_size_bytes, sync = options.sync, "opened LMDB storage");
        Ok(Lmdb {
            dir: dir.to_path_buf(),
            env,
            dbs,
            unflushed: Arc::default(),
            committed,
            writer,
            closed: watch::Sender::new(()),
        })
    }

    /// The data dir.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves once this environment is closed, i.e. every handle to it was dropped.
    pub(crate) fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.closed.subscribe();
        async move {
            // `changed` fails only once the sender is gone, which is the signal.
            while receiver.changed().await.is_ok() {}
        }
    }

    /// The environment, for tests that damage records on purpose.
    #[cfg(test)]
    pub(crate) fn env(&self) -> &Env<WithoutTls> {
        &self.env
    }

    /// The named databases.
    pub(crate) fn databases(&self) -> Databases {
        self.dbs
    }

    /// Starts a read transaction. Cheap and non-blocking: see the module docs.
    pub(crate) fn read_txn(&self) -> Result<RoTxn<'_, WithoutTls>, StorageError> {
        read_txn(&self.env)
    }

    /// Reads and decodes one record of the meta database.
    pub(crate) fn read_meta<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self.read_txn()?;
        let bytes = self
            .dbs
            .meta
            .get(&txn, key)
            .map_err(|e| StorageError::lmdb(table, Verb::Read, e))?;
        bytes
            .map(|bytes| codec::decode(bytes).map_err(|e| StorageError::corrupt(table, key, e)))
            .transpose()
    }

    /// Reads and decodes the current snapshot record.
    pub(crate) fn read_snapshot<T: DeserializeOwned>(&self) -> Result<Option<T>, StorageError> {
        let txn = self.read_txn()?;
        let bytes = self
            .dbs
            .snapshot
            .get(&txn, SNAPSHOT_KEY)
            .map_err(|e| StorageError::lmdb(Table::Snapshot, Verb::Read, e))?;
        bytes
            .map(|bytes| {
                codec::decode(bytes)
                    .map_err(|e| StorageError::corrupt(Table::Snapshot, SNAPSHOT_KEY, e))
            })
            .transpose()
    }

    /// Queues a job without waiting for its commit; `done` runs on the storage thread afterwards.
    /// Waits only while the queue is full.
    pub(crate) async fn submit(
        &self,
        ops: Vec<WriteOp>,
        done: Completion,
    ) -> Result<(), StorageError> {
        self.writer
            .submit(WriteJob { ops, done })
            .await
            .map_err(|_| StorageError::WriterGone)
    }

    /// Queues a job and waits until it is committed (and fsynced when `sync` is on).
    pub(crate) async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        let (reply, committed) = oneshot::channel();
        let done: Completion = Box::new(move |result| {
            // The caller may have given up waiting; then nobody needs the answer.
            let _ = reply.send(result);
        });
        self.submit(ops, done).await?;
        committed.await.map_err(|_| StorageError::WriterGone)?
    }
}

impl Drop for Lmdb {
    fn drop(&mut self) {
        // Closing the queue ends the storage thread after its current batch; joining it makes
        // sure its clone of the environment is gone, so the same dir can be reopened at once.
        self.writer.shut_down();
    }
}

/// Opens the LMDB environment in `dir` with room for `databases_max` named databases: the one
/// audited use of `unsafe` in this crate, shared by the raft storage and the node-local shard
/// store (`persist::lmdb`), each in a directory of its own.
#[allow(unsafe_code)]
pub(crate) fn open_environment(
    dir: &Path,
    options: &StoreOptions,
    databases_max: u32,
) -> heed::Result<Env<WithoutTls>> {
    let mut builder = EnvOpenOptions::new().read_txn_without_tls();
    builder
        .map_size(options.map_size_rounded_bytes())
        .max_dbs(databases_max);
    // SAFETY: heed marks these calls unsafe because LMDB memory-maps the data file, and the map
    // becomes undefined behaviour if the file is changed other than through LMDB's own locking.
    // We uphold that: (1) heed refuses to open one path twice in a process
    // (`EnvAlreadyOpened`), and this function is the only opener in this crate (the raft storage
    // and the shard store each open their own directory); (2) nothing in this crate
    // writes the data file except through LMDB transactions; (3) we never set `NO_LOCK`, so
    // another process opening the dir goes through LMDB's lock file; (4) `NO_SYNC` (the only flag
    // we may set) weakens durability after an OS crash, not memory safety; (5) the docs of
    // `LmdbStore::open` and `LmdbShardStore::open` require a local file system, as LMDB does.
    unsafe {
        if !options.sync {
            builder.flags(EnvFlags::NO_SYNC);
        }
        builder.open(dir)
    }
}

fn read_txn(env: &Env<WithoutTls>) -> Result<RoTxn<'_, WithoutTls>, StorageError> {
    env.read_txn()
        .map_err(|e| StorageError::lmdb(Table::Environment, Verb::Read, e))
}

fn create_databases(env: &Env<WithoutTls>) -> Result<Databases, StorageError> {
    let mut txn = env
        .write_txn()
        .map_err(|e| StorageError::lmdb(Table::Environment, Verb::Begin, e))?;
    let log = env
        .create_database(&mut txn, Some("log"))
        .map_err(|e| StorageError::lmdb(Table::Log, Verb::Open, e))?;
    let meta = env
        .create_database(&mut txn, Some("meta"))
        .map_err(|e| StorageError::lmdb(Table::Vote, Verb::Open, e))?;
    let snapshot = env
        .create_database(&mut txn, Some("snapshot"))
        .map_err(|e| StorageError::lmdb(Table::Snapshot, Verb::Open, e))?;
    txn.commit()
        .map_err(|e| StorageError::lmdb(Table::Environment, Verb::Commit, e))?;
    Ok(Databases {
        log,
        meta,
        snapshot,
    })
}

/// The raft storage's [`GroupCommit`]: commits each chunk of [`WriteJob`]s in one write
/// transaction, then tells each job how it went. It runs on the `clusterfunk-storage` thread
/// (the storage actor): see [`GroupWriter`]. When every store handle is gone it writes the newest
/// committed log id if no batch carried it yet.
struct RaftCommitter {
    env: Env<WithoutTls>,
    dbs: Databases,
    committed: Arc<Mutex<CommittedSlot>>,
    /// After one failed batch every later job fails too: raft forbids applying a later write
    /// when an earlier one is lost (it would leave a hole in the log or reorder vote and log).
    failure: Option<StorageError>,
}

impl GroupCommit for RaftCommitter {
    type Job = WriteJob;

    fn commit(&mut self, batch: Vec<WriteJob>) {
        let result = match &self.failure {
            Some(cause) => Err(StorageError::Stopped {
                cause: Box::new(cause.clone()),
            }),
            None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_batch(&self.env, self.dbs, &self.committed, &batch)
            }))
            // A panic while committing (a bug) aborted the transaction: the writer cannot go on.
            .unwrap_or(Err(StorageError::WriterGone)),
        };
        if let (Err(error), None) = (&result, &self.failure) {
            tracing::error!(%error, "storage write failed; refusing all further writes");
            self.failure = Some(error.clone());
        }
        for job in batch {
            (job.done)(result.clone());
        }
    }

    fn close(&mut self) {
        if self.failure.is_none() && lock(&self.committed).unwritten().is_some() {
            if let Err(error) = commit_batch(&self.env, self.dbs, &self.committed, &[]) {
                tracing::warn!(%error, "could not save the committed log id at close; it is re-learned from the leader");
            }
        }
        tracing::debug!("storage actor stopping: all store handles dropped");
    }
}

fn commit_batch(
    env: &Env<WithoutTls>,
    dbs: Databases,
    committed: &Mutex<CommittedSlot>,
    batch: &[WriteJob],
) -> Result<(), StorageError> {
    let mut txn = env
        .write_txn()
        .map_err(|e| StorageError::lmdb(Table::Environment, Verb::Begin, e))?;
    for op in batch.iter().flat_map(|job| &job.ops) {
        apply_op(&mut txn, dbs, op)?;
    }
    // Taken after the batch was collected: see `CommittedSlot` for why this order matters.
    let unwritten = lock(committed).unwritten();
    if let Some((_, value)) = &unwritten {
        dbs.meta
            .put(&mut txn, COMMITTED_KEY, value)
            .map_err(|e| StorageError::lmdb(Table::Committed, Verb::Write, e))?;
    }
    // On error the transaction is dropped, which aborts it: nothing of the batch lands.
    txn.commit()
        .map_err(|e| StorageError::lmdb(Table::Environment, Verb::Commit, e))?;
    if let Some((version, _)) = unwritten {
        let mut slot = lock(committed);
        slot.version_on_disk = slot.version_on_disk.max(version);
    }
    Ok(())
}

fn apply_op(txn: &mut RwTxn<'_>, dbs: Databases, op: &WriteOp) -> Result<(), StorageError> {
    match op {
        WriteOp::PutLog { index, value } => dbs
            .log
            .put(txn, index, value)
            .map_err(|e| StorageError::lmdb(Table::Log, Verb::Write, e)),
        WriteOp::DeleteLogFrom { index } => dbs
            .log
            .delete_range(txn, &(*index..))
            .map(drop)
            .map_err(|e| StorageError::lmdb(Table::Log, Verb::Delete, e)),
        WriteOp::DeleteLogThrough { index } => dbs
            .log
            .delete_range(txn, &(..=*index))
            .map(drop)
            .map_err(|e| StorageError::lmdb(Table::Log, Verb::Delete, e)),
        WriteOp::PutMeta { table, key, value } => dbs
            .meta
            .put(txn, key, value)
            .map_err(|e| StorageError::lmdb(*table, Verb::Write, e)),
        WriteOp::PutSnapshot { value } => dbs
            .snapshot
            .put(txn, SNAPSHOT_KEY, value)
            .map_err(|e| StorageError::lmdb(Table::Snapshot, Verb::Write, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: u8) -> Arc<[u8]> {
        Arc::from(vec![b])
    }

    #[test]
    fn unflushed_keeps_entries_replaced_by_a_later_batch() {
        let mut table = Unflushed::default();
        let first = table.insert(&[(1, bytes(1)), (2, bytes(2))]);
        table.remove_from(2);
        let second = table.insert(&[(2, bytes(22))]);
        table.flushed(first, 1, 2);
        let left = table.range((Bound::Unbounded, Bound::Unbounded));
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, 2);
        assert_eq!(&*left[0].1, &[22]);
        table.flushed(second, 2, 2);
        assert!(table.last().is_none());
    }

    #[test]
    fn unflushed_purge_through_max_index_clears_everything() {
        let mut table = Unflushed::default();
        table.insert(&[(u64::MAX, bytes(1))]);
        table.remove_through(u64::MAX);
        assert!(table.last().is_none());
    }
}
