//! Errors at the public boundaries: [`Error`] for `send`, [`ConfigError`] for start-up.
//!
//! Each variant says what happened and what the caller can do next. This module owns no logic;
//! the router and the shard actors decide which error applies.

use std::time::Duration;

use crate::shard_map::{Epoch, NodeId, ShardId};

/// Why a node cannot serve a request right now (protocol rule 1: no map, no service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum NotReadyReason {
    /// The node is still starting and has not installed a shard map yet.
    Starting,
    /// No leader is known, so no shard map can be committed or confirmed.
    NoLeader,
    /// A leader exists but no shard map has been committed yet.
    NoMap,
    /// The node's lease expired; it stopped serving until the leader renews it.
    LeaseExpired,
    /// The shard is being handed from one node to another.
    ShardMoving,
    /// The shard's owner cannot be reached; failover will move its shards.
    OwnerUnreachable,
    /// This node was started with a shard count other than the cluster's: it cannot route.
    ShardCountMismatch,
    /// The node stopped serving for good: its raft storage failed (a full disk, an I/O error).
    /// Its shards fail over to the others; restart it once the disk is fixed.
    // New variants go last: the wire format numbers them in order.
    Stopped,
}

impl std::fmt::Display for NotReadyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotReadyReason::Starting => "the node is starting and has no shard map yet",
            NotReadyReason::NoLeader => "no leader is known",
            NotReadyReason::NoMap => "no shard map has been committed yet",
            NotReadyReason::LeaseExpired => "the node's lease has expired",
            NotReadyReason::ShardMoving => "the shard is moving between nodes",
            NotReadyReason::OwnerUnreachable => "the shard's owner cannot be reached",
            NotReadyReason::ShardCountMismatch => {
                "this node was started with a shard count other than the cluster's; restart it with the cluster's shard count"
            }
            NotReadyReason::Stopped => {
                "the node stopped serving for good because its raft storage failed (see its log); send through another node, and restart it once its disk is fixed"
            }
        })
    }
}

