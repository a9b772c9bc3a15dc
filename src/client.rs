//! [`Client`]: sends messages to keys from programs outside the cluster.
//!
//! The client learns the shard map (owners and their addresses) from any node and sends each
//! message straight to its shard's owner. It keeps the map current: one request held open at a
//! node ([`Request::WatchRouting`]) answers as soon as the map changes, and a stale answer
//! (`WrongOwner`) refreshes it too. A node that receives a message for another node's shard
//! forwards it, so a stale map costs a hop, never a wrong answer. The client holds no shard
//! state.
//!
//! # When an owner fails
//!
//! - An owner that does not answer (frozen, cut off without a reset) is noticed by its
//!   connection: outstanding requests and silence for
//!   [`unresponsive_after`](crate::transport::TransportConfig::unresponsive_after) (probes
//!   included). New requests for its shards are not sent to it; they wait for it to answer
//!   again or for its shards to move.
//! - A request already sent to it is resolved the moment its shard moves: an idempotent one is
//!   sent to the new owner, any other fails at once with [`Error::OutcomeUnknown`], since it may
//!   or may not have taken effect. The same holds when the connection breaks after sending. (An
//!   old owner that still answers, say one cut off from the cluster but not from the client,
//!   is waited for instead: it refuses as not ready once its lease has lapsed, and such a
//!   refusal is retried at the new owner.)
//! - Answers "not ready" make the client fetch the map from the other nodes first: a node cut
//!   off from the rest of the cluster cannot know that its shards moved.
//! - A refusal from a node that never started the request (not the owner, lease lapsed, shard
//!   moving) is retried after the map catches up, never surfaced while the deadline allows.
//! - Every call is bounded by its deadline ([`CallOptions::deadline`], by default the client's
//!   timeout): a request still outstanding then fails with [`Error::Timeout`], whose outcome is
//!   unknown too.
//!
//! # Exactly once
//!
//! Each client has a session ([`SessionId`], 128 random bits) and numbers its requests
//! ([`RequestId`]). When an attempt's outcome is unknown the client sends the request again
//! under the same id, within the call's deadline: a shard whose handler keeps durable state in
//! a store records the replies of the requests it applied, in the same commit as their
//! changes, and answers such a retry from its record, so a message is applied at most once
//! and acknowledged exactly once. A shard without a record refuses the retry of a message that
//! is not idempotent, and the call fails with [`Error::OutcomeUnknown`] as before. A call that
//! runs out of time can be sent again under its id with [`Client::request`] and
//! [`ClientRequest::send`]. Every request also carries the lowest number the client still
//! waits on, so shards drop the replies the client no longer needs.

use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::codec;
use crate::error::{Error, NotReadyReason};
use crate::session::{Once, RequestId, SessionId};
use crate::shard::ShardMessage;
use crate::shard_map::{shard_for, Key, NodeId, ShardId};
use crate::transport::{Secret, Transport, TransportConfig, TransportError, OVERLOADED};
use crate::wire::{Request, Response, RoutingInfo, WATCH_HOLD};

/// Why a [`Client`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The cluster answered with an error (not ready, overloaded, a handler failure, outcome
    /// unknown, ...).
    #[error(transparent)]
    Cluster(#[from] Error),
    /// No node could be reached; the last failure is given.
    #[error("no node reachable: {0}; check the addresses and that this client's credentials (CLUSTERFUNK_SECRET, or the certificates of --tls-dir) match the cluster's")]
    Unreachable(TransportError),
    /// With TLS: the node refused the request because this client's certificate does not
    /// allow it; the reason names the certificate that would.
    #[error("{0}")]
    NotAuthorized(String),
    /// The client was built without seeds or with a zero timeout; the message says which.
    #[error("invalid client configuration: {0}")]
    Invalid(String),
    /// The client's transport settings are invalid (a limit out of range, for example).
    #[error("invalid client configuration: {0}")]
    InvalidTransport(#[source] TransportError),
}

impl ClientError {
    /// Whether the message may or may not have taken effect ([`Error::OutcomeUnknown`] or
    /// [`Error::Timeout`]): retry only an idempotent message.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            ClientError::Cluster(Error::OutcomeUnknown { .. } | Error::Timeout { .. })
        )
    }
}

/// Options of one [`Client::send_with`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallOptions {
    idempotent: Option<bool>,
    deadline: Option<Duration>,
    unnumbered: bool,
}

