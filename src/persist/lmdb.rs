//! [`LmdbShardStore`]: a node-local [`ShardStore`] in an LMDB environment of its own.
//!
//! # Layout on disk
//!
//! One LMDB environment in the store's directory (never the raft data dir: the two have separate
//! environments, writers and fsyncs) with two named databases: `fences` (key: shard id as
//! big-endian `u32`; value: the shard's [`Fence`], encoded by the storage codec) and `records`
//! (key: shard id as big-endian `u32`, one tag byte, then the record's key; value: the record's
//! bytes as given). The tag is 0 for the whole-shard record (no key follows) and 1 for a per-key
//! record, so one prefix scan reads or deletes all of a shard.
//!
//! # Threads and group commit
//!
//! Every call is a job for one writer thread, `clusterfunk-persist`, the same group-commit actor
//! the raft storage uses (`storage::group_commit`): whatever jobs are queued, for any shards,
//! land in one write transaction and share one fsync. Each job is checked against its shard's
//! fence inside that transaction, after the jobs before it, so a refused job writes nothing while
//! the others of its group commit; an LMDB failure aborts the whole group and every job in it
//! gets the error. An activation reads the shard's records inside the write transaction too,
//! which is what makes it an atomic load-and-raise (it holds up the group while it reads a
//! large shard).
//!
//! # Node-local
//!
//! The records here are only what this node committed. An activation loads them only in a
//! restart in place ([`Origin::node_local`]); otherwise it drops them in the same transaction
//! and reports [`Origin::Stale`], so stale records can never mix with what the new activation
//! writes.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};
use heed::byteorder::BigEndian;
use heed::types::{Bytes as RawBytes, U32};
use heed::{Database, Env, RoTxn, RwTxn, WithoutTls};
use tokio::sync::oneshot;

use super::error::{StoreError, Table};
use super::fence::{Fence, Origin};
use super::{Batch, Change, Loaded, Locality, Scope, ShardStore};
use crate::shard_map::{Epoch, Key, NodeId, ShardId};
use crate::storage::codec;
use crate::storage::group_commit::{GroupCommit, GroupWriter};
use crate::storage::{open_environment, StoreOptions, Verb};

/// Name of the writer thread, as shown by `top -H`, debuggers and panic messages.
const WRITER_THREAD_NAME: &str = "clusterfunk-persist";

/// Jobs that may wait in the writer's queue; callers past this wait (asynchronously) for room.
const WRITE_QUEUE_JOBS_MAX: usize = 4096;

/// Jobs committed in one write transaction at most, so one fsync never covers an unbounded
/// amount of work and replies are not held back for long.
const BATCH_JOBS_MAX: usize = 512;

/// The named databases: fences and records.
const DATABASES_MAX: u32 = 2;

/// Bytes in front of a record's key: the shard id and the tag.
const RECORD_KEY_PREFIX_BYTES: usize = 5;

/// LMDB's longest key (`mdb_env_get_maxkeysize` with the default build).
const LMDB_KEY_BYTES_MAX: usize = 511;

/// Tag of the whole-shard record.
const STATE_TAG: u8 = 0;
/// Tag of a per-key record.
const RECORD_TAG: u8 = 1;

/// The two named databases (plain ids in heed 0.22, so `Copy`).
#[derive(Clone, Copy)]
pub(super) struct Databases {
    fences: Database<U32<BigEndian>, RawBytes>,
    records: Database<RawBytes, RawBytes>,
}

/// A node-local [`ShardStore`] on LMDB (its [`Locality`] is
/// [`NodeLocal`](Locality::NodeLocal)): keeps every committed value across a restart of the node
/// in place, fsynced before a commit returns (unless [`StoreOptions::sync`] is off). A shard that
/// activates on this node after it was owned elsewhere starts empty ([`Origin::Stale`]); so in a
/// cluster, shard state does not follow a shard to another node. Cheap to clone.
///
/// For restarts in place to find their state, activate with the same epoch as before the restart:
/// the epoch of the map that made this node the shard's owner, not the newest map's epoch (at a
/// newer epoch the shard may have been owned elsewhere in between).
#[derive(Clone)]
pub struct LmdbShardStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    writer: GroupWriter<Job>,
    /// For reads, which need no writer: a read transaction sees the last committed state.
    env: Env<WithoutTls>,
    dbs: Databases,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Commits what is queued, then joins the writer thread, whose clone of the environment
        // is the last: the directory can be opened again as soon as this returns.
        self.writer.shut_down();
    }
}

