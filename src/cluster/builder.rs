//! [`Cluster::builder`] and the start of a node: standalone, or clustered in named steps.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_rt::{Arbiter, ArbiterHandle, System};

use super::config::NodeConfig;
use super::node::{Node, NodeInner};
use super::router_actor::{RouterActor, RouterActorHandle, RouterActorParts};
use super::tasks::{sample_metrics, UNDRAIN_MARKER};
use crate::consensus::network::Network;
use crate::consensus::{
    ClusterApp, ClusterState, Consensus, ConsensusConfig, NodeInfo, Raft, TypeConfig,
};
use crate::error::{ConfigError, NotReadyReason, StartError};
use crate::lease::LeaseConfig;
use crate::persist::{Locality, ShardStore};
use crate::router::RouterParts;
use crate::router::{Router, RoutingTable};
use crate::service::NodeService;
use crate::shard::ServeObserver;
use crate::shard::{HandlerFactory, ShardHandler};
use crate::shard_map::{allocate, Member, NodeId, ShardId};
use crate::storage::{
    data_dir, DataDirLock, Identity, LmdbStore, LogStore, StateMachineStore, StoreOptions,
};
use crate::transport::{serve_with_faults, Secret, Transport, TransportConfig};

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
            store: None,
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
    store: Option<Arc<dyn ShardStore>>,
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
            store: self.store,
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

    /// This node's zone. Default: none. It must match the zone the cluster's membership records
    /// for this node (see [`NodeConfig::zone`]): the node refuses to start, or stops serving
    /// for good, when they differ.
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

    /// Keeps a client session answerable for `idle` after its last request (see
    /// [`NodeConfig::session_idle`](crate::NodeConfig::session_idle)).
    pub fn session_idle(mut self, idle: Duration) -> Self {
        self.config.session_idle = idle;
        self
    }

    /// Passivates a shard after `idle` without a message (see
    /// [`NodeConfig::passivate_after`](crate::NodeConfig::passivate_after)).
    pub fn passivate_after(mut self, idle: Duration) -> Self {
        self.config.passivate_after = Some(idle);
        self
    }

    /// Keeps at most `max` shards active on the node, passivating the least recently used
    /// (see [`NodeConfig::active_shards_max`](crate::NodeConfig::active_shards_max)).
    pub fn active_shards_max(mut self, max: usize) -> Self {
        self.config.active_shards_max = Some(max);
        self
    }

    /// Keeps the durable state of handlers that declare one
    /// ([`ShardHandler::durable`](crate::ShardHandler::durable)) in `store`: a shard loads it
    /// when it activates, and a reply is sent only once the change it reports is committed
    /// there. Without a store, declared durable state is kept in memory only, like the rest of
    /// the handler. See the guide's persistence chapter for what each store survives.
    pub fn store(mut self, store: Arc<dyn ShardStore>) -> Self {
        self.store = Some(store);
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
            store: self.store,
        });
        router.start_passivation();
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
                router_actor: Mutex::new(None),
                server: Mutex::new(None),
                undrain_marker: None,
                data_dir_lock: Mutex::new(None),
                stopped: tokio::sync::watch::channel(None).0,
            }),
        })
    }

    /// Starts a clustered node, step by step: check the security mode, open the raft log, start
    /// consensus, start the router, serve, bootstrap (first start only), start the node's tasks.
    async fn start_clustered(self, factory: HandlerFactory<H>) -> Result<Node<H>, StartError> {
        let config = self.config;
        let options = self.cluster;
        let listen = config.listen.ok_or(ConfigError::Missing {
            name: "listen",
            hint: "call .listen(addr) or use .standalone()",
        })?;
        check_security_mode(&options, listen)?;
        warn_if_lease_is_short(&config);
        if let Some(members) = &options.initial_members {
            check_initial_members(members, config.node_id, listen)?;
        }
        let (log_store, state_machine, data_dir_lock) = open_raft_log(&config, &options).await?;
        check_zone_at_start(
            &config,
            &state_machine.subscribe().borrow().state,
            options.initial_members.as_ref(),
        )?;
        let transport_config = transport_config(&config, &options);
        let consensus =
            start_consensus(&config, &transport_config, log_store, state_machine).await?;
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
        let router = start_router(
            &config,
            &transport_config,
            &consensus,
            arbiter.clone(),
            factory,
            self.observer,
            self.store,
        )?;
        let service = Arc::new(NodeService {
            consensus: consensus.clone(),
            router: router.clone(),
            warnings: crate::transport::log_limit::LogLimit::new(
                crate::service::REFUSAL_WARNING_WINDOW,
                crate::service::REFUSAL_WARNINGS_PER_WINDOW,
            ),
        });
        let faults = Some(consensus.transport().faults().clone());
        let server = serve_with_faults(listener, transport_config, service, faults).await?;
        if let Some(members) = options.initial_members {
            consensus
                .bootstrap(members)
                .await
                .map_err(|e| StartError::Bootstrap {
                    source: Box::new(e),
                })?;
        }
        let undrain_marker = (!options.in_memory_for_tests)
            .then(|| config.data_dir.as_ref().map(|dir| dir.join(UNDRAIN_MARKER)))
            .flatten();
        let (stopped, _) = tokio::sync::watch::channel(None);
        let router_actor = start_node_tasks(
            &config,
            &router,
            &consensus,
            &arbiter,
            &stopped,
            undrain_marker.as_ref(),
        );
        tracing::info!(node_id = config.node_id, %listen, "node started");
        Ok(Node {
            inner: Arc::new(NodeInner {
                router,
                system,
                consensus: Some(consensus),
                router_actor: Mutex::new(Some(router_actor)),
                server: Mutex::new(Some(server)),
                undrain_marker,
                data_dir_lock: Mutex::new(data_dir_lock),
                stopped,
            }),
        })
    }
}

