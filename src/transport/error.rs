//! Errors of the transport boundary: what a request, a connection or a server start can fail
//! with. Each message says what happened and what to do next.

use std::net::SocketAddr;
use std::time::Duration;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer could not be reached: connecting failed, the handshake did not finish, the
    /// transport is backing off after earlier failures, or a test blocked the destination.
    #[error("cannot reach {addr}: {reason}; check that a node is running at that address and reachable (while reconnecting with backoff, requests fail fast)")]
    Unreachable {
        /// The destination.
        addr: SocketAddr,
        /// What went wrong, in words.
        reason: String,
    },
    /// The peer at the address answered as another node than the one dialled (or as no node):
    /// two nodes share an address, a node was started with another node's id, or the address
    /// in the membership is wrong. Nothing was sent.
    #[error("the peer at {addr} is {}, not node {expected}; nothing was sent. Two nodes may share that address, or the membership lists a wrong address: compare `clusterfunk nodes` with each node's id and listen address (`kv serve --id --listen`)", announced.map_or_else(|| "no node".to_owned(), |id| format!("node {id}")))]
    WrongNode {
        /// The destination.
        addr: SocketAddr,
        /// The node the caller dialled for.
        expected: u64,
        /// The node id the peer announced (`None`: it announced none).
        announced: Option<u64>,
    },
    /// No response arrived within the caller's timeout.
    #[error("no response from {addr} within {after:?}; the peer may still process the request, so retry only if it is idempotent, or raise the timeout")]
    Timeout {
        /// The destination.
        addr: SocketAddr,
        /// The timeout that expired.
        after: Duration,
    },
    /// A handshake refused the connection: wrong or missing secret, another cluster name or
    /// another protocol version. The reason says which, and what to fix.
    #[error("the handshake refused the connection: {reason}")]
    Refused {
        /// Why, in words, including what to fix.
        reason: String,
    },
    /// The connection closed before the response arrived.
    #[error("the connection to {addr} closed before the response arrived; the peer may or may not have processed the request, so retry only if it is idempotent (the next request reconnects)")]
    Closed {
        /// The destination.
        addr: SocketAddr,
    },
    /// A frame was larger than `frame_size_max`.
    #[error("a frame of {len} bytes exceeds the limit of {max} bytes; send smaller payloads, or raise frame_size_max on both sides")]
    FrameTooLarge {
        /// Size of the frame (or an upper bound of it), in bytes.
        len: usize,
        /// The configured limit, in bytes.
        max: usize,
    },
    /// The remote service handled the request and returned an error; the network worked.
    #[error("the remote service failed the request: {reason}; the network worked, so act on the service's reason (\"overloaded\" means retry later)")]
    Remote {
        /// The error string the service returned.
        reason: String,
    },
    /// The peer broke the wire protocol (an undecodable or unexpected frame).
    #[error("protocol violation: {reason}; the connection was closed, make sure both sides run compatible clusterfunk releases")]
    Protocol {
        /// What was wrong, in words.
        reason: String,
    },
    /// The transport configuration is invalid.
    #[error(transparent)]
    Config(#[from] TransportConfigError),
    /// A network I/O operation failed.
    #[error("network I/O failed: {0}; the connection was closed, the next request reconnects")]
    Io(#[from] std::io::Error),
}

/// Why a [`Service`](super::Service) failed a request. The server sends the error's message
/// (its `Display`) to the caller, which receives it as [`TransportError::Remote`]; the cause
/// stays available here through [`std::error::Error::source`] for the server's own logs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request's payload could not be decoded: the peer sent something this service does
    /// not understand (another release, or not a request of this service at all).
    #[error(transparent)]
    Undecodable(Box<dyn std::error::Error + Send + Sync>),
    /// The peer may not send this request. The message starts with
    /// [`NOT_AUTHORIZED`](crate::tls::NOT_AUTHORIZED), which is how callers tell a refusal from
    /// other failures; the source says which rule refused it and what to do.
    #[error("{}: {source}", crate::tls::NOT_AUTHORIZED)]
    NotAuthorized {
        /// Which rule refused the request.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The service's answer could not be encoded.
    #[error(transparent)]
    Encode(Box<dyn std::error::Error + Send + Sync>),
    /// Any other failure of the service.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl ServiceError {
    /// A [`ServiceError::Failed`] with `cause` (an error, or a message: `&str` and `String`
    /// convert too).
    pub fn failed(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Failed(cause.into())
    }
}

/// Why a [`TransportConfig`](super::TransportConfig) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportConfigError {
    /// One field holds a value outside its allowed range.
    #[error(
        "invalid transport configuration: `{field}` {problem}; fix the configuration and restart"
    )]
    Invalid {
        /// The name of the field.
        field: &'static str,
        /// What is wrong with its value and what is allowed.
        problem: String,
    },
}
