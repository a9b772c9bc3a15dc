//! The router: key → shard → the local shard actor, starting shard actors lazily.
//!
//! It holds the current routing table (the shard map and whether the node may serve), swapped
//! atomically so that the hot path reads it without a lock, and one slot per shard with the
//! address of its actor. It does not decide the map (consensus does) and does not run handler
//! code (shard actors do).

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use actix::dev::channel;
use actix::prelude::*;
use actix_rt::ArbiterHandle;
use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use crate::__private::WireMessage;
use crate::cluster::ClusterHandle;
use crate::error::{Error, NotReadyReason};
use crate::shard::{
    Deactivate, Deliver, HandlerFactory, Handles, ShardActor, ShardHandler, ShardMessage,
};
use crate::shard_map::{Epoch, Key, NodeId, ShardId, ShardMap};

/// What the router routes by: the newest shard map this node has, and whether it may serve.
#[derive(Debug, Clone)]
pub(crate) struct RoutingTable {
    /// The newest applied shard map, if any.
    pub(crate) map: Option<Arc<ShardMap>>,
    /// Why the node may not serve, or `None` when it may.
    pub(crate) not_ready: Option<NotReadyReason>,
}

/// Limits and timeouts of the router.
#[derive(Debug, Clone)]
pub(crate) struct RouterLimits {
    pub(crate) mailbox_capacity: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) deactivate_timeout: Duration,
}

/// A running shard actor and the count of messages waiting in its mailbox.
///
/// actix bounds a mailbox per sender (every `Addr` clone may queue past the capacity), so the
/// router counts queued messages itself: incremented before a send, decremented by the actor
/// when it takes the message out of its mailbox.
struct ShardSlot<H: ShardHandler> {
    actor: Addr<ShardActor<H>>,
    queued: Arc<AtomicUsize>,
}

impl<H: ShardHandler> Clone for ShardSlot<H> {
    fn clone(&self) -> Self {
        ShardSlot {
            actor: self.actor.clone(),
            queued: self.queued.clone(),
        }
    }
}

