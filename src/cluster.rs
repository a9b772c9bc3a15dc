//! The entry points: [`Cluster::builder`], the [`Node`] handle it starts, and the type-erased
//! [`ClusterHandle`] that handlers use to send further messages.
//!
//! This module wires the parts together and owns the node's configuration ([`NodeConfig`]); it
//! does no routing itself (the router does) and holds no handler state (shard actors do).

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use actix_rt::{Arbiter, ArbiterHandle, System};

use crate::admin::{AdminError, AdminRequest, AdminResponse, StatusReport};
use crate::consensus::network::Network;
use crate::consensus::{ClusterApp, ClusterState, Consensus, ConsensusConfig, NodeInfo, Raft};
use crate::error::{ConfigError, Error, NotReadyReason, StartError};
use crate::lease::LeaseConfig;
use crate::metrics::RouteLabel;
use crate::router::RouterParts;
use crate::router::{Router, RouterLimits, RoutingTable};
use crate::service::NodeService;
use crate::shard::ServeObserver;
use crate::shard::{ClusterHandle, Origin};
use crate::shard::{HandlerFactory, Handles, ShardHandler, ShardMessage};
use crate::shard_map::{allocate, Epoch, Key, Member, NodeId, ShardId};
use crate::storage::{data_dir, DataDirLock, Identity, LmdbStore, StoreOptions};
use crate::transport::{serve_with_faults, Secret, ServerHandle, Transport, TransportConfig};

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
    /// How long shutdown waits for each shard's `on_deactivate`, and how long a planned move
    /// waits for a shard to retire before it tries again later (the state is never handed
    /// over before the shard retired). Default: 5 s.
    pub deactivate_timeout: Duration,
    /// The cluster's name; nodes of differently named clusters refuse each other.
    /// Default: `"clusterfunk"`.
    pub cluster_name: String,
    /// The address the node listens on for peers, clients and the admin tool (cluster mode).
    /// Default: none (required unless standalone).
    pub listen: Option<SocketAddr>,
    /// The directory of the node's LMDB storage (cluster mode). Default: none (required unless
    /// standalone or in-memory for tests).
    pub data_dir: Option<PathBuf>,
    /// The node's zone (failure domain), if any. Default: none.
    pub zone: Option<String>,
    /// Raft timing and log settings.
    pub consensus: ConsensusConfig,
    /// Lease timing (rule 4).
    pub lease: LeaseConfig,
    /// How long a request waits for its shard to get a serving owner (during failover or
    /// handoff) before `NotReady`. Default: 3 s.
    pub unavailable_wait: Duration,
    /// How many requests may wait at once before `Overloaded`. Default: 10 000.
    pub waiting_max: usize,
    /// Where to serve Prometheus metrics (`http://ADDR/metrics`), process-wide. Default: none.
    pub metrics: Option<SocketAddr>,
    /// Most connections (peers, clients, admin tools) the node holds at once; further ones
    /// wait in the listen backlog until one closes, while the open ones keep being served.
    /// Count two per other node plus your clients. Default: 1024
    /// ([`TransportConfig::connections_max`]).
    pub connections_max: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            shard_count: 1024,
            mailbox_capacity: 1024,
            request_timeout: Duration::from_secs(5),
            deactivate_timeout: Duration::from_secs(5),
            cluster_name: "clusterfunk".to_string(),
            listen: None,
            data_dir: None,
            zone: None,
            consensus: ConsensusConfig::default(),
            lease: LeaseConfig::default(),
            unavailable_wait: Duration::from_secs(3),
            waiting_max: 10_000,
            metrics: None,
            connections_max: TransportConfig::default().connections_max,
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
        if self.waiting_max == 0 {
            return Err(out_of_range(
                "waiting_max",
                self.waiting_max,
                "more than zero",
            ));
        }
        self.lease.validate(
            self.consensus.election_timeout_max,
            self.consensus.heartbeat_interval,
        )?;
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