impl std::fmt::Debug for LmdbShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbShardStore")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl LmdbShardStore {
    /// The longest key a [`Batch`] may hold for this store; longer ones are refused with
    /// [`StoreError::KeyTooLong`].
    pub const KEY_BYTES_MAX: usize = LMDB_KEY_BYTES_MAX - RECORD_KEY_PREFIX_BYTES;

    /// Opens the store in `dir`, creating the directory and the databases if needed, and starts
    /// the `clusterfunk-persist` writer thread.
    ///
    /// Blocking (it maps the file and may create it): call it at start-up or from a blocking
    /// context. `dir` must be a directory of its own (not the node's raft data dir), on a local
    /// file system (LMDB's locking does not work over network file systems), and not open in
    /// another process. The store closes when the last clone is dropped; that drop waits for the
    /// queued commits, after which `dir` can be opened again.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        options
            .validate()
            .map_err(|source| StoreError::InvalidOptions { source })?;
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.to_path_buf(),
            source: Arc::new(source),
        })?;
        let env =
            open_environment(dir, &options, DATABASES_MAX).map_err(|source| match source {
                heed::Error::EnvAlreadyOpened => StoreError::AlreadyOpen {
                    dir: dir.to_path_buf(),
                },
                source => StoreError::lmdb(Table::Environment, Verb::Open, source),
            })?;
        let dbs = create_databases(&env)?;
        let writer = GroupWriter::spawn(
            WRITER_THREAD_NAME,
            WRITE_QUEUE_JOBS_MAX,
            BATCH_JOBS_MAX,
            Committer {
                env: env.clone(),
                dbs,
            },
        )
        .map_err(|source| StoreError::SpawnThread {
            source: Arc::new(source),
        })?;
        tracing::info!(dir = %dir.display(), map_size_bytes = options.map_size_bytes, sync = options.sync, "opened the LMDB shard store");
        Ok(LmdbShardStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                writer,
                env,
                dbs,
            }),
        })
    }

    /// The directory this store was opened in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Queues `job` and waits for its answer on `answer`.
    fn run<T: Send + 'static>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T, StoreError>>,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let inner = Arc::clone(&self.inner);
        async move {
            // A job handed back was never queued: it changed nothing, but the store is closed.
            let queued = inner.writer.submit(job).await;
            // Waiting for the answer needs no store handle: let a drop of the store close it
            // without waiting for this caller.
            drop(inner);
            queued.map_err(|_| StoreError::Closed)?;
            // The writer answers every job it took; a dropped answer means it panicked.
            answer.await.map_err(|_| StoreError::Closed)?
        }
        .boxed()
    }
}

impl ShardStore for LmdbShardStore {
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.run(
            Job::Activate {
                shard,
                owner,
                epoch,
                scope,
                reply,
            },
            answer,
        )
    }

    fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> BoxFuture<'static, Result<Option<Bytes>, StoreError>> {
        // A read transaction on the caller's thread: LMDB readers never wait for the writer.
        future::ready(read_record(
            &self.inner.env,
            self.inner.dbs,
            shard,
            epoch,
            &key,
        ))
        .boxed()
    }

    fn commit(
        &self,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        // Checked before queueing: LMDB would fail the whole group on a key it cannot store.
        if let Some((key, _)) = batch
            .records()
            .find(|(key, _)| key.as_bytes().len() > Self::KEY_BYTES_MAX)
        {
            return future::ready(Err(StoreError::KeyTooLong {
                shard,
                key_bytes: key.as_bytes().len(),
                key_bytes_max: Self::KEY_BYTES_MAX,
            }))
            .boxed();
        }
        let (reply, answer) = oneshot::channel();
        self.run(
            Job::Commit {
                shard,
                epoch,
                batch,
                reply,
            },
            answer,
        )
    }

    fn release(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.run(
            Job::Release {
                shard,
                epoch,
                reply,
            },
            answer,
        )
    }

    fn locality(&self) -> Locality {
        Locality::NodeLocal
    }

    fn key_bytes_max(&self) -> Option<usize> {
        Some(Self::KEY_BYTES_MAX)
    }
}

/// The sender of a job's answer.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One call, queued for the writer thread, with where its answer goes.
pub(super) enum Job {
    /// [`ShardStore::activate`].
    Activate {
        /// The shard.
        shard: ShardId,
        /// The activating node.
        owner: NodeId,
        /// The activation's epoch.
        epoch: Epoch,
        /// What to load.
        scope: Scope,
        /// Where the loaded state goes.
        reply: Reply<Loaded>,
    },
    /// [`ShardStore::commit`].
    Commit {
        /// The shard.
        shard: ShardId,
        /// The committing activation's epoch.
        epoch: Epoch,
        /// The changes.
        batch: Batch,
        /// Where the outcome goes.
        reply: Reply<()>,
    },
    /// [`ShardStore::release`].
    Release {
        /// The shard.
        shard: ShardId,
        /// The releasing activation's epoch.
        epoch: Epoch,
        /// Where the outcome goes.
        reply: Reply<()>,
    },
}

