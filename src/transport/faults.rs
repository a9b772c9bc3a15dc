//! Fault injection for tests: block, blackhole or slow down destinations of one [`Transport`].
//!
//! Faults act on the connections of one transport (its requests and the answers that come back
//! on them). A blocked destination makes `request` fail at once with `Unreachable`, and drops
//! the existing connection to it (requests in flight on it fail with `Unreachable` too). To
//! partition nodes A and B, block B's address in A's transport *and* A's address in B's
//! transport: responses travel on the requester's connection, so both directions are then cut.
//! Healing is `unblock` on both sides.
//!
//! A blackhole loses frames instead, as a network that silently drops packets would: nothing
//! fails and no connection closes, the requester just never hears back and its request ends
//! with `Timeout` when its own timeout runs out. It has two halves, so that one direction of a
//! link can be cut precisely: [`Faults::blackhole_requests`] drops the requests this transport
//! sends to a destination, [`Faults::blackhole_responses`] drops the answers that destination
//! sends back on this transport's connection. To drop every frame node A sends to node B,
//! blackhole B's requests in A's transport and A's responses in B's transport. The handshake of
//! a new connection is not affected.
//!
//! [`Faults::isolate`] cuts a whole node off without a reset, as a partition does: every frame
//! its transport sends or receives is dropped, and so is every request its server (which shares
//! these faults) receives, liveness probes included. Its connections stay open.
//!
//! This file does not decide which links to break: fault schedules belong to the test harness.
//!
//! [`Transport`]: super::Transport

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::lock;

/// The faults configured for one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fault {
    /// Requests fail at once and the connection closes ([`Faults::block`]).
    pub(crate) blocked: bool,
    /// Requests are dropped unsent and wait for their timeout ([`Faults::blackhole_requests`]).
    pub(crate) requests_blackholed: bool,
    /// Answers from the destination are dropped on arrival ([`Faults::blackhole_responses`]).
    pub(crate) responses_blackholed: bool,
    /// Every request waits this long before it is sent ([`Faults::set_delay`]).
    pub(crate) delay: Duration,
}

/// A handle to the faults injected into one [`Transport`](super::Transport), obtained with
/// [`Transport::faults`](super::Transport::faults). Clones share the same faults.
#[derive(Debug, Clone)]
pub struct Faults {
    inner: Arc<FaultsInner>,
}

#[derive(Debug)]
struct FaultsInner {
    rules: Mutex<HashMap<SocketAddr, Fault>>,
    /// Whether any rule exists, so that the request path skips the lock when none does.
    any: AtomicBool,
    /// Bumped on every change, so that open connections can check whether they were blocked.
    changes: watch::Sender<u64>,
    /// [`Faults::isolate`]: every destination blackholed both ways, the server deaf.
    isolated: AtomicBool,
}