impl NodeConfig {
    pub(crate) fn router_limits(&self) -> RouterLimits {
        RouterLimits {
            mailbox_capacity: self.mailbox_capacity,
            request_timeout: self.request_timeout,
            deactivate_timeout: self.deactivate_timeout,
            unavailable_wait: self.unavailable_wait,
            waiting_max: self.waiting_max,
        }
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
            cluster: ClusterOptions::default(),
            observer: None,
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
    cluster: ClusterOptions,
    observer: Option<Arc<dyn ServeObserver>>,
    marker: PhantomData<fn() -> H>,
}

/// A planned move whose snapshots could not be delivered for this many lease periods is reported
/// as stuck and cancelled or re-targeted (a few periods: long enough that a leader election or a
/// brief network hiccup does not re-target, short enough that a shard is not unavailable long).
const STUCK_MOVE_LEASES: u32 = 4;

/// The builder's cluster-mode settings that are not plain configuration.
#[derive(Default)]
struct ClusterOptions {
    secret: Option<Secret>,
    tls: Option<crate::tls::TlsConfig>,
    insecure: bool,
    in_memory_for_tests: bool,
    initial_members: Option<BTreeMap<NodeId, NodeInfo>>,
    store: StoreOptions,
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

    /// Most connections the node holds at once (see [`NodeConfig::connections_max`]).
    /// Default: 1024.
    pub fn connections_max(mut self, connections: usize) -> Self {
        self.config.connections_max = connections;
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
            cluster: self.cluster,
            observer: self.observer,
            marker: PhantomData,
        }
    }

    /// The address to listen on, `IP:PORT` (cluster mode; required there). Default: none.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = Some(addr);
        self
    }

    /// The directory of the node's durable storage (cluster mode; required there unless
    /// [`in_memory_for_tests`](Self::in_memory_for_tests)). Default: none.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = Some(dir.into());
        self
    }

    /// Keeps the raft log in memory. **For tests only**: a restarted node forgets its vote and
    /// log, which raft's safety does not allow in production. Default: off.
    pub fn in_memory_for_tests(mut self) -> Self {
        self.cluster.in_memory_for_tests = true;
        self
    }

    /// The cluster's name. Default: `"clusterfunk"`.
    pub fn cluster_name(mut self, name: impl Into<String>) -> Self {
        self.config.cluster_name = name.into();
        self
    }

    /// This node's zone. Default: none.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.config.zone = Some(zone.into());
        self
    }

    /// The shared cluster secret that authenticates nodes and clients. Default: none, and a
    /// node without a secret refuses to start unless [`insecure`](Self::insecure).
    pub fn secret(mut self, secret: Secret) -> Self {
        self.cluster.secret = Some(secret);
        self
    }

    /// Runs every connection over TLS 1.3 with certificates of the cluster CA (see
    /// [`TlsConfig`](crate::tls::TlsConfig)): traffic is encrypted, and each peer's certificate
    /// decides what it may do (`node`, `admin`, `client`). This node's certificate must name
    /// its node id. Excludes [`secret`](Self::secret) and [`insecure`](Self::insecure).
    pub fn tls(mut self, tls: crate::tls::TlsConfig) -> Self {
        self.cluster.tls = Some(tls);
        self
    }

    /// Runs without a secret: anyone who reaches the port can join or send. For local
    /// experiments only. Default: off.
    pub fn insecure(mut self) -> Self {
        self.cluster.insecure = true;
        self
    }

    /// Bootstraps a new cluster with these voters on first start (every initial node gets the
    /// same list). A node whose storage already holds a cluster ignores it and rejoins from disk.
    pub fn initial_members(
        mut self,
        members: impl IntoIterator<Item = (NodeId, NodeInfo)>,
    ) -> Self {
        self.cluster.initial_members = Some(members.into_iter().collect());
        self
    }

    /// Lease timing. Default: [`LeaseConfig::default`].
    pub fn lease(mut self, lease: LeaseConfig) -> Self {
        self.config.lease = lease;
        self
    }

    /// Receives every activation, delivery and deactivation of a shard on this node: for tests
    /// that check that no two nodes serve one shard at once. Default: none.
    pub fn observer(mut self, observer: Arc<dyn ServeObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Raft timing and log settings. Default: [`ConsensusConfig::default`].
    pub fn consensus(mut self, consensus: ConsensusConfig) -> Self {
        self.config.consensus = consensus;
        self
    }

    /// Serves Prometheus metrics at `http://addr/metrics` (see the guide's metrics reference).
    /// The endpoint is process-wide: every node of one process must name the same address.
    /// Default: none.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.config.metrics = Some(addr);
        self
    }

    /// LMDB options (map size, fsync). Default: [`StoreOptions::default`].
    pub fn store_options(mut self, options: StoreOptions) -> Self {
        self.cluster.store = options;
        self
    }
}

