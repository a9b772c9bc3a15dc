//! The router: key → shard → the node serving it, and on this node → its shard actor.
//!
//! It holds the current routing table (the replicated cluster state this node applied, and
//! whether the node may serve), swapped atomically so the hot path reads it without a lock; the
//! node's lease; one slot per shard with the address of its actor, started lazily; and the
//! snapshots handed over for shards about to become this node's. A request for a shard this node
//! serves goes to the local actor; one for another node's shard is forwarded to the owner; one
//! for a shard that has no serving owner right now (lease lapsed, shard moving, owner
//! unreachable, failover under way) waits here, bounded in count and time, until it has one.
//! The router does not decide the map (consensus does) and does not run handler code (shard
//! actors do).

use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use actix::dev::channel;
use actix::prelude::*;
use actix_rt::ArbiterHandle;
use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, watch};

use crate::codec;
use crate::codec::Handoff;
use crate::consensus::ClusterState;
use crate::error::{Error, NotReadyReason};
use crate::ledger::{self, Intake, MoveStep, Place, Sent, ShardLedger, ShardView};
use crate::metrics::{RequestMetrics, RouteLabel};
use crate::persist::{Locality, ShardStore};
use crate::session::{self, Stamp};
use crate::shard::{
    Activate, ActorParts, ClusterHandle, Deactivate, Deliver, Dispatch, HandlerFactory, Handles,
    Origin, Passivate, RouteAny, ServeEvent, ServeEventKind, ServeObserver, ShardActor,
    ShardHandler, ShardHost, ShardMessage, Undelivered, WireMessage,
};
use crate::shard_map::{Epoch, Key, NodeId, ShardId};
use crate::transport::{Transport, TransportError, OVERLOADED};
use crate::wire::{Request, Response};

/// The shortest and longest interval between passivation passes.
const PASSIVATION_PASS_MIN: Duration = Duration::from_millis(50);
const PASSIVATION_PASS_MAX: Duration = Duration::from_secs(5);

/// What the router routes by.
#[derive(Debug, Clone)]
pub(crate) struct RoutingTable {
    /// The newest cluster state this node applied (members, map, pending moves).
    pub(crate) state: Arc<ClusterState>,
    /// Why the node may not serve at all, or `None` when it may (subject to its lease).
    pub(crate) not_ready: Option<NotReadyReason>,
    /// Since when the node has known no leader, if it knows none.
    pub(crate) leaderless_since: Option<Instant>,
}

/// How often a handler's send with an id whose outcome was unknown at a shard of this node is
/// sent again there before its outcome is reported.
const LOCAL_RESENDS_MAX: u32 = 3;

/// Limits and timeouts of the router.
#[derive(Debug, Clone)]
pub(crate) struct RouterLimits {
    pub(crate) mailbox_capacity: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) deactivate_timeout: Duration,
    /// How long a request waits for its shard to get a serving owner.
    pub(crate) unavailable_wait: Duration,
    /// How many requests may wait at once.
    pub(crate) waiting_max: usize,
    /// Passivate a shard idle this long (`None`: never for idleness).
    pub(crate) passivate_after: Option<Duration>,
    /// Passivate the least recently used shards beyond this many active ones (`None`: no bound).
    pub(crate) active_shards_max: Option<usize>,
    /// How long a client session's record in a shard outlives its last request (halved).
    pub(crate) session_idle: Duration,
}

/// The node's lease, readable without a lock: the nanoseconds since `base` until which it is
/// valid (0: none; `u64::MAX`: forever, for standalone nodes), and the newest allocation epoch a
/// grant was for (rule 4(b): it covers only a routing table at least that new).
#[derive(Debug)]
pub(crate) struct LeaseGate {
    base: Instant,
    until_nanos: AtomicU64,
    epoch: AtomicU64,
    /// Set for good when the node stops serving (its storage failed): no grant counts after.
    revoked: AtomicBool,
}

impl LeaseGate {
    fn new(forever: bool) -> Self {
        LeaseGate {
            base: Instant::now(),
            until_nanos: AtomicU64::new(if forever { u64::MAX } else { 0 }),
            epoch: AtomicU64::new(0),
            revoked: AtomicBool::new(false),
        }
    }

    /// Extends the lease to `until`, granted for allocation `epoch`.
    fn set(&self, until: Instant, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        let nanos = until
            .saturating_duration_since(self.base)
            .as_nanos()
            .min(u64::MAX as u128 - 1) as u64;
        self.until_nanos.fetch_max(nanos, Ordering::AcqRel);
    }

    /// Whether the lease is valid now for a routing table at allocation `table_epoch`.
    fn covers(&self, table_epoch: u64) -> bool {
        self.is_valid() && table_epoch >= self.epoch.load(Ordering::Acquire)
    }

    fn is_valid(&self) -> bool {
        if self.revoked.load(Ordering::Acquire) {
            return false;
        }
        let until = self.until_nanos.load(Ordering::Acquire);
        until == u64::MAX || (until != 0 && (self.base.elapsed().as_nanos() as u64) < until)
    }

    /// Whether the lease ended (or never began) at least `duration` ago.
    fn expired_for(&self, duration: Duration) -> bool {
        let until = self.until_nanos.load(Ordering::Acquire);
        if until == u64::MAX {
            return false;
        }
        let now = self.base.elapsed().as_nanos() as u64;
        now.saturating_sub(until) >= duration.as_nanos() as u64
    }

    fn remaining(&self) -> Option<Duration> {
        if self.revoked.load(Ordering::Acquire) {
            return None;
        }
        let until = self.until_nanos.load(Ordering::Acquire);
        if until == u64::MAX {
            return Some(Duration::MAX);
        }
        let now = self.base.elapsed().as_nanos() as u64;
        (until > now).then(|| Duration::from_nanos(until - now))
    }
}

/// A running shard actor, its number on this node, and the count of messages waiting in its
/// mailbox.
///
/// actix bounds a mailbox per sender (every `Addr` clone may queue past the capacity), so the
/// router counts queued messages itself: incremented before a send, decremented by the actor
/// when it takes the message out of its mailbox.
pub(crate) struct ShardSlot<H: ShardHandler> {
    actor: Addr<ShardActor<H>>,
    queued: Arc<AtomicUsize>,
    /// The router's passivation clock when a message was last queued for the actor.
    last_used: Arc<AtomicU64>,
}

// By hand: a derive would ask `H: Clone`. Cloning a slot clones a handle, not the actor.
impl<H: ShardHandler> Clone for ShardSlot<H> {
    fn clone(&self) -> Self {
        ShardSlot {
            actor: self.actor.clone(),
            queued: self.queued.clone(),
            last_used: self.last_used.clone(),
        }
    }
}

/// What to do with a message for a shard, now.
enum Route {
    Local,
    Forward(NodeId, SocketAddr),
    Wait(NotReadyReason),
    Fail(Error),
}

/// Routes messages to local shard actors and to the owners of other shards. One per node.
pub struct Router<H: ShardHandler> {
    node_id: NodeId,
    shard_count: u32,
    table: ArcSwap<RoutingTable>,
    /// Bumped on every table or lease change; waiting requests watch it.
    changes: watch::Sender<u64>,
    lease: LeaseGate,
    stopping: AtomicBool,
    waiting: AtomicUsize,
    /// Where each shard's state is on this node (the handoff ledger), with the running actor's
    /// handle when one runs.
    slots: Box<[Mutex<ShardLedger<ShardSlot<H>>>]>,
    /// Numbers shard actors, so a retiring actor's snapshot is matched to its place.
    next_actor: AtomicU64,
    /// Notified whenever a retiring actor handed its state back.
    retirements: tokio::sync::Notify,
    /// Snapshots arriving in chunks, by shard, until their last chunk.
    staging: Mutex<HashMap<ShardId, Staging>>,
    arbiter: ArbiterHandle,
    factory: HandlerFactory<H>,
    limits: RouterLimits,
    transport: Option<Transport>,
    /// The node's raft and lease connections, asked only whether a peer answers: they hear
    /// from every member all the time, so they know a frozen owner before a forward would.
    peers: Option<Transport>,
    observer: Option<Arc<dyn ServeObserver>>,
    /// Where shards keep the durable state their handlers declare, if anywhere.
    store: Option<Arc<dyn ShardStore>>,
    /// The passivation clock: milliseconds since `started`, advanced by each passivation pass
    /// (coarse on purpose: the send path reads it with one relaxed load).
    clock: AtomicU64,
    started: Instant,
    /// A passivation pass is queued on the arbiter because a shard actor started while a bound
    /// on active shards is set (one queued pass at a time).
    pass_queued: AtomicBool,
    /// Request counters and histograms; `None` without a metrics endpoint.
    metrics: Option<RequestMetrics>,
    self_ref: Weak<Router<H>>,
}

