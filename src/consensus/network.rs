//! openraft's network over the clusterfunk transport: each raft RPC is one request/response on
//! the peer's multiplexed connection.
//!
//! It owns the mapping of transport failures onto openraft's error kinds (unreachable peers
//! make openraft back off); it does not own connections (the transport does).

use std::net::{AddrParseError, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::contact::Contact;
use super::{NodeInfo, TypeConfig};
use crate::codec;
use crate::shard_map::NodeId;
use crate::transport::log_limit::LogLimit;
use crate::transport::{Transport, TransportError};
use crate::wire::{Request, Response};

/// Makes a [`PeerClient`] per raft peer.
#[derive(Clone, Debug)]
pub struct Network {
    transport: Transport,
    contact: Arc<Contact>,
}

impl Network {
    /// A network sending over `transport`, with evidence of its own.
    #[cfg(test)]
    pub fn new(transport: Transport) -> Self {
        Self::with_contact(transport, Arc::default())
    }

    /// A network sending over `transport` that records its leader contacts and the evidence
    /// of its elections in `contact` (shared with the node's service and lease granter).
    pub fn with_contact(transport: Transport, contact: Arc<Contact>) -> Self {
        Network { transport, contact }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            transport: self.transport.clone(),
            target,
            addr: node
                .addr
                .parse()
                .map_err(|source| (node.addr.clone(), source)),
            unreachable_warnings: LogLimit::new(UNREACHABLE_WARNING_WINDOW, 1),
            contact: self.contact.clone(),
        }
    }
}

/// Sends raft RPCs to one peer.
#[derive(Debug)]
pub struct PeerClient {
    transport: Transport,
    target: NodeId,
    /// The peer's address, or the unparsable string the membership holds for it and why it
    /// does not parse.
    addr: Result<SocketAddr, (String, AddrParseError)>,
    /// Bounds the warnings about a peer that does not answer: raft retries it every 50 ms.
    unreachable_warnings: LogLimit,
    /// Leader contacts and election evidence (the receipt rule).
    contact: Arc<Contact>,
}

/// One warning per this window about a raft peer that does not answer (with a count of the
/// failures left out). openraft's own lines about it, one or more per retry, are what
/// [`QUIET_OPENRAFT_LOG`](crate::QUIET_OPENRAFT_LOG) turns off.
const UNREACHABLE_WARNING_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

/// A failure before the peer's raft answered.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("node {target} has an invalid address `{addr}` in the membership ({source}): remove it and add it again with IP:PORT")]
    BadAddress {
        target: NodeId,
        addr: String,
        source: AddrParseError,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("node answered with a message that broke the protocol: {0}")]
    Protocol(#[source] ProtocolError),
}

/// How a raft RPC broke the protocol: a message that could not be encoded or decoded, or an
/// answer of the wrong kind.
#[derive(Debug, thiserror::Error)]
enum ProtocolError {
    #[error("the request cannot be encoded: {0}")]
    Encode(#[source] crate::error::Error),
    #[error("the answer cannot be decoded: {0}")]
    Decode(#[source] crate::error::Error),
    #[error("expected a {expected} response")]
    Unexpected { expected: &'static str },
}

impl PeerClient {
    async fn call(&self, request: Request, option: &RPCOption) -> Result<Response, CallError> {
        let addr = self
            .addr
            .clone()
            .map_err(|(addr, source)| CallError::BadAddress {
                target: self.target,
                addr,
                source,
            })?;
        let payload =
            codec::encode(&request).map_err(|e| CallError::Protocol(ProtocolError::Encode(e)))?;
        let answer = self
            .transport
            .request_node(self.target, addr, payload, option.hard_ttl())
            .await?;
        codec::decode(&answer).map_err(|e| CallError::Protocol(ProtocolError::Decode(e)))
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
            | CallError::BadAddress { .. } => {
                if let Some(left_out) = self.unreachable_warnings.admit(std::time::Instant::now()) {
                    tracing::warn!(
                        target: "clusterfunk::raft",
                        node = self.target,
                        "raft cannot reach node {}: {error} ({left_out} more failures since the last warning; the leader keeps retrying every {} ms; see `clusterfunk status` for members down)",
                        self.target,
                        UNREACHABLE_RETRY.as_millis(),
                    );
                }
                RPCError::Unreachable(Unreachable::new(&error))
            }
            _ => RPCError::Network(NetworkError::new(&error)),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        expected: &'static str,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        self.rpc_error(CallError::Protocol(ProtocolError::Unexpected { expected }))
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
        // Only a leader sends appends: a leader's own sends are receipts (a former leader's
        // voters must not report a time before its last grant's confirmation round).
        self.contact.heard_from_leader(rpc.vote.leader_id.node_id);
        match self.call(Request::AppendEntries(rpc), &option).await {
            Ok(Response::AppendEntries(Ok(response))) => {
                self.contact.answered(self.target);
                Ok(response)
            }
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
        let term = rpc.vote.leader_id.term;
        self.contact.campaigning(term);
        match self.call(Request::Vote(rpc), &option).await {
            Ok(Response::Vote {
                result: Ok(response),
                since_contact,
            }) => {
                self.contact.answered(self.target);
                if response.vote_granted {
                    match since_contact {
                        Some(elapsed) => self.contact.granted(term, Instant::now(), elapsed),
                        // A voter that reports nothing: as if it heard from a leader just now.
                        None => self.contact.granted(term, Instant::now(), Duration::ZERO),
                    }
                }
                Ok(response)
            }
            Ok(Response::Vote {
                result: Err(error), ..
            }) => Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                error.into_raft(|_| None),
            ))),
            Ok(_) => Err(self.unexpected("vote")),
            Err(error) => Err(self.rpc_error(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use openraft::Vote;

    use super::*;
    use crate::transport::TransportConfig;

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_dead_peer_is_warned_about_once_per_window_not_once_per_retry() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        // A port where nothing listens: bound, then closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("local addr");
        drop(closed);
        let transport = Transport::new(TransportConfig {
            node_id: Some(1),
            ..TransportConfig::default()
        })
        .expect("transport");
        let mut network = Network::new(transport);
        let mut peer = network
            .new_client(
                3,
                &NodeInfo {
                    addr: addr.to_string(),
                    zone: None,
                },
            )
            .await;
        let mut failures = 0;
        for _ in 0..40 {
            let request = VoteRequest::new(Vote::new(2, 1), None);
            let result = peer
                .vote(request, RPCOption::new(Duration::from_secs(5)))
                .await;
            if matches!(result, Err(RPCError::Unreachable(_))) {
                failures += 1;
            }
        }
        assert_eq!(
            failures, 40,
            "every call to the dead peer fails as unreachable"
        );
        let text = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
        let warnings = text.matches("raft cannot reach node 3").count();
        assert_eq!(warnings, 1, "one warning for 40 failures: {text}");
    }
}
