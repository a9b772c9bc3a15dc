//! The client side: [`Transport`] keeps one connection per peer address, opens it lazily,
//! and reconnects with capped exponential backoff.
//!
//! This file does not own the wire format, the handshake or the multiplexing of requests over a
//! connection (`connection.rs`).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::codec::{payload_fits, PAYLOAD_OVERHEAD_MAX};
use super::connection::{
    secure_frames, split, split_tls, Connection, FrameReader, FrameWriter, LivenessConfig,
};
use super::{handshake, lock, Faults, TransportConfig, TransportError, PROTOCOL_VERSION};

/// Sends requests to peers and waits for their responses. Clones share the connections: make
/// one per node (or per client) and clone it freely.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use clusterfunk::transport::{Secret, Transport, TransportConfig};
///
/// let transport = Transport::new(TransportConfig {
///     node_id: Some(1),
///     secret: Secret::from_env()?,
///     ..Default::default()
/// })?;
/// let peer = "127.0.0.1:7102".parse()?;
/// let response = transport.request(peer, b"ping".to_vec(), Duration::from_secs(1)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    config: TransportConfig,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    faults: Faults,
    /// Bumped whenever a connection turns unresponsive or responsive again.
    health: tokio::sync::watch::Sender<u64>,
}

/// What the transport knows about one destination.
struct Peer {
    connection: Option<Arc<Connection>>,
    /// Held while connecting, so that concurrent first requests open one connection, not many.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// Consecutive failed connection attempts.
    failures: u32,
    /// No attempt before this instant; requests fail fast until then.
    retry_at: Option<Instant>,
    /// Why the last attempt failed, for the fail-fast error.
    last_error: String,
    /// Whether the last attempt was refused by the handshake (secret, certificate, cluster
    /// name): the fail-fast error is then a refusal too, so callers can tell a configuration
    /// mistake from a node that is down.
    last_refused: bool,
}

impl Peer {
    fn new() -> Self {
        Self {
            connection: None,
            connecting: Arc::new(tokio::sync::Mutex::new(())),
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            last_refused: false,
        }
    }
}

/// What a request should do about its connection.
enum Ready {
    Open(Arc<Connection>),
    Connect(Arc<tokio::sync::Mutex<()>>),
}

impl Transport {
    /// Makes a transport after validating `config`. It opens no connection until the first
    /// request to a peer; it must be used inside a tokio runtime.
    pub fn new(config: TransportConfig) -> Result<Self, TransportError> {
        Self::with_faults(config, Faults::new())
    }

