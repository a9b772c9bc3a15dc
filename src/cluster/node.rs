//! The [`Node`] handle: sending, status, admin requests and shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_rt::System;

use crate::admin::{AdminError, AdminRequest, AdminResponse, StatusReport};
use crate::consensus::Consensus;
use crate::error::Error;
use crate::metrics::RouteLabel;
use crate::router::Router;
use crate::shard::{ClusterHandle, Origin};
use crate::shard::{Handles, ShardHandler, ShardMessage};
use crate::shard_map::{Epoch, Key, NodeId, ShardId};
use crate::storage::DataDirLock;
use crate::transport::ServerHandle;

use super::router_actor::RouterActorHandle;

pub(super) struct NodeInner<H: ShardHandler> {
    pub(super) router: Arc<Router<H>>,
    pub(super) system: Option<System>,
    pub(super) consensus: Option<Consensus>,
    /// The router actor, owner of the node's rebalancing (clustered nodes only); taken by
    /// `shutdown`.
    pub(super) router_actor: Mutex<Option<RouterActorHandle<H>>>,
    pub(super) server: Mutex<Option<ServerHandle>>,
    /// The file that says "drained by a graceful shutdown: undrain on restart" (persistent
    /// nodes only).
    pub(super) undrain_marker: Option<PathBuf>,
    /// The data dir's exclusive lock (persistent nodes only), released by `shutdown`.
    pub(super) data_dir_lock: Mutex<Option<DataDirLock>>,
    /// Why the node stopped serving for good, once it did (see [`Node::stopped`]).
    pub(super) stopped: tokio::sync::watch::Sender<Option<String>>,
}

impl<H: ShardHandler> Drop for NodeInner<H> {
    fn drop(&mut self) {
        if let Some(system) = self.system.take() {
            system.stop();
        }
    }
}

/// A running node. Cheap to clone; every clone talks to the same node.
pub struct Node<H: ShardHandler> {
    pub(super) inner: Arc<NodeInner<H>>,
}

impl<H: ShardHandler> Clone for Node<H> {
    fn clone(&self) -> Self {
        Node {
            inner: self.inner.clone(),
        }
    }
}

impl<H: ShardHandler> std::fmt::Debug for Node<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.inner.router.node_id())
            .finish_non_exhaustive()
    }
}

/// A snapshot of a node's state, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: NodeId,
    /// The epoch of the newest shard map the node has, if any.
    pub epoch: Option<Epoch>,
    /// Whether the node serves requests now.
    pub serving: bool,
    /// The shards this node owns in its newest map.
    pub shards_owned: u32,
    /// The shard actors running on this node now (started lazily on first message).
    pub shards_active: usize,
}

impl<H: ShardHandler> Node<H> {
    /// Sends `msg` to the shard that owns `key` and returns the handler's reply.
    ///
    /// Messages to one shard are handled one at a time in arrival order. Fails with
    /// [`Error::Overloaded`] when the shard's mailbox is full, [`Error::ShardFailed`] when the
    /// handler panicked, [`Error::Timeout`] when no reply came within `request_timeout`, and
    /// [`Error::ShuttingDown`] once [`shutdown`](Self::shutdown) began.
    pub fn send<M>(
        &self,
        key: impl Into<Key>,
        msg: M,
    ) -> impl Future<Output = Result<M::Reply, Error>> + Send + '_
    where
        M: ShardMessage,
        H: Handles<M>,
    {
        self.inner
            .router
            .send_counted(key.into(), msg, Origin::Local, RouteLabel::Local)
    }

    /// Runs an admin command on this node (as the `clusterfunk` tool does over the network).
    pub async fn admin(&self, request: AdminRequest) -> Result<AdminResponse, AdminError> {
        match &self.inner.consensus {
            Some(consensus) => consensus.admin(request, false).await,
            None => Err(AdminError::Invalid {
                reason: "a standalone node has no cluster to administer".into(),
            }),
        }
    }

    /// The `status` report of this node (cluster mode), `None` when standalone.
    pub fn cluster_status(&self) -> Option<StatusReport> {
        self.inner
            .consensus
            .as_ref()
            .map(|c| crate::service::status(c, &self.inner.router))
    }

    /// The fault injector of this node's outgoing connections (cluster mode): block or delay
    /// peers to simulate partitions in tests; [`Faults::isolate`](crate::transport::Faults::isolate)
    /// also makes the node's server drop every request it receives.
    pub fn faults(&self) -> Option<&crate::transport::Faults> {
        self.inner
            .consensus
            .as_ref()
            .map(|c| c.transport().faults())
    }

    /// A type-erased handle to this node, for code that does not know the handler type.
    pub fn handle(&self) -> ClusterHandle {
        self.inner.router.handle(None)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.router.node_id()
    }

    /// The shard `key` belongs to.
    pub fn shard_for(&self, key: impl Into<Key>) -> ShardId {
        key.into().shard(self.inner.router.shard_count())
    }

    /// The node's state now.
    pub fn status(&self) -> NodeStatus {
        let table = self.inner.router.table();
        let node_id = self.node_id();
        let map = table.state.map.as_ref();
        NodeStatus {
            node_id,
            epoch: map.map(|map| map.epoch),
            serving: table.not_ready.is_none()
                && map.is_some()
                && self.inner.router.lease_remaining().is_some(),
            shards_owned: map.map_or(0, |map| map.shards_of(node_id).count() as u32),
            shards_active: self.inner.router.active_shards(),
        }
    }

