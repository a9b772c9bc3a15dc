//! One established connection after the handshake: the writer task shared by both sides, and
//! the client side's multiplexing of concurrent requests over one connection.
//!
//! The writer task owns the socket's write half and drains a bounded queue, feeding every frame
//! already queued and flushing once per batch, so that many concurrent requests (or responses)
//! cost one system call. On the client side a reader task owns the read half and hands each
//! response to the waiting request by id.
//!
//! This file does not own connecting, the handshake, reconnecting (`client.rs`) or serving
//! requests (`server.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, warn};

use super::codec::{Frame, FrameCodec, FrameKey, Header, HANDSHAKE_FRAME_MAX};
use super::{lock, Faults, TransportError};

/// Frames a connection's queue holds before senders wait: bounds memory per connection and
/// pushes back on callers when the socket cannot keep up.
pub(crate) const QUEUE_CAPACITY: usize = 1024;
/// Most frames the writer feeds before it flushes, so one huge backlog does not delay the
/// first flush indefinitely.
const WRITE_BATCH_MAX: usize = 256;

/// The read half of a connection's byte stream: TCP, or TLS over TCP.
pub(crate) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection's byte stream: TCP, or TLS over TCP.
pub(crate) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// The framed read half of a connection.
pub(crate) type FrameReader = FramedRead<ReadHalf, FrameCodec>;
/// The framed write half of a connection.
pub(crate) type FrameWriter = FramedWrite<WriteHalf, FrameCodec>;

/// Splits a new TCP stream into framed halves, limited to handshake-sized frames until
/// [`secure_frames`] is called.
pub(crate) fn split(stream: TcpStream) -> (FrameReader, FrameWriter) {
    let (read, write) = stream.into_split();
    framed(Box::new(read), Box::new(write))
}

/// Splits a TLS stream into framed halves, as [`split`] does a TCP stream.
pub(crate) fn split_tls<S>(stream: S) -> (FrameReader, FrameWriter)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    framed(Box::new(read), Box::new(write))
}

fn framed(read: ReadHalf, write: WriteHalf) -> (FrameReader, FrameWriter) {
    (
        FramedRead::new(read, FrameCodec::new(HANDSHAKE_FRAME_MAX)),
        FramedWrite::new(write, FrameCodec::new(HANDSHAKE_FRAME_MAX)),
    )
}

/// Once the peer is authenticated: raises the frame limit to the configured one and, with a
/// secret, authenticates every later frame with this side's `(read, write)` keys.
pub(crate) fn secure_frames(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    frame_size_max: usize,
    keys: Option<(&FrameKey, &FrameKey)>,
) {
    reader.decoder_mut().set_frame_size_max(frame_size_max);
    writer.encoder_mut().set_frame_size_max(frame_size_max);
    if let Some((read, write)) = keys {
        reader.decoder_mut().authenticate(read);
        writer.encoder_mut().authenticate(write);
    }
}

/// Writes queued frames until the queue closes or writing fails, flushing once per batch.
pub(crate) async fn write_loop(
    mut writer: FrameWriter,
    mut queue: mpsc::Receiver<Frame>,
    peer: SocketAddr,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    while queue.recv_many(&mut batch, WRITE_BATCH_MAX).await > 0 {
        for frame in batch.drain(..) {
            if let Err(error) = writer.feed(frame).await {
                log_write_error(peer, &error);
                return;
            }
        }
        if let Err(error) = writer.flush().await {
            log_write_error(peer, &error);
            return;
        }
    }
    // Every sender is gone: close the write direction cleanly.
    let _ = writer.close().await;
}

fn log_write_error(peer: SocketAddr, error: &TransportError) {
    match error {
        // The peer went away; whoever waits on this connection learns it from the reader.
        TransportError::Io(_) => debug!(%peer, %error, "closing connection: write failed"),
        // Senders check sizes before queueing, so this is a bug worth seeing.
        _ => warn!(%peer, %error, "closing connection: cannot encode a frame"),
    }
}

/// The result handed to a waiting request.
type Reply = Result<Vec<u8>, TransportError>;

/// Why a connection stopped, to tell waiting requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    Closed,
    Blocked,
}