impl CallOptions {
    /// The defaults: idempotent as the message type declares
    /// ([`ShardMessage::IDEMPOTENT`]), the client's timeout as the deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides whether this call's message may be handled twice: `true` lets the client send
    /// it again to a shard's next owner when the first attempt's fate is unknown.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = Some(idempotent);
        self
    }

    /// The longest the call may take, retries and waits for a failover included.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sends the message without its request id (`false`; default `true`): the shard keeps no
    /// record of it, and an attempt whose outcome is unknown is sent again only if the message
    /// is idempotent, else the call fails with [`Error::OutcomeUnknown`]. Saves the record's
    /// write where every message is idempotent anyway.
    pub fn numbered(mut self, numbered: bool) -> Self {
        self.unnumbered = !numbered;
        self
    }
}

/// The routing information the client holds.
#[derive(Debug)]
struct Routing {
    epoch: u64,
    owners: Vec<NodeId>,
    addrs: HashMap<NodeId, SocketAddr>,
}

impl Routing {
    /// The owner of `key`'s shard and its address.
    fn owner(&self, key: &[u8]) -> Option<(ShardId, NodeId, Option<SocketAddr>)> {
        let shard = shard_for(key, self.owners.len() as u32);
        let owner = *self.owners.get(shard as usize)?;
        Some((shard, owner, self.addrs.get(&owner).copied()))
    }
}

/// How many answers "not ready" (from a node that never started the request) a call waits out
/// before it returns one: enough for a failover, bounded so that a cluster without a leader
/// answers in bounded time.
const NOT_READY_ROUNDS: u32 = 4;
/// Longest a call waits for the map to change after a node refused it as not ready.
const NOT_READY_PAUSE: Duration = Duration::from_millis(250);
/// How often the map is fetched while the watch cannot be held (every node refused it).
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How long a map fetch waits for one node before it also asks the next.
const HEDGE_AFTER: Duration = Duration::from_millis(200);
/// Most nodes one map fetch asks at once.
const HEDGED_MAX: usize = 3;
/// Pause before the watch tries the next node after a failure.
const WATCH_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What clones of one client share.
#[derive(Debug)]
struct Shared {
    transport: Transport,
    seeds: Vec<SocketAddr>,
    timeout: Duration,
    routing: RwLock<Option<Arc<Routing>>>,
    /// Bumped whenever a newer map is installed.
    changes: watch::Sender<u64>,
    /// Whether the background watch runs.
    watching: AtomicBool,
    /// When the map was last installed, in milliseconds since `created`.
    installed_ms: AtomicU64,
    created: Instant,
    /// This client's session.
    session: SessionId,
    /// The number of the next request.
    next_seq: AtomicU64,
    /// The numbers of the requests not yet answered or dropped.
    outstanding: std::sync::Mutex<BTreeSet<u64>>,
}

impl Shared {
    /// The lowest request number this client still waits on.
    fn low(&self) -> u64 {
        let outstanding = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        match outstanding.first() {
            Some(seq) => *seq,
            None => self.next_seq.load(Ordering::Acquire),
        }
    }
}