impl<H: ShardHandler> ClusterBuilder<H> {
    /// Validates the settings and starts the node.
    ///
    /// Shard actors run on the current actix arbiter when called inside an actix `System` (the
    /// fast path: same-thread sends), otherwise on a thread of their own.
    pub async fn start(self) -> Result<Node<H>, StartError> {
        self.config.validate()?;
        let factory = self.factory.clone().ok_or(ConfigError::Missing {
            name: "handler",
            hint: "call .handler::<YourHandler>() or .handler_with(|shard| ..) on the builder",
        })?;
        check_tags::<H>()?;
        if let Some(addr) = self.config.metrics {
            crate::metrics::install(addr)?;
        }
        if !self.standalone {
            return self.start_clustered(factory).await;
        }
        let (arbiter, system) = match System::try_current() {
            Some(_) => (Arbiter::current(), None),
            None => spawn_system(),
        };
        let config = self.config;
        let state = standalone_state(config.node_id, config.shard_count)?;
        let table = RoutingTable {
            state: Arc::new(state),
            not_ready: None,
            leaderless_since: None,
        };
        let router = Router::new(RouterParts {
            node_id: config.node_id,
            shard_count: config.shard_count,
            table,
            arbiter,
            factory,
            limits: config.router_limits(),
            transport: None,
            peers: None,
            observer: self.observer,
        });
        tracing::info!(
            node_id = config.node_id,
            shards = config.shard_count,
            "standalone node started"
        );
        Ok(Node {
            inner: Arc::new(NodeInner {
                router,
                system,
                consensus: None,
                server: Mutex::new(None),
                undrain_marker: None,
                data_dir_lock: Mutex::new(None),
                stopped: tokio::sync::watch::channel(None).0,
            }),
        })
    }

