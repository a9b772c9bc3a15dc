//! Fault injection for tests: block or slow down destinations of one [`Transport`].
//!
//! Faults act on the sending side only. A blocked destination makes `request` fail at once
//! with `Unreachable`, and drops the existing connection to it (requests in flight on it fail
//! with `Unreachable` too). To partition nodes A and B, block B's address in A's transport
//! *and* A's address in B's transport: responses travel on the requester's connection, so
//! both directions are then cut. Healing is `unblock` on both sides.
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
    pub(crate) blocked: bool,
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
}

impl Faults {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(FaultsInner {
                rules: Mutex::new(HashMap::new()),
                any: AtomicBool::new(false),
                changes: watch::channel(0).0,
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

    /// Unblocks every destination (delays stay).
    pub fn unblock_all(&self) {
        let mut rules = lock(&self.inner.rules);
        for fault in rules.values_mut() {
            fault.blocked = false;
        }
        rules.retain(|_, fault| *fault != Fault::default());
        self.changed(&rules);
    }

    /// Makes every request to `addr` wait `delay` before it is sent (the wait counts against
    /// the request's timeout). `Duration::ZERO` removes the delay.
    pub fn set_delay(&self, addr: SocketAddr, delay: Duration) {
        self.update(addr, |fault| fault.delay = delay);
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
        lock(&self.inner.rules)
            .get(&addr)
            .copied()
            .unwrap_or_default()
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
        self.inner.any.store(!rules.is_empty(), Ordering::Release);
        self.inner.changes.send_modify(|version| *version += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
