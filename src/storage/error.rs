//! [`StorageError`]: what went wrong in the storage layer, where, and what the operator does next.
//!
//! Each error names the table (LMDB database or record) and the verb, like openraft's
//! `StorageIOError`, and converts into `openraft::StorageError` for the raft traits. Errors are
//! `Clone` (sources are behind `Arc`) because one failed LMDB commit fails every write batched
//! into it, and each waiting caller gets its own copy.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::{AnyError, ErrorSubject, ErrorVerb, NodeId, StorageIOError};

use super::codec::CodecError;

/// The stored thing an error is about: an LMDB database or one record in the meta database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Table {
    /// The LMDB environment as a whole (opening it, starting or committing a transaction).
    Environment,
    /// The `log` database: raft log entries keyed by big-endian index.
    Log,
    /// The `vote` record in the `meta` database.
    Vote,
    /// The `committed` record (last committed log id) in the `meta` database.
    Committed,
    /// The `last_purged` record (purge marker) in the `meta` database.
    LastPurged,
    /// The `snapshot` database: the current state-machine snapshot.
    Snapshot,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Environment => "LMDB environment",
            Table::Log => "raft log (database `log`)",
            Table::Vote => "vote (database `meta`, key `vote`)",
            Table::Committed => "committed log id (database `meta`, key `committed`)",
            Table::LastPurged => "purge marker (database `meta`, key `last_purged`)",
            Table::Snapshot => "snapshot (database `snapshot`)",
        })
    }
}

/// What the storage layer was doing when an error occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verb {
    /// Opening the environment or a database.
    Open,
    /// Reading records.
    Read,
    /// Writing records.
    Write,
    /// Deleting records (truncate, purge).
    Delete,
    /// Starting a write transaction.
    Begin,
    /// Committing (and, with `sync`, fsyncing) a write transaction.
    Commit,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Open => "open",
            Verb::Read => "read",
            Verb::Write => "write",
            Verb::Delete => "delete from",
            Verb::Begin => "start a write transaction on",
            Verb::Commit => "commit a write transaction on",
        })
    }
}

