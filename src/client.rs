//! [`Client`]: sends messages to keys from programs outside the cluster.
//!
//! The client learns the shard map (owners and their addresses) from any node, sends each
//! message straight to its shard's owner, and refreshes the map when the answer says it is stale
//! (`WrongOwner`), when the owner is not ready or unreachable, failing over between the seed
//! nodes it was given, and in the background about once a second while it is in use. A node that receives a message for another node's shard forwards it, so a
//! stale map costs a hop, never a wrong answer. The client holds no shard state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::codec;
use crate::error::Error;
use crate::shard::ShardMessage;
use crate::shard_map::{shard_for, Key, NodeId};
use crate::transport::{Secret, Transport, TransportConfig, TransportError};
use crate::wire::{Request, Response, RoutingInfo};

/// Why a [`Client`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The cluster answered with an error (not ready, overloaded, a handler failure, ...).
    #[error(transparent)]
    Cluster(#[from] Error),
    /// No node could be reached; the last failure is given.
    #[error("no node reachable: {0}; check the addresses and that CLUSTERFUNK_SECRET matches the cluster's")]
    Unreachable(TransportError),
    /// The client was built without seeds or with a bad configuration.
    #[error("invalid client configuration: {0}")]
    Invalid(String),
}

/// The routing information the client holds.
#[derive(Debug)]
struct Routing {
    epoch: u64,
    owners: Vec<NodeId>,
    addrs: HashMap<NodeId, SocketAddr>,
}

/// How many times a request is retried after a stale map or an unreachable owner.
const ATTEMPTS_MAX: usize = 4;

/// A client of a clusterfunk cluster. Cheap to clone; clones share the map.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    seeds: Arc<Vec<SocketAddr>>,
    timeout: Duration,
    routing: Arc<RwLock<Option<Arc<Routing>>>>,
    /// When the map was last fetched (or a background fetch began), in milliseconds since
    /// `created`.
    refreshed_ms: Arc<AtomicU64>,
    created: Instant,
}

/// How old the map may grow while the client is in use before a background fetch renews it:
/// after a failover or a planned move a stale map costs a forwarding hop per request (never a
/// wrong answer), for at most about this long.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

impl Client {
    /// A client for the cluster reachable at `seeds`, authenticating with `secret` (`None`
    /// only for insecure clusters). Nothing is sent until the first request.
    pub fn connect(
        seeds: impl IntoIterator<Item = SocketAddr>,
        secret: Option<Secret>,
    ) -> Result<Self, ClientError> {
        Self::with_config(seeds, secret, "clusterfunk", Duration::from_secs(10))
    }

    /// Like [`connect`](Self::connect), with the cluster's name and the per-request timeout.
    pub fn with_config(
        seeds: impl IntoIterator<Item = SocketAddr>,
        secret: Option<Secret>,
        cluster_name: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let seeds: Vec<SocketAddr> = seeds.into_iter().collect();
        if seeds.is_empty() {
            return Err(ClientError::Invalid(
                "give at least one seed address".into(),
            ));
        }
        let transport = Transport::new(TransportConfig {
            cluster_name: cluster_name.to_string(),
            node_id: None,
            secret,
            reconnect_backoff_max: Duration::from_millis(250),
            ..TransportConfig::default()
        })
        .map_err(|e| ClientError::Invalid(e.to_string()))?;
        Ok(Client {
            transport,
            seeds: Arc::new(seeds),
            timeout,
            routing: Arc::new(RwLock::new(None)),
            refreshed_ms: Arc::new(AtomicU64::new(0)),
            created: Instant::now(),
        })
    }

    /// The map epoch the client routes by, once it has one.
    pub fn epoch(&self) -> Option<u64> {
        self.current().map(|r| r.epoch)
    }

    fn current(&self) -> Option<Arc<Routing>> {
        self.routing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fetches the map from the first seed (or known node) that answers.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let known: Vec<SocketAddr> = self
            .current()
            .map(|r| r.addrs.values().copied().collect())
            .unwrap_or_default();
        let mut last = None;
        for addr in self.seeds.iter().chain(known.iter()) {
            match self.call(*addr, &Request::Routing).await {
                Ok(Response::Routing(info)) if !info.owners.is_empty() => {
                    self.refreshed_ms
                        .store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
                    self.install(info);
                    return Ok(());
                }
                Ok(_) => {
                    last = Some(TransportError::Protocol {
                        reason: format!("{addr} has no shard map yet"),
                    })
                }
                Err(error) => last = Some(error),
            }
        }
        Err(ClientError::Unreachable(last.unwrap_or(
            TransportError::Protocol {
                reason: "no seeds".into(),
            },
        )))
    }