/// Refuses a security mode that is none or two at once, and warns loudly about insecure mode.
fn check_security_mode(options: &ClusterOptions, listen: SocketAddr) -> Result<(), StartError> {
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
    Ok(())
}

/// Warns when the lease breaks DESIGN's relation (longer than the renew period plus two election
/// timeouts): a leader election may then pause healthy shards.
fn warn_if_lease_is_short(config: &NodeConfig) {
    let advised = config.lease.renew_period + config.consensus.election_timeout_max * 2;
    if config.lease.lease < advised {
        tracing::warn!(
            lease = ?config.lease.lease,
            advised = ?advised,
            "the lease is shorter than the renew period plus two election timeouts: a leader election may briefly pause healthy shards (requests wait, they do not fail)"
        );
    }
}

/// The raft log and state machine: in memory for tests, otherwise LMDB in the data dir, which is
/// claimed (locked, identity checked) before its log is read.
async fn open_raft_log(
    config: &NodeConfig,
    options: &ClusterOptions,
) -> Result<
    (
        LogStore<TypeConfig>,
        StateMachineStore<TypeConfig, ClusterApp>,
        Option<DataDirLock>,
    ),
    StartError,
> {
    if options.in_memory_for_tests {
        let (log_store, state_machine) = crate::storage::memory::in_memory_for_tests(ClusterApp);
        return Ok((log_store, state_machine, None));
    }
    let dir = config.data_dir.clone().ok_or(ConfigError::Missing {
        name: "data_dir",
        hint: "call .data_dir(path): raft logs must be persistent",
    })?;
    let store_options = options.store.clone();
    let identity = Identity {
        cluster_name: config.cluster_name.clone(),
        node_id: config.node_id,
    };
    // Opening maps the file and may create it: blocking work, off the async thread. A second
    // process on the data dir, or a data dir of another node or cluster, is refused first.
    tokio::task::spawn_blocking(move || {
        let lock = data_dir::lock(&dir)?;
        data_dir::check_identity(&lock, &identity)?;
        let store = LmdbStore::open(&dir, store_options)?;
        let state_machine = store.state_machine(ClusterApp)?;
        Ok::<_, StartError>((store.log_store(), state_machine, Some(lock)))
    })
    .await?
}

/// The transport settings every connection of this node uses.
fn transport_config(config: &NodeConfig, options: &ClusterOptions) -> TransportConfig {
    TransportConfig {
        cluster_name: config.cluster_name.clone(),
        node_id: Some(config.node_id),
        secret: options.secret.clone(),
        tls: options.tls.clone(),
        // A restarted peer must be reachable again quickly: leases and failover run on
        // sub-second timers.
        reconnect_backoff_max: Duration::from_millis(250),
        connections_max: config.connections_max,
        ..TransportConfig::default()
    }
}

/// Starts raft on the opened log and wraps it in [`Consensus`].
async fn start_consensus(
    config: &NodeConfig,
    transport_config: &TransportConfig,
    log_store: LogStore<TypeConfig>,
    state_machine: StateMachineStore<TypeConfig, ClusterApp>,
) -> Result<Consensus, StartError> {
    let raft_config = config.consensus.raft_config(&config.cluster_name)?;
    let applied = state_machine.subscribe();
    let transport = Transport::new(transport_config.clone())?;
    let contact = Arc::new(crate::consensus::Contact::default());
    let network = Network::with_contact(transport.clone(), contact.clone());
    let raft = Raft::new(
        config.node_id,
        raft_config,
        network,
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| StartError::Raft {
        source: Box::new(e),
    })?;
    Ok(Consensus::new(
        config.node_id,
        raft,
        applied,
        transport,
        config.consensus.clone(),
        config.lease.clone(),
        config.shard_count,
        contact,
    ))
}