/// An error of the storage layer. Every message ends with what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The data directory could not be created.
    #[error("cannot create data dir {}: {source}; check that its parent exists and is writable by this user", dir.display())]
    CreateDir {
        /// The directory that was to be created.
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The LMDB environment in the data directory could not be opened.
    #[error("cannot open the LMDB environment in data dir {}: {source}; {hint}", dir.display())]
    OpenEnvironment {
        /// The data directory.
        dir: PathBuf,
        /// heed's error.
        #[source]
        source: Arc<heed::Error>,
        /// What the operator should check, derived from `source`.
        hint: &'static str,
    },
    /// This process already has the data directory open.
    #[error("data dir {} is already open in this process; drop the other LmdbStore and every LogStore and StateMachineStore made from it before opening it again", dir.display())]
    AlreadyOpen {
        /// The data directory.
        dir: PathBuf,
    },
    /// The [`StoreOptions`](super::StoreOptions) are unusable.
    #[error("invalid storage options: {reason}")]
    InvalidOptions {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// LMDB failed while reading or writing.
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
    /// A stored record does not decode: the data directory is damaged or was written by an
    /// incompatible build.
    #[error("corrupt record in the {table} at key {key}: {source}; this node's data dir is damaged or was written by an incompatible version: move it aside and re-add the node so it catches up from its peers")]
    Corrupt {
        /// Where the record is.
        table: Table,
        /// The record's key, for the operator to inspect (e.g. with `mdb_dump`).
        key: String,
        /// Why it does not decode.
        #[source]
        source: Arc<CodecError>,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode a record for the {table}: {source}; this is a bug in the value's Serialize impl or the value is too large, please report it")]
    Encode {
        /// Where the record was to be stored.
        table: Table,
        /// Why it could not be encoded.
        #[source]
        source: Arc<CodecError>,
    },
    /// A snapshot received from the leader does not decode into the application state.
    #[error("received snapshot {snapshot_id} does not decode: {source}; the leader runs an incompatible version or the transfer was damaged: check that all nodes run the same release")]
    BadSnapshot {
        /// The snapshot's id.
        snapshot_id: String,
        /// Why it does not decode.
        #[source]
        source: Arc<CodecError>,
    },
    /// An earlier write failed; since raft forbids skipping a write, all later writes fail too.
    #[error("storage refuses writes since an earlier write failed ({cause}); fix that cause and restart the node")]
    Stopped {
        /// The first failure.
        cause: Box<StorageError>,
    },
    /// The storage thread could not be started.
    #[error("cannot start the storage thread: {source}; the process is out of threads or memory: check ulimit -u and free memory")]
    SpawnThread {
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The storage thread is gone (it panicked, or the store is being dropped).
    #[error("the storage thread `clusterfunk-storage` has exited; restart the node and see earlier log lines for why it stopped")]
    WriterGone,
}

impl StorageError {
    pub(crate) fn lmdb(table: Table, verb: Verb, source: heed::Error) -> Self {
        let hint = hint_for(&source);
        StorageError::Lmdb {
            table,
            verb,
            source: Arc::new(source),
            hint,
        }
    }

    pub(crate) fn open_environment(dir: &std::path::Path, source: heed::Error) -> Self {
        StorageError::OpenEnvironment {
            dir: dir.to_path_buf(),
            hint: hint_for(&source),
            source: Arc::new(source),
        }
    }

    pub(crate) fn corrupt(table: Table, key: impl fmt::Display, source: CodecError) -> Self {
        StorageError::Corrupt {
            table,
            key: key.to_string(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn encode(table: Table, source: CodecError) -> Self {
        StorageError::Encode {
            table,
            source: Arc::new(source),
        }
    }

    /// The table this error is about, if it is about one.
    pub fn table(&self) -> Option<Table> {
        match self {
            StorageError::Lmdb { table, .. }
            | StorageError::Corrupt { table, .. }
            | StorageError::Encode { table, .. } => Some(*table),
            StorageError::BadSnapshot { .. } => Some(Table::Snapshot),
            StorageError::Stopped { cause } => cause.table(),
            _ => None,
        }
    }

    fn openraft_verb(&self) -> ErrorVerb {
        match self {
            StorageError::Lmdb { verb, .. } => match verb {
                Verb::Read => ErrorVerb::Read,
                Verb::Delete => ErrorVerb::Delete,
                Verb::Open | Verb::Write | Verb::Begin | Verb::Commit => ErrorVerb::Write,
            },
            StorageError::Corrupt { .. } | StorageError::BadSnapshot { .. } => ErrorVerb::Read,
            _ => ErrorVerb::Write,
        }
    }
}

/// Turns a heed error into advice for the operator.
pub(crate) fn hint_for(error: &heed::Error) -> &'static str {
    use heed::MdbError;
    match error {
        heed::Error::Mdb(MdbError::MapFull) => {
            "the data file reached StoreOptions::map_size_bytes: raise it and restart the node"
        }
        heed::Error::Mdb(MdbError::ReadersFull) => {
            "too many concurrent LMDB readers: check for leaked read transactions, then restart the node"
        }
        heed::Error::Mdb(
            MdbError::Corrupted | MdbError::Invalid | MdbError::VersionMismatch | MdbError::PageNotFound,
        ) => "the data file is damaged or from another LMDB version: move the data dir aside and re-add the node",
        heed::Error::Io(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            "data dir not writable: check the permissions of the data dir and its files"
        }
        heed::Error::Io(e) if e.kind() == io::ErrorKind::StorageFull => {
            "the disk is full: free space on the data dir's file system and restart the node"
        }
        heed::Error::EnvAlreadyOpened => {
            "the data dir is already open in this process: drop the other store first"
        }
        _ => "check free disk space, the data dir's permissions and the system log, then restart the node",
    }
}

impl<NID: NodeId> From<StorageError> for openraft::StorageError<NID> {
    fn from(error: StorageError) -> Self {
        let subject = match error.table() {
            Some(Table::Log) => ErrorSubject::Logs,
            Some(Table::Vote) => ErrorSubject::Vote,
            Some(Table::Snapshot) => ErrorSubject::Snapshot(None),
            Some(Table::Committed | Table::LastPurged | Table::Environment) | None => {
                ErrorSubject::Store
            }
        };
        let verb = error.openraft_verb();
        openraft::StorageError::IO {
            source: StorageIOError::new(subject, verb, AnyError::new(&error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_full_tells_operator_to_raise_the_map_size() {
        let error = StorageError::lmdb(
            Table::Log,
            Verb::Commit,
            heed::Error::Mdb(heed::MdbError::MapFull),
        );
        let message = error.to_string();
        assert!(message.contains("raft log"), "{message}");
        assert!(message.contains("map_size_bytes"), "{message}");
    }

    #[test]
    fn converts_to_openraft_error_with_subject_of_the_table() {
        let error = StorageError::corrupt(Table::Vote, "vote", CodecError::Empty);
        let raft: openraft::StorageError<u64> = error.into();
        let io = raft.into_io().expect("an IO storage error");
        // StorageIOError has no accessors in openraft 0.9; its Display shows verb and subject.
        let message = io.to_string();
        assert!(message.starts_with("when Read Vote"), "{message}");
        assert!(message.contains("corrupt record"), "{message}");
    }
}