    /// A transport with connections of its own that obeys `faults` (shared with another
    /// transport, so that a test's partition cuts both).
    pub(crate) fn with_faults(
        config: TransportConfig,
        faults: Faults,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                peers: Mutex::new(HashMap::new()),
                faults,
                health: tokio::sync::watch::channel(0).0,
            }),
        })
    }

    /// The configuration this transport was built with.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// Whether `addr` answers: `false` while its connection has requests outstanding and has
    /// heard nothing, not even the answer to a liveness probe, for
    /// [`unresponsive_after`](TransportConfig::unresponsive_after) (the peer is frozen, cut
    /// off without a reset, or stalled). `true` again with the next frame from it, and for an
    /// address without a connection. Callers avoid sending new work to an unresponsive peer.
    pub fn is_responsive(&self, addr: SocketAddr) -> bool {
        lock(&self.inner.peers)
            .get(&addr)
            .and_then(|peer| peer.connection.as_ref())
            .is_none_or(|connection| !connection.is_open() || connection.is_responsive())
    }

    /// A receiver that changes whenever some connection turns unresponsive or responsive
    /// again; await [`changed`](tokio::sync::watch::Receiver::changed) and ask
    /// [`is_responsive`](Self::is_responsive).
    pub fn health_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.health.subscribe()
    }

    /// The fault injection handle of this transport (for tests).
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Sends `payload` to the service at `addr` and waits at most `timeout` for its response.
    ///
    /// Connects first if there is no connection to `addr` (one per address, shared by all
    /// concurrent requests). While `addr` is in reconnect backoff after a failed attempt, fails
    /// at once with [`TransportError::Unreachable`]. The timeout covers connecting too: running out
    /// of it before the connection is open fails with [`TransportError::Unreachable`] (nothing was
    /// sent), after that with [`TransportError::Timeout`] (the outcome is unknown). An empty
    /// payload is refused: it is the liveness probe, which the peer's connection answers itself.
    pub async fn request(
        &self,
        addr: SocketAddr,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.request_to(addr, None, payload, timeout).await
    }

    /// Like [`request`](Self::request), for a destination known to be node `node`: the request
    /// is sent only if the peer at `addr` announced itself as `node` in the handshake
    /// (authenticated by the secret in secret mode), and fails with
    /// [`TransportError::WrongNode`] otherwise, nothing sent. Raft, forwarding, handoff, lease
    /// renewals and routed client requests all dial this way, so a process reached under
    /// another node's address never counts for that node.
    pub async fn request_node(
        &self,
        node: u64,
        addr: SocketAddr,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.request_to(addr, Some(node), payload, timeout).await
    }

    /// [`request_node`](Self::request_node) when `node` is known, else
    /// [`request`](Self::request).
    pub(crate) async fn request_to(
        &self,
        addr: SocketAddr,
        node: Option<u64>,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        if payload.is_empty() {
            return Err(TransportError::Protocol {
                reason: "an empty payload is reserved for liveness probes; send at least one byte"
                    .to_owned(),
            });
        }
        let frame_size_max = self.inner.config.frame_size_max;
        if !payload_fits(payload.len(), frame_size_max) {
            return Err(TransportError::FrameTooLarge {
                len: payload.len() + PAYLOAD_OVERHEAD_MAX,
                max: frame_size_max,
            });
        }
        let deadline = Instant::now() + timeout;
        // Nothing is sent until a connection is open: running out of time before that is an
        // unreachable peer (safe to try elsewhere), not a request whose outcome is unknown.
        let connection = match tokio::time::timeout_at(deadline, self.open(addr)).await {
            Ok(connection) => connection?,
            Err(_) => {
                return Err(TransportError::Unreachable {
                    addr,
                    reason: format!(
                        "no connection within {timeout:?} (the peer accepts but does not answer the handshake); nothing was sent"
                    ),
                })
            }
        };
        if let Some(expected) = node {
            let announced = connection.peer_node_id();
            if announced != Some(expected) {
                return Err(TransportError::WrongNode {
                    addr,
                    expected,
                    announced,
                });
            }
        }
        match tokio::time::timeout_at(deadline, self.send_on(addr, &connection, payload)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                addr,
                after: timeout,
            }),
        }
    }

    /// Closes the connection to `addr`, if any, and forgets its backoff. Requests waiting on
    /// it fail with [`TransportError::Closed`]; the next request reconnects.
    pub fn close(&self, addr: SocketAddr) {
        let peer = lock(&self.inner.peers).remove(&addr);
        if let Some(connection) = peer.and_then(|peer| peer.connection) {
            connection.close();
        }
    }

    /// Closes every connection (their tasks end at once) and forgets every peer: what a node
    /// does last when it shuts down. A later request connects again.
    pub fn close_all(&self) {
        let peers = std::mem::take(&mut *lock(&self.inner.peers));
        for connection in peers.into_values().filter_map(|peer| peer.connection) {
            connection.close();
        }
    }

    /// The connection a request to `addr` goes out on, connecting if there is none; fails at
    /// once while the link is blocked ([`Faults::block`]).
    async fn open(&self, addr: SocketAddr) -> Result<Arc<Connection>, TransportError> {
        if self.inner.faults.get(addr).blocked {
            self.drop_blocked_connection(addr);
            return Err(TransportError::Unreachable {
                addr,
                reason: "blocked by fault injection (Faults::block)".to_owned(),
            });
        }
        self.connection(addr).await
    }

    /// Sends `payload` on `connection` and waits for the answer, after the faults injected for
    /// the link: a delay ([`Faults::set_delay`]: the request is on its way meanwhile) and a
    /// blackhole ([`Faults::blackhole_requests`]: lost on the way, never answered; the caller's
    /// timeout ends the wait, as for a real loss).
    async fn send_on(
        &self,
        addr: SocketAddr,
        connection: &Connection,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let delay = self.inner.faults.get(addr).delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.inner.faults.get(addr).requests_blackholed {
            return std::future::pending().await;
        }
        connection.call(payload).await
    }

    fn drop_blocked_connection(&self, addr: SocketAddr) {
        let connection = lock(&self.inner.peers)
            .get_mut(&addr)
            .and_then(|peer| peer.connection.take());
        if let Some(connection) = connection {
            connection.close_blocked();
        }
    }

    /// The open connection to `addr`, connecting if there is none.
    async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>, TransportError> {
        let connecting = match self.ready(addr)? {
            Ready::Open(connection) => return Ok(connection),
            Ready::Connect(connecting) => connecting,
        };
        let _turn = connecting.lock().await;
        // Whoever held the lock before may have connected, or failed and started a backoff.
        if let Ready::Open(connection) = self.ready(addr)? {
            return Ok(connection);
        }
        let result = connect(
            &self.inner.config,
            addr,
            &self.inner.faults,
            &self.inner.health,
        )
        .await;
        let mut peers = lock(&self.inner.peers);
        let peer = peers.entry(addr).or_insert_with(Peer::new);
        match result {
            Ok(connection) => {
                let connection = Arc::new(connection);
                peer.connection = Some(connection.clone());
                peer.failures = 0;
                peer.retry_at = None;
                debug!(peer = %addr, "connected");
                Ok(connection)
            }
            Err(error) => {
                peer.failures = peer.failures.saturating_add(1);
                let wait = backoff(&self.inner.config, peer.failures);
                peer.retry_at = Some(Instant::now() + wait);
                peer.last_error = match &error {
                    TransportError::Unreachable { reason, .. } => reason.clone(),
                    TransportError::Refused { reason } => reason.clone(),
                    other => other.to_string(),
                };
                peer.last_refused = matches!(error, TransportError::Refused { .. });
                debug!(peer = %addr, %error, failures = peer.failures, ?wait, "connecting failed");
                Err(error)
            }
        }
    }

    fn ready(&self, addr: SocketAddr) -> Result<Ready, TransportError> {
        let mut peers = lock(&self.inner.peers);
        let peer = peers.entry(addr).or_insert_with(Peer::new);
        if let Some(connection) = &peer.connection {
            if connection.is_open() {
                return Ok(Ready::Open(connection.clone()));
            }
            peer.connection = None;
        }
        if let Some(retry_at) = peer.retry_at {
            let now = Instant::now();
            if now < retry_at && peer.last_refused {
                return Err(TransportError::Refused {
                    reason: format!(
                        "{} (the same refusal {} time(s) in a row; the next attempt in {:?})",
                        peer.last_error,
                        peer.failures,
                        retry_at - now
                    ),
                });
            }
            if now < retry_at {
                return Err(TransportError::Unreachable {
                    addr,
                    reason: format!(
                        "{} connection attempt(s) failed, the next one in {:?}; last error: {}",
                        peer.failures,
                        retry_at - now,
                        peer.last_error
                    ),
                });
            }
        }
        Ok(Ready::Connect(peer.connecting.clone()))
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("config", &self.inner.config)
            .field("peers", &lock(&self.inner.peers).len())
            .finish_non_exhaustive()
    }
}

