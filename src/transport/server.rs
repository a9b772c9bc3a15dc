//! The server side: accepts connections, runs the handshake, and hands each request to the
//! [`Service`] concurrently, answering through the connection's writer task.
//!
//! This file does not own what requests mean: the service decodes its own payloads.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::codec::{payload_fits, Frame, Header};
use super::connection::{secure_frames, split, split_tls, write_loop, QUEUE_CAPACITY};
use super::log_limit::LogLimit;
use super::{handshake, Faults, ServiceError, TransportConfig, TransportError, PROTOCOL_VERSION};
use crate::tls::Role;

/// The reason a request is failed with when its connection already has
/// `in_flight_per_connection_max` requests in progress. Retrying later may succeed.
pub const OVERLOADED: &str = "overloaded";

/// Pause after a failed `accept` (for example when the process is out of file descriptors), so
/// the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Warnings about misbehaving peers (refused handshakes, bad frames) logged per
/// [`PEER_WARNING_WINDOW`]; the rest are counted and summed up in the next line.
const PEER_WARNINGS_PER_WINDOW: u32 = 10;
/// See [`PEER_WARNINGS_PER_WINDOW`].
const PEER_WARNING_WINDOW: Duration = Duration::from_secs(10);

/// What handles requests on a server.
pub trait Service: Send + Sync + 'static {
    /// Handle one request from an authenticated peer; the returned bytes are the response
    /// payload. An `Err` reaches the caller as [`TransportError::Remote`], carrying the
    /// error's message.
    fn call(
        &self,
        peer: PeerInfo,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, ServiceError>> + Send>>;
}