    async fn start_clustered(self, factory: HandlerFactory<H>) -> Result<Node<H>, StartError> {
        let config = self.config;
        let options = self.cluster;
        let listen = config.listen.ok_or(ConfigError::Missing {
            name: "listen",
            hint: "call .listen(addr) or use .standalone()",
        })?;
        if options.tls.is_some() && (options.secret.is_some() || options.insecure) {
            return Err(ConfigError::Invalid {
                name: "tls",
                reason: format!(
                    "TLS cannot be combined with {}: certificates authenticate every connection; choose one mode",
                    if options.insecure { "insecure mode" } else { "a cluster secret" }
                ),
            }
            .into());
        }
        if options.secret.is_none() && options.tls.is_none() && !options.insecure {
            return Err(ConfigError::Missing {
                name: "secret",
                hint: "set CLUSTERFUNK_SECRET or pass a secret file (or use TLS certificates); use insecure mode only for local experiments",
            }
            .into());
        }
        if options.secret.is_none() && options.tls.is_none() {
            tracing::warn!(
                %listen,
                "INSECURE: this node runs without a cluster secret; anyone who reaches {listen} can join the cluster or send it messages"
            );
        }
        let raft_config = config.consensus.raft_config(&config.cluster_name)?;
        let advised = config.lease.renew_period + config.consensus.election_timeout_max * 2;
        if config.lease.lease < advised {
            tracing::warn!(
                lease = ?config.lease.lease,
                advised = ?advised,
                "the lease is shorter than the renew period plus two election timeouts: a leader election may briefly pause healthy shards (requests wait, they do not fail)"
            );
        }
        if let Some(members) = &options.initial_members {
            check_initial_members(members, config.node_id, listen)?;
        }
        let (log_store, state_machine, data_dir_lock) = if options.in_memory_for_tests {
            let (log_store, state_machine) =
                crate::storage::memory::in_memory_for_tests(ClusterApp);
            (log_store, state_machine, None)
        } else {
            let dir = config.data_dir.clone().ok_or(ConfigError::Missing {
                name: "data_dir",
                hint: "call .data_dir(path): raft logs must be persistent",
            })?;
            let store_options = options.store.clone();
            let identity = Identity {
                cluster_name: config.cluster_name.clone(),
                node_id: config.node_id,
            };
            // Opening maps the file and may create it: blocking work, off the async thread.
            // The data dir is claimed first: a second process on it, or a data dir of another
            // node or cluster, is refused before its log is read.
            tokio::task::spawn_blocking(move || {
                let lock = data_dir::lock(&dir)?;
                data_dir::check_identity(&lock, &identity)?;
                let store = LmdbStore::open(&dir, store_options)?;
                let state_machine = store.state_machine(ClusterApp)?;
                Ok::<_, StartError>((store.log_store(), state_machine, Some(lock)))
            })
            .await
            .map_err(|e| StartError::Failed(format!("storage thread: {e}")))??
        };
        let applied = state_machine.subscribe();
        let transport_config = TransportConfig {
            cluster_name: config.cluster_name.clone(),
            node_id: Some(config.node_id),
            secret: options.secret.clone(),
            tls: options.tls.clone(),
            // A restarted peer must be reachable again quickly: leases and failover run on
            // sub-second timers.
            reconnect_backoff_max: Duration::from_millis(250),
            connections_max: config.connections_max,
            ..TransportConfig::default()
        };
        let transport = Transport::new(transport_config.clone())
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let contact = Arc::new(crate::consensus::Contact::default());
        let network = Network::with_contact(transport.clone(), contact.clone());
        let forwarding =
            Transport::with_faults(transport_config.clone(), transport.faults().clone())
                .map_err(|e| StartError::Failed(e.to_string()))?;
        let raft = Raft::new(
            config.node_id,
            raft_config,
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Failed(format!("raft: {e}")))?;
        let consensus = Consensus::new(
            config.node_id,
            raft,
            applied,
            transport.clone(),
            config.consensus.clone(),
            config.lease.clone(),
            config.shard_count,
            contact,
        );
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: listen,
                source,
            })?;
        let (arbiter, system) = match System::try_current() {
            Some(_) => (Arbiter::current(), None),
            None => spawn_system(),
        };
        let table = RoutingTable {
            state: Arc::new(ClusterState::default()),
            not_ready: Some(NotReadyReason::Starting),
            leaderless_since: Some(Instant::now()),
        };
        let router = Router::new(RouterParts {
            node_id: config.node_id,
            shard_count: config.shard_count,
            table,
            arbiter,
            factory,
            limits: config.router_limits(),
            // Forwarded messages get connections of their own: a flood of them filling a
            // connection's in-flight limit must not starve raft heartbeats and lease renewals
            // (found by a test: the flooding node lost its lease and was marked down).
            transport: Some(forwarding),
            peers: Some(transport.clone()),
            observer: self.observer,
        });
        let service = Arc::new(NodeService {
            consensus: consensus.clone(),
            router: router.clone(),
            warnings: crate::transport::log_limit::LogLimit::new(
                crate::service::REFUSAL_WARNING_WINDOW,
                crate::service::REFUSAL_WARNINGS_PER_WINDOW,
            ),
        });
        let faults = Some(consensus.transport().faults().clone());
        let server = serve_with_faults(listener, transport_config, service, faults)
            .await
            .map_err(|e| StartError::Failed(e.to_string()))?;
        if let Some(members) = options.initial_members {
            consensus
                .bootstrap(members)
                .await
                .map_err(|e| StartError::Failed(e.to_string()))?;
        }
        let (stopped, _) = tokio::sync::watch::channel(None);
        tokio::spawn(follow_consensus(
            Arc::downgrade(&router),
            consensus.clone(),
            stopped.clone(),
        ));
        tokio::spawn(crate::lease_task::keep_lease(
            Arc::downgrade(&router),
            consensus.clone(),
        ));
        tokio::spawn(crate::handoff::hand_off(
            Arc::downgrade(&router),
            consensus.clone(),
            config.deactivate_timeout,
            config.lease.lease * STUCK_MOVE_LEASES,
        ));
        if crate::metrics::enabled() {
            tokio::spawn(crate::metrics::sample(
                Arc::downgrade(&router),
                consensus.clone(),
            ));
        }
        let undrain_marker = (!options.in_memory_for_tests)
            .then(|| config.data_dir.as_ref().map(|dir| dir.join(UNDRAIN_MARKER)))
            .flatten();
        if let Some(marker) = undrain_marker.clone().filter(|m| m.exists()) {
            tokio::spawn(undrain_after_restart(
                Arc::downgrade(&router),
                consensus.clone(),
                marker,
            ));
        }
        tracing::info!(node_id = config.node_id, %listen, "node started");
        Ok(Node {
            inner: Arc::new(NodeInner {
                router,
                system,
                consensus: Some(consensus),
                server: Mutex::new(Some(server)),
                undrain_marker,
                data_dir_lock: Mutex::new(data_dir_lock),
                stopped,
            }),
        })
    }
}

