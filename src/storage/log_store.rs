//! [`LogStore`]: openraft's `RaftLogStorage` and `RaftLogReader` over LMDB (or memory, for tests).
//!
//! Holds the raft log, the vote, the committed log id and the purge marker. It does not apply
//! entries (that is [`StateMachineStore`](super::StateMachineStore)) and knows nothing about what
//! the entries mean.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, Vote};
use serde::de::DeserializeOwned;

use super::codec;
use super::error::{StorageError, Table, Verb};
use super::lmdb::{
    self, lock, Lmdb, WriteOp, COMMITTED_KEY, LAST_PURGED_KEY, READ_BYTES_MAX, VOTE_KEY,
};

/// The raft log store. Cheap to clone; clones share everything (openraft's log reader is a clone).
///
/// Made by [`LmdbStore::log_store`](super::LmdbStore::log_store) (durable) or by
/// [`memory::in_memory_for_tests`](super::memory::in_memory_for_tests).
///
/// Durability contract (LMDB backend): `append` returns once the entries are queued for the
/// storage thread and readable; its callback reports success only after the write transaction
/// that holds them committed (and was fsynced when [`StoreOptions::sync`](super::StoreOptions)
/// is on). `save_vote`, `truncate` and `purge` return after their commit. All writes reach the
/// disk in the order they were called.
pub struct LogStore<C: RaftTypeConfig> {
    backend: Backend<C>,
}

enum Backend<C: RaftTypeConfig> {
    Lmdb(Arc<Lmdb>),
    Memory(Arc<Mutex<MemoryLog<C>>>),
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        let backend = match &self.backend {
            Backend::Lmdb(lmdb) => Backend::Lmdb(Arc::clone(lmdb)),
            Backend::Memory(memory) => Backend::Memory(Arc::clone(memory)),
        };
        LogStore { backend }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Lmdb(lmdb) => f
                .debug_struct("LogStore")
                .field("lmdb", &lmdb.dir())
                .finish(),
            Backend::Memory(_) => f.debug_struct("LogStore").field("memory", &true).finish(),
        }
    }
}

/// The in-memory backend: the same records, encoded the same way, in maps. Entries are kept
/// encoded so tests exercise the codec (a command that does not round-trip fails in tests too).
pub(crate) struct MemoryLog<C: RaftTypeConfig> {
    entries: BTreeMap<u64, Arc<[u8]>>,
    vote: Option<Vote<C::NodeId>>,
    committed: Option<LogId<C::NodeId>>,
    last_purged: Option<LogId<C::NodeId>>,
}

impl<C: RaftTypeConfig> LogStore<C> {
    pub(crate) fn lmdb(lmdb: Arc<Lmdb>) -> Self {
        LogStore {
            backend: Backend::Lmdb(lmdb),
        }
    }

    pub(crate) fn memory() -> Self {
        LogStore {
            backend: Backend::Memory(Arc::new(Mutex::new(MemoryLog {
                entries: BTreeMap::new(),
                vote: None,
                committed: None,
                last_purged: None,
            }))),
        }
    }

    /// Whether this store writes to disk (false only for the test-only in-memory store).
    pub fn is_durable(&self) -> bool {
        matches!(self.backend, Backend::Lmdb(_))
    }

    /// Reads entries in `range`, stopping after `bytes_max` bytes (at least one entry).
    fn read_range(
        &self,
        range: (Bound<u64>, Bound<u64>),
        bytes_max: Option<usize>,
    ) -> Result<Vec<C::Entry>, StorageError> {
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                // Unflushed entries first, then LMDB: see `lmdb::Unflushed` for why this order
                // never misses an entry that is moving from one to the other.
                let pending = lock(&lmdb.unflushed).range(range);
                read_lmdb_range::<C>(lmdb, range, pending, bytes_max)
            }
            Backend::Memory(memory) => {
                let memory = lock(memory);
                let mut entries = Vec::new();
                let mut bytes_total = 0;
                for (index, bytes) in memory.entries.range(range) {
                    entries.push(decode_entry::<C>(*index, bytes)?);
                    bytes_total += bytes.len();
                    if bytes_max.is_some_and(|max| bytes_total >= max) {
                        break;
                    }
                }
                Ok(entries)
            }
        }
    }

    fn log_state(&self) -> Result<LogState<C>, StorageError> {
        let (last_purged_log_id, last) = match &self.backend {
            Backend::Lmdb(lmdb) => {
                let last_purged = lmdb.read_meta(Table::LastPurged, LAST_PURGED_KEY)?;
                let pending = lock(&lmdb.unflushed).last();
                let last = match pending {
                    Some((index, bytes)) => Some(decode_entry::<C>(index, &bytes)?),
                    None => last_lmdb_entry::<C>(lmdb)?,
                };
                (last_purged, last)
            }
            Backend::Memory(memory) => {
                let memory = lock(memory);
                let last = match memory.entries.last_key_value() {
                    Some((index, bytes)) => Some(decode_entry::<C>(*index, bytes)?),
                    None => None,
                };
                (memory.last_purged.clone(), last)
            }
        };
        let last_log_id = last
            .map(|entry| entry.get_log_id().clone())
            .or_else(|| last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }
}

