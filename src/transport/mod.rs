//! The network transport: moves opaque byte payloads between nodes (and external clients) as
//! requests and responses over TCP.
//!
//! What it owns: framing and the codec (length-delimited frames, bincode headers, size limits),
//! the handshake that checks protocol version and cluster name and authenticates both sides with
//! the shared cluster secret and derives the per-connection keys that authenticate every later
//! frame with its sequence number, one multiplexed connection per peer address with request ids
//! and timeouts, reconnecting with backoff, the server's accept loop and its limits, and fault
//! injection for tests.
//!
//! What it does not own: what payloads mean. Shards, the shard map, raft messages and admin
//! commands are encoded by the layers above, which hand this module bytes and get bytes back.
//!
//! # Using it
//!
//! A server runs a [`Service`] with [`serve`]; a client sends with [`Transport::request`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use clusterfunk::transport::{
//!     serve, PeerInfo, Secret, Service, ServiceError, Transport, TransportConfig,
//! };
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = TransportConfig {
//!     node_id: Some(1),
//!     secret: Secret::from_env()?, // CLUSTERFUNK_SECRET; `None` is insecure mode
//!     ..Default::default()
//! };
//! let echo = |_peer: PeerInfo, payload: Vec<u8>| async move { Ok::<_, ServiceError>(payload) };
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = serve(listener, config.clone(), Arc::new(echo)).await?;
//!
//! let transport = Transport::new(config)?;
//! let answer = transport
//!     .request(server.local_addr(), b"ping".to_vec(), Duration::from_secs(1))
//!     .await?;
//! assert_eq!(answer, b"ping");
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # On the wire
//!
//! Every frame is a 4-byte big-endian length and a body of at most `frame_size_max` bytes:
//! a bincode-encoded header and, for requests and responses, the raw payload (`codec.rs`). A
//! connection starts with the handshake (`handshake.rs`); afterwards the client sends
//! `Request { id }` frames and the server answers each with `Response { id }` or
//! `Failed { id, reason }`, in any order, so that many requests share one connection. An
//! oversized or undecodable frame closes that one connection (logged with the peer and the
//! reason); the server keeps serving everyone else.
//!
//! # Security
//!
//! With a [`Secret`] both sides prove they hold it (HMAC-SHA256 challenge–response); without
//! one (insecure mode) a node talks only to peers that are insecure too. The handshake
//! authenticates; it does not encrypt or protect later frames, so run clusters that cross
//! untrusted networks inside a private network or an encrypted tunnel.
//!
//! # Fault injection
//!
//! [`Transport::faults`] blocks, blackholes or delays destinations for tests; see [`Faults`]
//! for how to partition two nodes or drop one direction of a link.

mod client;
pub(crate) mod codec;
mod config;
mod connection;
mod error;
mod faults;
pub(crate) mod handshake;
pub(crate) mod log_limit;
mod secret;
mod server;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use client::Transport;
#[doc(hidden)]
pub use codec::FramePipe;
pub use config::TransportConfig;
pub use error::{ServiceError, TransportConfigError, TransportError};
pub use faults::Faults;
pub use secret::{Secret, SecretError, SECRET_DISTINCT_MIN, SECRET_ENV_VAR, SECRET_LENGTH_MIN};
pub(crate) use server::serve_with_faults;
pub use server::{serve, PeerInfo, ServerHandle, Service, OVERLOADED};

/// Version of the wire protocol, exchanged in the handshake; peers of different versions refuse
/// each other. Bump it on any change to the frame layout or the handshake.
pub const PROTOCOL_VERSION: u32 = 4;

/// Locks a mutex, ignoring poisoning: the data behind the transport's locks stays consistent
/// even if a holder panicked, since every critical section is a single map operation.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