/// The error of [`Node::send`](crate::Node::send) and [`ClusterHandle::send`](crate::ClusterHandle::send).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// The node cannot serve yet or any more (no leader, no map, lease expired). Retry later,
    /// or send through another node.
    #[error("not ready: {reason}; retry shortly or send through another node")]
    NotReady {
        /// Why the node is not ready.
        reason: NotReadyReason,
    },
    /// The shard's mailbox is full: the shard is receiving more than it handles. Back off and
    /// retry, or raise `mailbox_capacity` if the bursts are expected.
    #[error("shard {shard} is overloaded (mailbox full); back off and retry")]
    Overloaded {
        /// The shard whose mailbox was full.
        shard: ShardId,
    },
    /// The handler panicked while handling this message (or an earlier one that was still in
    /// flight). The shard was restarted with fresh state from the handler's constructor; the
    /// message may or may not have taken effect.
    #[error("shard {shard} failed: {reason}; it was restarted with fresh state")]
    ShardFailed {
        /// The shard that failed.
        shard: ShardId,
        /// The panic message or the cause.
        reason: String,
    },
    /// The node is shutting down and takes no new messages. Send through another node.
    #[error("the node is shutting down; send through another node")]
    ShuttingDown,
    /// No reply arrived in time. The message may or may not have taken effect.
    #[error("no reply from shard {shard} within {after:?}; the message may or may not have taken effect")]
    Timeout {
        /// The shard the message was for.
        shard: ShardId,
        /// How long the sender waited.
        after: Duration,
    },
    /// The handler has no method for this message type (only possible through the type-erased
    /// [`ClusterHandle`](crate::ClusterHandle)). Add a method for it to the `#[shard_handler]` block.
    #[error("the shard handler has no method for message `{tag}`; add one to its #[shard_handler] block")]
    UnknownMessage {
        /// The wire tag of the message.
        tag: String,
    },
    /// A handler sent a message to a key of its own shard and would wait for itself forever.
    /// Handle the key's work inline instead.
    #[error("a handler of shard {shard} sent a message to its own shard, which would deadlock; handle it inline")]
    Reentrant {
        /// The shard that tried to send to itself.
        shard: ShardId,
    },
    /// The shard is owned by another node in the newest map this node knows.
    #[error("shard {shard} is owned by node {owner} at epoch {epoch}; send to that node")]
    WrongOwner {
        /// The shard the message was for.
        shard: ShardId,
        /// Its owner in the receiver's newest map.
        owner: NodeId,
        /// The receiver's newest map epoch.
        epoch: Epoch,
    },
    /// The shard's owner could not be reached, or the connection failed after the message was
    /// sent (it may or may not have taken effect).
    #[error("node {node} unreachable: {reason}")]
    Unreachable {
        /// The node (0 when unknown).
        node: NodeId,
        /// What failed.
        reason: String,
    },
    /// A message or reply could not be encoded or decoded. Check that both sides run
    /// compatible message types.
    #[error("codec: {0}; check that sender and receiver use the same message types")]
    Codec(String),
    /// A peer answered outside the protocol (a reply of the wrong kind): a bug, or releases
    /// that do not match. Run the same clusterfunk release on every node and client.
    #[error(
        "protocol violation: {detail}; run the same clusterfunk release on every node and client"
    )]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// An invariant of this node broke (a bug in clusterfunk); the message was not delivered.
    #[error("internal error: {detail}; this is a bug in clusterfunk: please report it with the node's log")]
    Internal {
        /// Which invariant.
        detail: String,
    },
    /// The message may or may not have taken effect, and nobody can tell any more: its shard's
    /// owner stopped answering (frozen, cut off, killed) and the shard moved to another node
    /// while the message was in flight, or an `async` handler finished after its node had
    /// stopped serving the shard (its reply is withheld: it may describe state another node now
    /// owns). Returned at once, when the shard moves, rather than after a timeout. Retry only
    /// if the message is idempotent (idempotent messages are retried for you).
    // New variants go last: the wire format numbers them in order.
    #[error("the outcome of the message to shard {shard} is unknown: its owner failed or the shard moved while it was in flight; retry only if the message is idempotent")]
    OutcomeUnknown {
        /// The shard the message was for.
        shard: ShardId,
    },
    /// A handler tried to send to another key after its node had stopped serving its own shard:
    /// the send was refused (nothing was sent), so a handler that lost its shard cannot act on
    /// its behalf.
    #[error("a handler of shard {shard} sent a message after its node stopped serving that shard; the send was refused")]
    OriginNotServed {
        /// The shard whose handler tried to send.
        shard: ShardId,
    },
    /// A message or its reply is larger than one frame may carry between nodes and clients
    /// (`frame_size_max` less the frame's header). Refused before it was sent, or (for a reply)
    /// instead of the reply: the message was handled, its reply withheld.
    #[error("the {what} of {size} bytes exceeds the limit of {limit} bytes per frame between nodes and clients; keep values smaller (split large ones over several keys)")]
    TooLarge {
        /// `"message"` or `"reply"`.
        what: String,
        /// Its encoded size in bytes.
        size: u64,
        /// The largest payload a frame carries, in bytes.
        limit: u64,
    },
    /// A durable change's key is longer than the node's shard store can keep: the message was
    /// not applied (its handler's in-memory change is dropped and the shard reloads).
    #[error("shard {shard}: a key of {size} bytes is over the shard store's limit of {limit} bytes; the message was not applied: use shorter keys (hash long ones)")]
    KeyTooLong {
        /// The shard.
        shard: ShardId,
        /// The key's length in bytes.
        size: u64,
        /// The store's limit in bytes.
        limit: u64,
    },
    /// The message's key starts with the prefix reserved for the framework's own records
    /// ([`session::RESERVED_PREFIX`](crate::session::RESERVED_PREFIX)): nothing was sent.
    #[error("the key starts with the prefix reserved for clusterfunk's own records (0xff 0xff \"clusterfunk:\"); the message was not sent: use another key")]
    ReservedKey,
    /// A retry carried the id of an applied request with another message, key or payload: a
    /// request id is bound to what it asks, so it was refused and nothing was applied.
    #[error("shard {shard}: request {seq} of this session was applied with another message, key or payload; the retry was refused (a client must not reuse a request id)")]
    RequestIdReused {
        /// The shard.
        shard: ShardId,
        /// The request's number in its session.
        seq: u64,
    },
    /// The request's number is below its session's low watermark: the client said it waits on
    /// nothing below `low`, so the shard dropped those replies and cannot tell whether this
    /// request was applied. It was not applied now.
    #[error("shard {shard}: request {seq} is below its session's low watermark {low} (its client acknowledged it earlier); it was not applied again, and whether its first attempt was is not recorded any more")]
    RequestTooOld {
        /// The shard.
        shard: ShardId,
        /// The request's number in its session.
        seq: u64,
        /// The session's low watermark in the shard.
        low: u64,
    },
    /// A retry older than the session idle time found no record of its session: the record
    /// may have expired, so whether the first attempt was applied is unknown. It was not
    /// applied now; read the state to find out, and raise `session_idle` if retries take
    /// this long.
    #[error("shard {shard}: this retry is older than the session idle time ({idle_ms} ms) and its session has no record here (it may have expired); it was not applied again: read the state to learn whether the first attempt was")]
    SessionExpired {
        /// The shard.
        shard: ShardId,
        /// The node's session idle time, in milliseconds.
        idle_ms: u64,
    },
    /// A retry of a message that is not idempotent reached a shard that keeps no session record
    /// (its handler declares no durable state, or the node has no store): the first attempt's
    /// outcome cannot be known, so the retry was not applied.
    #[error("shard {shard} keeps no record of its requests (its handler has no durable state in a store), so a retry of a message that is not idempotent was not applied; its outcome is unknown")]
    NotRecorded {
        /// The shard.
        shard: ShardId,
    },
}