impl<H: ShardHandler> std::fmt::Debug for Router<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("node_id", &self.node_id)
            .field("shard_count", &self.shard_count)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is one map or slot operation, so a panic while holding the
    // lock cannot leave the data half-written: a poisoned lock is safe to keep using.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The parts a router is built from.
pub(crate) struct RouterParts<H: ShardHandler> {
    pub(crate) node_id: NodeId,
    pub(crate) shard_count: u32,
    pub(crate) table: RoutingTable,
    pub(crate) arbiter: ArbiterHandle,
    pub(crate) factory: HandlerFactory<H>,
    pub(crate) limits: RouterLimits,
    /// `None` for a standalone node, which serves everything forever.
    pub(crate) transport: Option<Transport>,
    /// The node's raft and lease transport, consulted for peer health only.
    pub(crate) peers: Option<Transport>,
    pub(crate) observer: Option<Arc<dyn ServeObserver>>,
    /// Where shards keep their declared durable state (`None`: in memory only).
    pub(crate) store: Option<Arc<dyn ShardStore>>,
}

impl<H: ShardHandler> Router<H> {
    pub(crate) fn new(parts: RouterParts<H>) -> Arc<Self> {
        let standalone = parts.transport.is_none();
        Arc::new_cyclic(|self_ref| Router {
            node_id: parts.node_id,
            shard_count: parts.shard_count,
            table: ArcSwap::from_pointee(parts.table),
            changes: watch::channel(0).0,
            lease: LeaseGate::new(standalone),
            stopping: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            slots: (0..parts.shard_count)
                .map(|_| Mutex::new(ShardLedger::default()))
                .collect(),
            next_actor: AtomicU64::new(1),
            retirements: tokio::sync::Notify::new(),
            staging: Mutex::new(HashMap::new()),
            arbiter: parts.arbiter,
            factory: parts.factory,
            limits: parts.limits,
            transport: parts.transport,
            peers: parts.peers,
            observer: parts.observer,
            store: parts.store,
            clock: AtomicU64::new(0),
            started: Instant::now(),
            pass_queued: AtomicBool::new(false),
            metrics: RequestMetrics::new(),
            self_ref: self_ref.clone(),
        })
    }

    /// The node this router belongs to.
    pub(crate) fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The number of shards keys are hashed into.
    pub(crate) fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// The current map epoch (0 before the first map).
    pub(crate) fn map_epoch(&self) -> Epoch {
        self.table.load().state.map_epoch()
    }

    /// Installs a new routing table and stops the actors of shards this node no longer owns
    /// (those moving away are the router actor's handoff rounds).
    pub(crate) fn set_table(&self, table: RoutingTable) {
        let state = table.state.clone();
        self.table.store(Arc::new(table));
        self.changes.send_modify(|v| *v += 1);
        // Half-received snapshots of moves no longer coming here are dropped.
        lock(&self.staging).retain(|shard, staged| {
            let expected = state.pending.get(shard).is_some_and(|p| {
                p.to == self.node_id && p.from == staged.from && p.epoch == staged.epoch
            });
            expected || staged.epoch > state.epoch
        });
        // The ledger drops what the applied state says is no longer this node's (released,
        // re-targeted away, lost without handoff) and names the actors to stop.
        for (shard, slot) in self.slots.iter().enumerate() {
            let shard = shard as ShardId;
            let owner = state.map.as_ref().and_then(|m| m.owner(shard));
            let view = ShardView {
                owned: owner == Some(self.node_id),
                coming: state
                    .pending
                    .get(&shard)
                    .is_some_and(|p| p.to == self.node_id),
                leaving: state
                    .pending
                    .get(&shard)
                    .is_some_and(|p| p.from == self.node_id),
                epoch: state.epoch,
            };
            if let Some(stale) = ledger::apply_locked(slot, |l| l.reconcile(view)) {
                tracing::info!(
                    shard,
                    ?owner,
                    "shard lost without handoff; stopping its actor"
                );
                stale.actor.do_send(Deactivate);
            }
        }
        self.wake_parked();
    }

    /// Extends the node's lease to `until`, granted for allocation `epoch` (rule 4(b): the node
    /// serves under it only while its table is at least at that epoch).
    pub(crate) fn set_lease(&self, until: Instant, epoch: u64) {
        let was_valid = self.lease.is_valid();
        self.lease.set(until, epoch);
        if !was_valid {
            self.changes.send_modify(|v| *v += 1);
        }
        self.wake_parked();
    }

    /// With a node-local store, starts the shards whose state arrived in a handoff as soon as
    /// the node serves them, without waiting for a request: the activation commits the carried
    /// state to this node's store. Until then it exists only in this node's memory (and in the
    /// previous owner's store, which this node cannot read), so a crash would lose it.
    fn wake_parked(&self) {
        let node_local = self
            .store
            .as_ref()
            .is_some_and(|store| store.locality() != Locality::Shared);
        if !node_local || self.stopping.load(Ordering::Acquire) {
            return;
        }
        for (shard, slot) in self.slots.iter().enumerate() {
            let shard = shard as ShardId;
            if !matches!(
                lock(slot).place(),
                Place::Parked {
                    snapshot: Some(_),
                    ..
                }
            ) || self.serves_now(shard).is_none()
            {
                continue;
            }
            let number = self.next_actor.fetch_add(1, Ordering::Relaxed);
            let (handle, start) = self.new_shard_actor(shard, number);
            let intake = ledger::apply_locked(slot, |l| l.request(true, number, || handle.clone()));
            if let Intake::Start { restore } = intake {
                if start(restore) {
                    handle.actor.do_send(Activate);
                } else {
                    ledger::apply_locked(slot, |l| l.actor_gone(number));
                }
            }
        }
    }

    /// Stops serving for good (the node's raft storage failed): the lease no longer counts and
    /// every request is refused as [`NotReadyReason::Stopped`].
    pub(crate) fn stop_for_good(&self) {
        self.lease.revoked.store(true, Ordering::Release);
        let current = self.table();
        self.set_table(RoutingTable {
            state: current.state.clone(),
            not_ready: Some(NotReadyReason::Stopped),
            leaderless_since: current.leaderless_since,
        });
    }

    /// How long the lease still runs, if it is valid.
    pub(crate) fn lease_remaining(&self) -> Option<Duration> {
        self.lease.remaining()
    }