/// A client of a clusterfunk cluster. Cheap to clone; clones share the map and the
/// connections.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// A client for the cluster reachable at `seeds`, authenticating with `secret` (`None`
    /// only for insecure clusters). Nothing is sent until the first request.
    pub fn connect(
        seeds: impl IntoIterator<Item = SocketAddr>,
        secret: Option<Secret>,
    ) -> Result<Self, ClientError> {
        Self::with_config(seeds, secret, "clusterfunk", Duration::from_secs(10))
    }

    /// Like [`connect`](Self::connect), with the cluster's name and the default deadline of a
    /// call (`timeout`).
    pub fn with_config(
        seeds: impl IntoIterator<Item = SocketAddr>,
        secret: Option<Secret>,
        cluster_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let credentials = match secret {
            Some(secret) => crate::admin::Credentials::Secret(secret),
            None => crate::admin::Credentials::Insecure,
        };
        Self::with_credentials(seeds, &credentials, cluster_name, timeout)
    }

    /// A client that talks TLS with the certificate in `tls` (a `client` certificate of the
    /// cluster's CA, e.g. `TlsConfig::from_dir("D/client")`); the cluster name is the one the
    /// certificate names. `timeout` is the default deadline of a call.
    pub fn with_tls(
        seeds: impl IntoIterator<Item = SocketAddr>,
        tls: crate::tls::TlsConfig,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let cluster_name = tls.identity().cluster.clone();
        Self::with_credentials(
            seeds,
            &crate::admin::Credentials::Tls(tls),
            &cluster_name,
            timeout,
        )
    }

    /// A client with resolved [`Credentials`](crate::admin::Credentials) (what `kv`'s
    /// `--tls-dir`, `--secret-file` and `--insecure` resolve to); with TLS the cluster name
    /// must be the one the certificate names.
    pub fn with_credentials(
        seeds: impl IntoIterator<Item = SocketAddr>,
        credentials: &crate::admin::Credentials,
        cluster_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::with_transport_config(
            seeds,
            TransportConfig {
                cluster_name: cluster_name.to_string(),
                node_id: None,
                secret: credentials.secret(),
                tls: credentials.tls(),
                reconnect_backoff_max: Duration::from_millis(250),
                ..TransportConfig::default()
            },
            timeout,
        )
    }

    fn with_transport_config(
        seeds: impl IntoIterator<Item = SocketAddr>,
        config: TransportConfig,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let seeds: Vec<SocketAddr> = seeds.into_iter().collect();
        if seeds.is_empty() {
            return Err(ClientError::Invalid(
                "give at least one seed address".into(),
            ));
        }
        if timeout.is_zero() {
            return Err(ClientError::Invalid(
                "the timeout must be longer than zero".into(),
            ));
        }
        let transport = Transport::new(config).map_err(ClientError::InvalidTransport)?;
        let session = SessionId::random()?;
        Ok(Client {
            shared: Arc::new(Shared {
                transport,
                seeds,
                timeout,
                routing: RwLock::new(None),
                changes: watch::channel(0).0,
                watching: AtomicBool::new(false),
                installed_ms: AtomicU64::new(0),
                created: Instant::now(),
                session,
                next_seq: AtomicU64::new(1),
                outstanding: std::sync::Mutex::new(BTreeSet::new()),
            }),
        })
    }

    /// This client's session: the ids of its requests are numbers in it.
    pub fn session(&self) -> SessionId {
        self.shared.session
    }

    /// Numbers `msg` to `key` as the next request of this client's session, to be sent (and
    /// sent again, under the same id, until it is answered) with [`ClientRequest::send`]. The
    /// client counts it as waited on until it is answered or dropped.
    pub fn request<M: ShardMessage>(
        &self,
        key: impl Into<Key>,
        msg: M,
    ) -> Result<ClientRequest<M>, ClientError> {
        self.numbered(None, key.into(), msg)
    }

    /// [`request`](Self::request) with the number `seq` chosen by the caller instead of the
    /// session's next one: for a program that sends again a request it numbered before and no
    /// longer holds (holding the [`ClientRequest`] is simpler). The session's later requests
    /// are numbered above `seq`. Reusing a number for another message is refused by the shard
    /// ([`Error::RequestIdReused`]).
    pub fn request_numbered<M: ShardMessage>(
        &self,
        seq: u64,
        key: impl Into<Key>,
        msg: M,
    ) -> Result<ClientRequest<M>, ClientError> {
        self.numbered(Some(seq), key.into(), msg)
    }

    fn numbered<M: ShardMessage>(
        &self,
        seq: Option<u64>,
        key: Key,
        msg: M,
    ) -> Result<ClientRequest<M>, ClientError> {
        let payload = codec::encode(&msg)?;
        let seq = {
            // Taken under the lock, so the low watermark never passes a number being taken.
            let mut outstanding = self
                .shared
                .outstanding
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let seq = match seq {
                // Later requests are numbered above it: a low watermark it lifted never
                // passes them.
                Some(seq) => {
                    self.shared
                        .next_seq
                        .fetch_max(seq.saturating_add(1), Ordering::AcqRel);
                    seq
                }
                None => self.shared.next_seq.fetch_add(1, Ordering::AcqRel),
            };
            outstanding.insert(seq);
            seq
        };
        Ok(ClientRequest {
            client: self.clone(),
            key,
            payload,
            seq,
            created: Instant::now(),
            maybe_applied: AtomicU32::new(0),
            answered: AtomicBool::new(false),
            message: PhantomData,
        })
    }

    /// The map epoch the client routes by, once it has one.
    pub fn epoch(&self) -> Option<u64> {
        self.shared.current().map(|r| r.epoch)
    }

    /// Fetches the map from the first seed (or known node) that answers.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        self.shared.refresh().await
    }

    /// Sends `msg` to the shard owning `key` and returns the reply, with the default
    /// [`CallOptions`]: see [`send_with`](Self::send_with).
    pub async fn send<M: ShardMessage>(
        &self,
        key: impl Into<Key>,
        msg: M,
    ) -> Result<M::Reply, ClientError> {
        self.send_with(key, msg, CallOptions::new()).await
    }

    /// Sends `msg` to the shard owning `key` and returns the reply.
    ///
    /// The message goes to the owner by the client's map. If the owner cannot be reached (it
    /// may have crashed) the message goes to another node instead, which forwards it and waits
    /// at its router, bounded, for the failover to give the shard a live owner. If the owner
    /// stops answering, the message waits for the shard to move (see the [module
    /// docs](self)): an idempotent message (per [`CallOptions::idempotent`], else
    /// [`ShardMessage::IDEMPOTENT`]) then goes to the new owner; any other message that may
    /// have reached the old owner fails with [`Error::OutcomeUnknown`].
    pub async fn send_with<M: ShardMessage>(
        &self,
        key: impl Into<Key>,
        msg: M,
        options: CallOptions,
    ) -> Result<M::Reply, ClientError> {
        self.request(key, msg)?.send_with(options).await
    }
}