/// A configuration value out of range, found before the node starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A numeric setting is outside its allowed range.
    #[error("`{name}` is {value}, but it must be {expected}")]
    OutOfRange {
        /// The setting's name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What the value must be.
        expected: &'static str,
    },
    /// A setting was refused for the reason given.
    #[error("`{name}` is invalid: {reason}")]
    Invalid {
        /// The setting's name.
        name: &'static str,
        /// Why it was refused and what to do.
        reason: String,
    },
    /// A required setting was not given.
    #[error("`{name}` is required: {hint}")]
    Missing {
        /// The setting's name.
        name: &'static str,
        /// How to give it.
        hint: &'static str,
    },
    /// The node's zone differs from the zone the cluster's membership records for it (the zone
    /// the allocator places its shards by).
    #[error("node {node} is configured with zone `{configured}` but {record} records it {}: start it with the recorded zone, or remove it (`clusterfunk remove-node --id {node}`) and add it again with `clusterfunk add-node --zone {configured}`", recorded.as_deref().map_or_else(|| "without a zone".to_string(), |zone| format!("in zone `{zone}`")))]
    ZoneMismatch {
        /// The node's id.
        node: NodeId,
        /// The zone the node was configured with.
        configured: String,
        /// The zone the membership records, if any.
        recorded: Option<String>,
        /// Which membership: the initial members, or the cluster's applied membership.
        record: &'static str,
    },
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is out of range or missing.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data dir could not be opened.
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    /// The data dir is in use by another process, or belongs to another node or cluster.
    #[error(transparent)]
    DataDir(#[from] crate::storage::DataDirError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The transport (connections to peers, the server) could not start.
    #[error("the transport could not start: {0}")]
    Transport(#[from] crate::transport::TransportError),
    /// Raft could not start on the opened log.
    #[error("raft could not start: {source}; the log in the data dir may be damaged (see the guide's recovery chapter)")]
    Raft {
        /// openraft's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The initial member list could not be written (bootstrap).
    #[error(
        "cannot bootstrap the cluster: {source}; check the initial member list and start again"
    )]
    Bootstrap {
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The thread that opens the data dir ended without an answer.
    #[error("the storage thread failed: {0}; start again, and report it if it repeats")]
    StorageThread(#[from] tokio::task::JoinError),
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// This process already serves metrics on another address.
    #[error("this process already serves metrics on {existing}; one endpoint per process: use {existing} for every node in it")]
    AlreadyInstalled {
        /// Where the endpoint runs.
        existing: std::net::SocketAddr,
    },
    /// This build of clusterfunk has no Prometheus exporter (its `prometheus` feature is off).
    #[error("cannot serve metrics on {addr}: this build has no Prometheus exporter; enable clusterfunk's `prometheus` feature (on by default) or do not set a metrics address")]
    NotBuilt {
        /// The requested address.
        addr: std::net::SocketAddr,
    },
    /// The exporter could not be built or bound, or its thread not started.
    #[error("cannot serve metrics on {addr}: {source}; is the port free?")]
    Exporter {
        /// The requested address.
        addr: std::net::SocketAddr,
        /// Why: the exporter's or the operating system's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another metrics recorder is installed in this process already (by the application or a
    /// library), so the exporter's cannot be.
    #[error("cannot serve metrics on {addr}: another metrics recorder is installed in this process already; install none yourself, or do not set a metrics address and export the `metrics` crate's values your own way")]
    RecorderInstalled {
        /// The requested address.
        addr: std::net::SocketAddr,
    },
    /// The exporter's thread ended before it reported whether the exporter started.
    #[error("cannot serve metrics on {addr}: the exporter's thread ended before the exporter started; start again, and report it if it repeats")]
    ExporterThreadEnded {
        /// The requested address.
        addr: std::net::SocketAddr,
    },
}