    /// Waits until this node's map is at least at `epoch`, at most `unavailable_wait`: a
    /// client that routed by a newer map must not be forwarded by an older one. A wait takes
    /// one of the `waiting_max` places of requests waiting at the router (a flood of requests
    /// naming a future epoch is refused with [`Error::Overloaded`], not held).
    pub(crate) async fn catch_up(&self, epoch: Epoch, shard: ShardId) -> Result<(), Error> {
        if self.map_epoch() >= epoch {
            return Ok(());
        }
        let _waiting = WaitPermit::take(&self.waiting, self.limits.waiting_max)
            .ok_or(Error::Overloaded { shard })?;
        let mut changes = self.changes.subscribe();
        let until = tokio::time::Instant::now() + self.limits.unavailable_wait;
        while self.map_epoch() < epoch {
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// The routing table once its map is newer than `epoch`, or after `hold`, whichever comes
    /// first; at once when this node cannot vouch for its map (it knows no leader, may not
    /// serve, or its lease lapsed: its map may be stale, and the watcher should ask another
    /// node) or when `waiting_max` requests already wait here.
    pub(crate) async fn watch_map(&self, epoch: Epoch, hold: Duration) -> Arc<RoutingTable> {
        let until = tokio::time::Instant::now() + hold;
        let mut changes = self.changes.subscribe();
        let Some(_waiting) = WaitPermit::take(&self.waiting, self.limits.waiting_max) else {
            return self.table();
        };
        loop {
            let table = self.table();
            let doubtful = self.cannot_vouch(&table);
            if doubtful || table.state.map_epoch() > epoch || tokio::time::Instant::now() >= until {
                return table;
            }
            // A change of table or lease wakes the loop; the hold bounds it.
            let _ = tokio::time::timeout_at(until, changes.changed()).await;
        }
    }

    /// Whether this node cannot vouch for `table`: it knows no leader, may not serve, or its
    /// lease lapsed, so the map may be stale.
    fn cannot_vouch(&self, table: &RoutingTable) -> bool {
        table.not_ready.is_some() || table.leaderless_since.is_some() || !self.lease.is_valid()
    }

    /// The shard of the key whose bytes are `key`.
    pub(crate) fn shard_of_bytes(&self, key: &[u8]) -> ShardId {
        crate::shard_map::shard_for(key, self.shard_count)
    }

    /// The current routing table.
    pub(crate) fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Whether this node serves `shard` at this instant: it may serve, holds a valid lease, its
    /// table is at least at the epoch the lease was granted for (a table that lags behind the
    /// state the grant was for may still name this node), owns the shard in that table and the
    /// shard is not moving away.
    pub(crate) fn serves_now(&self, shard: ShardId) -> Option<Epoch> {
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        let table = self.table.load();
        (table.not_ready.is_none()
            && self.lease.covers(table.state.epoch)
            && table.state.serves(self.node_id, shard))
        .then(|| table.state.map_epoch())
    }

    /// Passes an event to the observer, if any.
    pub(crate) fn observe(&self, shard: ShardId, kind: ServeEventKind, epoch: Epoch) {
        if let Some(observer) = &self.observer {
            observer.observe(ServeEvent {
                node: self.node_id,
                shard,
                epoch,
                at: Instant::now(),
                kind,
            });
        }
    }

    /// A type-erased handle for sending from inside shard actor `origin` (shard and actor
    /// number), or from outside (`None`).
    pub(crate) fn handle(&self, origin: Option<(ShardId, u64)>) -> ClusterHandle {
        let weak: Weak<dyn RouteAny> = self.self_ref.clone();
        ClusterHandle::new(weak, origin)
    }

    /// Whether this node may serve and owns `shard` in its newest map (lease and pending moves
    /// not checked: the shard actor checks them for every message).
    fn owns_now(&self, shard: ShardId) -> bool {
        if self.stopping.load(Ordering::Acquire) {
            return false;
        }
        let table = self.table.load();
        table.not_ready.is_none()
            && table.state.map.as_ref().and_then(|m| m.owner(shard)) == Some(self.node_id)
    }

    fn route(&self, shard: ShardId) -> Route {
        if self.stopping.load(Ordering::Acquire) {
            return Route::Fail(Error::ShuttingDown);
        }
        let table = self.table.load();
        if let Some(reason) = table.not_ready {
            if matches!(
                reason,
                NotReadyReason::ShardCountMismatch | NotReadyReason::Stopped
            ) {
                // Waiting cannot help: only a restart (with the right count, on a working
                // disk) does.
                return Route::Fail(Error::NotReady { reason });
            }
            return Route::Wait(reason);
        }
        let Some(owner) = table.state.map.as_ref().and_then(|m| m.owner(shard)) else {
            return Route::Wait(NotReadyReason::NoMap);
        };
        if owner == self.node_id {
            if table.state.pending.contains_key(&shard) {
                Route::Wait(NotReadyReason::ShardMoving)
            } else if !self.lease.covers(table.state.epoch) {
                Route::Wait(NotReadyReason::LeaseExpired)
            } else {
                Route::Local
            }
        } else {
            let addr = table
                .state
                .members
                .get(&owner)
                .and_then(|m| m.addr.parse().ok());
            match addr {
                Some(addr) if self.transport.is_some() => Route::Forward(owner, addr),
                _ => Route::Wait(NotReadyReason::NoMap),
            }
        }
    }

    /// Sends `msg` to the shard owning `key` and waits for its reply: locally, forwarded to the
    /// owner (only when `origin` is local), or after waiting for the shard to get a serving
    /// owner.
    pub(crate) async fn send<M>(&self, key: Key, msg: M, origin: Origin) -> Result<M::Reply, Error>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        if session::is_reserved(key.as_bytes()) {
            return Err(Error::ReservedKey);
        }
        let shard = key.shard(self.shard_count);
        let arrival = self.map_epoch();
        // Set by the node's service (or a handler's send) around a request with an id.
        let stamp = session::current_stamp();
        // The fast path: this node owns the shard. The shard actor checks the lease and any
        // pending move itself (and hands the message back when it may not serve it now).
        // (A handler's send with an id takes the slow path, which sends it again under its id
        // when its outcome is unknown.)
        let resends = stamp.is_some() && origin == Origin::Local;
        let msg = if self.owns_now(shard) && !resends {
            match self.deliver(shard, key.clone(), msg, stamp).await {
                Ok(reply) => return reply,
                Err((msg, _)) => msg,
            }
        } else {
            msg
        };
        // Only the slow path (forwarding, waiting) gets a span: the fast path stays lean.
        let span = tracing::debug_span!("route", shard, origin = ?origin);
        tracing::Instrument::instrument(
            self.send_slow(shard, key, msg, origin, arrival, stamp),
            span,
        )
        .await
    }

    /// [`send`](Self::send), counted in the request metrics under `route`.
    pub(crate) async fn send_counted<M>(
        &self,
        key: Key,
        msg: M,
        origin: Origin,
        route: RouteLabel,
    ) -> Result<M::Reply, Error>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        match &self.metrics {
            None => self.send(key, msg, origin).await,
            Some(metrics) => {
                let started = Instant::now();
                let result = self.send(key, msg, origin).await;
                metrics.record(route, result.as_ref().err(), started);
                result
            }
        }
    }

    /// Counts a request that entered by `route` and began at `started`.
    pub(crate) fn record(&self, route: RouteLabel, error: Option<&Error>, started: Instant) {
        if let Some(metrics) = &self.metrics {
            metrics.record(route, error, started);
        }
    }

    /// Whether requests are counted (the process serves metrics).
    pub(crate) fn counts_requests(&self) -> bool {
        self.metrics.is_some()
    }