/// A numbered request of a [`Client`]'s session ([`Client::request`]): send it, and send it
/// again after an error whose outcome is unknown, as often as needed; a shard with durable
/// state applies it at most once and answers every attempt with the same reply. Dropping it
/// (or an answer) tells the shards, with the client's next requests, that its reply is no
/// longer needed.
pub struct ClientRequest<M: ShardMessage> {
    client: Client,
    key: Key,
    payload: Vec<u8>,
    seq: u64,
    created: Instant,
    /// Attempts that may have been applied so far (answered, or their outcome unknown): a
    /// later attempt is a retry.
    maybe_applied: AtomicU32,
    answered: AtomicBool,
    message: PhantomData<fn() -> M>,
}

impl<M: ShardMessage> std::fmt::Debug for ClientRequest<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRequest")
            .field("id", &self.id())
            .field("tag", &M::TAG)
            .finish_non_exhaustive()
    }
}

impl<M: ShardMessage> ClientRequest<M> {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        RequestId {
            session: self.client.shared.session,
            seq: self.seq,
        }
    }

    /// Sends the request (again) with the default [`CallOptions`].
    pub async fn send(&self) -> Result<M::Reply, ClientError> {
        self.send_with(CallOptions::new()).await
    }

    /// Sends the request (again), as [`Client::send_with`] describes, under its id. After an
    /// error whose outcome is unknown ([`ClientError::is_outcome_unknown`]) it may be sent
    /// again: a durable shard answers from its record if an earlier attempt was applied.
    /// Other errors are final for this id: [`Error::RequestIdReused`],
    /// [`Error::RequestTooOld`] and [`Error::SessionExpired`] say the shard cannot tell.
    pub async fn send_with(&self, options: CallOptions) -> Result<M::Reply, ClientError> {
        let idempotent = options.idempotent.unwrap_or(M::IDEMPOTENT);
        let budget = options.deadline.unwrap_or(self.client.shared.timeout);
        let reply = self
            .client
            .shared
            .call_shard(
                self.key.as_bytes(),
                M::TAG,
                &self.payload,
                idempotent,
                budget,
                (!options.unnumbered).then_some(self as &dyn Numbered),
            )
            .await;
        let reply = reply?;
        self.maybe_applied.fetch_add(1, Ordering::AcqRel);
        let reply = codec::decode(&reply)?;
        self.answered.store(true, Ordering::Release);
        self.release();
        Ok(reply)
    }

    /// What the next attempt carries.
    fn once(&self, idempotent: bool) -> Once {
        Once {
            session: self.client.shared.session,
            seq: self.seq,
            low: self.client.shared.low(),
            age_ms: self.created.elapsed().as_millis() as u64,
            attempt: self.maybe_applied.load(Ordering::Acquire),
            idempotent,
        }
    }

    /// No longer waited on.
    fn release(&self) {
        let mut outstanding = self
            .client
            .shared
            .outstanding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        outstanding.remove(&self.seq);
    }
}

impl<M: ShardMessage> Drop for ClientRequest<M> {
    fn drop(&mut self) {
        if !self.answered.load(Ordering::Acquire) {
            self.release();
        }
    }
}

/// What [`Shared::call_shard`] needs of the request it sends.
trait Numbered: Sync {
    /// The id and low watermark for the next attempt.
    fn once(&self, idempotent: bool) -> Once;
    /// Counts an attempt whose outcome is unknown.
    fn unknown(&self);
}

impl<M: ShardMessage> Numbered for ClientRequest<M> {
    fn once(&self, idempotent: bool) -> Once {
        ClientRequest::once(self, idempotent)
    }

    fn unknown(&self) {
        self.maybe_applied.fetch_add(1, Ordering::AcqRel);
    }
}

