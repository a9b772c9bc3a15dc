//! [`Client`]: sends messages to keys from programs outside the cluster.
//!
//! It talks to the cluster's nodes over the authenticated transport and fails over between the
//! seed nodes it was given. This version sends each message to the first seed that answers; a
//! node that does not own the key's shard answers [`Error::WrongOwner`] naming the owner.
//! It holds no shard state.

use std::net::SocketAddr;
use std::time::Duration;

use crate::codec;
use crate::error::Error;
use crate::shard::ShardMessage;
use crate::shard_map::Key;
use crate::transport::{Secret, Transport, TransportConfig, TransportError};
use crate::wire::{Request, Response};

/// Why a [`Client`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The cluster answered with an error (not ready, wrong owner, overloaded, ...).
    #[error(transparent)]
    Cluster(#[from] Error),
    /// No seed could be reached; the last failure is given.
    #[error("no node reachable: {0}; check the addresses and that CLUSTERFUNK_SECRET matches the cluster's")]
    Unreachable(TransportError),
    /// The client was built without seeds or with a bad configuration.
    #[error("invalid client configuration: {0}")]
    Invalid(String),
}

/// A client of a clusterfunk cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    seeds: Vec<SocketAddr>,
    timeout: Duration,
}

impl Client {
    /// A client for the cluster reachable at `seeds`, authenticating with `secret` (`None`
    /// only for insecure clusters). Connections open lazily on first use.
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
            ..TransportConfig::default()
        })
        .map_err(|e| ClientError::Invalid(e.to_string()))?;
        Ok(Client {
            transport,
            seeds,
            timeout,
        })
    }

    /// Sends `msg` to the shard owning `key` and returns the reply.
    pub async fn send<M: ShardMessage>(
        &self,
        key: impl Into<Key>,
        msg: M,
    ) -> Result<M::Reply, ClientError> {
        let request = Request::Shard {
            key: key.into().into_bytes(),
            tag: M::TAG.to_string(),
            payload: codec::encode(&msg)?,
        };
        let payload = codec::encode(&request)?;
        let mut last = None;
        for seed in &self.seeds {
            match self
                .transport
                .request(*seed, payload.clone(), self.timeout)
                .await
            {
                Ok(answer) => {
                    return match codec::decode::<Response>(&answer)? {
                        Response::Shard(Ok(reply)) => Ok(codec::decode(&reply)?),
                        Response::Shard(Err(error)) => Err(error.into()),
                        _ => Err(Error::Codec(
                            "the node answered with an unexpected message".into(),
                        )
                        .into()),
                    }
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
}