    /// Leaves gracefully, for rolling upgrades: drains this node's shards to the other members
    /// (their state moves by handoff and requests wait instead of failing), hands leadership to
    /// another voter if this node leads, then [`shutdown`](Self::shutdown)s. `timeout` bounds the
    /// drain and the hand-over; after it the node shuts down anyway (its remaining shards then
    /// fail over as after a crash).
    ///
    /// A node drained this way (and not by an operator) undrains itself when it starts again
    /// from the same data dir and has rejoined. Standalone nodes just shut down.
    pub async fn shutdown_gracefully(&self, timeout: Duration) -> GracefulShutdown {
        let Some(consensus) = self.inner.consensus.clone() else {
            self.shutdown().await;
            return GracefulShutdown::Drained;
        };
        let me = self.node_id();
        let started = Instant::now();
        let others = consensus
            .applied()
            .state
            .members
            .iter()
            .filter(|(id, m)| **id != me && !m.draining && !m.down)
            .count();
        if others == 0 {
            self.shutdown().await;
            return GracefulShutdown::NotDrained {
                reason: "no other member can take the shards".into(),
            };
        }
        let already_draining = consensus
            .applied()
            .state
            .members
            .get(&me)
            .is_some_and(|m| m.draining);
        if !already_draining {
            if let Some(marker) = &self.inner.undrain_marker {
                // Written before the drain: if the process dies midway the restart still undrains.
                if let Err(error) = std::fs::write(marker, b"drained by a graceful shutdown\n") {
                    tracing::warn!(%error, path = %marker.display(), "cannot record the shutdown drain; undrain the node by hand after restarting it");
                }
            }
        }
        let span = tracing::info_span!("graceful_shutdown", node = me);
        let outcome = tracing::Instrument::instrument(
            async {
                tracing::info!(?timeout, "draining before shutdown");
                let drained = tokio::time::timeout(
                    timeout,
                    consensus.admin(AdminRequest::Drain { id: me }, false),
                )
                .await;
                let outcome = match drained {
                    // A removed node owns nothing: there is nothing to hand over.
                    Ok(Ok(_)) | Ok(Err(AdminError::NotAMember { .. })) => GracefulShutdown::Drained,
                    Ok(Err(error)) => GracefulShutdown::NotDrained {
                        reason: error.to_string(),
                    },
                    Err(_) => GracefulShutdown::NotDrained {
                        reason: format!("the drain did not finish within {timeout:?}"),
                    },
                };
                let leading = consensus.raft().metrics().borrow().current_leader == Some(me);
                let left = timeout.saturating_sub(started.elapsed());
                if leading && !left.is_zero() {
                    match tokio::time::timeout(left, consensus.admin(AdminRequest::StepDown, false))
                        .await
                    {
                        Ok(Ok(_)) => tracing::info!("leadership handed over"),
                        Ok(Err(error)) => tracing::warn!(%error, "could not hand over leadership"),
                        Err(_) => tracing::warn!("leadership hand-over timed out"),
                    }
                }
                outcome
            },
            span,
        )
        .await;
        match &outcome {
            GracefulShutdown::Drained => tracing::info!(node = me, "drained; shutting down"),
            GracefulShutdown::NotDrained { reason } => {
                tracing::warn!(node = me, %reason, "shutting down without a complete drain")
            }
        }
        self.shutdown().await;
        outcome
    }

    /// Resolves when the node has stopped serving for good on its own, with the reason: its raft
    /// log could not be written (a full disk, an I/O error), or the cluster's membership records
    /// another zone for it than [`NodeConfig::zone`](crate::NodeConfig::zone). From then on it refuses every
    /// request ([`NotReadyReason::Stopped`](crate::NotReadyReason::Stopped)) and its shards fail over to the other nodes; exit
    /// (after [`shutdown`](Self::shutdown)) with the reason and restart the node once the disk
    /// is fixed. Never resolves on a healthy node or after an ordinary shutdown.
    ///
    /// ```no_run
    /// # async fn run(node: clusterfunk::Node<impl clusterfunk::ShardHandler>) {
    /// tokio::select! {
    ///     _ = tokio::signal::ctrl_c() => node.shutdown().await,
    ///     reason = node.stopped() => {
    ///         eprintln!("error: {reason}");
    ///         node.shutdown().await;
    ///         std::process::exit(1);
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn stopped(&self) -> String {
        let mut stopped = self.inner.stopped.subscribe();
        let reason = stopped
            .wait_for(Option::is_some)
            .await
            .map(|reason| reason.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            // The sender lives as long as the node: unreachable while `self` exists.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops taking messages, runs `on_deactivate` on every active shard and stops them. Sends
    /// after this fail with [`Error::ShuttingDown`].
    pub async fn shutdown(&self) {
        // The router actor first, then the node's tasks (they use the router and raft), each
        // awaited until it ended.
        let router_actor = self
            .inner
            .router_actor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(router_actor) = router_actor {
            router_actor.stop().await;
        }
        if let Some(consensus) = &self.inner.consensus {
            consensus.tasks().shutdown().await;
        }
        self.inner.router.shutdown().await;
        let server = self
            .inner
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(server) = server {
            server.shutdown().await;
        }
        if let Some(consensus) = &self.inner.consensus {
            if let Err(e) = consensus.raft().shutdown().await {
                tracing::warn!(error = %e, "raft did not shut down cleanly");
            }
            // Raft sends nothing more: its connections' tasks end here.
            consensus.transport().close_all();
        }
        // Raft has stopped writing: the data dir may be used by a new node from here.
        drop(
            self.inner
                .data_dir_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        tracing::info!(node_id = self.node_id(), "node stopped");
    }
}

/// How a [`Node::shutdown_gracefully`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GracefulShutdown {
    /// Every shard was handed over before the node stopped.
    Drained,
    /// The node stopped with shards left; they fail over as after a crash.
    NotDrained {
        /// Why the drain did not finish.
        reason: String,
    },
}