    /// Starts one background fetch of the map when the last is older than [`REFRESH_EVERY`]
    /// (only inside a tokio runtime; outside one, errors and `WrongOwner` still refresh).
    fn refresh_in_background_when_old(&self) {
        let now = self.created.elapsed().as_millis() as u64;
        let last = self.refreshed_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REFRESH_EVERY.as_millis() as u64 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // One fetch at a time: whoever moves the stamp starts it.
        if self
            .refreshed_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let client = self.clone();
            runtime.spawn(async move {
                if let Err(error) = client.refresh().await {
                    tracing::debug!(%error, "background map refresh failed");
                }
            });
        }
    }

    fn install(&self, info: RoutingInfo) {
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
        let mut current = self.routing.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|c| c.epoch <= routing.epoch) {
            *current = Some(routing);
        }
    }

    /// Sends `msg` to the shard owning `key` and returns the reply.
    ///
    /// The message goes to the owner by the client's map. If the owner cannot be reached (it
    /// may have crashed) the message goes to another node instead, which forwards it and waits
    /// at its router, bounded, for the failover to give the shard a live owner. A `WrongOwner`
    /// answer refreshes the map and retries.
    pub async fn send<M: ShardMessage>(
        &self,
        key: impl Into<Key>,
        msg: M,
    ) -> Result<M::Reply, ClientError> {
        let key = key.into();
        let request = Request::Shard {
            key: key.as_bytes().to_vec(),
            tag: M::TAG.to_string(),
            payload: codec::encode(&msg)?,
        };
        if self.current().is_none() {
            // Without a map any node will do: it forwards.
            let _ = self.refresh().await;
        } else {
            self.refresh_in_background_when_old();
        }
        let mut unreachable: Vec<SocketAddr> = Vec::new();
        let mut last: Option<ClientError> = None;
        for attempt in 0..ATTEMPTS_MAX {
            let routing = self.current();
            let owner_addr = routing.as_ref().and_then(|r| {
                let shard = shard_for(key.as_bytes(), r.owners.len() as u32);
                r.owners
                    .get(shard as usize)
                    .and_then(|owner| r.addrs.get(owner))
                    .copied()
            });
            // The owner if reachable, else any other node (seeds first) not known to be down.
            let others = self
                .seeds
                .iter()
                .copied()
                .chain(routing.iter().flat_map(|r| r.addrs.values().copied()));
            let target = owner_addr
                .into_iter()
                .chain(others)
                .find(|addr| !unreachable.contains(addr))
                .unwrap_or(self.seeds[attempt % self.seeds.len()]);
            match self.call(target, &request).await {
                Ok(Response::Shard(Ok(reply))) => return Ok(codec::decode(&reply)?),
                Ok(Response::Shard(Err(error @ Error::WrongOwner { .. }))) => {
                    last = Some(error.into());
                    let _ = self.refresh().await;
                }
                // Any other answer (NotReady included: the node already waited) is final.
                Ok(Response::Shard(Err(error))) => return Err(error.into()),
                Ok(_) => {
                    return Err(
                        Error::Codec("the node answered with an unexpected message".into()).into(),
                    )
                }
                // Never sent: try another node, which waits for the failover if needed.
                Err(
                    error @ (TransportError::Unreachable { .. } | TransportError::Refused { .. }),
                ) => {
                    unreachable.push(target);
                    last = Some(ClientError::Unreachable(error));
                }
                Err(error) => return Err(ClientError::Unreachable(error)),
            }
        }
        Err(last.unwrap_or(ClientError::Invalid("no attempt made".into())))
    }

    async fn call(&self, addr: SocketAddr, request: &Request) -> Result<Response, TransportError> {
        let payload = codec::encode(request).map_err(|e| TransportError::Protocol {
            reason: e.to_string(),
        })?;
        let answer = self.transport.request(addr, payload, self.timeout).await?;
        codec::decode(&answer).map_err(|e| TransportError::Protocol {
            reason: e.to_string(),
        })
    }
}