/// Wait before the next attempt after `failures` consecutive failures: the minimum, doubled
/// per further failure, capped at the maximum.
fn backoff(config: &TransportConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    config
        .reconnect_backoff_min
        .saturating_mul(1 << doublings)
        .min(config.reconnect_backoff_max)
}

/// Opens a TCP connection to `addr`, runs the handshake and starts the connection's tasks.
async fn connect(
    config: &TransportConfig,
    addr: SocketAddr,
    faults: &Faults,
    health: &tokio::sync::watch::Sender<u64>,
) -> Result<Connection, TransportError> {
    let stream = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Err(TransportError::Unreachable {
                addr,
                reason: format!("TCP connect failed: {error}"),
            })
        }
        Err(_) => {
            return Err(TransportError::Unreachable {
                addr,
                reason: format!("TCP connect timed out after {:?}", config.connect_timeout),
            })
        }
    };
    // Requests are small and latency-bound; the writer batches on its own.
    stream.set_nodelay(true)?;
    let (mut reader, mut writer, certified) = match &config.tls {
        None => {
            let (reader, writer) = split(stream);
            (reader, writer, None)
        }
        Some(tls) => {
            let (reader, writer, node) = connect_tls(config, tls, addr, stream).await?;
            (reader, writer, Some(node))
        }
    };
    let handshake = handshake::client(&mut reader, &mut writer, config, addr, PROTOCOL_VERSION);
    let established = match tokio::time::timeout(config.handshake_timeout, handshake).await {
        Ok(Ok(established)) => established,
        // A TLS alert (the node refused this process's certificate) arrives as invalid data
        // on the first read after the TLS handshake.
        Ok(Err(TransportError::Io(error)))
            if config.tls.is_some() && error.kind() == std::io::ErrorKind::InvalidData =>
        {
            return Err(TransportError::Refused {
                reason: format!("the node at {addr} refused this process's certificate: {error}; use a certificate issued by the cluster's CA (`clusterfunk certs`)"),
            })
        }
        // A TLS record (an alert or a handshake, version 3.x) read as a frame length: the node runs
        // with certificates and this process without.
        Ok(Err(TransportError::FrameTooLarge { len, .. }))
            if config.tls.is_none() && matches!(len >> 16, 0x1503 | 0x1603) =>
        {
            return Err(TransportError::Refused {
                reason: format!("the node at {addr} speaks TLS: the cluster runs with certificates, so give this process its certificate directory (--tls-dir D/client for applications, D/admin for clusterfunk) instead of a secret or --insecure"),
            })
        }
        // Nothing was sent yet: a broken handshake is an unreachable peer.
        Ok(Err(TransportError::Io(error))) => {
            return Err(TransportError::Unreachable {
                addr,
                reason: format!("the handshake failed: {error}"),
            })
        }
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return Err(TransportError::Unreachable {
                addr,
                reason: format!(
                    "the handshake did not finish within {:?}; is a clusterfunk node of a compatible release listening there?",
                    config.handshake_timeout
                ),
            })
        }
    };
    if let Some(certified) = certified {
        if established.peer_node_id != Some(certified) {
            return Err(TransportError::Refused {
                reason: format!(
                    "the peer at {addr} holds the certificate of node {certified} but announced {}; it is not a node of this cluster as configured",
                    established
                        .peer_node_id
                        .map_or_else(|| "no node id".to_owned(), |id| format!("node {id}"))
                ),
            });
        }
    }
    secure_frames(
        &mut reader,
        &mut writer,
        config.frame_size_max,
        established
            .keys
            .as_ref()
            .map(handshake::FrameKeys::for_client),
    );
    let liveness = LivenessConfig {
        probe_after: config.probe_after,
        unresponsive_after: config.unresponsive_after,
    };
    Ok(Connection::start(
        addr,
        established.peer_node_id,
        reader,
        writer,
        faults.clone(),
        liveness,
        health.clone(),
    ))
}

