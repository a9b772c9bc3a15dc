//! In-memory storage, **for tests only**.
//!
//! The product rule is that raft logs are persistent: a node that forgets its vote or its log
//! after a restart can vote twice in one term or lose acknowledged entries, which breaks raft's
//! safety. This module exists so unit and simulation tests can run raft without a disk. It has
//! the same types and traits as the LMDB store ([`LogStore`], [`StateMachineStore`]) and encodes
//! entries with the same codec, so whatever passes on it passes the same code paths above the
//! storage layer; only the bytes never reach a disk.

use openraft::RaftTypeConfig;

use super::{LogStore, StateMachineApp, StateMachineStore};

/// Builds an in-memory log store and state machine for `app`. **For tests only**: everything is
/// lost when the last handle is dropped, so a "restarted" node would come back with no vote and
/// no log. Production code uses [`LmdbStore`](super::LmdbStore).
pub fn in_memory_for_tests<C, A>(app: A) -> (LogStore<C>, StateMachineStore<C, A>)
where
    C: RaftTypeConfig,
    A: StateMachineApp<C>,
{
    (LogStore::memory(), StateMachineStore::in_memory(app))
}