    async fn send_slow<M>(
        &self,
        shard: ShardId,
        key: Key,
        msg: M,
        origin: Origin,
        arrival: Epoch,
        mut stamp: Option<Stamp>,
    ) -> Result<M::Reply, Error>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        let bounds = WaitBounds::new(Instant::now(), &self.limits);
        let (deadline, wait_deadline) = (bounds.deadline, bounds.wait_deadline);
        let mut msg = Some(msg);
        let mut encoded: Option<Vec<u8>> = None;
        let mut _waiting: Option<WaitPermit<'_>> = None;
        // A message sent on this node whose outcome is unknown is sent again to the shard's
        // next owner when handling it twice is harmless, or when it carries an id (a handler's
        // send while it handles a request with one): the shard answers a retry from its record.
        let resend_unknown = origin == Origin::Local && (M::IDEMPOTENT || stamp.is_some());
        let mut local_resends = 0;
        loop {
            let mut changes = self.changes.subscribe();
            let route = self.route(shard);
            if refuse_after_map_change(origin, &route, arrival, self.map_epoch()) {
                return Err(Error::NotReady {
                    reason: NotReadyReason::ShardMoving,
                });
            }
            let reason = match route {
                Route::Fail(error) => return Err(error),
                Route::Local => {
                    let Some(m) = msg.take() else {
                        return Err(Error::Internal {
                            detail: "message lost in routing".into(),
                        });
                    };
                    if resend_unknown && stamp.is_some() && encoded.is_none() {
                        encoded = Some(codec::encode(&m)?);
                    }
                    match self.deliver(shard, key.clone(), m, stamp).await {
                        // Its commit failed or its activation lost the shard: sent again under
                        // its id, the shard answers from its record if it was applied.
                        Ok(Err(Error::OutcomeUnknown { .. }))
                            if resend_unknown
                                && local_resends < LOCAL_RESENDS_MAX
                                && Instant::now() < deadline =>
                        {
                            let (Some(stamp), Some(bytes)) = (&mut stamp, &encoded) else {
                                return Err(Error::OutcomeUnknown { shard });
                            };
                            local_resends += 1;
                            stamp.once.attempt = stamp.once.attempt.saturating_add(1);
                            msg = Some(codec::decode(bytes)?);
                            continue;
                        }
                        Ok(reply) => return reply,
                        Err((m, reason)) => {
                            msg = Some(m);
                            reason
                        }
                    }
                }
                Route::Forward(owner, addr) => {
                    let epoch = self.map_epoch();
                    if origin == Origin::Forwarded {
                        return Err(Error::WrongOwner {
                            shard,
                            owner,
                            epoch,
                        });
                    }
                    let Some(m) = msg.as_ref() else {
                        return Err(Error::Internal {
                            detail: "message lost in routing".into(),
                        });
                    };
                    let payload = match &encoded {
                        Some(bytes) => bytes.clone(),
                        None => {
                            let bytes = codec::encode(m)?;
                            encoded = Some(bytes.clone());
                            bytes
                        }
                    };
                    let forwarded = self
                        .forward(owner, addr, &key, M::TAG, payload, epoch, deadline, stamp)
                        .await;
                    match &forwarded {
                        Forwarded::NotSent(reason) => {
                            tracing::debug!(owner, %reason, "owner unreachable; waiting for failover");
                        }
                        Forwarded::Unknown | Forwarded::Failed(Error::OutcomeUnknown { .. })
                            if resend_unknown =>
                        {
                            tracing::debug!(
                                owner,
                                "outcome unknown; re-sending an idempotent message"
                            );
                            if let Some(stamp) = &mut stamp {
                                stamp.once.attempt = stamp.once.attempt.saturating_add(1);
                            }
                        }
                        _ => {}
                    }
                    match after_forward(forwarded, shard, epoch, resend_unknown, origin) {
                        AfterForward::Reply(bytes) => return codec::decode(&bytes),
                        AfterForward::Fail(error) => return Err(error),
                        AfterForward::CatchUp(theirs) => {
                            // Our map is behind theirs: catch up, then route again.
                            while self.map_epoch() < theirs && Instant::now() < wait_deadline {
                                let _ = tokio::time::timeout_at(
                                    wait_deadline.into(),
                                    changes.changed(),
                                )
                                .await;
                            }
                            if self.map_epoch() < theirs {
                                return Err(Error::NotReady {
                                    reason: NotReadyReason::ShardMoving,
                                });
                            }
                            continue;
                        }
                        AfterForward::Wait(reason) => reason,
                    }
                }
                Route::Wait(reason) => reason,
            };
            // No serving owner now: wait (bounded) for the table, the lease or the owner.
            let now = Instant::now();
            let cut_off = reason == NotReadyReason::LeaseExpired
                && self.lease.expired_for(self.limits.unavailable_wait);
            if !keep_waiting(&bounds, now, self.table.load().leaderless_since, cut_off) {
                return Err(Error::NotReady { reason });
            }
            if _waiting.is_none() {
                _waiting = Some(
                    WaitPermit::take(&self.waiting, self.limits.waiting_max)
                        .ok_or(Error::Overloaded { shard })?,
                );
            }
            // Wake on any change of table or lease, or after a short pause (an unreachable owner
            // or a remote lease renewal changes nothing here).
            let pause = Duration::from_millis(10);
            let until = wait_deadline.min(now + pause);
            let _ = tokio::time::timeout_at(until.into(), changes.changed()).await;
        }
    }

    /// Forwards an encoded message to `addr`.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        owner: NodeId,
        addr: SocketAddr,
        key: &Key,
        tag: &str,
        payload: Vec<u8>,
        epoch: Epoch,
        deadline: Instant,
        stamp: Option<Stamp>,
    ) -> Forwarded {
        let Some(transport) = &self.transport else {
            return Forwarded::NotSent("standalone node".into());
        };
        let (key_bytes, tag) = (key.as_bytes().to_vec(), tag.to_string());
        let request = match stamp {
            Some(stamp) => Request::ForwardOnce {
                key: key_bytes,
                tag,
                payload,
                epoch,
                once: stamp.once,
                digest: stamp.digest.to_le_bytes(),
            },
            None => Request::Forward {
                key: key_bytes,
                tag,
                payload,
                epoch,
            },
        };
        let bytes = match codec::encode(&request) {
            Ok(bytes) => bytes,
            Err(error) => return Forwarded::Failed(error),
        };
        if self.silent(transport, addr) {
            return Forwarded::NotSent(format!(
                "node {owner} at {addr} does not answer (frozen or cut off)"
            ));
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let shard = key.shard(self.shard_count);
        let answer = tokio::select! {
            answer = transport.request_node(owner, addr, bytes, timeout) => answer,
            () = self.moved_from_silent(shard, owner, addr, transport) => return Forwarded::Unknown,
        };
        match answer {
            Ok(answer) => match codec::decode::<Response>(&answer) {
                Ok(Response::Shard(Ok(reply))) => Forwarded::Reply(reply),
                Ok(Response::Shard(Err(error))) => Forwarded::Failed(error),
                Ok(_) => Forwarded::Failed(Error::Protocol {
                    detail: format!(
                        "node {owner} answered a forwarded message with another kind of response"
                    ),
                }),
                Err(error) => Forwarded::Failed(error),
            },
            // Never sent: safe to try again once the shard has an owner we can reach.
            Err(
                error @ (TransportError::Unreachable { .. }
                | TransportError::Refused { .. }
                | TransportError::WrongNode { .. }),
            ) => Forwarded::NotSent(error.to_string()),
            Err(TransportError::Timeout { after, .. }) => Forwarded::Failed(Error::Timeout {
                shard: key.shard(self.shard_count),
                after,
            }),
            Err(TransportError::FrameTooLarge { len, .. }) => Forwarded::Failed(Error::TooLarge {
                what: "message".to_owned(),
                size: len as u64,
                limit: transport.config().payload_max() as u64,
            }),
            // The owner's connection had too many requests in progress: refused unstarted.
            Err(TransportError::Remote { reason }) if reason == OVERLOADED => {
                Forwarded::Failed(Error::Overloaded {
                    shard: key.shard(self.shard_count),
                })
            }
            // Sent, maybe handled, no answer: the caller must decide.
            Err(TransportError::Closed { .. }) => Forwarded::Unknown,
            Err(error) => Forwarded::Failed(Error::Unreachable {
                node: owner,
                reason: error.to_string(),
            }),
        }
    }

    /// Resolves once the connection to `owner` at `addr` does not answer while `shard` has an
    /// owner other than `owner` in this node's table, or while this node cannot vouch for its
    /// table (no leader, not ready, lease lapsed: in a majority outage the map never moves): a
    /// message in flight to it can no longer be answered by anyone who knows its outcome.
    async fn moved_from_silent(
        &self,
        shard: ShardId,
        owner: NodeId,
        addr: SocketAddr,
        transport: &Transport,
    ) {
        let mut changes = self.changes.subscribe();
        let mut health = transport.health_changes();
        let mut peer_health = self.peers.as_ref().map(Transport::health_changes);
        loop {
            let table = self.table.load();
            let now_owner = table.state.map.as_ref().and_then(|m| m.owner(shard));
            let moved = now_owner.is_some_and(|o| o != owner);
            let doubtful = self.cannot_vouch(&table);
            let silent = self.silent(transport, addr);
            if (moved || doubtful) && silent {
                return;
            }
            // A lease lapses without a change notice: look again while the owner is silent.
            let recheck = if silent {
                Duration::from_millis(50)
            } else {
                Duration::MAX
            };
            tokio::select! {
                () = tokio::time::sleep(recheck) => {}
                changed = changes.changed() => if changed.is_err() { return std::future::pending().await },
                changed = health.changed() => if changed.is_err() { return std::future::pending().await },
                changed = async {
                    match peer_health.as_mut() {
                        Some(peer_health) => peer_health.changed().await,
                        None => std::future::pending().await,
                    }
                } => if changed.is_err() { peer_health = None },
            }
        }
    }

    /// Whether the node at `addr` does not answer: on the forwarding connection, or on the
    /// node's raft and lease connections, which hear from it all the time.
    fn silent(&self, transport: &Transport, addr: SocketAddr) -> bool {
        !transport.is_responsive(addr)
            || self
                .peers
                .as_ref()
                .is_some_and(|peers| !peers.is_responsive(addr))
    }

    /// Delivers to the local actor. `Err((msg, why))` when the node does not serve the shard
    /// after all (the message comes back to be routed again).
    async fn deliver<M>(
        &self,
        shard: ShardId,
        key: Key,
        msg: M,
        once: Option<Stamp>,
    ) -> Result<Result<M::Reply, Error>, (M, NotReadyReason)>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        let (reply, reply_rx) = oneshot::channel();
        match self.enqueue(
            shard,
            Deliver {
                key,
                msg,
                once,
                reply,
            },
        ) {
            Ok(()) => {}
            Err(Enqueue::Failed(error)) => return Ok(Err(error)),
            Err(Enqueue::Retired(msg)) => return Err((msg, NotReadyReason::LeaseExpired)),
            Err(Enqueue::Elsewhere(msg)) => return Err((msg, NotReadyReason::ShardMoving)),
        }
        match tokio::time::timeout(self.limits.request_timeout, reply_rx).await {
            Ok(Ok(Ok(value))) => Ok(Ok(value)),
            Ok(Ok(Err(Undelivered::NotServing(msg)))) => Err((msg, NotReadyReason::LeaseExpired)),
            Ok(Ok(Err(Undelivered::Failed(error)))) => Ok(Err(error)),
            Ok(Err(_)) => Ok(Err(self.stopped_error(shard))),
            Err(_) => Ok(Err(Error::Timeout {
                shard,
                after: self.limits.request_timeout,
            })),
        }
    }

    fn stopped_error(&self, shard: ShardId) -> Error {
        if self.stopping.load(Ordering::Acquire) {
            Error::ShuttingDown
        } else {
            Error::ShardFailed {
                shard,
                reason: "the shard actor stopped before replying".into(),
            }
        }
    }

    /// Puts `deliver` in the mailbox of `shard`'s actor, counting it against the mailbox bound.
    /// Under the slot's lock, so the hot path clones nothing. Without a running actor the ledger
    /// decides: start one (with the parked snapshot) only while the node serves the shard, and
    /// make the request wait while the shard's state is retiring or on its way out.
    fn enqueue<M>(&self, shard: ShardId, deliver: Deliver<M>) -> Result<(), Enqueue<M>>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        let slot = self.slots.get(shard as usize).ok_or_else(|| {
            Enqueue::Failed(Error::Internal {
                detail: format!("shard {shard} is out of range"),
            })
        })?;
        let mut ledger = lock(slot);
        if let Place::Running { actor, handle } = ledger.place() {
            if !handle.actor.connected() {
                // Its arbiter stopped under it: nothing of its state can be recovered.
                let actor = *actor;
                tracing::error!(
                    shard,
                    "a shard actor stopped without retiring; its state is lost"
                );
                ledger::apply(&mut ledger, |l| l.actor_gone(actor));
            }
        }
        if ledger.running().is_none() {
            let serves = self.serves_now(shard).is_some();
            let number = self.next_actor.fetch_add(1, Ordering::Relaxed);
            let mut started = None;
            let intake = ledger::apply(&mut ledger, |l| {
                l.request(serves, number, || {
                    let (slot, start) = self.new_shard_actor(shard, number);
                    started = Some(start);
                    slot
                })
            });
            match intake {
                Intake::Start { restore } => {
                    let start = started.expect("the ledger built the actor's handle to start it");
                    if !start(restore) {
                        ledger::apply(&mut ledger, |l| l.actor_gone(number));
                        return Err(Enqueue::Failed(Error::ShuttingDown));
                    }
                    self.queue_bound_pass();
                }
                Intake::NotServing => return Err(Enqueue::Retired(deliver.msg)),
                Intake::Elsewhere => return Err(Enqueue::Elsewhere(deliver.msg)),
            }
        }
        let Some(running) = ledger.running() else {
            return Err(Enqueue::Retired(deliver.msg));
        };
        if running.queued.fetch_add(1, Ordering::AcqRel) >= self.limits.mailbox_capacity {
            running.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Enqueue::Failed(Error::Overloaded { shard }));
        }
        match running.actor.try_send(deliver) {
            Ok(()) => {
                running
                    .last_used
                    .store(self.clock.load(Ordering::Relaxed), Ordering::Relaxed);
                Ok(())
            }
            Err(SendError::Full(deliver) | SendError::Closed(deliver)) => {
                // A full actix channel cannot happen below our own count; a closed one means the
                // actor just stopped: route again.
                running.queued.fetch_sub(1, Ordering::AcqRel);
                Err(Enqueue::Retired(deliver.msg))
            }
        }
    }

    /// The handle of a new shard actor numbered `number`, and the function that starts it with
    /// its restore on the node's arbiter (false when the arbiter is gone).
    #[allow(clippy::type_complexity)]
    fn new_shard_actor(
        &self,
        shard: ShardId,
        number: u64,
    ) -> (ShardSlot<H>, Box<dyn FnOnce(Option<Handoff>) -> bool + '_>) {
        // Built by hand rather than with `Actor::start_in_arbiter`, which creates the mailbox with
        // actix's default capacity (16) until the actor runs.
        let (sender, receiver) = channel::channel(self.limits.mailbox_capacity);
        let actor = Addr::new(sender);
        let queued = Arc::new(AtomicUsize::new(0));
        let actor_queued = queued.clone();
        let start = Box::new(move |restore: Option<Handoff>| {
            let router = self.self_ref.clone();
            let (factory, cluster) = (self.factory.clone(), self.handle(Some((shard, number))));
            let store = self.store.clone();
            let session_idle = self.limits.session_idle;
            self.arbiter.spawn_fn(move || {
                let context = Context::with_receiver(receiver);
                let shard_actor = ShardActor::new(
                    ActorParts {
                        shard,
                        number,
                        router,
                        cluster,
                        factory,
                        queued: actor_queued,
                        store,
                        session_idle,
                    },
                    restore,
                );
                actix_rt::spawn(context.into_future(shard_actor));
            })
        });
        let last_used = Arc::new(AtomicU64::new(self.clock.load(Ordering::Relaxed)));
        (
            ShardSlot {
                actor,
                queued,
                last_used,
            },
            start,
        )
    }

    /// One step of the planned move of `shard` to `to` (allocation `epoch`), for the handoff
    /// task: asks a running actor to retire (its snapshot comes back through
    /// [`retired`](Self::retired)), or hands out the snapshot to send.
    /// Nothing happens until this router's own table shows the move: the router actor's rounds follow
    /// the applied state directly, and a table that lags behind it would still let requests
    /// start the shard here after its state left.
    pub(crate) fn begin_move(&self, shard: ShardId, to: NodeId, epoch: u64) -> MoveStep<()> {
        let Some(slot) = self.slots.get(shard as usize) else {
            return MoveStep::Wait;
        };
        let shown = self
            .table
            .load()
            .state
            .pending
            .get(&shard)
            .is_some_and(|p| p.from == self.node_id && p.to == to && p.epoch == epoch);
        if !shown {
            return MoveStep::Wait;
        }
        // A node-local store may hold state of a shard that has no actor here (not active since
        // the node restarted, or passivated): an actor wakes to load it and hand it over.
        let node_local = self
            .store
            .as_ref()
            .is_some_and(|store| store.locality() != Locality::Shared);
        let mut woken = None;
        let step = match node_local {
            true => {
                let number = self.next_actor.fetch_add(1, Ordering::Relaxed);
                let (handle, start) = self.new_shard_actor(shard, number);
                let used = std::cell::Cell::new(false);
                let step = ledger::apply_locked(slot, |l| {
                    let wake = || {
                        used.set(true);
                        handle
                    };
                    l.begin_move_waking(to, epoch, Some((number, wake)))
                });
                if used.get() {
                    woken = Some(start);
                }
                step
            }
            false => ledger::apply_locked(slot, |l| l.begin_move(to, epoch)),
        };
        match step {
            MoveStep::Retire(running) => {
                if let Some(start) = woken {
                    if !start(None) {
                        // The arbiter is gone: the node is stopping, and the move waits until
                        // it is re-targeted or cancelled.
                        tracing::warn!(shard, "cannot start an actor to hand over the shard's stored state: the node is stopping");
                    }
                }
                // `do_send`: the retirement waits its turn behind the messages already queued,
                // and its outcome reaches the ledger however long that takes.
                running.actor.do_send(Deactivate);
                MoveStep::Retire(())
            }
            MoveStep::Wait => MoveStep::Wait,
            MoveStep::Send(snapshot) => MoveStep::Send(snapshot),
        }
    }

    /// Waits until none of `shards` is retiring any more, or until `timeout`; returns those
    /// still retiring.
    pub(crate) async fn wait_retired(&self, shards: &[ShardId], timeout: Duration) -> Vec<ShardId> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.retirements.notified();
            let retiring: Vec<ShardId> = shards
                .iter()
                .copied()
                .filter(|shard| {
                    self.slots
                        .get(*shard as usize)
                        .is_some_and(|slot| matches!(lock(slot).place(), Place::Retiring { .. }))
                })
                .collect();
            if retiring.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return retiring;
            }
        }
    }

    /// Whether the node holds a lease for an epoch its table has reached and owns `shard` in
    /// that table (also while the shard waits to move away: its state is still only here).
    fn owns_under_lease(&self, shard: ShardId) -> bool {
        let table = self.table.load();
        self.lease.covers(table.state.epoch)
            && table.state.map.as_ref().and_then(|m| m.owner(shard)) == Some(self.node_id)
    }

    /// Whether actor `actor` of `shard` may still answer a message it began under a valid
    /// lease: the node holds a lease now (for an epoch its table has reached), owns the shard in
    /// that table, and the actor still holds the shard's state (running, or asked to retire
    /// for a planned move, which waits for it). Then no other node can have served the shard
    /// meanwhile: it moves only by this actor's handoff, or after this node's lease expired and
    /// was not renewed.
    pub(crate) fn may_reply(&self, shard: ShardId, actor: u64) -> bool {
        self.owns_under_lease(shard)
            && self.slots.get(shard as usize).is_some_and(|slot| {
                matches!(lock(slot).place(),
                    Place::Running { actor: a, .. }
                    | Place::Retiring { actor: a }
                    | Place::Passivating { actor: a, .. } if *a == actor)
            })
    }

    /// Actor `actor` of `shard` retired and hands back its state (called by the actor).
    pub(crate) fn retired(&self, shard: ShardId, actor: u64, snapshot: Option<Handoff>) {
        let epoch = self.table.load().state.epoch;
        if let Some(slot) = self.slots.get(shard as usize) {
            if !ledger::apply_locked(slot, |l| l.retired(actor, snapshot, epoch)) {
                tracing::debug!(shard, actor, "a stale actor retired; its state is not kept");
            }
        }
        self.retirements.notify_waiters();
    }

    /// The send of `shard`'s snapshot for the move of `epoch` to `to` ended with `outcome`.
    pub(crate) fn sent(&self, shard: ShardId, to: NodeId, epoch: u64, outcome: Sent) {
        if let Some(slot) = self.slots.get(shard as usize) {
            ledger::apply_locked(slot, |l| l.sent(to, epoch, outcome));
        }
        // A cancelled move's requests wait for the state to come back.
        self.changes.send_modify(|v| *v += 1);
    }

    /// Keeps a snapshot handed over by the previous owner (for the move of allocation `epoch`)
    /// until the shard starts here or moves on.
    /// Refused while the node stops: the sender must not release a shard to a node that is
    /// about to exit.
    pub(crate) fn accept_handoff(
        &self,
        shard: ShardId,
        epoch: u64,
        handoff: Option<Handoff>,
    ) -> Result<(), HandoffRefused> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(HandoffRefused::ShuttingDown { node: self.node_id });
        }
        let slot = self
            .slots
            .get(shard as usize)
            .ok_or(HandoffRefused::ShardOutOfRange { shard })?;
        let mut ledger = lock(slot);
        if !ledger::apply(&mut ledger, |l| l.received(epoch, handoff)) {
            if ledger.running().is_some() {
                // An actor of an earlier activation still runs here (its stop was not installed
                // yet): taking the shard now would keep that actor's stale state and drop this
                // snapshot. Refused, so the sender keeps it and tries again.
                return Err(HandoffRefused::EarlierActivationRunning {
                    shard,
                    node: self.node_id,
                });
            }
            tracing::debug!(shard, epoch, "a stale or duplicate snapshot was not kept");
        }
        Ok(())
    }

    /// Keeps one chunk of a large snapshot; the last one parks the whole snapshot like
    /// [`accept_handoff`](Self::accept_handoff). Chunks of one snapshot come in order; a first
    /// chunk starts the snapshot afresh (the sender retried or moved on).
    pub(crate) fn accept_chunk(
        &self,
        from: NodeId,
        epoch: u64,
        shard: ShardId,
        offset: u64,
        total: u64,
        bytes: Vec<u8>,
    ) -> Result<(), HandoffRefused> {
        if shard >= self.shard_count {
            return Err(HandoffRefused::ShardOutOfRange { shard });
        }
        if total > codec::SNAPSHOT_BYTES_MAX {
            return Err(HandoffRefused::TooLarge {
                shard,
                total,
                limit: codec::SNAPSHOT_BYTES_MAX,
            });
        }
        let mut staging = lock(&self.staging);
        if offset == 0 {
            staging.insert(
                shard,
                Staging {
                    from,
                    epoch,
                    total,
                    bytes: Vec::new(),
                },
            );
        }
        let Some(staged) = staging.get_mut(&shard) else {
            return Err(HandoffRefused::ChunkWithoutStart { shard, offset });
        };
        let expected = (
            staged.from,
            staged.epoch,
            staged.total,
            staged.bytes.len() as u64,
        );
        if expected != (from, epoch, total, offset) || offset + bytes.len() as u64 > total {
            staging.remove(&shard);
            return Err(HandoffRefused::ChunkOutOfOrder {
                shard,
                offset,
                total,
            });
        }
        staged.bytes.extend_from_slice(&bytes);
        if staged.bytes.len() as u64 == total {
            if let Some(done) = staging.remove(&shard) {
                drop(staging);
                return self.accept_handoff(shard, epoch, Some(Handoff::from_bytes(done.bytes)));
            }
        }
        Ok(())
    }

    /// Stops taking messages and deactivates every local shard (running `on_deactivate`).
    pub(crate) async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.changes.send_modify(|v| *v += 1);
        let actors: Vec<_> = self
            .slots
            .iter()
            .filter_map(|slot| ledger::apply_locked(slot, |l| l.shutdown()))
            .collect();
        let deactivations = actors.into_iter().map(|ShardSlot { actor, .. }| {
            let timeout = self.limits.deactivate_timeout;
            async move {
                // `send` (not `try_send`): deactivation waits its turn behind queued messages.
                let _ = tokio::time::timeout(timeout, actor.send(Deactivate)).await;
            }
        });
        futures_util::future::join_all(deactivations).await;
        // Nothing more is forwarded: the forwarding connections' tasks end here.
        for transport in self.transport.iter().chain(self.peers.iter()) {
            transport.close_all();
        }
    }

    /// Messages queued in this node's shard mailboxes.
    pub(crate) fn queue_depth(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|slot| {
                lock(slot)
                    .running()
                    .map(|s| s.queued.load(Ordering::Relaxed))
            })
            .sum()
    }

    /// Requests waiting for a serving owner.
    pub(crate) fn waiting_requests(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The number of shard actors running on this node.
    /// Starts the passivation pass on the node's arbiter, every `every`, if idle shards or a
    /// bound of active shards are configured. It ends when the router stops.
    pub(crate) fn start_passivation(self: &Arc<Self>) {
        let every = match (self.limits.passivate_after, self.limits.active_shards_max) {
            (None, None) => return,
            (Some(idle), _) => (idle / 4).clamp(PASSIVATION_PASS_MIN, PASSIVATION_PASS_MAX),
            (None, Some(_)) => PASSIVATION_PASS_MIN,
        };
        let router = self.self_ref.clone();
        self.arbiter.spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(router) = router.upgrade() else {
                    return;
                };
                if router.stopping.load(Ordering::Acquire) {
                    return;
                }
                router.passivate_pass();
            }
        });
    }

    /// Queues a passivation pass on the node's arbiter when a bound on active shards is set, so
    /// the bound holds as shards start under load rather than only at the next periodic pass
    /// (which lets every shard of the node start between two passes). One pass is queued at a
    /// time: the starts that come while it waits share it.
    fn queue_bound_pass(&self) {
        if self.limits.active_shards_max.is_none() || self.pass_queued.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let router = self.self_ref.clone();
        self.arbiter.spawn(async move {
            let Some(router) = router.upgrade() else {
                return;
            };
            router.pass_queued.store(false, Ordering::Release);
            if !router.stopping.load(Ordering::Acquire) {
                router.passivate_pass();
            }
        });
    }

    /// One passivation pass: asks the shards idle for `passivate_after`, and the least recently
    /// used beyond `active_shards_max`, to passivate. Returns how many were asked.
    pub(crate) fn passivate_pass(&self) -> usize {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.clock.store(now, Ordering::Relaxed);
        let mut running: Vec<(u64, ShardId, u64)> = Vec::new();
        for (shard, slot) in self.slots.iter().enumerate() {
            if let Place::Running { actor, handle } = lock(slot).place() {
                running.push((
                    handle.last_used.load(Ordering::Relaxed),
                    shard as ShardId,
                    *actor,
                ));
            }
        }
        running.sort_unstable();
        let idle_before = self
            .limits
            .passivate_after
            .map(|idle| now.saturating_sub(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX)));
        let over = self
            .limits
            .active_shards_max
            .map_or(0, |max| running.len().saturating_sub(max));
        let mut asked = 0;
        for (index, (last_used, shard, actor)) in running.into_iter().enumerate() {
            let idle = idle_before.is_some_and(|before| last_used <= before && last_used < now);
            if !(idle || index < over) {
                continue;
            }
            let Some(slot) = self.slots.get(shard as usize) else {
                continue;
            };
            if let Some(handle) = ledger::apply_locked(slot, |l| l.passivate(actor)) {
                handle.actor.do_send(Passivate);
                asked += 1;
            }
        }
        asked
    }

    /// Actor `actor` of `shard` passivated (`done`) or declined; requests that waited for it go
    /// on.
    pub(crate) fn passivated(&self, shard: ShardId, actor: u64, done: bool) {
        if let Some(slot) = self.slots.get(shard as usize) {
            ledger::apply_locked(slot, |l| l.passivated(actor, done));
        }
        self.changes.send_modify(|v| *v += 1);
    }

    pub(crate) fn active_shards(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| {
                lock(slot)
                    .running()
                    .is_some_and(|running| running.actor.connected())
            })
            .count()
    }
}