impl<C: RaftTypeConfig> LogStore<C> {
    /// `append` with a plain completion instead of openraft's `LogFlushed` (which only openraft
    /// can construct): returns once the entries are readable, and calls `flushed` once they are
    /// durable or failed to be written.
    pub(crate) async fn append_then<I>(
        &self,
        entries: I,
        flushed: impl FnOnce(Result<(), StorageError>) + Send + 'static,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = C::Entry>,
    {
        let encoded = entries
            .into_iter()
            .map(|entry| encode_entry::<C>(&entry))
            .collect::<Result<Vec<_>, _>>()?;
        let (Some((first, _)), Some((last, _))) = (encoded.first(), encoded.last()) else {
            flushed(Ok(()));
            return Ok(());
        };
        let (first, last) = (*first, *last);
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                let batch = lock(&lmdb.unflushed).insert(&encoded);
                let unflushed = Arc::clone(&lmdb.unflushed);
                let done: lmdb::Completion = Box::new(move |result| {
                    // Committed entries are now readable from LMDB; failed ones must not stay
                    // readable either (the store refuses writes from now on anyway).
                    lock(&unflushed).flushed(batch, first, last);
                    flushed(result);
                });
                let ops = encoded
                    .into_iter()
                    .map(|(index, value)| WriteOp::PutLog { index, value })
                    .collect();
                if let Err(error) = lmdb.submit(ops, done).await {
                    // The job never reached the queue, so its completion will not run.
                    lock(&lmdb.unflushed).flushed(batch, first, last);
                    return Err(error);
                }
            }
            Backend::Memory(memory) => {
                lock(memory).entries.extend(encoded);
                flushed(Ok(()));
            }
        }
        Ok(())
    }
}

fn encode_entry<C: RaftTypeConfig>(entry: &C::Entry) -> Result<(u64, Arc<[u8]>), StorageError> {
    let bytes = codec::encode(entry).map_err(|e| StorageError::encode(Table::Log, e))?;
    Ok((entry.get_log_id().index, Arc::from(bytes)))
}

/// Decodes an entry and checks that it is stored under its own index, which catches records
/// copied or written under the wrong key.
fn decode_entry<C: RaftTypeConfig>(index: u64, bytes: &[u8]) -> Result<C::Entry, StorageError> {
    let entry: C::Entry =
        codec::decode(bytes).map_err(|e| StorageError::corrupt(Table::Log, index, e))?;
    let found = entry.get_log_id().index;
    if found != index {
        return Err(StorageError::corrupt(
            Table::Log,
            index,
            codec::CodecError::WrongKey { found },
        ));
    }
    Ok(entry)
}

fn decode_meta<T: DeserializeOwned>(
    table: Table,
    key: &str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    codec::decode(bytes).map_err(|e| StorageError::corrupt(table, key, e))
}

fn encode_meta<T: serde::Serialize>(table: Table, value: &T) -> Result<Vec<u8>, StorageError> {
    codec::encode(value).map_err(|e| StorageError::encode(table, e))
}

/// Merges the LMDB entries in `range` with the not-yet-committed ones (which win on equal
/// index, being newer), in index order, stopping after `bytes_max` bytes.
fn read_lmdb_range<C: RaftTypeConfig>(
    lmdb: &Lmdb,
    range: (Bound<u64>, Bound<u64>),
    pending: Vec<(u64, Arc<[u8]>)>,
    bytes_max: Option<usize>,
) -> Result<Vec<C::Entry>, StorageError> {
    let txn = lmdb.read_txn()?;
    let read_error = |e| StorageError::lmdb(Table::Log, Verb::Read, e);
    let mut stored = lmdb
        .databases()
        .log
        .range(&txn, &range)
        .map_err(read_error)?;
    let mut pending = pending.into_iter();
    let mut stored_next = stored.next().transpose().map_err(read_error)?;
    let mut pending_next = pending.next();
    let mut entries = Vec::new();
    let mut bytes_total = 0;
    loop {
        let use_pending = match (&stored_next, &pending_next) {
            (None, None) => break,
            (Some((stored_index, _)), Some((pending_index, _))) => pending_index <= stored_index,
            (None, Some(_)) => true,
            (Some(_), None) => false,
        };
        let length = if use_pending {
            let Some((index, bytes)) = pending_next.take() else {
                break;
            };
            if matches!(&stored_next, Some((stored_index, _)) if *stored_index == index) {
                stored_next = stored.next().transpose().map_err(read_error)?;
            }
            pending_next = pending.next();
            entries.push(decode_entry::<C>(index, &bytes)?);
            bytes.len()
        } else {
            let Some((index, bytes)) = stored_next.take() else {
                break;
            };
            entries.push(decode_entry::<C>(index, bytes)?);
            stored_next = stored.next().transpose().map_err(read_error)?;
            bytes.len()
        };
        bytes_total += length;
        if bytes_max.is_some_and(|max| bytes_total >= max) {
            break;
        }
    }
    Ok(entries)
}

