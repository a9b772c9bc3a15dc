//! openraft's network over the clusterfunk transport: each raft RPC is one request/response on
//! the peer's multiplexed connection.
//!
//! It owns the mapping of transport failures onto openraft's error kinds (unreachable peers
//! make openraft back off); it does not own connections (the transport does).

use std::net::SocketAddr;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{NodeInfo, TypeConfig};
use crate::codec;
use crate::shard_map::NodeId;
use crate::transport::{Transport, TransportError};
use crate::wire::{Request, Response};

/// Makes a [`PeerClient`] per raft peer.
#[derive(Clone, Debug)]
pub struct Network {
    transport: Transport,
}

impl Network {
    /// A network sending over `transport`.
    pub fn new(transport: Transport) -> Self {
        Network { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            transport: self.transport.clone(),
            target,
            addr: node.addr.parse().map_err(|_| node.addr.clone()),
        }
    }
}

/// Sends raft RPCs to one peer.
#[derive(Debug)]
pub struct PeerClient {
    transport: Transport,
    target: NodeId,
    /// The peer's address, or the unparsable string the membership holds for it.
    addr: Result<SocketAddr, String>,
}

/// A failure before the peer's raft answered.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("node {target} has an invalid address `{addr}` in the membership: remove it and add it again with IP:PORT")]
    BadAddress { target: NodeId, addr: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("node answered with an undecodable or unexpected message: {0}")]
    Protocol(String),
}

impl PeerClient {
    async fn call(&self, request: Request, option: &RPCOption) -> Result<Response, CallError> {
        let addr = self.addr.clone().map_err(|addr| CallError::BadAddress {
            target: self.target,
            addr,
        })?;
        let payload = codec::encode(&request).map_err(|e| CallError::Protocol(e.to_string()))?;
        let answer = self
            .transport
            .request_node(self.target, addr, payload, option.hard_ttl())
            .await?;
        codec::decode(&answer).map_err(|e| CallError::Protocol(e.to_string()))
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        error: CallError,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        match &error {
            CallError::Transport(
                TransportError::Unreachable { .. }
                | TransportError::Refused { .. }
                | TransportError::WrongNode { .. }
                | TransportError::Closed { .. },
            )
            | CallError::BadAddress { .. } => RPCError::Unreachable(Unreachable::new(&error)),
            _ => RPCError::Network(NetworkError::new(&error)),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        what: &str,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        self.rpc_error(CallError::Protocol(format!("expected a {what} response")))
    }
}

/// The pause before retrying an unreachable peer. openraft's default is 500 ms, as long as a
/// follower's election timeout: a peer restarted meanwhile hears no heartbeat, campaigns and
/// deposes a healthy leader. Retrying at the heartbeat pace avoids that; the transport's own
/// reconnect backoff still keeps a dead peer from being hammered.
const UNREACHABLE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

impl RaftNetwork<TypeConfig> for PeerClient {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_RETRY))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self.call(Request::AppendEntries(rpc), &option).await {
            Ok(Response::AppendEntries(Ok(response))) => Ok(response),
            Ok(Response::AppendEntries(Err(error))) => Err(RPCError::RemoteError(
                RemoteError::new(self.target, error.into_raft(|_| None)),
            )),
            Ok(_) => Err(self.unexpected("append-entries")),
            Err(error) => Err(self.rpc_error(error)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(Request::InstallSnapshot(rpc), &option).await {
            Ok(Response::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(Response::InstallSnapshot(Err(error))) => {
                Err(RPCError::RemoteError(RemoteError::new(
                    self.target,
                    error.into_raft(|mismatch| {
                        Some(InstallSnapshotError::SnapshotMismatch(mismatch))
                    }),
                )))
            }
            Ok(_) => Err(self.unexpected("install-snapshot")),
            Err(error) => Err(self.rpc_error(error)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        match self.call(Request::Vote(rpc), &option).await {
            Ok(Response::Vote(Ok(response))) => Ok(response),
            Ok(Response::Vote(Err(error))) => Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                error.into_raft(|_| None),
            ))),
            Ok(_) => Err(self.unexpected("vote")),
            Err(error) => Err(self.rpc_error(error)),
        }
    }
}