/// Any `Fn(PeerInfo, Vec<u8>) -> impl Future<Output = Result<Vec<u8>, ServiceError>>` is a service.
impl<F, Fut> Service for F
where
    F: Fn(PeerInfo, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
{
    fn call(
        &self,
        peer: PeerInfo,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, ServiceError>> + Send>> {
        Box::pin(self(peer, payload))
    }
}

/// Who sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The node id the peer announced in the handshake (authenticated by the cluster secret
    /// in secure mode); `None` for external clients such as the command-line tool.
    pub node_id: Option<u64>,
    /// The peer's socket address (its outgoing port, not its listening address).
    pub addr: SocketAddr,
    /// With TLS, the role its certificate gives it (which decides what it may do); `None`
    /// without TLS, where every peer that passed the handshake is trusted alike.
    pub role: Option<Role>,
}

/// Controls a running server. Dropping it stops the server too, without waiting.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    counters: Arc<Counters>,
    accept_loop: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Counters {
    accepted: AtomicU64,
    /// Connections closed because the peer failed the handshake or broke the protocol.
    refused: AtomicU64,
    connection_permits: Arc<Semaphore>,
    connections_max: usize,
    /// Rate of warnings about misbehaving peers.
    peer_warnings: LogLimit,
    /// Rate of warnings that the connection limit was reached.
    limit_warnings: LogLimit,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many TCP connections the server has accepted since it started (whether or not
    /// their handshake succeeded).
    pub fn connections_accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// How many connections were closed because the peer failed the handshake (wrong secret,
    /// cluster or version; too slow) or broke the protocol afterwards. Each is counted; only a
    /// few per 10 s are logged, with the number left out.
    pub fn connections_refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    /// How many connections are open now.
    pub fn connections_open(&self) -> usize {
        self.counters.connections_max - self.counters.connection_permits.available_permits()
    }

    /// Stops accepting, closes every connection and waits until the listening socket is
    /// closed, so that the port can be bound again. Requests being handled run to completion,
    /// but their responses are dropped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(accept_loop) = self.accept_loop.take() {
            if let Err(error) = accept_loop.await {
                warn!(%error, "the server's accept loop failed");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Shared by all connections of one server.
struct Context {
    config: TransportConfig,
    service: Arc<dyn Service>,
    /// The faults of the transport this server shares them with (a node's): while they
    /// isolate it, requests are dropped unanswered.
    faults: Option<Faults>,
}

/// Serves `service` on `listener` until the returned handle is shut down or dropped. Fails
/// only if `config` is invalid or the listener has no local address.
pub async fn serve(
    listener: TcpListener,
    config: TransportConfig,
    service: Arc<dyn Service>,
) -> Result<ServerHandle, TransportError> {
    serve_with_faults(listener, config, service, None).await
}

/// [`serve`], deaf to every request while `faults` isolate their transport
/// ([`Faults::isolate`]).
pub(crate) async fn serve_with_faults(
    listener: TcpListener,
    config: TransportConfig,
    service: Arc<dyn Service>,
    faults: Option<Faults>,
) -> Result<ServerHandle, TransportError> {
    config.validate()?;
    let local_addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let counters = Arc::new(Counters {
        accepted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        connection_permits: Arc::new(Semaphore::new(config.connections_max)),
        connections_max: config.connections_max,
        peer_warnings: LogLimit::new(PEER_WARNING_WINDOW, PEER_WARNINGS_PER_WINDOW),
        limit_warnings: LogLimit::new(PEER_WARNING_WINDOW, 1),
    });
    let context = Arc::new(Context {
        config,
        service,
        faults,
    });
    let accept_loop = tokio::spawn(accept_loop(
        listener,
        context,
        counters.clone(),
        shutdown.clone(),
    ));
    Ok(ServerHandle {
        local_addr,
        shutdown,
        counters,
        accept_loop: Some(accept_loop),
    })
}

async fn accept_loop(
    listener: TcpListener,
    context: Arc<Context>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        // Take a connection slot before accepting: at the limit, new connections wait in the
        // kernel's backlog instead of costing us memory.
        let permit = match counters.connection_permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(suppressed) = counters.limit_warnings.admit(Instant::now()) {
                    warn!(
                        connections_max = counters.connections_max,
                        times_since_last_warning = suppressed + 1,
                        "connection limit reached; new connections wait until one closes (open ones are still served)"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = counters.connection_permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a connection failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        connections.spawn(serve_connection(
            stream,
            peer,
            context.clone(),
            counters.clone(),
            shutdown.clone(),
            permit,
        ));
        // Reap finished connections so the set does not grow with the server's history.
        while let Some(finished) = connections.try_join_next() {
            if let Err(error) = finished {
                warn!(%error, "a connection task failed");
            }
        }
    }
    // Close the listening socket first, so the port is free once `shutdown` returns.
    drop(listener);
    connections.shutdown().await;
}

async fn serve_connection(
    stream: TcpStream,
    addr: SocketAddr,
    context: Arc<Context>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    _connection_permit: OwnedSemaphorePermit,
) {
    let config = &context.config;
    // Counts a misbehaving peer; `Some(n)` when a warning may be logged (n left out before it).
    let refused = || {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        counters.peer_warnings.admit(Instant::now())
    };
    if let Err(error) = stream.set_nodelay(true) {
        debug!(peer = %addr, %error, "cannot set TCP_NODELAY");
    }
    let (mut reader, mut writer, certified) = match &config.tls {
        None => {
            let (reader, writer) = split(stream);
            (reader, writer, None)
        }
        Some(tls) => {
            let accept = tokio::time::timeout(
                config.handshake_timeout,
                tokio_rustls::TlsAcceptor::from(tls.server()).accept(stream),
            );
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = accept => match accepted {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        if let Some(left_out) = refused() {
                            warn!(peer = %addr, %error, warnings_left_out = left_out, "refused connection: TLS handshake failed (no certificate of the cluster CA?)");
                        }
                        return;
                    }
                    Err(_) => {
                        if let Some(left_out) = refused() {
                            warn!(peer = %addr, timeout = ?config.handshake_timeout, warnings_left_out = left_out, "closing connection: TLS handshake not finished in time");
                        }
                        return;
                    }
                },
            };
            let identity = crate::tls::peer_identity(stream.get_ref().1.peer_certificates());
            let (reader, mut writer) = split_tls(stream);
            let identity = match identity {
                Ok(identity) if identity.cluster == config.cluster_name => identity,
                other => {
                    let reason = match other {
                        Ok(identity) => format!(
                            "the certificate is of {identity}, not of cluster {:?}",
                            config.cluster_name
                        ),
                        Err(reason) => format!("the certificate cannot be used: {reason}"),
                    };
                    // Tell the peer why (it is past TLS, so it reads our frames) and close.
                    let _ = writer
                        .send(Frame::control(Header::Refused {
                            reason: super::codec::bounded_reason(reason.clone()),
                        }))
                        .await;
                    if let Some(left_out) = refused() {
                        warn!(peer = %addr, %reason, warnings_left_out = left_out, "refused connection");
                    }
                    drop(reader);
                    return;
                }
            };
            (reader, writer, Some(identity.role))
        }
    };
    let handshake = tokio::time::timeout(
        config.handshake_timeout,
        handshake::server(&mut reader, &mut writer, config, addr, PROTOCOL_VERSION),
    );
    let established = tokio::select! {
        _ = shutdown.cancelled() => return,
        result = handshake => match result {
            Ok(Ok(established)) => established,
            Ok(Err(TransportError::Io(error))) => {
                debug!(peer = %addr, %error, "connection lost during the handshake");
                return;
            }
            Ok(Err(error)) => {
                if let Some(left_out) = refused() {
                    warn!(peer = %addr, reason = %error, warnings_left_out = left_out, "refused connection");
                }
                return;
            }
            Err(_) => {
                if let Some(left_out) = refused() {
                    warn!(peer = %addr, timeout = ?config.handshake_timeout, warnings_left_out = left_out, "closing connection: handshake not finished in time");
                }
                return;
            }
        },
    };
    secure_frames(
        &mut reader,
        &mut writer,
        config.frame_size_max,
        established
            .keys
            .as_ref()
            .map(handshake::FrameKeys::for_server),
    );
    let node_id = established.peer_node_id;
    // A certificate binds what the peer may announce: a node its own id, tools and clients none.
    let announced_as_certified = match certified {
        None => true,
        Some(Role::Node(id)) => node_id == Some(id),
        Some(Role::Admin | Role::Client) => node_id.is_none(),
    };
    if !announced_as_certified {
        if let Some(left_out) = refused() {
            warn!(peer = %addr, ?node_id, certificate = ?certified, warnings_left_out = left_out, "closing connection: the peer announced a node id its certificate does not name");
        }
        return;
    }
    let peer = PeerInfo {
        node_id,
        addr,
        role: certified,
    };
    debug!(peer = %addr, ?node_id, "connection accepted");

    let (queue, queue_receiver) = mpsc::channel(QUEUE_CAPACITY);
    let mut writer_task = AbortOnDrop(tokio::spawn(write_loop(writer, queue_receiver, addr)));
    let in_flight = Arc::new(Semaphore::new(config.in_flight_per_connection_max));
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut writer_task.0 => break,
            frame = reader.next() => frame,
        };
        let (id, payload) = match frame {
            Some(Ok(Frame {
                header: Header::Request { id },
                payload,
            })) => (id, payload),
            Some(Ok(frame)) => {
                if let Some(left_out) = refused() {
                    warn!(peer = %addr, kind = frame.header.kind(), warnings_left_out = left_out, "closing connection: protocol violation, expected a request");
                }
                break;
            }
            Some(Err(TransportError::Io(error))) => {
                debug!(peer = %addr, %error, "connection lost");
                break;
            }
            Some(Err(error)) => {
                if let Some(left_out) = refused() {
                    warn!(peer = %addr, reason = %error, warnings_left_out = left_out, "closing connection: bad frame");
                }
                break;
            }
            None => {
                debug!(peer = %addr, "connection closed by the peer");
                break;
            }
        };
        if context.faults.as_ref().is_some_and(Faults::is_isolated) {
            // Lost on the way in (Faults::isolate): no answer, not even to a probe.
            continue;
        }
        if payload.is_empty() {
            // A liveness probe: answered here, by the connection, however busy the service is.
            // A full queue means answers are being written, which tells the peer as much.
            let _ = queue.try_send(Frame::response(id, Vec::new()));
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // Waiting for room here is backpressure on the peer, which is what overload needs.
            if queue
                .send(Frame::failed(id, OVERLOADED.to_owned()))
                .await
                .is_err()
            {
                break;
            }
            continue;
        };
        let response = context.service.call(peer, payload);
        let queue = queue.clone();
        let frame_size_max = config.frame_size_max;
        tokio::spawn(async move {
            let frame = match response.await {
                Ok(payload) if payload_fits(payload.len(), frame_size_max) => {
                    Frame::response(id, payload)
                }
                Ok(payload) => Frame::failed(
                    id,
                    format!(
                        "the response of {} bytes exceeds the server's frame_size_max of {frame_size_max} bytes",
                        payload.len()
                    ),
                ),
                Err(error) => Frame::failed(id, error.to_string()),
            };
            // The connection may be gone meanwhile; then nobody waits for the answer.
            let _ = queue.send(frame).await;
            drop(permit);
        });
    }
}

/// Aborts the task when dropped, so that a connection's writer never outlives it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
