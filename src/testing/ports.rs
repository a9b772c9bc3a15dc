//! Free loopback ports for test clusters, held per process until their [`PortReservation`]
//! drops. Does not own what listens on them.
//!
//! Nodes listen on ports below Linux's ephemeral range (32768–60999), so the kernel never
//! hands one of them to an outgoing connection. That matters because nodes and tools open many
//! outgoing connections, and a restarted node must get its old port back: with "bind port 0,
//! then release" the port would be an ephemeral one, free for any `connect()` on the machine
//! to take while its node is down. A search starts at a spot hashed from a seed (a test's name)
//! and the process id, so parallel tests and parallel test binaries start far apart; each
//! candidate is probed by binding it and skipped when taken, and a process never hands out one
//! port twice while a reservation holds it.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use super::TestingError;

/// Where [`reserve_ports`] looks: ports for node processes on 127.0.0.1.
pub const PROCESS_PORT_RANGE: Range<u16> = 20_000..32_000;

/// Where [`reserve_port_on_hosts`] looks: one port shared by the nodes of an in-process
/// cluster, each on its own address `127.0.0.N`. Apart from [`PROCESS_PORT_RANGE`], so the two
/// kinds of cluster never compete.
pub const IN_PROCESS_PORT_RANGE: Range<u16> = 10_000..20_000;

/// Ports held by live reservations of this process.
static PORTS_IN_USE: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Ports that were free when reserved, held for this process until the reservation drops.
#[derive(Debug)]
pub struct PortReservation {
    /// The ports, in the order they were found.
    ports: Vec<u16>,
}

impl PortReservation {
    /// The reserved ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The reserved ports as addresses on 127.0.0.1.
    pub fn loopback_addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .map(|&port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .collect()
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        let mut in_use = lock();
        for port in &self.ports {
            in_use.remove(port);
        }
    }
}

/// Reserves `count` ports of [`PROCESS_PORT_RANGE`] that are free on 127.0.0.1, starting the
/// search at a spot hashed from `seed` (a test's name, a tool's secret) and the process id.
pub fn reserve_ports(seed: &str, count: usize) -> Result<PortReservation, TestingError> {
    reserve(PROCESS_PORT_RANGE, seed, count, &[Ipv4Addr::LOCALHOST])
}

/// Reserves one port of [`IN_PROCESS_PORT_RANGE`] that is free on every address of `hosts`
/// (say `127.0.0.1..=127.0.0.N`, one per node), seeded like [`reserve_ports`].
pub fn reserve_port_on_hosts(
    seed: &str,
    hosts: &[Ipv4Addr],
) -> Result<PortReservation, TestingError> {
    reserve(IN_PROCESS_PORT_RANGE, seed, 1, hosts)
}

/// The search behind both: every port of `range` at most once, from the seeded spot.
fn reserve(
    range: Range<u16>,
    seed: &str,
    count: usize,
    hosts: &[Ipv4Addr],
) -> Result<PortReservation, TestingError> {
    let mut hasher = DefaultHasher::new();
    (seed, std::process::id()).hash(&mut hasher);
    let span = range.end - range.start;
    let mut offset = (hasher.finish() % u64::from(span)) as u16;
    let mut in_use = lock();
    let mut ports = Vec::with_capacity(count);
    for _ in 0..span {
        if ports.len() == count {
            break;
        }
        let port = range.start + offset;
        offset = (offset + 1) % span;
        // The probe listeners close at once; only this process's table keeps the port.
        let free = !in_use.contains(&port)
            && hosts
                .iter()
                .all(|&host| TcpListener::bind((host, port)).is_ok());
        if free {
            in_use.insert(port);
            ports.push(port);
        }
    }
    if ports.len() < count {
        for port in &ports {
            in_use.remove(port);
        }
        return Err(TestingError::NoFreePorts { count, range });
    }
    Ok(PortReservation { ports })
}

/// Locks the table, ignoring poisoning: a panicking test must still release its ports.
fn lock() -> MutexGuard<'static, BTreeSet<u16>> {
    PORTS_IN_USE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_not_handed_out_twice_until_released() {
        let first = reserve_ports("ports-test", 3).expect("free ports");
        let second = reserve_ports("ports-test", 3).expect("free ports");
        assert_eq!(first.ports().len(), 3);
        assert!(first.ports().iter().all(|p| !second.ports().contains(p)));
        let held: Vec<u16> = first.ports().to_vec();
        drop(first);
        let in_use = lock();
        assert!(held.iter().all(|p| !in_use.contains(p)));
    }
}