/// A snapshot arriving in chunks.
struct Staging {
    from: NodeId,
    epoch: u64,
    total: u64,
    bytes: Vec<u8>,
}

/// Why a message did not reach a shard's mailbox.
enum Enqueue<M> {
    /// Answer the sender with this error.
    Failed(Error),
    /// The node does not serve the shard now: route the message again.
    Retired(M),
    /// The shard's state is retiring or on its way out: the message waits.
    Elsewhere(M),
}

/// The time limits of one request (rule 5: a request for a shard without a serving owner waits
/// at the router, bounded, instead of failing).
#[derive(Debug, Clone, Copy)]
struct WaitBounds {
    /// When the request arrived.
    started: Instant,
    /// When it times out altogether (`request_timeout`).
    deadline: Instant,
    /// How long it may wait for a serving owner (`unavailable_wait`, within the timeout).
    wait_deadline: Instant,
    /// The wait bound itself: a cluster leaderless for longer is down, not failing over.
    unavailable_wait: Duration,
}

impl WaitBounds {
    fn new(started: Instant, limits: &RouterLimits) -> Self {
        WaitBounds {
            started,
            deadline: started + limits.request_timeout,
            wait_deadline: started + limits.unavailable_wait.min(limits.request_timeout),
            unavailable_wait: limits.unavailable_wait,
        }
    }
}

