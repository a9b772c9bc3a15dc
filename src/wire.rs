//! The node protocol: what travels inside transport payloads between nodes, clients and the
//! command-line tool. One enum each way, encoded with the crate's [`codec`](crate::codec).
//!
//! This module only names the messages; the node's service answers them and the raft network,
//! the admin client and the shard client send them.

use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::admin::{AdminError, AdminRequest, AdminResponse};
use crate::codec::Handoff;
use crate::consensus::{Command, CommandResponse, TypeConfig};
use crate::error::Error;
use crate::lease::{LeaseGrant, LeaseRefusal, RenewLease};
use crate::session::Once;
use crate::shard_map::{NodeId, ShardId};

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
    /// A message forwarded by another node, which routed it here under its map `epoch`: served
    /// here or answered with `WrongOwner`, never forwarded again.
    Forward {
        /// The routing key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The message's wire tag.
        tag: String,
        /// The encoded message.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// The sender's map epoch.
        epoch: u64,
    },
    /// A lease renewal, to the leader.
    RenewLease(RenewLease),
    /// The state of shards handed over by their previous owner (planned moves).
    Handoff {
        /// The previous owner.
        from: NodeId,
        /// The allocation epoch of the moves.
        epoch: u64,
        /// Each shard with its snapshot (none when the shard was never active there).
        shards: Vec<(ShardId, Option<Handoff>)>,
    },
    /// A command for the leader to propose (a release, from the node that released).
    Propose(Command),
    /// The routing information clients need: shard count, owners and addresses.
    Routing,
    /// A message for the shard owning `key`, from a client: the node forwards it to the owner if
    /// needed. `tag` names the message type, `payload` is the encoded message.
    Shard {
        /// The routing key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The message's wire tag ([`ShardMessage::TAG`](crate::ShardMessage::TAG)).
        tag: String,
        /// The encoded message.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// One piece of a shard's snapshot too large for one [`Request::Handoff`]: the pieces of
    /// one snapshot arrive in order, and the last one makes it complete.
    HandoffChunk {
        /// The previous owner.
        from: NodeId,
        /// The allocation epoch of the move.
        epoch: u64,
        /// The shard.
        shard: ShardId,
        /// Where this piece starts in the snapshot.
        offset: u64,
        /// The snapshot's whole length.
        total: u64,
        /// The piece.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The routing information, as soon as the node's map is newer than `epoch` (or after
    /// `WATCH_HOLD` without a change): clients hold one open to learn map changes promptly,
    /// so requests to a shard whose owner failed follow the shard.
    WatchRouting {
        /// The map epoch the client already has.
        epoch: u64,
    },
    /// [`Request::Shard`] from a client that routed it under map `epoch`: a node whose own
    /// map is older waits (bounded) until it has caught up before it routes the message, so
    /// that it never forwards to an owner the client already knows is gone.
    ShardAt {
        /// The routing key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The message's wire tag.
        tag: String,
        /// The encoded message.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// The client's map epoch (0 when it has none).
        epoch: u64,
    },
    /// [`Request::ShardAt`] with a request id: a durable shard applies it at most once and
    /// answers its retries from its session record ([`crate::session`]).
    ShardOnce {
        /// The routing key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The message's wire tag.
        tag: String,
        /// The encoded message.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// The client's map epoch (0 when it has none).
        epoch: u64,
        /// The request's id, the client's low watermark and the attempt.
        once: Once,
    },
    /// [`Request::Forward`] of a request with an id ([`Request::ShardOnce`], or a handler's
    /// send while it handled one).
    ForwardOnce {
        /// The routing key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The message's wire tag.
        tag: String,
        /// The encoded message.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// The sender's map epoch.
        epoch: u64,
        /// The request's id, its client's low watermark and the attempt.
        once: Once,
        /// The digest the first node computed from the client's own bytes (this payload was
        /// encoded again, and a map's entries may come out in another order).
        digest: [u8; 16],
    },
}

/// A raft error as it crosses the wire. Flat on purpose: openraft's own errors carry a chain of
/// causes (`AnyError::source`) that a decoder follows one stack frame per level, so a peer could
/// send a few hundred kilobytes of nested causes and overflow the stack of whoever decodes the
/// answer (found by reading the code while fuzzing the decoders).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteRaftError {
    /// The peer's raft has stopped: shut down (`stopped`), or failed on a fatal error, whose
    /// message (cut to 4 KiB) is given.
    Fatal {
        /// Shut down normally rather than failed.
        stopped: bool,
        /// What failed, in words.
        message: String,
    },
    /// An install-snapshot segment was not the one the peer expected.
    SnapshotMismatch(SnapshotMismatch),
}

/// Longest message of a [`RemoteRaftError::Fatal`].
const REMOTE_MESSAGE_MAX: usize = 4096;

impl RemoteRaftError {
    /// The wire form of a raft error whose API error `E` is flattened by `api`.
    pub(crate) fn flatten<E>(error: RaftError<NodeId, E>, api: impl FnOnce(E) -> Self) -> Self
    where
        E: std::error::Error,
    {
        match error {
            RaftError::APIError(error) => api(error),
            RaftError::Fatal(Fatal::Stopped) => RemoteRaftError::Fatal {
                stopped: true,
                message: "raft stopped".to_owned(),
            },
            RaftError::Fatal(fatal) => {
                let mut message = fatal.to_string();
                if message.len() > REMOTE_MESSAGE_MAX {
                    let mut cut = REMOTE_MESSAGE_MAX;
                    while !message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    message.truncate(cut);
                }
                RemoteRaftError::Fatal {
                    stopped: false,
                    message,
                }
            }
        }
    }

