//! Recovery from a lost quorum: rewrites a stopped node's stored membership so that it forms a
//! new cluster from its own log (what etcd's `--force-new-cluster` does).
//!
//! Raft cannot change its membership without a quorum of the current one, so a cluster that
//! lost a majority of its voters for good is stuck: no leader, no map, every request answers
//! `NotReady`. [`force_new_cluster`] is the way out, run offline (`clusterfunk recover`) on the
//! survivor with the most advanced log (see [`inspect`]):
//!
//! 1. it appends one membership entry naming only the given members, in a term above every term
//!    the node has seen, and records a vote for that term, so the node
//! 2. on its next start campaigns among the new members only (normally itself alone), wins,
//!    commits everything in its log plus the new membership, reallocates the shards of the
//!    members that are gone and serves them after its lease wait. Fresh nodes join with
//!    `add-node`.
//!
//! What may be lost: entries that only the lost majority held (changes committed there but not
//! yet replicated to the survivor). The dead nodes must never run again with their old data
//! dirs: they would still believe in the old membership. Wipe them and add them as new nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, Vote};
use serde::Serialize;

use crate::consensus::{ClusterApp, NodeInfo, TypeConfig};
use crate::shard_map::NodeId;
use crate::storage::{data_dir, DataDirLock, LmdbStore, StorageError, StoreOptions};

/// Why a recovery (or inspection) could not run. Nothing was written unless the message says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The data dir could not be opened or read.
    #[error("cannot read the data dir: {0}")]
    Storage(#[from] StorageError),
    /// openraft's storage interface failed.
    #[error("cannot read or write the raft state: {0}")]
    Raft(#[source] Box<openraft::StorageError<NodeId>>),
    /// The thread that reads or writes the data dir failed (panicked).
    #[error("the storage thread failed: {0}; run the command again, and report it if it repeats")]
    StorageThread(#[source] tokio::task::JoinError),
    /// The thread that writes the data dir stopped before it reported the write done; the
    /// write may or may not have happened.
    #[error("the storage thread stopped before the write; inspect the data dir (--inspect) and run the command again")]
    StorageThreadStopped,
    /// The data dir holds no cluster.
    #[error("{dir} holds no raft log: is it the data dir of a node that was part of a cluster?")]
    Empty {
        /// The data dir.
        dir: String,
    },
    /// The new member list is not usable.
    #[error("invalid --members: {reason}")]
    Members {
        /// What is wrong with it.
        reason: String,
    },
    /// The data dir is in use (a node runs on it) or is not usable.
    #[error(transparent)]
    DataDir(#[from] crate::storage::DataDirError),
    /// The node seems to be running.
    #[error(
        "a process answers at {addr}, this node's address: stop the node before recovering it"
    )]
    Running {
        /// The node's address.
        addr: String,
    },
}

/// What a node's data dir says about its raft state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// The term of the node's vote (the highest term it has seen).
    pub vote_term: u64,
    /// The node the vote went to, if any.
    pub voted_for: Option<NodeId>,
    /// Term and index of the last log entry.
    pub last_log: Option<(u64, u64)>,
    /// The index of the last entry the node knows to be committed.
    pub committed: Option<u64>,
    /// The voters of the node's effective membership (the last one in its log).
    pub voters: BTreeSet<NodeId>,
    /// Every member of that membership, with address and zone.
    pub members: BTreeMap<NodeId, NodeInfo>,
}

/// What [`force_new_cluster`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recovered {
    /// The state before.
    pub before: Inspection,
    /// The term of the new membership entry and vote.
    pub term: u64,
    /// The index of the new membership entry.
    pub index: u64,
    /// The new voters.
    pub voters: BTreeSet<NodeId>,
}

/// Reads the raft state of a stopped node's data dir. Blocking the calling task only briefly;
/// call it from a runtime.
pub async fn inspect(dir: &Path) -> Result<Inspection, RecoverError> {
    let (_lock, store) = open(dir).await?;
    read(&store, dir).await
}