impl CloseReason {
    fn error(self, addr: SocketAddr) -> TransportError {
        match self {
            CloseReason::Closed => TransportError::Closed { addr },
            CloseReason::Blocked => TransportError::Unreachable {
                addr,
                reason: "blocked by fault injection (Faults::block)".to_owned(),
            },
        }
    }
}

/// Requests waiting for their response, by id.
#[derive(Debug)]
struct Pending {
    state: Mutex<PendingState>,
    /// Mirrors `state.closed.is_some()` so the request path can check without the lock.
    closed: AtomicBool,
    /// What the connection heard and when, for the liveness monitor.
    liveness: Liveness,
}

/// When a connection last heard from its peer and whether it counts as unresponsive. Times
/// are milliseconds since the connection started (plus one, so that 0 means "never").
#[derive(Debug)]
struct Liveness {
    started: Instant,
    /// The last frame received.
    received_ms: AtomicU64,
    /// When the oldest request still outstanding was sent, roughly: set when a request is
    /// registered while none was outstanding.
    busy_since_ms: AtomicU64,
    /// The id of the probe in flight (0: none) and when it was sent.
    probe_id: AtomicU64,
    probe_sent_ms: AtomicU64,
    unresponsive: AtomicBool,
}

impl Liveness {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            received_ms: AtomicU64::new(1),
            busy_since_ms: AtomicU64::new(1),
            probe_id: AtomicU64::new(0),
            probe_sent_ms: AtomicU64::new(0),
            unresponsive: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }
}

#[derive(Debug)]
struct PendingState {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once; a request registering afterwards fails at once instead of waiting forever.
    closed: Option<CloseReason>,
}

impl Pending {
    fn register(&self, id: u64, waiter: oneshot::Sender<Reply>) -> Result<(), CloseReason> {
        let mut state = lock(&self.state);
        match state.closed {
            Some(reason) => Err(reason),
            None => {
                if state.waiters.is_empty() {
                    let now = self.liveness.now_ms();
                    self.liveness.busy_since_ms.store(now, Ordering::Relaxed);
                }
                state.waiters.insert(id, waiter);
                Ok(())
            }
        }
    }

    fn complete(&self, id: u64, reply: Reply, peer: SocketAddr) {
        let waiter = lock(&self.state).waiters.remove(&id);
        match waiter {
            // The requester may have given up meanwhile; then nobody needs the reply.
            Some(waiter) => {
                let _ = waiter.send(reply);
            }
            None => {
                debug!(%peer, id, "ignoring a response to an unknown request id (timed out or cancelled)")
            }
        }
    }

    fn forget(&self, id: u64) {
        lock(&self.state).waiters.remove(&id);
    }

    fn close(&self, reason: CloseReason, peer: SocketAddr) {
        let waiters = {
            let mut state = lock(&self.state);
            if state.closed.is_some() {
                return;
            }
            state.closed = Some(reason);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut state.waiters)
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(reason.error(peer)));
        }
    }

    fn close_reason(&self) -> CloseReason {
        lock(&self.state).closed.unwrap_or(CloseReason::Closed)
    }

    fn is_idle(&self) -> bool {
        lock(&self.state).waiters.is_empty()
    }

    /// Notes a frame from the peer; `true` when the connection was unresponsive until now.
    fn heard(&self) -> bool {
        let now = self.liveness.now_ms();
        self.liveness.received_ms.store(now, Ordering::Relaxed);
        self.liveness.unresponsive.load(Ordering::Relaxed)
            && self.liveness.unresponsive.swap(false, Ordering::AcqRel)
    }
}

/// When to probe a silent connection and when to call it unresponsive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LivenessConfig {
    pub(crate) probe_after: Duration,
    pub(crate) unresponsive_after: Duration,
}

