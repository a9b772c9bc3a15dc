//! The node's request handler: decodes each [`Request`] that arrives over the transport and
//! hands it to raft, the admin API or the router.
//!
//! It owns no state and makes no decisions: it only dispatches.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::__private::WireMessage;
use crate::codec;
use crate::consensus::Consensus;
use crate::error::Error;
use crate::router::Router;
use crate::shard::ShardHandler;
use crate::shard_map::Key;
use crate::transport::{PeerInfo, Service};
use crate::wire::{Request, Response};

/// Serves one node's requests.
pub(crate) struct NodeService<H: ShardHandler> {
    pub(crate) consensus: Consensus,
    pub(crate) router: Arc<Router<H>>,
}

impl<H: ShardHandler> Service for NodeService<H> {
    fn call(
        &self,
        peer: PeerInfo,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>> {
        let consensus = self.consensus.clone();
        let router = self.router.clone();
        Box::pin(async move {
            let request: Request = codec::decode(&payload).map_err(|e| {
                tracing::warn!(peer = %peer.addr, error = %e, "undecodable request");
                e.to_string()
            })?;
            let response = match request {
                Request::AppendEntries(rpc) => {
                    Response::AppendEntries(consensus.raft().append_entries(rpc).await)
                }
                Request::Vote(rpc) => Response::Vote(consensus.raft().vote(rpc).await),
                Request::InstallSnapshot(rpc) => {
                    Response::InstallSnapshot(consensus.raft().install_snapshot(rpc).await)
                }
                Request::Admin { request, forwarded } => {
                    Response::Admin(consensus.admin(request, forwarded).await)
                }
                Request::Shard { key, tag, payload } => {
                    Response::Shard(route_wire(&router, key, &tag, &payload).await)
                }
            };
            codec::encode(&response).map_err(|e| e.to_string())
        })
    }
}

async fn route_wire<H: ShardHandler>(
    router: &Arc<Router<H>>,
    key: Vec<u8>,
    tag: &str,
    payload: &[u8],
) -> Result<Vec<u8>, Error> {
    let message = H::Message::decode(tag, payload)?;
    message.route_wire(router, Key::from(key)).await
}