/// What one attempt at a shard request came to.
enum Attempt {
    /// The reply.
    Reply(Vec<u8>),
    /// Never started anywhere (refused, or never sent): try again.
    Retry(ClientError),
    /// Never started, and the node takes no more: try again elsewhere.
    Avoid(ClientError),
    /// The node refused it as not ready: try again after the map may have caught up.
    NotReady(Error),
    /// Sent, and its fate is unknown.
    Unknown(ClientError),
    /// A final answer.
    Fail(ClientError),
}

impl Shared {
    fn current(&self) -> Option<Arc<Routing>> {
        self.routing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, info: RoutingInfo) {
        if info.owners.is_empty() {
            return;
        }
        let addrs = info
            .addrs
            .iter()
            .filter_map(|(id, addr)| Some((*id, addr.parse().ok()?)))
            .collect();
        let routing = Arc::new(Routing {
            epoch: info.epoch,
            owners: info.owners,
            addrs,
        });
        let newer = {
            let mut current = self.routing.write().unwrap_or_else(|p| p.into_inner());
            let newer = current.as_ref().is_none_or(|c| c.epoch < routing.epoch);
            if current.as_ref().is_none_or(|c| c.epoch <= routing.epoch) {
                *current = Some(routing);
            }
            newer
        };
        self.installed_ms
            .store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
        if newer {
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Every address worth asking for the map: the seeds, then the members the map names.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut all = self.seeds.clone();
        if let Some(routing) = self.current() {
            let mut known: Vec<SocketAddr> = routing.addrs.values().copied().collect();
            known.sort();
            all.extend(known.into_iter().filter(|a| !self.seeds.contains(a)));
        }
        all
    }

    /// Fetches the map from the candidates, responsive ones first, asking the next one
    /// whenever [`HEDGE_AFTER`] passes without an answer (a node frozen before this client ever
    /// talked to it accepts the TCP connection and then holds the handshake), and installs the
    /// first map that arrives.
    async fn refresh(&self) -> Result<(), ClientError> {
        self.refresh_avoiding(None).await
    }

    /// [`refresh`](Self::refresh), asking `doubtful` (a node that just refused as not ready:
    /// it may be cut off from the cluster and its map stale) only after every other node.
    async fn refresh_avoiding(&self, doubtful: Option<SocketAddr>) -> Result<(), ClientError> {
        let mut candidates = self.candidates();
        candidates.sort_by_key(|addr| {
            (
                Some(*addr) == doubtful,
                !self.transport.is_responsive(*addr),
            )
        });
        let mut pending = candidates.into_iter();
        let mut asking = futures_util::stream::FuturesUnordered::new();
        let mut last = None;
        loop {
            if asking.is_empty() || asking.len() < HEDGED_MAX {
                if let Some(addr) = pending.next() {
                    asking.push(async move {
                        (addr, self.call(addr, &Request::Routing, self.timeout).await)
                    });
                }
            }
            if asking.is_empty() {
                break;
            }
            let answer = tokio::select! {
                answer = futures_util::StreamExt::next(&mut asking) => answer,
                () = tokio::time::sleep(HEDGE_AFTER), if pending.len() > 0 => continue,
            };
            match answer {
                Some((_, Ok(Response::Routing(info)))) if !info.owners.is_empty() => {
                    self.install(info);
                    return Ok(());
                }
                Some((addr, Ok(_))) => {
                    last = Some(TransportError::Protocol {
                        reason: format!("{addr} has no shard map yet"),
                    })
                }
                Some((_, Err(error))) => last = Some(error),
                None => {}
            }
        }
        Err(ClientError::Unreachable(last.unwrap_or(
            TransportError::Protocol {
                reason: "no seeds".into(),
            },
        )))
    }

    /// Starts the background watch of the map, once per client (only inside a tokio runtime).
    fn watch(self: &Arc<Self>) {
        if self.watching.load(Ordering::Relaxed) || self.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(watch_loop(Arc::downgrade(self)));
            }
            Err(_) => self.watching.store(false, Ordering::Release),
        }
    }

    async fn call(
        &self,
        addr: SocketAddr,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        let payload = codec::encode(request).map_err(|e| TransportError::Protocol {
            reason: e.to_string(),
        })?;
        let answer = tokio::select! {
            answer = self.transport.request(addr, payload, timeout) => answer?,
            () = until_silent(&self.transport, addr) => {
                return Err(TransportError::Unreachable {
                    addr,
                    reason: "the node stopped answering (frozen or cut off)".into(),
                })
            }
        };
        codec::decode(&answer).map_err(|e| TransportError::Protocol {
            reason: e.to_string(),
        })
    }

    /// Sends the encoded message `message` of type `tag` to `key`'s shard until it is answered,
    /// fails for good, or `budget` runs out.
    async fn call_shard(
        self: &Arc<Self>,
        key: &[u8],
        tag: &str,
        message: &[u8],
        idempotent: bool,
        budget: Duration,
        request: Option<&dyn Numbered>,
    ) -> Result<Vec<u8>, ClientError> {
        let started = Instant::now();
        let deadline = started + budget;
        self.watch();
        if self.current().is_none() {
            // Without a map any node will do: it forwards.
            let _ = tokio::time::timeout_at(deadline, self.refresh()).await;
        }
        let mut avoid: Vec<SocketAddr> = Vec::new();
        // Nodes whose handshake refused this client (wrong secret, certificate or cluster
        // name): a configuration mistake that waiting does not fix.
        let mut refused: Vec<SocketAddr> = Vec::new();
        let mut last: Option<ClientError> = None;
        let mut not_ready_rounds = 0;
        let timed_out = |shard| {
            ClientError::Cluster(Error::Timeout {
                shard,
                after: budget,
            })
        };
        loop {
            let routing = self.current();
            let owner = routing.as_ref().and_then(|r| r.owner(key));
            let shard = owner.map_or(0, |(shard, _, _)| shard);
            if Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| timed_out(shard)));
            }
            let owner_addr = owner.and_then(|(_, _, addr)| addr);
            if let Some(addr) = owner_addr.filter(|a| !self.transport.is_responsive(*a)) {
                // The owner does not answer: send nothing there; wait until it answers again
                // or its shards move.
                last = Some(ClientError::Cluster(Error::NotReady {
                    reason: NotReadyReason::OwnerUnreachable,
                }));
                self.wait_for_change(Some(addr), deadline).await;
                continue;
            }
            // The owner if reachable, else any other node (seeds first) not known to be down.
            // (The owner was checked for responsiveness above; the others are listed only
            // when the owner cannot be used, off the hot path.)
            let target = owner_addr.filter(|addr| !avoid.contains(addr)).or_else(|| {
                self.candidates()
                    .into_iter()
                    .find(|addr| !avoid.contains(addr) && self.transport.is_responsive(*addr))
            });
            let Some(target) = target else {
                // Every node refused the handshake: say so now rather than at the deadline.
                if !refused.is_empty() && self.candidates().iter().all(|a| refused.contains(a)) {
                    if let Some(error) = last {
                        return Err(error);
                    }
                }
                // Everything tried: start over after a pause, bounded by the deadline.
                avoid.clear();
                self.wait_for_change(None, (Instant::now() + WATCH_RETRY_PAUSE).min(deadline))
                    .await;
                continue;
            };
            // The map epoch goes along: a node with an older map catches up before routing.
            let (key_bytes, tag_name) = (key.to_vec(), tag.to_owned());
            let epoch = routing.as_ref().map_or(0, |r| r.epoch);
            let payload = codec::encode(&match request {
                Some(request) => Request::ShardOnce {
                    key: key_bytes,
                    tag: tag_name,
                    payload: message.to_vec(),
                    epoch,
                    once: request.once(idempotent),
                },
                None => Request::ShardAt {
                    key: key_bytes,
                    tag: tag_name,
                    payload: message.to_vec(),
                    epoch,
                },
            })?;
            let limit = self.transport.config().payload_max();
            if payload.len() > limit {
                return Err(ClientError::Cluster(Error::TooLarge {
                    what: "message".to_owned(),
                    size: payload.len() as u64,
                    limit: limit as u64,
                }));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let sent_to_owner = owner.filter(|(_, _, addr)| *addr == Some(target));
            let attempt = tokio::select! {
                answer = self.transport.request_to(target, sent_to_owner.map(|(_, node, _)| node), payload, remaining) => {
                    classify(shard, target, answer)
                }
                () = self.moved_from(key, sent_to_owner, target, idempotent) => {
                    Attempt::Unknown(ClientError::Cluster(Error::OutcomeUnknown { shard }))
                }
            };
            match attempt {
                Attempt::Reply(reply) => return Ok(reply),
                Attempt::Fail(error) => return Err(error),
                Attempt::Avoid(error) => {
                    avoid.push(target);
                    if matches!(
                        error,
                        ClientError::Unreachable(TransportError::Refused { .. })
                    ) {
                        refused.push(target);
                    }
                    last = Some(error);
                }
                Attempt::Retry(error) => {
                    // Refused as not the owner: the map is stale.
                    let _ = tokio::time::timeout_at(deadline, self.refresh()).await;
                    last = Some(error);
                }
                Attempt::NotReady(error) => {
                    not_ready_rounds += 1;
                    if not_ready_rounds > NOT_READY_ROUNDS {
                        return Err(error.into());
                    }
                    // The refuser may be behind us or we behind the cluster (a node resumed
                    // after a freeze refuses at once), or the shard is about to move: retry
                    // once the map has changed. A node that refuses under the newest map has
                    // already waited for the shard at its router: its answer stands.
                    let epoch = routing.as_ref().map(|r| r.epoch);
                    let _ = tokio::time::timeout_at(deadline, self.refresh_avoiding(Some(target)))
                        .await;
                    if self.current().map(|r| r.epoch) == epoch {
                        self.wait_for_change(
                            None,
                            (Instant::now() + NOT_READY_PAUSE).min(deadline),
                        )
                        .await;
                    }
                    if self.current().map(|r| r.epoch) == epoch {
                        return Err(error.into());
                    }
                    last = Some(error.into());
                }
                Attempt::Unknown(error) => {
                    // Sent again under the same id: a shard that records its requests answers
                    // from the record if this attempt was applied; one that does not refuses
                    // the retry of a message that is not idempotent (NotRecorded).
                    match request {
                        Some(request) => {
                            tracing::debug!(%target, %error, "outcome unknown; sending the request again under its id");
                            request.unknown();
                        }
                        None if idempotent => {
                            tracing::debug!(%target, %error, "outcome unknown; re-sending an idempotent message");
                        }
                        None => {
                            return Err(match error {
                                ClientError::Cluster(Error::Timeout { .. }) => timed_out(shard),
                                other => other,
                            })
                        }
                    }
                    last = Some(match error {
                        ClientError::Cluster(Error::Timeout { .. }) => timed_out(shard),
                        other => other,
                    });
                }
            }
        }
    }

    /// Resolves once `key`'s shard has moved away from `sent_to` (the owner the request went
    /// to, if it went to the owner) and the request is better sent again or given up: at once
    /// for an idempotent request (the old owner serves nothing once the new one may, so a
    /// second attempt is safe and its answer no older), and only while `target` does not
    /// answer for any other (a responsive old owner answers, or refuses as not ready, soon:
    /// its answer says whether the request took effect). Never resolves for a request sent to
    /// a non-owner: that node resolves its own forward.
    async fn moved_from(
        &self,
        key: &[u8],
        sent_to: Option<(ShardId, NodeId, Option<SocketAddr>)>,
        target: SocketAddr,
        idempotent: bool,
    ) {
        let Some((_, owner, _)) = sent_to else {
            return std::future::pending().await;
        };
        let mut changes = self.changes.subscribe();
        let mut health = self.transport.health_changes();
        loop {
            let moved = self
                .current()
                .and_then(|r| r.owner(key))
                .is_some_and(|(_, now, _)| now != owner);
            if moved && (idempotent || !self.transport.is_responsive(target)) {
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return std::future::pending().await },
                changed = health.changed() => if changed.is_err() { return std::future::pending().await },
            }
        }
    }

    /// Waits until the map changes, `silent` answers again, or `until`.
    async fn wait_for_change(&self, silent: Option<SocketAddr>, until: Instant) {
        let mut changes = self.changes.subscribe();
        let mut health = self.transport.health_changes();
        let wait = async {
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return std::future::pending().await } else { return },
                    changed = health.changed() => {
                        if changed.is_err() { return std::future::pending().await }
                        if silent.is_some_and(|addr| self.transport.is_responsive(addr)) { return }
                    }
                }
            }
        };
        let _ = tokio::time::timeout_at(until, wait).await;
    }
}