impl Job {
    /// The answer of a job that was not applied because of `error`.
    fn unapplied(self, error: StoreError) -> Answer {
        match self {
            Job::Activate { reply, .. } => Answer::Loaded(reply, Err(error)),
            Job::Commit { reply, .. } | Job::Release { reply, .. } => {
                Answer::Done(reply, Err(error))
            }
        }
    }
}

/// A job's answer, held until its transaction committed or failed.
enum Answer {
    /// An activation's reply and its loaded state (or refusal).
    Loaded(Reply<Loaded>, Result<Loaded, StoreError>),
    /// A commit's or release's reply and its outcome.
    Done(Reply<()>, Result<(), StoreError>),
}

impl Answer {
    /// Sends the answer, or the transaction's failure if it did not commit (then nothing of the
    /// group landed, and a refusal decided against fences that never landed would mislead).
    fn send(self, committed: &Result<(), StoreError>) {
        // The caller may have given up waiting; then nobody needs the answer.
        match self {
            Answer::Loaded(reply, outcome) => {
                let _ = reply.send(committed.clone().and(outcome));
            }
            Answer::Done(reply, outcome) => {
                let _ = reply.send(committed.clone().and(outcome));
            }
        }
    }
}

/// Runs one job's step unless the transaction already failed. The step's outer `Err` is an LMDB
/// failure that dooms the transaction (recorded in `failure`); its inner result is the job's own
/// outcome (a refusal writes nothing).
fn step<T>(
    failure: &mut Option<StoreError>,
    apply: impl FnOnce() -> Result<Result<T, StoreError>, StoreError>,
) -> Result<T, StoreError> {
    if let Some(error) = failure {
        return Err(error.clone());
    }
    apply().unwrap_or_else(|error| {
        *failure = Some(error.clone());
        Err(error)
    })
}

/// The writer thread's [`GroupCommit`]: applies each queued chunk of jobs in one transaction.
pub(super) struct Committer {
    env: Env<WithoutTls>,
    dbs: Databases,
}

impl GroupCommit for Committer {
    type Job = Job;

    fn commit(&mut self, jobs: Vec<Job>) {
        let mut answers = Vec::with_capacity(jobs.len());
        let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.commit_group(jobs, &mut answers)
        }))
        .unwrap_or_else(|_| {
            // A bug: the transaction was aborted while unwinding, so nothing of the group landed.
            tracing::error!(
                "the shard store's writer panicked while committing; the group was aborted"
            );
            Err(StoreError::Closed)
        });
        for answer in answers {
            answer.send(&committed);
        }
    }
}

impl Committer {
    /// Opens the store's databases in `dir` and makes a committer over them, for tests that
    /// commit a group of their choosing on the calling thread.
    #[cfg(test)]
    pub(super) fn open_for_tests(dir: &Path) -> Result<Committer, StoreError> {
        let env = open_environment(dir, &StoreOptions::default(), DATABASES_MAX)
            .map_err(|source| StoreError::lmdb(Table::Environment, Verb::Open, source))?;
        let dbs = create_databases(&env)?;
        Ok(Committer { env, dbs })
    }

    /// Applies `jobs` in order in one write transaction and commits it; pushes each job's answer
    /// onto `answers`. Returns the transaction's result.
    fn commit_group(&self, jobs: Vec<Job>, answers: &mut Vec<Answer>) -> Result<(), StoreError> {
        let mut txn = match self.env.write_txn() {
            Ok(txn) => txn,
            Err(source) => {
                let error = StoreError::lmdb(Table::Environment, Verb::Begin, source);
                answers.extend(jobs.into_iter().map(|job| job.unapplied(error.clone())));
                return Err(error);
            }
        };
        let mut failure = None;
        for job in jobs {
            let answer = match job {
                Job::Activate {
                    shard,
                    owner,
                    epoch,
                    scope,
                    reply,
                } => Answer::Loaded(
                    reply,
                    step(&mut failure, || {
                        self.activate(&mut txn, shard, owner, epoch, scope)
                    }),
                ),
                Job::Commit {
                    shard,
                    epoch,
                    batch,
                    reply,
                } => Answer::Done(
                    reply,
                    step(&mut failure, || {
                        self.commit_one(&mut txn, shard, epoch, batch)
                    }),
                ),
                Job::Release {
                    shard,
                    epoch,
                    reply,
                } => Answer::Done(
                    reply,
                    step(&mut failure, || self.release(&mut txn, shard, epoch)),
                ),
            };
            answers.push(answer);
        }
        match failure {
            // Dropping the transaction aborts it: nothing of the group lands.
            Some(error) => Err(error),
            None => txn
                .commit()
                .map_err(|source| StoreError::lmdb(Table::Environment, Verb::Commit, source)),
        }
    }