/// Routes messages to local shard actors. One per node; shared by every [`Node`](crate::Node)
/// and [`ClusterHandle`] of that node.
pub struct Router<H: ShardHandler> {
    node_id: NodeId,
    shard_count: u32,
    table: ArcSwap<RoutingTable>,
    stopping: AtomicBool,
    slots: Box<[Mutex<Option<ShardSlot<H>>>]>,
    arbiter: ArbiterHandle,
    factory: HandlerFactory<H>,
    limits: RouterLimits,
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
    // A panic while holding a slot lock cannot leave the slot half-written (it holds one
    // `Option<Addr>`), so a poisoned lock is safe to keep using.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<H: ShardHandler> Router<H> {
    pub(crate) fn new(
        node_id: NodeId,
        shard_count: u32,
        table: RoutingTable,
        arbiter: ArbiterHandle,
        factory: HandlerFactory<H>,
        limits: RouterLimits,
    ) -> Arc<Self> {
        Arc::new_cyclic(|self_ref| Router {
            node_id,
            shard_count,
            table: ArcSwap::from_pointee(table),
            stopping: AtomicBool::new(false),
            slots: (0..shard_count).map(|_| Mutex::new(None)).collect(),
            arbiter,
            factory,
            limits,
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

    /// Installs a new routing table (a new map, or a change of readiness).
    #[allow(dead_code)] // used by consensus mode
    pub(crate) fn set_table(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    /// The current routing table.
    pub(crate) fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// A type-erased handle for sending from inside shard `origin` (or from outside, `None`).
    pub(crate) fn handle(&self, origin: Option<ShardId>) -> ClusterHandle {
        let weak: Weak<dyn RouteAny> = self.self_ref.clone();
        ClusterHandle::new(weak, origin)
    }

    /// Sends `msg` to the shard owning `key` and waits for its reply.
    pub(crate) async fn send<M>(&self, key: Key, msg: M) -> Result<M::Reply, Error>
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        let (shard, epoch) = self.route(&key)?;
        let slot = self.shard_actor(shard, epoch)?;
        if slot.queued.fetch_add(1, Ordering::AcqRel) >= self.limits.mailbox_capacity {
            slot.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Overloaded { shard });
        }
        let (reply, reply_rx) = oneshot::channel();
        match slot.actor.try_send(Deliver {
            key,
            msg,
            epoch,
            reply,
        }) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                slot.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(Error::Overloaded { shard });
            }
            Err(SendError::Closed(_)) => {
                slot.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(self.stopped_error(shard));
            }
        }
        match tokio::time::timeout(self.limits.request_timeout, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.stopped_error(shard)),
            Err(_) => Err(Error::Timeout {
                shard,
                after: self.limits.request_timeout,
            }),
        }
    }

    /// The shard of `key` and the epoch to serve it under, if this node serves it now.
    fn route(&self, key: &Key) -> Result<(ShardId, Epoch), Error> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let table = self.table.load();
        if let Some(reason) = table.not_ready {
            return Err(Error::NotReady { reason });
        }
        let Some(map) = table.map.as_ref() else {
            return Err(Error::NotReady {
                reason: NotReadyReason::NoMap,
            });
        };
        let (shard, owner) = map.owner_of_key(key.as_bytes());
        if owner != self.node_id {
            return Err(Error::WrongOwner {
                shard,
                owner,
                epoch: map.epoch,
            });
        }
        Ok((shard, map.epoch))
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

    /// The running actor of `shard`, started on first use.
    fn shard_actor(&self, shard: ShardId, epoch: Epoch) -> Result<ShardSlot<H>, Error> {
        let slot = self
            .slots
            .get(shard as usize)
            .ok_or_else(|| Error::Codec(format!("shard {shard} is out of range")))?;
        let mut slot = lock(slot);
        if let Some(running) = slot.as_ref() {
            if running.actor.connected() {
                return Ok(running.clone());
            }
        }
        let started = self.start_shard(shard, epoch)?;
        *slot = Some(started.clone());
        Ok(started)
    }

    fn start_shard(&self, shard: ShardId, epoch: Epoch) -> Result<ShardSlot<H>, Error> {
        // Built by hand rather than with `Actor::start_in_arbiter`, which creates the mailbox with
        // actix's default capacity (16) until the actor runs: a burst of first messages to a
        // fresh shard would then be refused as `Overloaded`.
        let (sender, receiver) = channel::channel(self.limits.mailbox_capacity);
        let actor = Addr::new(sender);
        let queued = Arc::new(AtomicUsize::new(0));
        let (node_id, factory, cluster) =
            (self.node_id, self.factory.clone(), self.handle(Some(shard)));
        let actor_queued = queued.clone();
        let spawned = self.arbiter.spawn_fn(move || {
            let context = Context::with_receiver(receiver);
            let shard_actor =
                ShardActor::new(shard, node_id, epoch, cluster, factory, actor_queued);
            actix_rt::spawn(context.into_future(shard_actor));
        });
        if !spawned {
            return Err(Error::ShuttingDown);
        }
        tracing::debug!(shard, epoch, "shard activated");
        Ok(ShardSlot { actor, queued })
    }

    /// Stops taking messages and deactivates every local shard (running `on_deactivate`).
    pub(crate) async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let actors: Vec<_> = self
            .slots
            .iter()
            .filter_map(|slot| lock(slot).take())
            .collect();
        let deactivations = actors.into_iter().map(|ShardSlot { actor, .. }| {
            let timeout = self.limits.deactivate_timeout;
            async move {
                // `send` (not `try_send`): deactivation waits its turn behind queued messages.
                let _ = tokio::time::timeout(timeout, actor.send(Deactivate)).await;
            }
        });
        futures_util::future::join_all(deactivations).await;
    }

    /// The number of shard actors running on this node.
    pub(crate) fn active_shards(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| {
                lock(slot)
                    .as_ref()
                    .is_some_and(|running| running.actor.connected())
            })
            .count()
    }
}

/// The type-erased face of a router, behind [`ClusterHandle`].
pub(crate) trait RouteAny: Send + Sync + 'static {
    /// Sends a boxed message (already type-checked by the caller against `tag`).
    fn send_any(
        &self,
        key: Key,
        tag: &'static str,
        msg: Box<dyn Any + Send>,
    ) -> BoxFuture<'static, Result<Box<dyn Any + Send>, Error>>;

    /// The shard of `key`.
    fn shard_of(&self, key: &Key) -> ShardId;
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
            Ok(wire) => wire.route_any(&router, key),
            Err(_) => Box::pin(std::future::ready(Err(Error::UnknownMessage {
                tag: tag.to_string(),
            }))),
        }
    }

    fn shard_of(&self, key: &Key) -> ShardId {
        key.shard(self.shard_count)
    }
}