/// Sorts the answer to one attempt sent to `target`.
fn classify(
    shard: ShardId,
    target: SocketAddr,
    answer: Result<Vec<u8>, TransportError>,
) -> Attempt {
    let unknown = |shard| Attempt::Unknown(ClientError::Cluster(Error::OutcomeUnknown { shard }));
    let bytes = match answer {
        Ok(bytes) => bytes,
        // Never sent: try another node, which waits for the failover if needed.
        Err(
            error @ (TransportError::Unreachable { .. }
            | TransportError::Refused { .. }
            | TransportError::WrongNode { .. }
            | TransportError::Io(_)),
        ) => return Attempt::Avoid(ClientError::Unreachable(error)),
        // Sent; the connection broke before the answer.
        Err(TransportError::Closed { .. }) => return unknown(shard),
        Err(TransportError::Timeout { after, .. }) => {
            return Attempt::Unknown(ClientError::Cluster(Error::Timeout { shard, after }))
        }
        Err(TransportError::Remote { reason }) if reason == OVERLOADED => {
            return Attempt::Fail(ClientError::Cluster(Error::Overloaded { shard }))
        }
        Err(TransportError::Remote { reason })
            if reason.starts_with(crate::tls::NOT_AUTHORIZED) =>
        {
            return Attempt::Fail(ClientError::NotAuthorized(reason))
        }
        Err(error) => return Attempt::Fail(ClientError::Unreachable(error)),
    };
    match codec::decode::<Response>(&bytes) {
        Ok(Response::Shard(Ok(reply))) => Attempt::Reply(reply),
        Ok(Response::Shard(Err(error))) => match error {
            Error::WrongOwner { .. } => Attempt::Retry(error.into()),
            Error::NotReady {
                reason: NotReadyReason::ShardCountMismatch,
            } => Attempt::Fail(error.into()),
            Error::ShuttingDown => Attempt::Avoid(error.into()),
            Error::NotReady { .. } => Attempt::NotReady(error),
            // A forwarding node lost the owner after sending: as unknown as our own loss.
            Error::OutcomeUnknown { .. } | Error::Unreachable { .. } => unknown(shard),
            // A retry reached a shard that keeps no record: the first attempt's fate stays
            // unknown, and so does the call's.
            Error::NotRecorded { shard } => {
                Attempt::Fail(ClientError::Cluster(Error::OutcomeUnknown { shard }))
            }
            Error::Timeout { .. } => Attempt::Unknown(error.into()),
            other => Attempt::Fail(other.into()),
        },
        Ok(_) => Attempt::Fail(
            Error::Protocol {
                detail: format!("{target} answered with an unexpected message"),
            }
            .into(),
        ),
        Err(error) => Attempt::Fail(error.into()),
    }
}

