//! The entry points: [`Cluster::builder`], the [`Node`] handle it starts, and the type-erased
//! [`ClusterHandle`] that handlers use to send further messages.
//!
//! This module wires the parts together and owns the node's configuration ([`NodeConfig`]); it
//! does no routing itself (the router does) and holds no handler state (shard actors do).

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix_rt::{Arbiter, ArbiterHandle, System};

use crate::error::{ConfigError, Error};
use crate::router::{RouteAny, Router, RouterLimits, RoutingTable};
use crate::shard::{HandlerFactory, Handles, ShardHandler, ShardMessage};
use crate::shard_map::{allocate, Epoch, Key, Member, NodeId, ShardId};

/// Settings of one node. Build it with `..Default::default()` or through [`ClusterBuilder`];
/// [`validate`](NodeConfig::validate) runs before the node starts.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster. Default: 1.
    pub node_id: NodeId,
    /// How many shards keys are hashed into; fixed for the life of a cluster. Default: 1024.
    pub shard_count: u32,
    /// Messages a shard actor's mailbox holds before senders get [`Error::Overloaded`].
    /// Default: 1024.
    pub mailbox_capacity: usize,
    /// How long `send` waits for a reply before [`Error::Timeout`]. Default: 5 s.
    pub request_timeout: Duration,
    /// How long shutdown waits for each shard's `on_deactivate`. Default: 5 s.
    pub deactivate_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            shard_count: 1024,
            mailbox_capacity: 1024,
            request_timeout: Duration::from_secs(5),
            deactivate_timeout: Duration::from_secs(5),
        }
    }
}

/// The largest shard count a cluster may have.
pub const SHARD_COUNT_MAX: u32 = 1 << 20;
/// The largest mailbox a shard may have.
pub const MAILBOX_CAPACITY_MAX: usize = 1 << 20;

impl NodeConfig {
    /// Checks every limit; the node refuses to start on the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn out_of_range(
            name: &'static str,
            value: impl std::fmt::Debug,
            expected: &'static str,
        ) -> ConfigError {
            ConfigError::OutOfRange {
                name,
                value: format!("{value:?}"),
                expected,
            }
        }
        if self.shard_count == 0 || self.shard_count > SHARD_COUNT_MAX {
            return Err(out_of_range(
                "shard_count",
                self.shard_count,
                "between 1 and 1048576",
            ));
        }
        if self.mailbox_capacity == 0 || self.mailbox_capacity > MAILBOX_CAPACITY_MAX {
            return Err(out_of_range(
                "mailbox_capacity",
                self.mailbox_capacity,
                "between 1 and 1048576",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(out_of_range(
                "request_timeout",
                self.request_timeout,
                "more than zero",
            ));
        }
        if self.deactivate_timeout.is_zero() {
            return Err(out_of_range(
                "deactivate_timeout",
                self.deactivate_timeout,
                "more than zero",
            ));
        }
        Ok(())
    }
}

/// Starts nodes: `Cluster::builder()`.
#[derive(Debug)]
pub struct Cluster(());

impl Cluster {
    /// A builder with default settings and no handler yet.
    pub fn builder() -> ClusterBuilder<()> {
        ClusterBuilder {
            config: NodeConfig::default(),
            factory: None,
            standalone: false,
            marker: PhantomData,
        }
    }
}

/// Configures and starts a node. `H` is the shard handler type, set by
/// [`handler`](Self::handler) or [`handler_with`](Self::handler_with).
pub struct ClusterBuilder<H> {
    config: NodeConfig,
    factory: Option<HandlerFactory<H>>,
    standalone: bool,
    marker: PhantomData<fn() -> H>,
}

impl<H> std::fmt::Debug for ClusterBuilder<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("config", &self.config)
            .field("standalone", &self.standalone)
            .finish_non_exhaustive()
    }
}

impl<H> ClusterBuilder<H> {
    /// This node's id, unique in the cluster. Default: 1.
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.config.node_id = id;
        self
    }

    /// The number of shards (fixed for the life of a cluster). Default: 1024.
    pub fn shards(mut self, shard_count: u32) -> Self {
        self.config.shard_count = shard_count;
        self
    }

    /// The capacity of each shard's mailbox. Default: 1024.
    pub fn mailbox_capacity(mut self, capacity: usize) -> Self {
        self.config.mailbox_capacity = capacity;
        self
    }

    /// How long `send` waits for a reply. Default: 5 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Replaces all settings at once.
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Runs the node alone, owning every shard, without consensus: for development and for unit
    /// tests of handlers. Default: off.
    pub fn standalone(mut self) -> Self {
        self.standalone = true;
        self
    }

    /// Uses `H2::default()` to build each shard's handler.
    pub fn handler<H2: ShardHandler + Default>(self) -> ClusterBuilder<H2> {
        self.handler_with(|_shard| H2::default())
    }

    /// Uses `factory(shard)` to build each shard's handler (on activation, and again after a
    /// handler panicked). Use it to hand handlers shared resources such as a database pool.
    pub fn handler_with<H2, F>(self, factory: F) -> ClusterBuilder<H2>
    where
        H2: ShardHandler,
        F: Fn(ShardId) -> H2 + Send + Sync + 'static,
    {
        ClusterBuilder {
            config: self.config,
            factory: Some(Arc::new(factory)),
            standalone: self.standalone,
            marker: PhantomData,
        }
    }
}