/// Runs the TLS handshake on a new TCP stream: the node must present a certificate of the
/// cluster CA for the IP address dialled that names a node of this cluster. Returns the framed
/// halves and the node id the certificate names.
async fn connect_tls(
    config: &TransportConfig,
    tls: &crate::tls::TlsConfig,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<(FrameReader, FrameWriter, u64), TransportError> {
    let connector = tokio_rustls::TlsConnector::from(tls.client());
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream =
        match tokio::time::timeout(config.handshake_timeout, connector.connect(name, stream)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
                return Err(TransportError::Refused {
                    reason: format!("the TLS handshake with {addr} failed: {error}; the node must run with --tls-dir holding a certificate of this cluster's CA issued for the address dialled (`clusterfunk certs --nodes ID=IP:PORT`)"),
                })
            }
            Ok(Err(error)) => {
                return Err(TransportError::Unreachable {
                    addr,
                    reason: format!("the TLS handshake failed: {error}"),
                })
            }
            Err(_) => {
                return Err(TransportError::Unreachable {
                    addr,
                    reason: format!(
                        "the TLS handshake did not finish within {:?}; is a clusterfunk node with --tls-dir listening there?",
                        config.handshake_timeout
                    ),
                })
            }
        };
    let identity =
        crate::tls::peer_identity(stream.get_ref().1.peer_certificates()).map_err(|reason| {
            TransportError::Refused {
                reason: format!("the node at {addr} presented an unusable certificate: {reason}"),
            }
        })?;
    let node = match identity.role {
        crate::tls::Role::Node(id) if identity.cluster == config.cluster_name => id,
        _ => {
            return Err(TransportError::Refused {
                reason: format!(
                    "the peer at {addr} holds the certificate of {identity}, not of a node of cluster {:?}",
                    config.cluster_name
                ),
            })
        }
    };
    let (reader, writer) = split_tls(stream);
    Ok((reader, writer, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_is_cheap_to_share_across_tasks() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Transport>();
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = TransportConfig::default();
        let waits: Vec<u128> = (1..=9).map(|n| backoff(&config, n).as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(backoff(&config, u32::MAX), config.reconnect_backoff_max);
    }
}