/// Probes a connection that has requests outstanding (or was found unresponsive) and heard
/// nothing for `probe_after`, and flags it unresponsive after `unresponsive_after` of silence,
/// telling `health` whenever the flag goes up (the reader lowers it on the next frame).
async fn monitor(
    pending: Arc<Pending>,
    queue: mpsc::Sender<Frame>,
    next_id: Arc<AtomicU64>,
    config: LivenessConfig,
    health: watch::Sender<u64>,
    addr: SocketAddr,
) {
    let live = &pending.liveness;
    let probe_after = config.probe_after.as_millis() as u64;
    let unresponsive_after = config.unresponsive_after.as_millis() as u64;
    let tick = (config.probe_after / 3).max(Duration::from_millis(5));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let unresponsive = live.unresponsive.load(Ordering::Relaxed);
        if !unresponsive && pending.is_idle() {
            continue;
        }
        let now = live.now_ms();
        let heard = live.received_ms.load(Ordering::Relaxed);
        let since = if unresponsive {
            heard
        } else {
            heard.max(live.busy_since_ms.load(Ordering::Relaxed))
        };
        let silence = now.saturating_sub(since);
        if silence < probe_after {
            continue;
        }
        let probe_sent = live.probe_sent_ms.load(Ordering::Relaxed);
        let probing = live.probe_id.load(Ordering::Relaxed) != 0
            && now.saturating_sub(probe_sent) < unresponsive_after;
        if !probing {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            // A full queue means frames are being written; the peer's answers will tell.
            if queue.try_send(Frame::request(id, Vec::new())).is_ok() {
                live.probe_id.store(id, Ordering::Relaxed);
                live.probe_sent_ms.store(now, Ordering::Relaxed);
            }
        }
        if !unresponsive && silence >= unresponsive_after {
            live.unresponsive.store(true, Ordering::Release);
            debug!(peer = %addr, silence_ms = silence, "connection unresponsive: requests outstanding, nothing heard");
            health.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// Removes a request from [`Pending`] when the request future is dropped before its response
/// arrived (timeout or cancellation), so abandoned ids do not pile up.
struct Forget<'a> {
    pending: &'a Pending,
    id: u64,
    armed: bool,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pending.forget(self.id);
        }
    }
}

/// The client side of one established connection, shared by all requests to its peer.
#[derive(Debug)]
pub(crate) struct Connection {
    addr: SocketAddr,
    /// The node id the peer announced in the handshake (authenticated with a secret).
    peer_node_id: Option<u64>,
    queue: mpsc::Sender<Frame>,
    pending: Arc<Pending>,
    next_id: Arc<AtomicU64>,
    reader: AbortHandle,
    writer: AbortHandle,
    monitor: AbortHandle,
}

impl Connection {
    /// Starts the reader and writer tasks of a connection whose handshake is done.
    pub(crate) fn start(
        addr: SocketAddr,
        peer_node_id: Option<u64>,
        reader: FrameReader,
        writer: FrameWriter,
        faults: Faults,
        liveness: LivenessConfig,
        health: watch::Sender<u64>,
    ) -> Self {
        let (queue, queue_receiver) = mpsc::channel(QUEUE_CAPACITY);
        let pending = Arc::new(Pending {
            state: Mutex::new(PendingState {
                waiters: HashMap::new(),
                closed: None,
            }),
            closed: AtomicBool::new(false),
            liveness: Liveness::new(),
        });
        let next_id = Arc::new(AtomicU64::new(1));
        let writer_task = tokio::spawn(write_loop(writer, queue_receiver, addr));
        let writer = writer_task.abort_handle();
        let reader = tokio::spawn(read_loop(
            reader,
            pending.clone(),
            addr,
            faults,
            writer_task,
            health.clone(),
        ))
        .abort_handle();
        let monitor = tokio::spawn(monitor(
            pending.clone(),
            queue.clone(),
            next_id.clone(),
            liveness,
            health,
            addr,
        ))
        .abort_handle();
        Self {
            addr,
            peer_node_id,
            queue,
            pending,
            next_id,
            reader,
            writer,
            monitor,
        }
    }

    /// The node id the peer announced in the handshake; `None` for a peer that is no node.
    pub(crate) fn peer_node_id(&self) -> Option<u64> {
        self.peer_node_id
    }

    /// Whether the peer answers: `false` while requests are outstanding and nothing (not even
    /// a probe's answer) arrived for `unresponsive_after`.
    pub(crate) fn is_responsive(&self) -> bool {
        !self.pending.liveness.unresponsive.load(Ordering::Acquire)
    }