    /// The wire form of an install-snapshot error.
    pub(crate) fn from_install_snapshot(error: RaftError<NodeId, InstallSnapshotError>) -> Self {
        Self::flatten(error, |InstallSnapshotError::SnapshotMismatch(mismatch)| {
            RemoteRaftError::SnapshotMismatch(mismatch)
        })
    }

    /// The raft error for the caller's openraft; `api` turns a snapshot mismatch into the API
    /// error `E` (`None`: the answer does not fit the request).
    pub(crate) fn into_raft<E>(
        self,
        api: impl FnOnce(SnapshotMismatch) -> Option<E>,
    ) -> RaftError<NodeId, E> {
        match self {
            RemoteRaftError::Fatal { stopped: true, .. } => RaftError::Fatal(Fatal::Stopped),
            RemoteRaftError::Fatal { message, .. } => RaftError::Fatal(remote_fatal(&message)),
            RemoteRaftError::SnapshotMismatch(mismatch) => {
                let message = format!("unexpected snapshot mismatch answer: {mismatch}");
                match api(mismatch) {
                    Some(error) => RaftError::APIError(error),
                    None => RaftError::Fatal(remote_fatal(&message)),
                }
            }
        }
    }
}

/// A peer's fatal raft failure, described by `message`, as the caller's openraft error.
fn remote_fatal(message: &str) -> Fatal<NodeId> {
    Fatal::StorageError(StorageError::IO {
        source: StorageIOError::new(
            ErrorSubject::Store,
            ErrorVerb::Write,
            AnyError::error(format!("on the peer: {message}")),
        ),
    })
}

/// Longest a node holds a [`Request::WatchRouting`] before answering with the unchanged map.
pub const WATCH_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// A node's answer to a [`Request`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RemoteRaftError>),
    /// Answer to [`Request::Vote`].
    Vote {
        /// Raft's answer.
        result: Result<VoteResponse<NodeId>, RemoteRaftError>,
        /// With a granted vote: the time since the voter last received an append from a
        /// leader (or since it started), on its clock, rounded down (the receipt rule).
        since_contact: Option<std::time::Duration>,
    },
    /// Answer to [`Request::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RemoteRaftError>),
    /// Answer to [`Request::Admin`].
    Admin(Result<AdminResponse, AdminError>),
    /// Answer to [`Request::Shard`], [`Request::ShardAt`] and [`Request::Forward`]: the encoded
    /// reply.
    Shard(Result<Vec<u8>, Error>),
    /// Answer to [`Request::RenewLease`].
    Lease(Result<LeaseGrant, LeaseRefusal>),
    /// Answer to [`Request::Handoff`]: the snapshots are kept.
    HandoffAccepted,
    /// Answer to [`Request::Propose`].
    Proposed(Result<CommandResponse, AdminError>),
    /// Answer to [`Request::Routing`] and [`Request::WatchRouting`].
    Routing(RoutingInfo),
    /// Answer to [`Request::HandoffChunk`] when the piece cannot be kept (out of order, or the
    /// snapshot is larger than the receiver accepts).
    HandoffRefused {
        /// Why.
        reason: String,
    },
}

/// What a client needs to route: the shard count, each shard's owner, each owner's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingInfo {
    /// The map epoch.
    pub epoch: u64,
    /// Each shard's owner, by shard (empty before the first map).
    pub owners: Vec<NodeId>,
    /// Each member's address.
    pub addrs: Vec<(NodeId, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same fields without `serde_bytes`: byte strings must encode exactly as sequences of
    /// bytes did, so nodes built before and after the change understand each other.
    #[derive(Serialize)]
    enum PlainRequest {
        #[allow(dead_code)]
        AppendEntries(()),
        #[allow(dead_code)]
        Vote(()),
        #[allow(dead_code)]
        InstallSnapshot(()),
        #[allow(dead_code)]
        Admin(()),
        Forward {
            key: Vec<u8>,
            tag: String,
            payload: Vec<u8>,
            epoch: u64,
        },
    }

    #[test]
    fn byte_fields_keep_the_layout_of_byte_sequences() {
        let request = Request::Forward {
            key: b"user-42".to_vec(),
            tag: "kv.put".into(),
            payload: vec![1, 2, 3, 250],
            epoch: 7,
        };
        let plain = PlainRequest::Forward {
            key: b"user-42".to_vec(),
            tag: "kv.put".into(),
            payload: vec![1, 2, 3, 250],
            epoch: 7,
        };
        let encoded = crate::codec::encode(&request).expect("encodes");
        assert_eq!(encoded, crate::codec::encode(&plain).expect("encodes"));
        match crate::codec::decode::<Request>(&encoded).expect("decodes") {
            Request::Forward { key, payload, .. } => {
                assert_eq!((key, payload), (b"user-42".to_vec(), vec![1, 2, 3, 250]));
            }
            other => panic!("decoded as {other:?}"),
        }
    }
}