    /// Raises the fence and loads (or, if not a restart in place, drops) the shard's records.
    fn activate(
        &self,
        txn: &mut RwTxn<'_>,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> Result<Result<Loaded, StoreError>, StoreError> {
        let previous = match read_fence(self.dbs, txn, shard)? {
            Ok(previous) => previous,
            Err(corrupt) => return Ok(Err(corrupt)),
        };
        let fence = match Fence::activate(previous, shard, owner, epoch) {
            Ok(fence) => fence,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let origin = Origin::node_local(previous, owner, epoch);
        let loaded = if origin.is_loaded() {
            // Read before anything is written, so a damaged record refuses the activation whole.
            match self.load(txn, shard, origin, scope)? {
                Ok(loaded) => loaded,
                Err(corrupt) => return Ok(Err(corrupt)),
            }
        } else {
            self.delete_records(txn, shard)?;
            Loaded::empty(origin)
        };
        self.write_fence(txn, shard, fence)?;
        Ok(Ok(loaded))
    }

    /// Applies a batch if the activation of `epoch` is current.
    fn commit_one(
        &self,
        txn: &mut RwTxn<'_>,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> Result<Result<(), StoreError>, StoreError> {
        let previous = match read_fence(self.dbs, txn, shard)? {
            Ok(previous) => previous,
            Err(corrupt) => return Ok(Err(corrupt)),
        };
        if let Err(refusal) = Fence::check_commit(previous, shard, epoch) {
            return Ok(Err(refusal));
        }
        self.apply_batch(txn, shard, batch)?;
        Ok(Ok(()))
    }

    /// Marks the activation of `epoch` released.
    fn release(
        &self,
        txn: &mut RwTxn<'_>,
        shard: ShardId,
        epoch: Epoch,
    ) -> Result<Result<(), StoreError>, StoreError> {
        let previous = match read_fence(self.dbs, txn, shard)? {
            Ok(previous) => previous,
            Err(corrupt) => return Ok(Err(corrupt)),
        };
        match Fence::release(previous, shard, epoch) {
            Ok(fence) => self.write_fence(txn, shard, fence).map(Ok),
            Err(refusal) => Ok(Err(refusal)),
        }
    }

    fn write_fence(
        &self,
        txn: &mut RwTxn<'_>,
        shard: ShardId,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let bytes = codec::encode(&fence)
            .expect("a fence is two integers and a bool, far below the record limit");
        self.dbs
            .fences
            .put(txn, &shard, &bytes)
            .map_err(|source| StoreError::lmdb(Table::Fences, Verb::Write, source))
    }

    /// Reads every record of the shard. The inner `Err` is a damaged record key.
    fn load(
        &self,
        txn: &RwTxn<'_>,
        shard: ShardId,
        origin: Origin,
        scope: Scope,
    ) -> Result<Result<Loaded, StoreError>, StoreError> {
        let read_error = |source| StoreError::lmdb(Table::Records, Verb::Read, source);
        let mut loaded = Loaded::empty(origin);
        if scope == Scope::State {
            loaded.state = self
                .dbs
                .records
                .get(txn, &record_key(shard, STATE_TAG, &[]))
                .map_err(read_error)?
                .map(Bytes::copy_from_slice);
            return Ok(Ok(loaded));
        }
        let records = self
            .dbs
            .records
            .prefix_iter(txn, &shard.to_be_bytes())
            .map_err(read_error)?;
        for record in records {
            let (key, value) = record.map_err(read_error)?;
            let value = Bytes::copy_from_slice(value);
            match key.get(RECORD_KEY_PREFIX_BYTES - 1) {
                Some(&STATE_TAG) if key.len() == RECORD_KEY_PREFIX_BYTES => {
                    loaded.state = Some(value);
                }
                Some(&RECORD_TAG) => {
                    loaded
                        .records
                        .insert(Key::from(&key[RECORD_KEY_PREFIX_BYTES..]), value);
                }
                Some(_) => {
                    return Ok(Err(StoreError::CorruptRecord {
                        shard,
                        reason: "unknown record tag",
                    }))
                }
                None => {
                    return Ok(Err(StoreError::CorruptRecord {
                        shard,
                        reason: "key without a record tag",
                    }))
                }
            }
        }
        Ok(Ok(loaded))
    }

    /// Deletes every record of the shard (its fence stays).
    fn delete_records(&self, txn: &mut RwTxn<'_>, shard: ShardId) -> Result<(), StoreError> {
        let start = shard.to_be_bytes();
        let end = shard.checked_add(1).map(u32::to_be_bytes);
        let range: (Bound<&[u8]>, Bound<&[u8]>) = (
            Bound::Included(&start[..]),
            match &end {
                Some(end) => Bound::Excluded(&end[..]),
                None => Bound::Unbounded,
            },
        );
        self.dbs
            .records
            .delete_range(txn, &range)
            .map(drop)
            .map_err(|source| StoreError::lmdb(Table::Records, Verb::Delete, source))
    }

    fn apply_batch(
        &self,
        txn: &mut RwTxn<'_>,
        shard: ShardId,
        batch: Batch,
    ) -> Result<(), StoreError> {
        let (state, records) = batch.into_parts();
        let changes = state
            .map(|change| (record_key(shard, STATE_TAG, &[]), change))
            .into_iter()
            .chain(
                records
                    .into_iter()
                    .map(|(key, change)| (record_key(shard, RECORD_TAG, key.as_bytes()), change)),
            );
        for (key, change) in changes {
            match change {
                Change::Put(value) => self
                    .dbs
                    .records
                    .put(txn, &key, &value)
                    .map_err(|source| StoreError::lmdb(Table::Records, Verb::Write, source))?,
                Change::Delete => {
                    self.dbs
                        .records
                        .delete(txn, &key)
                        .map_err(|source| StoreError::lmdb(Table::Records, Verb::Delete, source))?;
                }
            }
        }
        Ok(())
    }
}

/// The shard's fence; the inner `Err` is a record that does not decode.
fn read_fence(
    dbs: Databases,
    txn: &RoTxn<'_, WithoutTls>,
    shard: ShardId,
) -> Result<Result<Option<Fence>, StoreError>, StoreError> {
    let bytes = dbs
        .fences
        .get(txn, &shard)
        .map_err(|source| StoreError::lmdb(Table::Fences, Verb::Read, source))?;
    Ok(bytes
        .map(codec::decode::<Fence>)
        .transpose()
        .map_err(|source| StoreError::CorruptFence {
            shard,
            source: Arc::new(source),
        }))
}

/// [`ShardStore::read`]: the fence check and the record, in one read transaction.
fn read_record(
    env: &Env<WithoutTls>,
    dbs: Databases,
    shard: ShardId,
    epoch: Epoch,
    key: &Key,
) -> Result<Option<Bytes>, StoreError> {
    let txn = env
        .read_txn()
        .map_err(|source| StoreError::lmdb(Table::Environment, Verb::Begin, source))?;
    let fence = read_fence(dbs, &txn, shard)??;
    Fence::check_commit(fence, shard, epoch)?;
    let record = dbs
        .records
        .get(&txn, &record_key(shard, RECORD_TAG, key.as_bytes()))
        .map_err(|source| StoreError::lmdb(Table::Records, Verb::Read, source))?;
    Ok(record.map(Bytes::copy_from_slice))
}

/// The `records` key of a shard's record: shard id (big-endian), tag, key.
fn record_key(shard: ShardId, tag: u8, key: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(RECORD_KEY_PREFIX_BYTES + key.len());
    bytes.extend_from_slice(&shard.to_be_bytes());
    bytes.push(tag);
    bytes.extend_from_slice(key);
    bytes
}

fn create_databases(env: &Env<WithoutTls>) -> Result<Databases, StoreError> {
    let mut txn = env
        .write_txn()
        .map_err(|source| StoreError::lmdb(Table::Environment, Verb::Begin, source))?;
    let fences = env
        .create_database(&mut txn, Some("fences"))
        .map_err(|source| StoreError::lmdb(Table::Fences, Verb::Open, source))?;
    let records = env
        .create_database(&mut txn, Some("records"))
        .map_err(|source| StoreError::lmdb(Table::Records, Verb::Open, source))?;
    txn.commit()
        .map_err(|source| StoreError::lmdb(Table::Environment, Verb::Commit, source))?;
    Ok(Databases { fences, records })
}