impl<H: ShardHandler> ClusterBuilder<H> {
    /// Validates the settings and starts the node.
    ///
    /// Shard actors run on the current actix arbiter when called inside an actix `System` (the
    /// fast path: same-thread sends), otherwise on a thread of their own.
    pub async fn start(self) -> Result<Node<H>, ConfigError> {
        self.config.validate()?;
        let factory = self.factory.ok_or(ConfigError::Missing {
            name: "handler",
            hint: "call .handler::<YourHandler>() or .handler_with(|shard| ..) on the builder",
        })?;
        if !self.standalone {
            return Err(ConfigError::Missing {
                name: "standalone",
                hint: "this release runs nodes standalone only: call .standalone() on the builder",
            });
        }
        check_tags::<H>()?;
        let (arbiter, system) = match System::try_current() {
            Some(_) => (Arbiter::current(), None),
            None => spawn_system(),
        };
        let config = self.config;
        let map =
            allocate(None, &[Member::new(config.node_id)], config.shard_count).map_err(|e| {
                ConfigError::Invalid {
                    name: "shard_count",
                    reason: e.to_string(),
                }
            })?;
        let table = RoutingTable {
            map: Some(Arc::new(map)),
            not_ready: None,
        };
        let limits = RouterLimits {
            mailbox_capacity: config.mailbox_capacity,
            request_timeout: config.request_timeout,
            deactivate_timeout: config.deactivate_timeout,
        };
        let router = Router::new(
            config.node_id,
            config.shard_count,
            table,
            arbiter,
            factory,
            limits,
        );
        tracing::info!(
            node_id = config.node_id,
            shards = config.shard_count,
            "standalone node started"
        );
        Ok(Node {
            inner: Arc::new(NodeInner { router, system }),
        })
    }
}

/// Refuses a handler whose messages share a wire tag (they could not be told apart on the wire).
fn check_tags<H: ShardHandler>() -> Result<(), ConfigError> {
    use crate::__private::WireMessage;
    let tags = <H::Message as WireMessage<H>>::TAGS;
    for (i, tag) in tags.iter().enumerate() {
        if tags[..i].contains(tag) {
            return Err(ConfigError::OutOfRange {
                name: "message tags",
                value: (*tag).to_string(),
                expected: "unique among one handler's messages: give one of them #[tag = \"...\"]",
            });
        }
    }
    Ok(())
}

/// Starts an actix `System` on a thread of its own for callers outside any actix runtime.
fn spawn_system() -> (ArbiterHandle, Option<System>) {
    let (sender, receiver) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("clusterfunk-node".into())
        .spawn(move || {
            let system = System::new();
            let _ = sender.send((Arbiter::current(), System::current()));
            system.run()
        });
    match spawned.ok().and_then(|_| receiver.recv().ok()) {
        Some((arbiter, system)) => (arbiter, Some(system)),
        // Without a thread the node cannot run at all; this only happens when the OS refuses
        // to create threads, and the arbiter of a stopped system makes every send fail cleanly.
        None => (Arbiter::new().handle(), None),
    }
}

struct NodeInner<H: ShardHandler> {
    router: Arc<Router<H>>,
    system: Option<System>,
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
    inner: Arc<NodeInner<H>>,
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
        self.inner.router.send(key.into(), msg)
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
        NodeStatus {
            node_id,
            epoch: table.map.as_ref().map(|map| map.epoch),
            serving: table.not_ready.is_none() && table.map.is_some(),
            shards_owned: table
                .map
                .as_ref()
                .map_or(0, |map| map.shards_of(node_id).count() as u32),
            shards_active: self.inner.router.active_shards(),
        }
    }

    /// Stops taking messages, runs `on_deactivate` on every active shard and stops them. Sends
    /// after this fail with [`Error::ShuttingDown`].
    pub async fn shutdown(&self) {
        self.inner.router.shutdown().await;
        tracing::info!(node_id = self.node_id(), "node stopped");
    }
}

/// A type-erased handle to a node, used by handlers through
/// [`ShardContext::cluster`](crate::ShardContext::cluster). Cheap to clone.
///
/// Its `send` checks at run time that the node's handler handles the message type
/// ([`Error::UnknownMessage`] otherwise) where [`Node::send`] checks at compile time.
#[derive(Clone)]
pub struct ClusterHandle {
    router: Weak<dyn RouteAny>,
    origin: Option<ShardId>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ClusterHandle {
    pub(crate) fn new(router: Weak<dyn RouteAny>, origin: Option<ShardId>) -> Self {
        ClusterHandle { router, origin }
    }

    /// Sends `msg` to the shard owning `key` and returns the reply. The returned future owns
    /// everything it needs, so an `async` handler can hold it across `.await`s.
    pub fn send<M: ShardMessage>(
        &self,
        key: impl Into<Key>,
        msg: M,
    ) -> impl Future<Output = Result<M::Reply, Error>> + Send + 'static {
        let key = key.into();
        let router = self.router.upgrade();
        let origin = self.origin;
        async move {
            let router = router.ok_or(Error::ShuttingDown)?;
            if let Some(origin) = origin {
                if router.shard_of(&key) == origin {
                    return Err(Error::Reentrant { shard: origin });
                }
            }
            let reply = router
                .send_any(key, M::TAG, Box::new(msg) as Box<dyn Any + Send>)
                .await?;
            reply
                .downcast::<M::Reply>()
                .map(|reply| *reply)
                .map_err(|_| Error::Codec(format!("reply of `{}` has an unexpected type", M::TAG)))
        }
    }
}