/// Installs every newly applied cluster state in the router, and tracks since when the node has
/// known no leader (a node without a leader keeps serving while its lease lasts, rule 4; requests
/// then fail fast instead of waiting once the outage is older than the wait bound).
async fn follow_consensus<H: ShardHandler>(
    weak: Weak<Router<H>>,
    consensus: Consensus,
    stopped: tokio::sync::watch::Sender<Option<String>>,
) {
    let mut metrics = consensus.raft().metrics();
    let mut applied = consensus.subscribe();
    let mut seen: Option<(Option<u64>, bool)> = None;
    let mut leaderless_since = Some(Instant::now());
    loop {
        let Some(router) = weak.upgrade() else {
            return;
        };
        let (leader, running) = {
            let current = metrics.borrow_and_update();
            (current.current_leader, current.running_state.clone())
        };
        match running {
            Ok(()) => {}
            // `Node::shutdown` stopped raft: nothing to report.
            Err(openraft::error::Fatal::Stopped) => return,
            Err(fatal) => {
                stop_for_good(&router, &consensus, &stopped, &fatal.to_string());
                return;
            }
        }
        match (leader, leaderless_since) {
            (Some(_), _) => leaderless_since = None,
            (None, None) => leaderless_since = Some(Instant::now()),
            (None, Some(_)) => {}
        }
        let current = applied.borrow_and_update().clone();
        let index = current.last_applied.as_ref().map(|l| l.index);
        if seen != Some((index, leaderless_since.is_some())) {
            seen = Some((index, leaderless_since.is_some()));
            let state = Arc::new(current.state.clone());
            let not_ready = match state.shard_count {
                Some(cluster) if cluster != router.shard_count() => {
                    tracing::error!(
                        node = router.node_id(),
                        configured = router.shard_count(),
                        cluster,
                        "this node was started with {} shards but the cluster has {cluster}: it answers NotReady until restarted with {cluster}",
                        router.shard_count()
                    );
                    Some(NotReadyReason::ShardCountMismatch)
                }
                _ if state.map.is_none() => Some(NotReadyReason::NoMap),
                _ => None,
            };
            router.set_table(RoutingTable {
                state,
                not_ready,
                leaderless_since,
            });
        }
        drop(router);
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                // The raft task ended without saying why (it panicked), unless it was stopped.
                if let (Some(router), true) = (weak.upgrade(), metrics.borrow().running_state.is_ok()) {
                    stop_for_good(&router, &consensus, &stopped, "the raft task ended unexpectedly");
                }
                return;
            },
            changed = applied.changed() => if changed.is_err() { return },
        }
    }
}

/// Raft stopped on a fatal error (its log could not be written): this node serves nothing
/// more. Its lease is revoked at once and every request is refused as
/// [`NotReadyReason::Stopped`]; without renewals the leader marks it down and its shards fail
/// over. [`Node::stopped`] resolves, so the program can exit.
fn stop_for_good<H: ShardHandler>(
    router: &Router<H>,
    consensus: &Consensus,
    stopped: &tokio::sync::watch::Sender<Option<String>>,
    cause: &str,
) {
    let reason = format!(
        "node {} stopped serving for good: raft failed ({cause}). A full disk or an I/O error on the data dir is the usual cause: fix it and restart the node; its shards fail over to the other nodes meanwhile",
        consensus.node_id()
    );
    tracing::error!("{reason}");
    router.stop_for_good();
    stopped.send_replace(Some(reason));
}

/// The file in the data dir that marks a node drained by its own graceful shutdown.
const UNDRAIN_MARKER: &str = "drained-by-shutdown";