fn last_lmdb_entry<C: RaftTypeConfig>(lmdb: &Lmdb) -> Result<Option<C::Entry>, StorageError> {
    let txn = lmdb.read_txn()?;
    let last = lmdb
        .databases()
        .log
        .last(&txn)
        .map_err(|e| StorageError::lmdb(Table::Log, Verb::Read, e))?;
    last.map(|(index, bytes)| decode_entry::<C>(index, bytes))
        .transpose()
}

fn to_bounds(range: &impl RangeBounds<u64>) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, openraft::StorageError<C::NodeId>> {
        Ok(self.read_range(to_bounds(&range), None)?)
    }

    /// Like `try_get_log_entries`, but stops after about 4 MiB of entries (always returning at
    /// least one entry of a non-empty range), so one replication request stays bounded.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, openraft::StorageError<C::NodeId>> {
        Ok(self.read_range(to_bounds(&(start..end)), Some(READ_BYTES_MAX))?)
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, openraft::StorageError<C::NodeId>> {
        Ok(self.log_state()?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(
        &mut self,
        vote: &Vote<C::NodeId>,
    ) -> Result<(), openraft::StorageError<C::NodeId>> {
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                let value = encode_meta(Table::Vote, vote)?;
                lmdb.write(vec![WriteOp::PutMeta {
                    table: Table::Vote,
                    key: VOTE_KEY,
                    value,
                }])
                .await?;
            }
            Backend::Memory(memory) => lock(memory).vote = Some(vote.clone()),
        }
        Ok(())
    }

    async fn read_vote(
        &mut self,
    ) -> Result<Option<Vote<C::NodeId>>, openraft::StorageError<C::NodeId>> {
        match &self.backend {
            Backend::Lmdb(lmdb) => Ok(lmdb.read_meta(Table::Vote, VOTE_KEY)?),
            Backend::Memory(memory) => Ok(lock(memory).vote.clone()),
        }
    }

    /// Records the committed log id so that after a restart openraft re-applies the committed
    /// entries past the last snapshot.
    ///
    /// Returns at once without a write of its own: the value joins the next transaction the
    /// storage thread commits (see `lmdb::CommittedSlot` for why that is safe and why a separate
    /// fsync per commit would halve the write rate). `read_committed` sees it immediately.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), openraft::StorageError<C::NodeId>> {
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                let value = encode_meta(Table::Committed, &committed)?;
                lock(&lmdb.committed).save(value);
            }
            Backend::Memory(memory) => lock(memory).committed = committed,
        }
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, openraft::StorageError<C::NodeId>> {
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                let saved = lock(&lmdb.committed).value().map(<[u8]>::to_vec);
                match saved {
                    // The record holds an `Option<LogId>` (openraft may save `None`).
                    Some(bytes) => Ok(decode_meta::<Option<LogId<C::NodeId>>>(
                        Table::Committed,
                        COMMITTED_KEY,
                        &bytes,
                    )?),
                    None => Ok(None),
                }
            }
            Backend::Memory(memory) => Ok(lock(memory).committed.clone()),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), openraft::StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let flushed = move |result: Result<(), StorageError>| {
            callback.log_io_completed(result.map_err(io::Error::other));
        };
        Ok(self.append_then(entries, flushed).await?)
    }

    async fn truncate(
        &mut self,
        log_id: LogId<C::NodeId>,
    ) -> Result<(), openraft::StorageError<C::NodeId>> {
        tracing::debug!(%log_id, "truncating the raft log from this entry on");
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                lock(&lmdb.unflushed).remove_from(log_id.index);
                lmdb.write(vec![WriteOp::DeleteLogFrom {
                    index: log_id.index,
                }])
                .await?;
            }
            Backend::Memory(memory) => {
                lock(memory).entries.split_off(&log_id.index);
            }
        }
        Ok(())
    }

    async fn purge(
        &mut self,
        log_id: LogId<C::NodeId>,
    ) -> Result<(), openraft::StorageError<C::NodeId>> {
        tracing::debug!(%log_id, "purging the raft log up to this entry");
        match &self.backend {
            Backend::Lmdb(lmdb) => {
                lock(&lmdb.unflushed).remove_through(log_id.index);
                // Marker and deletion in one transaction: after a crash either both happened or
                // neither did.
                let value = encode_meta(Table::LastPurged, &log_id)?;
                lmdb.write(vec![
                    WriteOp::PutMeta {
                        table: Table::LastPurged,
                        key: LAST_PURGED_KEY,
                        value,
                    },
                    WriteOp::DeleteLogThrough {
                        index: log_id.index,
                    },
                ])
                .await?;
            }
            Backend::Memory(memory) => {
                let mut memory = lock(memory);
                memory.last_purged = Some(log_id.clone());
                match log_id.index.checked_add(1) {
                    Some(next) => memory.entries = memory.entries.split_off(&next),
                    None => memory.entries.clear(),
                }
            }
        }
        Ok(())
    }
}