/// Whether a request without a serving owner waits on (rule 5) instead of failing `NotReady` now.
/// It stops at its bounds; at once when the cluster had been leaderless for the whole wait bound
/// before it arrived (down, not failing over); and at once when this node is `cut_off` (it could
/// not renew its lease for the wait bound, even a leader that still believes it leads).
fn keep_waiting(
    bounds: &WaitBounds,
    now: Instant,
    leaderless_since: Option<Instant>,
    cut_off: bool,
) -> bool {
    if now >= bounds.wait_deadline || now >= bounds.deadline || cut_off {
        return false;
    }
    leaderless_since.is_none_or(|since| since + bounds.unavailable_wait > bounds.started)
}

/// Whether a request that came from elsewhere (a remote client or another node) must be refused
/// because the map changed while it waited here: its sender may have learned that the shard
/// moved, given up on this copy and sent the message to the next owner (an idempotent one is
/// re-sent at once). Served or forwarded now, it could land after a newer write; refused, it was
/// never started, and the sender retries it under the new map.
fn refuse_after_map_change(origin: Origin, route: &Route, arrival: Epoch, now: Epoch) -> bool {
    origin != Origin::Local && matches!(route, Route::Local | Route::Forward(..)) && now != arrival
}

/// What a request does after forwarding it to the owner in our map.
#[derive(Debug, PartialEq)]
enum AfterForward {
    /// The owner answered.
    Reply(Vec<u8>),
    /// Rule 6: the owner's map is newer than ours: catch up to its epoch, then route again.
    CatchUp(Epoch),
    /// No serving owner now: wait (bounded, rule 5) and route again.
    Wait(NotReadyReason),
    /// The request fails with this error.
    Fail(Error),
}