/// Rewrites the stopped node `me`'s stored membership in `dir` to `members` (all voters; `me`
/// among them) so that it forms a new cluster from its own log on its next start. See the
/// module documentation for what this may lose.
pub async fn force_new_cluster(
    dir: &Path,
    me: NodeId,
    members: BTreeMap<NodeId, NodeInfo>,
) -> Result<Recovered, RecoverError> {
    if !members.contains_key(&me) {
        return Err(RecoverError::Members {
            reason: format!("it must include this node ({me}), the survivor being recovered"),
        });
    }
    for (id, info) in &members {
        if info.addr.parse::<SocketAddr>().is_err() {
            return Err(RecoverError::Members {
                reason: format!("node {id}: `{}` is not IP:PORT", info.addr),
            });
        }
    }
    let (_lock, store) = open(dir).await?;
    if let Some(identity) = data_dir::read_identity(dir)? {
        if identity.node_id != me {
            return Err(RecoverError::Members {
                reason: format!(
                    "{} is the data dir of node {}, not node {me}: pass --id {}",
                    dir.display(),
                    identity.node_id,
                    identity.node_id
                ),
            });
        }
    }
    let before = read(&store, dir).await?;
    if let Some(addr) = before
        .members
        .get(&me)
        .and_then(|info| info.addr.parse::<SocketAddr>().ok())
    {
        // LMDB lets two processes open one environment: make sure the node is not running.
        let probe = tokio::net::TcpStream::connect(addr);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), probe).await {
            return Err(RecoverError::Running {
                addr: addr.to_string(),
            });
        }
    }
    let (last_term, last_index) = before.last_log.unwrap_or((0, 0));
    let term = before.vote_term.max(last_term) + 1;
    let index = last_index + 1;
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, me), index),
        payload: EntryPayload::Membership(Membership::new(vec![voters.clone()], members)),
    };
    let mut log = store.log_store::<TypeConfig>();
    // The vote first: a log entry of a term above the vote would be inconsistent if the
    // append were lost.
    log.save_vote(&Vote::new(term, me))
        .await
        .map_err(|e| RecoverError::Raft(Box::new(e)))?;
    let (done, flushed) = tokio::sync::oneshot::channel();
    log.append_then([entry], move |result| {
        let _ = done.send(result);
    })
    .await?;
    flushed
        .await
        .map_err(|_| RecoverError::StorageThreadStopped)??;
    Ok(Recovered {
        before,
        term,
        index,
        voters,
    })
}

/// Locks the data dir (refused while a node runs on it) and opens the store off the async
/// thread (opening maps the file). The store is usable while the lock is held.
async fn open(dir: &Path) -> Result<(DataDirLock, LmdbStore), RecoverError> {
    if !dir.join("data.mdb").exists() {
        return Err(RecoverError::Empty {
            dir: dir.display().to_string(),
        });
    }
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let lock = data_dir::lock(&dir)?;
        let store = LmdbStore::open(&dir, StoreOptions::default())?;
        Ok((lock, store))
    })
    .await
    .map_err(RecoverError::StorageThread)?
}

async fn read(store: &LmdbStore, dir: &Path) -> Result<Inspection, RecoverError> {
    let raft_error = |e| RecoverError::Raft(Box::new(e));
    let mut log = store.log_store::<TypeConfig>();
    let vote = log.read_vote().await.map_err(raft_error)?;
    let committed = log.read_committed().await.map_err(raft_error)?;
    let state = log.get_log_state().await.map_err(raft_error)?;
    let Some(last) = state.last_log_id else {
        return Err(RecoverError::Empty {
            dir: dir.display().to_string(),
        });
    };
    // The effective membership is the last one in the log, else the applied one.
    let mut next = state.last_purged_log_id.map_or(0, |l| l.index + 1);
    let mut from_log = None;
    while next <= last.index {
        // Reads stop after a few MiB: page through the log.
        let entries = log
            .try_get_log_entries(next..=last.index)
            .await
            .map_err(raft_error)?;
        let Some(end) = entries.last().map(|e| e.log_id.index) else {
            break;
        };
        for entry in entries {
            if let EntryPayload::Membership(membership) = entry.payload {
                from_log = Some(membership);
            }
        }
        next = end + 1;
    }
    let membership = match from_log {
        Some(membership) => membership,
        None => {
            // Reading the snapshot blocks: off the async thread.
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                store
                    .state_machine::<TypeConfig, _>(ClusterApp)
                    .map(|machine| machine.applied().membership.membership().clone())
            })
            .await
            .map_err(RecoverError::StorageThread)??
        }
    };
    Ok(Inspection {
        vote_term: vote.as_ref().map_or(0, |v| v.leader_id().term),
        voted_for: vote.as_ref().and_then(|v| v.leader_id().voted_for()),
        last_log: Some((last.leader_id.term, last.index)),
        committed: committed.map(|c| c.index),
        voters: membership.voter_ids().collect(),
        members: membership
            .nodes()
            .map(|(id, info)| (*id, info.clone()))
            .collect(),
    })
}
