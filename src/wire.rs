//! The node protocol: what travels inside transport payloads between nodes, clients and the
//! command-line tool. One enum each way, encoded with the crate's [`codec`](crate::codec).
//!
//! This module only names the messages; the node's service answers them and the raft network,
//! the admin client and the shard client send them.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::admin::{AdminError, AdminRequest, AdminResponse};
use crate::consensus::TypeConfig;
use crate::error::Error;
use crate::shard_map::NodeId;

/// A request to a node.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft leader election.
    Vote(VoteRequest<NodeId>),
    /// Raft snapshot transfer (one chunk).
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// An operator command; `forwarded` is set when a node passed it on to the leader, which
    /// must then answer it itself (at most one hop).
    Admin {
        /// The command.
        request: AdminRequest,
        /// Whether another node forwarded it.
        forwarded: bool,
    },
    /// A message for the shard owning `key`: `tag` names the message type, `payload` is the
    /// encoded message.
    Shard {
        /// The routing key.
        key: Vec<u8>,
        /// The message's wire tag ([`ShardMessage::TAG`](crate::ShardMessage::TAG)).
        tag: String,
        /// The encoded message.
        payload: Vec<u8>,
    },
}

/// A node's answer to a [`Request`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`Request::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`Request::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// Answer to [`Request::Admin`].
    Admin(Result<AdminResponse, AdminError>),
    /// Answer to [`Request::Shard`]: the encoded reply.
    Shard(Result<Vec<u8>, Error>),
}