/// Starts the router of a clustered node: no table until consensus applies one.
fn start_router<H: ShardHandler>(
    config: &NodeConfig,
    transport_config: &TransportConfig,
    consensus: &Consensus,
    arbiter: ArbiterHandle,
    factory: HandlerFactory<H>,
    observer: Option<Arc<dyn ServeObserver>>,
    store: Option<Arc<dyn ShardStore>>,
) -> Result<Arc<Router<H>>, StartError> {
    if store
        .as_ref()
        .is_some_and(|store| store.locality() == Locality::NodeLocal)
    {
        tracing::warn!(
            node_id = config.node_id,
            "the shard store is local to this node: a planned move carries a shard's durable state to its next owner, but a shard that fails over after a crash or a cut-off starts empty on its new owner; use a shared store (a database) for state that must survive the loss of a node"
        );
    }
    // Forwarded messages get connections of their own: a flood of them filling a connection's
    // in-flight limit must not starve raft heartbeats and lease renewals (found by a test: the
    // flooding node lost its lease and was marked down).
    let forwarding = Transport::with_faults(
        transport_config.clone(),
        consensus.transport().faults().clone(),
    )?;
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
        transport: Some(forwarding),
        peers: Some(consensus.transport().clone()),
        observer,
        store,
    });
    router.start_passivation();
    Ok(router)
}

/// The node's parts that run on their own: the router actor (following consensus, handing
/// shards off, undraining after a graceful shutdown's restart when its marker is there) on the
/// node's arbiter, and the node's tasks (renewing the lease, sampling metrics with an endpoint),
/// all ended by the node's shutdown.
fn start_node_tasks<H: ShardHandler>(
    config: &NodeConfig,
    router: &Arc<Router<H>>,
    consensus: &Consensus,
    arbiter: &ArbiterHandle,
    stopped: &tokio::sync::watch::Sender<Option<String>>,
    undrain_marker: Option<&PathBuf>,
) -> RouterActorHandle<H> {
    let tasks = consensus.tasks();
    let weak = || Arc::downgrade(router);
    tasks.spawn(crate::lease_task::keep_lease(weak(), consensus.clone()));
    if crate::metrics::enabled() {
        tasks.spawn(sample_metrics(weak(), consensus.clone()));
    }
    RouterActor::start(
        arbiter,
        RouterActorParts {
            router: weak(),
            consensus: consensus.clone(),
            config: config.clone(),
            stopped: stopped.clone(),
            undrain_marker: undrain_marker.filter(|m| m.exists()).cloned(),
            stuck_after: config.lease.lease * STUCK_MOVE_LEASES,
        },
    )
}

/// Shards are placed by the zone the membership records: a node that claims another zone is
/// refused before it joins, against the membership applied in its data dir if that lists it,
/// else against the initial members it bootstraps with. Later changes (and a log not yet
/// replayed) are checked while it runs (the router actor).
fn check_zone_at_start(
    config: &NodeConfig,
    applied: &ClusterState,
    initial_members: Option<&BTreeMap<NodeId, NodeInfo>>,
) -> Result<(), ConfigError> {
    match applied.members.get(&config.node_id) {
        Some(member) => config.check_zone(
            Some(member.zone.as_deref()),
            "the cluster's membership in the data dir",
        ),
        None => config.check_zone(
            initial_members
                .and_then(|members| members.get(&config.node_id))
                .map(|member| member.zone.as_deref()),
            "the initial members",
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn in_zone(zone: &str) -> NodeConfig {
        NodeConfig {
            node_id: 1,
            zone: Some(zone.to_string()),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn the_zone_is_checked_against_the_data_dir_before_the_initial_members() {
        let initial: BTreeMap<NodeId, NodeInfo> =
            NodeInfo::parse_members("1=127.0.0.1:7001@b").expect("a member list");
        // A new node: its --init entry is the record.
        let fresh = ClusterState::default();
        assert_eq!(
            check_zone_at_start(&in_zone("b"), &fresh, Some(&initial)),
            Ok(())
        );
        let refused =
            check_zone_at_start(&in_zone("c"), &fresh, Some(&initial)).expect_err("c is not b");
        assert!(
            matches!(
                refused,
                ConfigError::ZoneMismatch {
                    record: "the initial members",
                    ..
                }
            ),
            "{refused}"
        );
        // A data dir that lists the node wins over --init, which it ignores.
        let mut applied = ClusterState::default();
        applied.members.insert(
            1,
            crate::consensus::MemberRecord {
                addr: "127.0.0.1:7001".into(),
                zone: Some("a".into()),
                voter: true,
                draining: false,
                down: false,
            },
        );
        assert_eq!(
            check_zone_at_start(&in_zone("a"), &applied, Some(&initial)),
            Ok(())
        );
        let refused = check_zone_at_start(&in_zone("b"), &applied, Some(&initial))
            .expect_err("the data dir says a");
        assert!(
            matches!(
                refused,
                ConfigError::ZoneMismatch {
                    record: "the cluster's membership in the data dir",
                    ..
                }
            ),
            "{refused}"
        );
        // Neither lists the node: nothing to compare.
        assert_eq!(check_zone_at_start(&in_zone("z"), &fresh, None), Ok(()));
    }
}