/// Decides what follows a forward (rule 6, fencing by epoch, and the outcome rules): a
/// `WrongOwner` from a newer map catches up; from an older map (the new owner has not applied
/// the map that names it yet) waits; a message sent whose owner then failed is re-sent only when
/// it is idempotent and this node is its origin (a forwarded copy never forwards again), any
/// other fails `OutcomeUnknown`; a message never sent waits for failover.
fn after_forward(
    forwarded: Forwarded,
    shard: ShardId,
    our_epoch: Epoch,
    idempotent: bool,
    origin: Origin,
) -> AfterForward {
    match forwarded {
        Forwarded::Reply(bytes) => AfterForward::Reply(bytes),
        Forwarded::Failed(Error::WrongOwner { epoch: theirs, .. }) if theirs > our_epoch => {
            AfterForward::CatchUp(theirs)
        }
        Forwarded::Failed(Error::WrongOwner { .. }) => {
            AfterForward::Wait(NotReadyReason::ShardMoving)
        }
        Forwarded::Failed(Error::NotReady { reason }) => AfterForward::Wait(reason),
        Forwarded::Failed(Error::OutcomeUnknown { .. }) | Forwarded::Unknown
            if idempotent && origin == Origin::Local =>
        {
            AfterForward::Wait(NotReadyReason::OwnerUnreachable)
        }
        Forwarded::Unknown | Forwarded::Failed(Error::OutcomeUnknown { .. }) => {
            AfterForward::Fail(Error::OutcomeUnknown { shard })
        }
        Forwarded::Failed(error) => AfterForward::Fail(error),
        Forwarded::NotSent(_) => AfterForward::Wait(NotReadyReason::OwnerUnreachable),
    }
}

/// The outcome of forwarding a message.
enum Forwarded {
    /// Sent, and then its owner failed (connection lost, or silent while the shard moved): it
    /// may or may not have taken effect.
    Unknown,
    Reply(Vec<u8>),
    Failed(Error),
    /// Not sent at all (connection refused or in backoff): safe to retry.
    NotSent(String),
}

/// A place among the requests waiting at the router.
struct WaitPermit<'a>(&'a AtomicUsize);

impl<'a> WaitPermit<'a> {
    fn take(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        if counter.fetch_add(1, Ordering::AcqRel) >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(WaitPermit(counter))
    }
}

impl Drop for WaitPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<H: ShardHandler> Dispatch<H> for Router<H> {
    fn dispatch<M>(
        router: &Arc<Self>,
        key: Key,
        msg: M,
        origin: Origin,
    ) -> BoxFuture<'static, Result<M::Reply, Error>>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        let router = router.clone();
        Box::pin(async move { router.send(key, msg, origin).await })
    }
}

impl<H: ShardHandler> ShardHost<H> for Router<H> {
    fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn map_epoch(&self) -> Epoch {
        Router::map_epoch(self)
    }

    fn serves_now(&self, shard: ShardId) -> Option<Epoch> {
        Router::serves_now(self, shard)
    }

    fn activation_epoch(&self, shard: ShardId) -> Option<Epoch> {
        // Owned under a lease, also while the shard waits to move away: a retiring actor may
        // have to load the shard's state to hand it over.
        self.owns_under_lease(shard)
            .then(|| self.table.load().state.owned_since(shard))
    }

    fn may_reply(&self, shard: ShardId, actor: u64) -> bool {
        Router::may_reply(self, shard, actor)
    }

    fn observe(&self, shard: ShardId, kind: ServeEventKind, epoch: Epoch) {
        Router::observe(self, shard, kind, epoch)
    }

    fn retired(&self, shard: ShardId, actor: u64, snapshot: Option<Handoff>) {
        Router::retired(self, shard, actor, snapshot)
    }

    fn passivated(&self, shard: ShardId, actor: u64, done: bool) {
        Router::passivated(self, shard, actor, done)
    }

    fn retire_failed(&self, shard: ShardId, actor: u64) {
        if let Some(slot) = self.slots.get(shard as usize) {
            ledger::apply_locked(slot, |l| l.retire_failed(actor));
        }
        self.retirements.notify_waiters();
    }
}

impl<H: ShardHandler> RouteAny for Router<H> {
    fn send_any(
        &self,
        key: Key,
        tag: &'static str,
        msg: Box<dyn Any + Send>,
    ) -> BoxFuture<'static, Result<Box<dyn Any + Send>, Error>> {
        let Some(router) = self.self_ref.upgrade() else {
            return Box::pin(std::future::ready(Err(Error::ShuttingDown)));
        };
        match H::Message::from_any(msg) {
            Ok(wire) if router.counts_requests() => {
                let started = Instant::now();
                let routed = wire.route_any(&router, key);
                Box::pin(async move {
                    let result = routed.await;
                    router.record(RouteLabel::Local, result.as_ref().err(), started);
                    result
                })
            }
            Ok(wire) => wire.route_any(&router, key),
            Err(_) => Box::pin(std::future::ready(Err(Error::UnknownMessage {
                tag: tag.to_string(),
            }))),
        }
    }

    fn shard_of(&self, key: &Key) -> ShardId {
        key.shard(self.shard_count)
    }

    fn may_act_for(&self, shard: ShardId, actor: u64) -> bool {
        self.may_reply(shard, actor)
    }
}