/// Undrains a node that a graceful shutdown drained, once it has rejoined (it knows a leader and
/// sees itself as a draining member), then removes the marker. An operator's undrain (or
/// removal) meanwhile also ends it.
async fn undrain_after_restart<H: ShardHandler>(
    router: Weak<Router<H>>,
    consensus: Consensus,
    marker: PathBuf,
) {
    let me = consensus.node_id();
    let mut applied = consensus.subscribe();
    let mut metrics = consensus.raft().metrics();
    loop {
        let Some(leased) = router.upgrade().map(|r| r.lease_remaining().is_some()) else {
            return;
        };
        // A lease is granted only for the newest allocation: with one the node has caught up.
        let caught_up = leased && metrics.borrow_and_update().current_leader.is_some();
        let draining = applied
            .borrow_and_update()
            .state
            .members
            .get(&me)
            .map(|m| m.draining);
        match (caught_up, draining) {
            (true, Some(false)) | (true, None) => {
                // Undrained already, or no longer a member: nothing left to do.
                break;
            }
            (true, Some(true)) => {
                match consensus
                    .admin(AdminRequest::Undrain { id: me }, false)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(
                            node = me,
                            "rejoined after a graceful shutdown; undrained, shards come back"
                        );
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot undrain yet; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            (false, _) => {}
        }
        // Lease renewals are not announced on these channels: look again every so often.
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    if let Err(error) = std::fs::remove_file(&marker) {
        tracing::warn!(%error, path = %marker.display(), "cannot remove the shutdown marker");
    }
}

/// The cluster state of a standalone node: one member owning every shard.
fn standalone_state(node_id: NodeId, shard_count: u32) -> Result<ClusterState, ConfigError> {
    let map =
        allocate(None, &[Member::new(node_id)], shard_count).map_err(|e| ConfigError::Invalid {
            name: "shard_count",
            reason: e.to_string(),
        })?;
    let mut state = ClusterState {
        shard_count: Some(shard_count),
        epoch: 1,
        map: Some(map.clone()),
        target: Some(map),
        ..ClusterState::default()
    };
    state.members.insert(
        node_id,
        crate::consensus::MemberRecord {
            addr: String::new(),
            zone: None,
            voter: true,
            draining: false,
            down: false,
        },
    );
    Ok(state)
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
    consensus: Option<Consensus>,
    server: Mutex<Option<ServerHandle>>,
    /// The file that says "drained by a graceful shutdown: undrain on restart" (persistent
    /// nodes only).
    undrain_marker: Option<PathBuf>,
    /// The data dir's exclusive lock (persistent nodes only), released by `shutdown`.
    data_dir_lock: Mutex<Option<DataDirLock>>,
    /// Why the node stopped serving for good, once it did (see [`Node::stopped`]).
    stopped: tokio::sync::watch::Sender<Option<String>>,
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
    /// log could not be written (a full disk, an I/O error). From then on it refuses every
    /// request ([`NotReadyReason::Stopped`]) and its shards fail over to the other nodes; exit
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

/// Refuses an initial member list that would let one process count twice toward the quorum
/// (two members at one address) or that gives this node another address than it listens on.
fn check_initial_members(
    members: &BTreeMap<NodeId, NodeInfo>,
    me: NodeId,
    listen: SocketAddr,
) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: "initial_members",
        reason,
    };
    let mut seen: BTreeMap<SocketAddr, NodeId> = BTreeMap::new();
    for (id, info) in members {
        let addr: SocketAddr = info.addr.parse().map_err(|_| {
            invalid(format!(
                "node {id}'s address `{}` is not IP:PORT",
                info.addr
            ))
        })?;
        if let Some(other) = seen.insert(crate::consensus::state::canonical_addr(addr), *id) {
            return Err(invalid(format!(
                "nodes {other} and {id} have the same address {addr}: every node needs its own address (one process must not count twice toward the quorum)"
            )));
        }
    }
    if let Some(mine) = members
        .get(&me)
        .and_then(|m| m.addr.parse::<SocketAddr>().ok())
    {
        let same_port = mine.port() == listen.port() || listen.port() == 0;
        let same_ip = listen.ip().is_unspecified() || mine.ip() == listen.ip();
        if !(same_port && same_ip) {
            return Err(invalid(format!(
                "this node ({me}) is listed at {mine} but listens on {listen}: give it the address it listens on"
            )));
        }
    }
    Ok(())
}