/// Resolves once the connection to `addr` counts as unresponsive.
async fn until_silent(transport: &Transport, addr: SocketAddr) {
    let mut health = transport.health_changes();
    while transport.is_responsive(addr) {
        if health.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Holds a [`Request::WatchRouting`] open at one node after another while the client lives,
/// installing every newer map it brings; it starts at a random node (clients spread their
/// watches) and ends as soon as the last clone of the client is dropped. A node that does not
/// answer (its connection turns unresponsive), refuses, or answers without a newer map (it
/// cannot vouch for its map, or nothing changed for a whole hold) is left for the next; while
/// none holds the watch, the map is fetched every [`REFRESH_EVERY`].
async fn watch_loop(client: Weak<Shared>) {
    let mut start = [0u8; 8];
    let mut next = match getrandom::fill(&mut start) {
        Ok(()) => u64::from_le_bytes(start) as usize,
        Err(_) => 0,
    };
    loop {
        let Some(shared) = client.upgrade() else {
            return;
        };
        let candidates = shared.candidates();
        let addr = candidates[next % candidates.len()];
        if !shared.transport.is_responsive(addr) {
            next = next.wrapping_add(1);
            if next.is_multiple_of(candidates.len()) {
                drop(shared);
                tokio::time::sleep(WATCH_RETRY_PAUSE).await;
            }
            continue;
        }
        let epoch = shared.current().map_or(0, |r| r.epoch);
        let transport = shared.transport.clone();
        // Closed when the client is dropped; changed when a call installs a newer map (the
        // watch then starts over from that epoch).
        let mut changes = shared.changes.subscribe();
        drop(shared);
        let request = Request::WatchRouting { epoch };
        let Ok(payload) = codec::encode(&request) else {
            return;
        };
        let answer = tokio::select! {
            answer = transport.request(addr, payload, WATCH_HOLD + Duration::from_secs(2)) => Some(answer),
            () = until_silent(&transport, addr) => None,
            changed = changes.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        drop(transport);
        let Some(shared) = client.upgrade() else {
            return;
        };
        match answer.map(|a| a.map(|bytes| codec::decode::<Response>(&bytes))) {
            Some(Ok(Ok(Response::Routing(info))))
                if info.epoch > epoch && !info.owners.is_empty() =>
            {
                shared.install(info);
                continue;
            }
            Some(Ok(Ok(Response::Routing(_)))) => {
                // Nothing newer: this node cannot vouch for its map, or nothing changed for a
                // whole hold; the next node holds the watch.
            }
            other => {
                tracing::debug!(%addr, failed = other.is_some(), "map watch lost; trying the next node");
                let stale = (shared.created.elapsed().as_millis() as u64)
                    .saturating_sub(shared.installed_ms.load(Ordering::Relaxed))
                    >= REFRESH_EVERY.as_millis() as u64;
                if stale {
                    let _ = shared.refresh().await;
                }
            }
        }
        next = next.wrapping_add(1);
        drop(shared);
        tokio::time::sleep(WATCH_RETRY_PAUSE).await;
    }
}