/// Why a node did not keep a snapshot handed to it ([`Router::accept_handoff`],
/// [`Router::accept_chunk`]). The sender keeps the snapshot and tries again; the refusal
/// travels to it as the message of [`Response::HandoffRefused`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HandoffRefused {
    /// The receiving node is stopping: the sender must not release a shard to it.
    #[error("node {node} is shutting down")]
    ShuttingDown {
        /// The receiving node.
        node: NodeId,
    },
    /// The shard does not exist on the receiver (the two nodes disagree on the shard count).
    #[error("shard {shard} is out of range")]
    ShardOutOfRange {
        /// The shard.
        shard: ShardId,
    },
    /// An actor of an earlier activation of the shard still runs on the receiver.
    #[error("shard {shard} still runs an earlier activation on node {node}; retry")]
    EarlierActivationRunning {
        /// The shard.
        shard: ShardId,
        /// The receiving node.
        node: NodeId,
    },
    /// The snapshot is larger than a receiver stages.
    #[error("shard {shard}'s snapshot of {total} bytes is above the {limit}-byte limit")]
    TooLarge {
        /// The shard.
        shard: ShardId,
        /// The snapshot's size, in bytes.
        total: u64,
        /// The largest snapshot accepted, in bytes.
        limit: u64,
    },
    /// A later chunk of a snapshot arrived without its first one.
    #[error("shard {shard}: a chunk at {offset} without its start")]
    ChunkWithoutStart {
        /// The shard.
        shard: ShardId,
        /// Where the chunk starts in the snapshot.
        offset: u64,
    },
    /// A chunk did not continue the snapshot being staged; the staged part is dropped.
    #[error("shard {shard}: chunk out of order (at {offset} of {total}); start again")]
    ChunkOutOfOrder {
        /// The shard.
        shard: ShardId,
        /// Where the chunk starts in the snapshot.
        offset: u64,
        /// The snapshot's size, in bytes.
        total: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(unavailable_wait_ms: u64, request_timeout_ms: u64) -> RouterLimits {
        RouterLimits {
            mailbox_capacity: 16,
            request_timeout: Duration::from_millis(request_timeout_ms),
            deactivate_timeout: Duration::from_secs(1),
            unavailable_wait: Duration::from_millis(unavailable_wait_ms),
            waiting_max: 16,
            passivate_after: None,
            active_shards_max: None,
            session_idle: Duration::from_secs(900),
        }
    }

    const SHARD: ShardId = 3;

    fn wrong_owner(epoch: Epoch) -> Forwarded {
        Forwarded::Failed(Error::WrongOwner {
            shard: SHARD,
            owner: 2,
            epoch,
        })
    }

    #[test]
    fn a_wrong_owner_answer_from_a_newer_map_catches_up_and_from_an_older_map_waits() {
        // Rule 6: the sender catches up to the receiver's epoch and routes again.
        assert_eq!(
            after_forward(wrong_owner(9), SHARD, 7, false, Origin::Local),
            AfterForward::CatchUp(9)
        );
        // The receiver is behind (it has not applied the map naming it): wait, do not fail.
        for theirs in [6, 7] {
            assert_eq!(
                after_forward(wrong_owner(theirs), SHARD, 7, false, Origin::Local),
                AfterForward::Wait(NotReadyReason::ShardMoving)
            );
        }
    }

    #[test]
    fn an_unknown_outcome_is_resent_only_for_an_idempotent_message_from_its_origin() {
        let unknowns = || {
            [
                Forwarded::Unknown,
                Forwarded::Failed(Error::OutcomeUnknown { shard: SHARD }),
            ]
        };
        for forwarded in unknowns() {
            assert_eq!(
                after_forward(forwarded, SHARD, 7, true, Origin::Local),
                AfterForward::Wait(NotReadyReason::OwnerUnreachable)
            );
        }
        // Not idempotent, or a copy another node forwarded: never applied twice by us.
        // (A remote client decides itself whether to send again.)
        for (idempotent, origin) in [
            (false, Origin::Local),
            (true, Origin::Forwarded),
            (false, Origin::Forwarded),
            (true, Origin::Client),
        ] {
            for forwarded in unknowns() {
                assert_eq!(
                    after_forward(forwarded, SHARD, 7, idempotent, origin),
                    AfterForward::Fail(Error::OutcomeUnknown { shard: SHARD })
                );
            }
        }
    }

    #[test]
    fn an_unsent_message_or_a_not_ready_owner_waits_and_other_errors_fail() {
        assert_eq!(
            after_forward(
                Forwarded::NotSent("refused".into()),
                SHARD,
                7,
                false,
                Origin::Local
            ),
            AfterForward::Wait(NotReadyReason::OwnerUnreachable)
        );
        assert_eq!(
            after_forward(
                Forwarded::Failed(Error::NotReady {
                    reason: NotReadyReason::LeaseExpired
                }),
                SHARD,
                7,
                false,
                Origin::Local
            ),
            AfterForward::Wait(NotReadyReason::LeaseExpired)
        );
        let overloaded = Error::Overloaded { shard: SHARD };
        assert_eq!(
            after_forward(
                Forwarded::Failed(overloaded.clone()),
                SHARD,
                7,
                true,
                Origin::Local
            ),
            AfterForward::Fail(overloaded)
        );
        assert_eq!(
            after_forward(Forwarded::Reply(vec![1, 2]), SHARD, 7, false, Origin::Local),
            AfterForward::Reply(vec![1, 2])
        );
    }

    #[test]
    fn a_waiting_request_stops_at_its_wait_bound_or_timeout_whichever_is_first() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let bounds = WaitBounds::new(t0, &limits(500, 2_000));
        assert!(keep_waiting(&bounds, t0 + ms(499), None, false));
        assert!(!keep_waiting(&bounds, t0 + ms(500), None, false));
        // A request timeout shorter than the wait bound ends the wait first.
        let short = WaitBounds::new(t0, &limits(500, 200));
        assert!(keep_waiting(&short, t0 + ms(199), None, false));
        assert!(!keep_waiting(&short, t0 + ms(200), None, false));
    }

    #[test]
    fn a_request_to_a_cluster_leaderless_for_the_whole_wait_bound_fails_at_once() {
        let ms = Duration::from_millis;
        let t0 = Instant::now() + ms(10_000);
        let bounds = WaitBounds::new(t0, &limits(500, 2_000));
        // Leaderless since long before the request arrived: the cluster is down.
        assert!(!keep_waiting(&bounds, t0, Some(t0 - ms(500)), false));
        // The leader was lost just before: a failover is under way, so wait for it.
        assert!(keep_waiting(&bounds, t0, Some(t0 - ms(499)), false));
        assert!(keep_waiting(
            &bounds,
            t0 + ms(100),
            Some(t0 + ms(50)),
            false
        ));
    }

    #[test]
    fn a_node_cut_off_from_renewals_answers_at_once_instead_of_waiting() {
        let t0 = Instant::now();
        let bounds = WaitBounds::new(t0, &limits(500, 2_000));
        assert!(!keep_waiting(&bounds, t0, None, true));
    }

    #[test]
    fn a_forwarded_request_that_waited_across_a_map_change_is_refused_not_served() {
        let forward = Route::Forward(2, "127.0.0.1:1".parse().expect("addr"));
        for route in [Route::Local, forward] {
            for remote in [Origin::Forwarded, Origin::Client] {
                assert!(refuse_after_map_change(remote, &route, 7, 8));
                assert!(!refuse_after_map_change(remote, &route, 7, 7));
            }
            // The node's own callers are not at risk of a duplicate elsewhere: served.
            assert!(!refuse_after_map_change(Origin::Local, &route, 7, 8));
        }
        // Still waiting: nothing was started, nothing to refuse.
        let waiting = Route::Wait(NotReadyReason::ShardMoving);
        assert!(!refuse_after_map_change(Origin::Forwarded, &waiting, 7, 8));
    }

    #[test]
    fn a_lease_for_a_newer_epoch_does_not_cover_an_older_table() {
        // Rule 4(b): the grant was for the state at allocation epoch 7; a routing table still
        // at epoch 6 may name this node as the owner of shards it has since lost.
        let lease = LeaseGate::new(false);
        assert!(!lease.covers(6), "no lease yet");
        lease.set(Instant::now() + Duration::from_secs(60), 7);
        assert!(!lease.covers(6));
        assert!(lease.covers(7));
        assert!(lease.covers(8));
        // A late answer to an older request neither shortens the lease nor lowers its epoch.
        lease.set(Instant::now() + Duration::from_secs(1), 5);
        assert!(!lease.covers(6));
        assert!(lease
            .remaining()
            .is_some_and(|left| left > Duration::from_secs(30)));
    }

    #[test]
    fn a_standalone_lease_covers_every_table() {
        let lease = LeaseGate::new(true);
        assert!(lease.covers(0));
        assert!(lease.covers(u64::MAX));
    }
}