    /// Whether the connection can still carry requests.
    pub(crate) fn is_open(&self) -> bool {
        !self.pending.closed.load(Ordering::Acquire)
    }

    /// Sends one request and waits for its response. The caller bounds the wait.
    pub(crate) async fn call(&self, payload: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (waiter, reply) = oneshot::channel();
        self.pending
            .register(id, waiter)
            .map_err(|reason| reason.error(self.addr))?;
        let mut forget = Forget {
            pending: &self.pending,
            id,
            armed: true,
        };
        if self.queue.send(Frame::request(id, payload)).await.is_err() {
            return Err(self.pending.close_reason().error(self.addr));
        }
        let reply = reply.await;
        forget.armed = false;
        // A dropped waiter means the connection was torn down without a word.
        reply.unwrap_or(Err(TransportError::Closed { addr: self.addr }))
    }

    /// Closes the connection now: waiting requests fail with `Closed`.
    pub(crate) fn close(&self) {
        self.close_because(CloseReason::Closed);
    }

    /// Closes the connection now because fault injection blocked its destination: waiting
    /// requests fail with `Unreachable`.
    pub(crate) fn close_blocked(&self) {
        self.close_because(CloseReason::Blocked);
    }

    fn close_because(&self, reason: CloseReason) {
        self.pending.close(reason, self.addr);
        self.reader.abort();
        self.writer.abort();
        self.monitor.abort();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}

/// Routes responses to waiting requests until the connection ends, the writer fails, or the
/// destination gets blocked.
async fn read_loop(
    mut reader: FrameReader,
    pending: Arc<Pending>,
    addr: SocketAddr,
    faults: Faults,
    mut writer: JoinHandle<()>,
    health: watch::Sender<u64>,
) {
    let mut fault_changes = faults.subscribe();
    let reason = loop {
        tokio::select! {
            frame = reader.next() => match frame {
                Some(Ok(Frame { header: Header::Response { .. } | Header::Failed { .. }, .. }))
                    if faults.get(addr).responses_blackholed =>
                {
                    debug!(peer = %addr, "dropping an answer: responses blackholed by fault injection");
                }
                Some(Ok(Frame { header: Header::Response { id } | Header::Failed { id, .. }, .. }))
                    if id == pending.liveness.probe_id.load(Ordering::Relaxed) =>
                {
                    pending.liveness.probe_id.store(0, Ordering::Relaxed);
                    if pending.heard() {
                        debug!(peer = %addr, "connection responsive again");
                        health.send_modify(|v| *v = v.wrapping_add(1));
                    }
                }
                Some(Ok(Frame { header: Header::Response { id }, payload })) => {
                    if pending.heard() {
                        health.send_modify(|v| *v = v.wrapping_add(1));
                    }
                    pending.complete(id, Ok(payload), addr);
                }
                Some(Ok(Frame { header: Header::Failed { id, reason }, .. })) => {
                    if pending.heard() {
                        health.send_modify(|v| *v = v.wrapping_add(1));
                    }
                    pending.complete(id, Err(TransportError::Remote { reason }), addr);
                }
                Some(Ok(frame)) => {
                    warn!(peer = %addr, kind = frame.header.kind(), "closing connection: protocol violation, expected a response");
                    break CloseReason::Closed;
                }
                Some(Err(TransportError::Io(error))) => {
                    debug!(peer = %addr, %error, "connection lost");
                    break CloseReason::Closed;
                }
                Some(Err(error)) => {
                    warn!(peer = %addr, %error, "closing connection: bad frame");
                    break CloseReason::Closed;
                }
                None => {
                    debug!(peer = %addr, "connection closed by the peer");
                    break CloseReason::Closed;
                }
            },
            // The sender lives in the `Faults` this task holds, so `changed` cannot fail.
            Ok(()) = fault_changes.changed() => {
                if faults.is_blocked(addr) {
                    debug!(peer = %addr, "closing connection: destination blocked by fault injection");
                    break CloseReason::Blocked;
                }
            }
            _ = &mut writer => break CloseReason::Closed,
        }
    };
    pending.close(reason, addr);
    writer.abort();
}