impl Faults {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(FaultsInner {
                rules: Mutex::new(HashMap::new()),
                any: AtomicBool::new(false),
                changes: watch::channel(0).0,
                isolated: AtomicBool::new(false),
            }),
        }
    }

    /// Makes requests to `addr` fail at once with `Unreachable`, and closes the open
    /// connection to it.
    pub fn block(&self, addr: SocketAddr) {
        self.update(addr, |fault| fault.blocked = true);
    }

    /// Lets requests to `addr` through again (a delay set for it stays).
    pub fn unblock(&self, addr: SocketAddr) {
        self.update(addr, |fault| fault.blocked = false);
    }

    /// Drops every request to `addr` from now on, without failing it and without touching the
    /// connection: the request is never sent, gets no answer, and fails with `Timeout` once its
    /// own timeout runs out. Requests sent earlier still get their answers.
    pub fn blackhole_requests(&self, addr: SocketAddr) {
        self.update(addr, |fault| fault.requests_blackholed = true);
    }

    /// Drops every answer (response or failure) that arrives from `addr` on this transport's
    /// connection from now on, without closing it: `addr` handles the request, but the
    /// requester never learns the outcome and fails with `Timeout` once its timeout runs out.
    pub fn blackhole_responses(&self, addr: SocketAddr) {
        self.update(addr, |fault| fault.responses_blackholed = true);
    }

    /// Ends both halves of a blackhole of `addr` (frames dropped until now stay lost; a block
    /// or a delay set for it stays).
    pub fn unblackhole(&self, addr: SocketAddr) {
        self.update(addr, |fault| {
            fault.requests_blackholed = false;
            fault.responses_blackholed = false;
        });
    }

    /// Unblocks every destination and ends every blackhole (delays stay).
    pub fn unblock_all(&self) {
        let mut rules = lock(&self.inner.rules);
        for fault in rules.values_mut() {
            fault.blocked = false;
            fault.requests_blackholed = false;
            fault.responses_blackholed = false;
        }
        rules.retain(|_, fault| *fault != Fault::default());
        self.changed(&rules);
    }

    /// Makes every request to `addr` wait `delay` before it is sent (the wait counts against
    /// the request's timeout). `Duration::ZERO` removes the delay.
    pub fn set_delay(&self, addr: SocketAddr, delay: Duration) {
        self.update(addr, |fault| fault.delay = delay);
    }

    /// Cuts this transport's owner off (`true`) or heals it (`false`): while isolated, every
    /// request to any destination is dropped unsent and every answer dropped on arrival (as
    /// [`blackhole_requests`](Self::blackhole_requests) and
    /// [`blackhole_responses`](Self::blackhole_responses) of every address), and a server
    /// sharing these faults (a node's) drops every request it receives without answering.
    /// Nothing closes: a partition without resets.
    pub fn isolate(&self, isolated: bool) {
        let rules = lock(&self.inner.rules);
        self.inner.isolated.store(isolated, Ordering::Release);
        self.changed(&rules);
    }

    /// Whether [`isolate`](Self::isolate) is in force.
    pub fn is_isolated(&self) -> bool {
        self.inner.isolated.load(Ordering::Acquire)
    }

    /// Whether `addr` is blocked.
    pub fn is_blocked(&self, addr: SocketAddr) -> bool {
        self.get(addr).blocked
    }

    /// The faults for `addr`; cheap when no fault is configured at all.
    pub(crate) fn get(&self, addr: SocketAddr) -> Fault {
        if !self.inner.any.load(Ordering::Acquire) {
            return Fault::default();
        }
        let rule = lock(&self.inner.rules)
            .get(&addr)
            .copied()
            .unwrap_or_default();
        if self.is_isolated() {
            return Fault {
                requests_blackholed: true,
                responses_blackholed: true,
                ..rule
            };
        }
        rule
    }

    /// A receiver that wakes up on every change of the faults.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn update(&self, addr: SocketAddr, change: impl FnOnce(&mut Fault)) {
        let mut rules = lock(&self.inner.rules);
        let fault = rules.entry(addr).or_default();
        change(fault);
        if *fault == Fault::default() {
            rules.remove(&addr);
        }
        self.changed(&rules);
    }

    fn changed(&self, rules: &HashMap<SocketAddr, Fault>) {
        let any = !rules.is_empty() || self.inner.isolated.load(Ordering::Acquire);
        self.inner.any.store(any, Ordering::Release);
        self.inner.changes.send_modify(|version| *version += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blackhole_loses_frames_and_keeps_the_connection_open() {
        // Goal: a blackholed request, or a blackholed answer, ends in the requester's own
        // timeout while the connection stays open and carries requests again once the
        // blackhole ends. Method: an echo server that counts the requests it handles; one
        // transport sends through one connection while each half of the blackhole is on.
        use std::sync::atomic::AtomicUsize;

        use crate::transport::{serve, PeerInfo, Transport, TransportConfig, TransportError};

        let handled = Arc::new(AtomicUsize::new(0));
        let counter = handled.clone();
        let echo = move |_peer: PeerInfo, payload: Vec<u8>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, crate::transport::ServiceError>(payload) }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let server = serve(listener, TransportConfig::default(), Arc::new(echo))
            .await
            .expect("serve");
        let addr = server.local_addr();
        let transport = Transport::new(TransportConfig::default()).expect("valid config");
        let wait = Duration::from_millis(200);
        let ask = || transport.request(addr, b"ping".to_vec(), wait);
        assert_eq!(ask().await.expect("no fault yet"), b"ping");

        transport.faults().blackhole_requests(addr);
        let lost = ask().await;
        assert!(
            matches!(lost, Err(TransportError::Timeout { .. })),
            "{lost:?}"
        );
        assert_eq!(
            handled.load(Ordering::SeqCst),
            1,
            "the request was never sent"
        );

        transport.faults().unblackhole(addr);
        transport.faults().blackhole_responses(addr);
        let lost = ask().await;
        assert!(
            matches!(lost, Err(TransportError::Timeout { .. })),
            "{lost:?}"
        );
        assert_eq!(handled.load(Ordering::SeqCst), 2, "the request was handled");

        transport.faults().unblock_all();
        assert_eq!(ask().await.expect("healed"), b"ping");
        assert_eq!(
            server.connections_accepted(),
            1,
            "every request used the first connection"
        );
        server.shutdown().await;
    }

    #[test]
    fn unblocking_all_ends_blackholes_and_keeps_delays() {
        let faults = Faults::new();
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        let b = SocketAddr::from(([127, 0, 0, 1], 2));
        faults.blackhole_requests(a);
        faults.blackhole_responses(b);
        faults.set_delay(b, Duration::from_millis(5));
        assert!(faults.get(a).requests_blackholed && !faults.get(a).responses_blackholed);
        assert!(faults.get(b).responses_blackholed && !faults.get(b).requests_blackholed);
        assert!(!faults.is_blocked(a), "a blackhole is not a block");
        faults.unblackhole(a);
        assert_eq!(faults.get(a), Fault::default());
        faults.unblock_all();
        assert_eq!(
            faults.get(b),
            Fault {
                delay: Duration::from_millis(5),
                ..Fault::default()
            }
        );
        faults.set_delay(b, Duration::ZERO);
        assert!(!faults.inner.any.load(Ordering::Acquire), "no rules left");
    }

    #[test]
    fn unblocking_keeps_delays_and_removes_empty_rules() {
        let faults = Faults::new();
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        let b = SocketAddr::from(([127, 0, 0, 1], 2));
        assert_eq!(faults.get(a), Fault::default());
        faults.block(a);
        faults.block(b);
        faults.set_delay(b, Duration::from_millis(5));
        assert!(faults.is_blocked(a) && faults.is_blocked(b));
        faults.unblock_all();
        assert!(!faults.is_blocked(a));
        assert_eq!(faults.get(b).delay, Duration::from_millis(5));
        faults.set_delay(b, Duration::ZERO);
        assert!(!faults.inner.any.load(Ordering::Acquire), "no rules left");
    }
}
