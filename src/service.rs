//! The node's request handler: decodes each [`Request`] that arrives over the transport and
//! hands it to raft, the admin API, the lease granter or the router.
//!
//! It owns no state and makes no decisions: it only dispatches.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::__private::WireMessage;
use crate::admin::{AdminRequest, AdminResponse, NodeState, StatusReport};
use crate::codec;
use crate::consensus::{ClusterState, Command, Consensus};
use crate::error::Error;
use crate::metrics::RouteLabel;
use crate::router::Router;
use crate::session::{Stamp, STAMP};
use crate::shard::Origin;
use crate::shard::ShardHandler;
use crate::shard_map::{Key, NodeId};
use crate::tls::Role;
use crate::transport::log_limit::LogLimit;
use crate::transport::{PeerInfo, Service, ServiceError};
use crate::wire::{RemoteRaftError, Request, Response, RoutingInfo};

/// Serves one node's requests.
pub(crate) struct NodeService<H: ShardHandler> {
    pub(crate) consensus: Consensus,
    pub(crate) router: Arc<Router<H>>,
    /// Bounds the warnings about refused and undecodable requests: a peer can send them as
    /// fast as it likes.
    pub(crate) warnings: LogLimit,
}

/// Warnings about refused requests: at most this many per [`REFUSAL_WARNING_WINDOW`].
pub(crate) const REFUSAL_WARNINGS_PER_WINDOW: u32 = 10;
/// The window of [`REFUSAL_WARNINGS_PER_WINDOW`].
pub(crate) const REFUSAL_WARNING_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

impl<H: ShardHandler> NodeService<H> {
    /// The ids of the members this node knows (voters and learners); `None` while it knows no
    /// membership (a node not yet added: its first log entries come from a leader it cannot
    /// know yet).
    fn members(&self) -> Option<BTreeSet<NodeId>> {
        let metrics = self.consensus.raft().metrics();
        let metrics = metrics.borrow();
        let ids: BTreeSet<NodeId> = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        (!ids.is_empty()).then_some(ids)
    }

    fn warn_refused(&self, peer: &PeerInfo, reason: &dyn std::fmt::Display) {
        if let Some(left_out) = self.warnings.admit(Instant::now()) {
            tracing::warn!(peer = %peer.addr, %reason, warnings_left_out = left_out, "request refused");
        }
    }
}

impl<H: ShardHandler> Service for NodeService<H> {
    fn call(
        &self,
        peer: PeerInfo,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, ServiceError>> + Send>> {
        let request: Request = match codec::decode(&payload) {
            Ok(request) => request,
            Err(e) => {
                self.warn_refused(&peer, &format_args!("undecodable request: {e}"));
                return Box::pin(std::future::ready(Err(ServiceError::Undecodable(
                    Box::new(e),
                ))));
            }
        };
        let members = match peer.role {
            Some(Role::Node(_)) => self.members(),
            _ => None,
        };
        if let Err(refusal) = authorize(peer.role, &request, members.as_ref()) {
            let error = refusal.into_service_error();
            self.warn_refused(&peer, &error);
            return Box::pin(std::future::ready(Err(error)));
        }
        // Each kind boxes only its own future (and clones only what it uses): a request for a
        // shard does not pay for the size of raft's futures.
        let limit = self.consensus.transport().config().payload_max();
        match request {
            Request::Shard { key, tag, payload } => {
                let router = self.router.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    let result = route_wire(&router, key, &tag, &payload, Origin::Client).await;
                    router.record(RouteLabel::Client, result.as_ref().err(), started);
                    encode_shard(result, limit)
                })
            }
            Request::ShardAt {
                key,
                tag,
                payload,
                epoch,
            } => {
                let router = self.router.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    let result = match router.catch_up(epoch, router.shard_of_bytes(&key)).await {
                        Ok(()) => route_wire(&router, key, &tag, &payload, Origin::Client).await,
                        Err(error) => Err(error),
                    };
                    router.record(RouteLabel::Client, result.as_ref().err(), started);
                    encode_shard(result, limit)
                })
            }
            Request::Forward {
                key, tag, payload, ..
            } => {
                let router = self.router.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    let result = route_wire(&router, key, &tag, &payload, Origin::Forwarded).await;
                    router.record(RouteLabel::Forwarded, result.as_ref().err(), started);
                    encode_shard(result, limit)
                })
            }
            Request::ShardOnce {
                key,
                tag,
                payload,
                epoch,
                once,
            } => {
                let router = self.router.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    let stamp = Stamp::new(once, &tag, &key, &payload);
                    let result = match router.catch_up(epoch, router.shard_of_bytes(&key)).await {
                        Ok(()) => {
                            let routed = route_wire(&router, key, &tag, &payload, Origin::Client);
                            STAMP.scope(stamp, routed).await
                        }
                        Err(error) => Err(error),
                    };
                    router.record(RouteLabel::Client, result.as_ref().err(), started);
                    encode_shard(result, limit)
                })
            }
            Request::ForwardOnce {
                key,
                tag,
                payload,
                once,
                digest,
                ..
            } => {
                let router = self.router.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    // Forwarded by a member node, which took it from the client's bytes.
                    let stamp = Stamp::forwarded(once, digest);
                    let routed = route_wire(&router, key, &tag, &payload, Origin::Forwarded);
                    let result = STAMP.scope(stamp, routed).await;
                    router.record(RouteLabel::Forwarded, result.as_ref().err(), started);
                    encode_shard(result, limit)
                })
            }
            Request::AppendEntries(rpc) => {
                // Before raft sees it: a receipt recorded late would start a new leader's wait
                // late (safe); recorded after raft acknowledged, a grant could slip before it.
                self.consensus
                    .contact()
                    .heard_from_leader(rpc.vote.leader_id.node_id);
                let consensus = self.consensus.clone();
                Box::pin(async move {
                    encode(&Response::AppendEntries(
                        consensus
                            .raft()
                            .append_entries(rpc)
                            .await
                            .map_err(|e| RemoteRaftError::flatten(e, |never| match never {})),
                    ))
                })
            }
            Request::Vote(rpc) => {
                let consensus = self.consensus.clone();
                Box::pin(async move {
                    let result = consensus
                        .raft()
                        .vote(rpc)
                        .await
                        .map_err(|e| RemoteRaftError::flatten(e, |never| match never {}));
                    // Measured after raft granted: a receipt in between only shortens it.
                    let since_contact = match &result {
                        Ok(response) if response.vote_granted => {
                            Some(consensus.contact().since_last())
                        }
                        _ => None,
                    };
                    encode(&Response::Vote {
                        result,
                        since_contact,
                    })
                })
            }
            Request::InstallSnapshot(rpc) => {
                let consensus = self.consensus.clone();
                Box::pin(async move {
                    encode(&Response::InstallSnapshot(
                        consensus
                            .raft()
                            .install_snapshot(rpc)
                            .await
                            .map_err(RemoteRaftError::from_install_snapshot),
                    ))
                })
            }
            Request::Admin {
                request: AdminRequest::Status,
                ..
            } => Box::pin(std::future::ready(encode(&Response::Admin(Ok(
                AdminResponse::Status(status(&self.consensus, &self.router)),
            ))))),
            Request::Admin { request, forwarded } => {
                let consensus = self.consensus.clone();
                Box::pin(async move {
                    encode(&Response::Admin(consensus.admin(request, forwarded).await))
                })
            }
            Request::RenewLease(renew) => {
                let consensus = self.consensus.clone();
                Box::pin(async move { encode(&Response::Lease(consensus.renew(renew).await)) })
            }
            Request::Handoff {
                from,
                epoch,
                shards,
            } => {
                tracing::info!(from, epoch, count = shards.len(), "shards handed over");
                crate::metrics::handoffs_completed("in", shards.len());
                let refused = shards
                    .into_iter()
                    .map(|(shard, snapshot)| self.router.accept_handoff(shard, epoch, snapshot))
                    .find_map(Result::err);
                let response = match refused {
                    None => Response::HandoffAccepted,
                    // The wire carries the refusal's message: the sender only retries.
                    Some(refusal) => Response::HandoffRefused {
                        reason: refusal.to_string(),
                    },
                };
                Box::pin(std::future::ready(encode(&response)))
            }
            Request::HandoffChunk {
                from,
                epoch,
                shard,
                offset,
                total,
                bytes,
            } => {
                let response = match self
                    .router
                    .accept_chunk(from, epoch, shard, offset, total, bytes)
                {
                    Ok(()) => Response::HandoffAccepted,
                    Err(refusal) => Response::HandoffRefused {
                        reason: refusal.to_string(),
                    },
                };
                Box::pin(std::future::ready(encode(&response)))
            }
            Request::Propose(command @ (Command::Released { .. } | Command::MoveStuck { .. })) => {
                let consensus = self.consensus.clone();
                Box::pin(async move {
                    encode(&Response::Proposed(consensus.propose(command, true).await))
                })
            }
            Request::Propose(_) => Box::pin(std::future::ready(encode(&Response::Proposed(Err(
                crate::admin::AdminError::Invalid {
                    reason: "only releases and stuck-move reports may be proposed by peers".into(),
                },
            ))))),
            Request::Routing => Box::pin(std::future::ready(encode(&Response::Routing(routing(
                &self.consensus,
            ))))),
            Request::WatchRouting { epoch } => {
                let router = self.router.clone();
                Box::pin(async move {
                    let table = router.watch_map(epoch, crate::wire::WATCH_HOLD).await;
                    encode(&Response::Routing(routing_of(&table.state)))
                })
            }
        }
    }
}

/// Why a peer's certificate does not allow a request. It reaches the peer as
/// [`ServiceError::NotAuthorized`], whose message starts with
/// [`NOT_AUTHORIZED`](crate::tls::NOT_AUTHORIZED): that prefix is how admin tools and clients
/// tell a refusal (fix the certificate) from a failure (retry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum NotAuthorized {
    /// The certificate's role never sends this kind of request.
    #[error("{role} certificates may not send {what}; {advice}")]
    Role {
        /// The peer's role.
        role: Role,
        /// The kind of request, in words.
        what: &'static str,
        /// What to do instead.
        advice: &'static str,
    },
    /// A node certificate of a node that is not (or no longer) a member.
    #[error("node {id} is not a member of this cluster (a certificate issued for a node never added, or for one removed), so it may not send {what}; add it with `clusterfunk add-node` first")]
    NotAMember {
        /// The node the certificate names.
        id: NodeId,
        /// The kind of request, in words.
        what: &'static str,
    },
    /// A node sent a request on behalf of another node.
    #[error("node {id}'s certificate may not send {what} for node {other}; a node speaks only for itself")]
    ForAnotherNode {
        /// The node the certificate names.
        id: NodeId,
        /// The kind of request, in words.
        what: &'static str,
        /// The node the request speaks for.
        other: NodeId,
    },
}

impl NotAuthorized {
    /// The error the transport sends back to the peer.
    fn into_service_error(self) -> ServiceError {
        ServiceError::NotAuthorized {
            source: Box::new(self),
        }
    }
}

/// What a peer's certificate allows (TLS only; without TLS `role` is `None` and every peer
/// that passed the handshake may do everything). Decided from the certificate, never from a
/// request field: a client that marks an admin request as forwarded is still a client, and a
/// node speaks only for itself (the node id in a renewal, handoff or release must be its own)
/// and only while it is a member (`members`: the members this node knows, `None` while it
/// knows none).
fn authorize(
    role: Option<Role>,
    request: &Request,
    members: Option<&BTreeSet<NodeId>>,
) -> Result<(), NotAuthorized> {
    let Some(role) = role else { return Ok(()) };
    let refuse =
        |what: &'static str, advice: &'static str| Err(NotAuthorized::Role { role, what, advice });
    let nodes_only = "only nodes of the cluster send them";
    let what = match request {
        // What a client does: send to shards, read the map and status.
        Request::Shard { .. }
        | Request::ShardAt { .. }
        | Request::ShardOnce { .. }
        | Request::Routing
        | Request::WatchRouting { .. }
        | Request::Admin {
            request: AdminRequest::Status | AdminRequest::Nodes | AdminRequest::Shards,
            forwarded: false,
        } => return Ok(()),
        // Operator commands: admins (and member nodes).
        Request::Admin {
            forwarded: false, ..
        } => {
            if role == Role::Admin {
                return Ok(());
            }
            if role == Role::Client {
                return refuse(
                    "operator commands",
                    "operator commands need the admin certificate (--tls-dir D/admin)",
                );
            }
            "operator commands"
        }
        // A forwarded client message is worth no more than the client's own.
        Request::Forward { .. } | Request::ForwardOnce { .. } if matches!(role, Role::Node(_)) => {
            return Ok(())
        }
        Request::Forward { .. } | Request::ForwardOnce { .. } => "forwarded messages",
        Request::Admin {
            forwarded: true, ..
        } => "admin commands forwarded between nodes",
        Request::AppendEntries(_) | Request::Vote(_) | Request::InstallSnapshot(_) => {
            "raft messages"
        }
        Request::RenewLease(_) => "lease renewals",
        Request::Handoff { .. } | Request::HandoffChunk { .. } => "shard handoffs",
        Request::Propose(_) => "proposals",
    };
    let Role::Node(id) = role else {
        return refuse(what, nodes_only);
    };
    if members.is_some_and(|members| !members.contains(&id)) {
        return Err(NotAuthorized::NotAMember { id, what });
    }
    let speaks_for = match request {
        Request::RenewLease(renew) => Some(renew.node),
        Request::Handoff { from, .. } | Request::HandoffChunk { from, .. } => Some(*from),
        Request::Propose(Command::Released { from, .. } | Command::MoveStuck { from, .. }) => {
            Some(*from)
        }
        _ => None,
    };
    match speaks_for {
        Some(other) if other != id => Err(NotAuthorized::ForAnotherNode { id, what, other }),
        _ => Ok(()),
    }
}

fn encode(response: &Response) -> Result<Vec<u8>, ServiceError> {
    codec::encode(response).map_err(|e| ServiceError::Encode(Box::new(e)))
}

/// Encodes a handler's answer; one too large for a frame becomes [`Error::TooLarge`], so the
/// sender learns why (the transport would otherwise fail it with a bare string).
fn encode_shard(result: Result<Vec<u8>, Error>, limit: usize) -> Result<Vec<u8>, ServiceError> {
    let bytes = encode(&Response::Shard(result))?;
    if bytes.len() <= limit {
        return Ok(bytes);
    }
    encode(&Response::Shard(Err(Error::TooLarge {
        what: "reply".to_owned(),
        size: bytes.len() as u64,
        limit: limit as u64,
    })))
}

/// The `status` report with this node's serving state as its router sees it (lease included).
pub(crate) fn status<H: ShardHandler>(consensus: &Consensus, router: &Router<H>) -> StatusReport {
    let mut report = consensus.status(None);
    let remaining = router.lease_remaining();
    report.lease_remaining_ms = remaining.map(|d| d.as_millis().min(u64::MAX as u128) as u64);
    if let (NodeState::Serving, Some(reason)) = (report.state, router.table().not_ready) {
        report.state = NodeState::NotReady;
        report.reason = Some(reason.to_string());
    }
    if report.state == NodeState::Serving && remaining.is_none() {
        report.state = NodeState::NotReady;
        report.reason = Some(crate::NotReadyReason::LeaseExpired.to_string());
    }
    report
}

fn routing(consensus: &Consensus) -> RoutingInfo {
    routing_of(&consensus.applied().state)
}

fn routing_of(state: &ClusterState) -> RoutingInfo {
    RoutingInfo {
        epoch: state.map_epoch(),
        owners: state
            .map
            .as_ref()
            .map(|m| m.shards.clone())
            .unwrap_or_default(),
        addrs: state
            .members
            .iter()
            .map(|(id, m)| (*id, m.addr.clone()))
            .collect(),
    }
}

async fn route_wire<H: ShardHandler>(
    router: &Arc<Router<H>>,
    key: Vec<u8>,
    tag: &str,
    payload: &[u8],
    origin: Origin,
) -> Result<Vec<u8>, Error> {
    let message = H::Message::decode(tag, payload)?;
    message.route_wire(router, Key::from(key), origin).await
}

#[cfg(test)]
mod authorization_tests {
    use super::*;

    fn admin(request: AdminRequest, forwarded: bool) -> Request {
        Request::Admin { request, forwarded }
    }

    #[test]
    fn a_certificate_role_decides_what_a_peer_may_send_not_a_request_field() {
        let shard = Request::Shard {
            key: b"k".to_vec(),
            tag: "t".into(),
            payload: Vec::new(),
        };
        let drain = || admin(AdminRequest::Drain { id: 1 }, false);
        let forward = Request::Forward {
            key: b"k".to_vec(),
            tag: "t".into(),
            payload: Vec::new(),
            epoch: 1,
        };
        // Without TLS there are no roles.
        assert!(authorize(None, &drain(), None).is_ok());
        // Clients: shards, map and status only.
        assert!(authorize(Some(Role::Client), &shard, None).is_ok());
        assert!(authorize(Some(Role::Client), &Request::Routing, None).is_ok());
        assert!(authorize(
            Some(Role::Client),
            &admin(AdminRequest::Status, false),
            None
        )
        .is_ok());
        let refused =
            authorize(Some(Role::Client), &drain(), None).expect_err("a client may not drain");
        assert!(
            matches!(
                refused,
                NotAuthorized::Role {
                    role: Role::Client,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("D/admin"), "{refused}");
        // Marking the request as forwarded by a node does not make the client a node.
        for request in [
            admin(AdminRequest::Status, true),
            admin(AdminRequest::Drain { id: 1 }, true),
        ] {
            assert!(authorize(Some(Role::Client), &request, None).is_err());
            assert!(authorize(Some(Role::Admin), &request, None).is_err());
        }
        assert!(authorize(Some(Role::Client), &forward, None).is_err());
        // Admins: operator commands too, nothing of the nodes' own protocol.
        assert!(authorize(Some(Role::Admin), &drain(), None).is_ok());
        assert!(authorize(Some(Role::Admin), &shard, None).is_ok());
        assert!(authorize(Some(Role::Admin), &forward, None).is_err());
        // Member nodes: everything, for themselves.
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        let as_node =
            |id, request: &Request| authorize(Some(Role::Node(id)), request, Some(&members));
        assert!(as_node(2, &forward).is_ok());
        assert!(as_node(2, &admin(AdminRequest::Drain { id: 1 }, true)).is_ok());
        let renew = |node| {
            Request::RenewLease(crate::lease::RenewLease {
                node,
                epoch: 1,
                incarnation: 1,
                request_id: 1,
            })
        };
        assert!(as_node(2, &renew(2)).is_ok());
        let handoff = |from| Request::Handoff {
            from,
            epoch: 1,
            shards: Vec::new(),
        };
        assert!(as_node(2, &handoff(2)).is_ok());
        // ... but never for another node: a renewal for node 3 would keep a dead node's shards
        // where nobody serves them.
        for request in [renew(3), handoff(3)] {
            let refused = as_node(2, &request).expect_err("a node speaks only for itself");
            assert!(
                matches!(
                    refused,
                    NotAuthorized::ForAnotherNode {
                        id: 2,
                        other: 3,
                        ..
                    }
                ),
                "{refused:?}"
            );
        }
        // A node certificate of a node that is not (or no longer) a member has no node power.
        let refused = as_node(9, &admin(AdminRequest::Drain { id: 3 }, true))
            .expect_err("node 9 is not a member");
        assert!(
            matches!(refused, NotAuthorized::NotAMember { id: 9, .. }),
            "{refused:?}"
        );
        assert!(as_node(9, &renew(9)).is_err());
        // Its forwarded client messages are a client's.
        assert!(as_node(9, &forward).is_ok());
        // A node that knows no membership yet (being added) takes raft messages from anyone with
        // a node certificate: its first entries come from a leader it cannot know yet.
        assert!(authorize(
            Some(Role::Node(9)),
            &admin(AdminRequest::Status, true),
            None
        )
        .is_ok());
    }

    // Goal: a refusal reaches the peer as before the error became typed: one message that
    // starts with NOT_AUTHORIZED (admin tools and clients decide on that prefix: fix the
    // certificate, do not retry), while the server keeps the refusal as the error's source.
    #[test]
    fn a_refusal_reaches_the_peer_as_not_authorized_with_its_reason() {
        let refused = authorize(
            Some(Role::Client),
            &admin(AdminRequest::Drain { id: 1 }, false),
            None,
        )
        .expect_err("a client may not drain");
        let error = refused.clone().into_service_error();
        assert!(
            matches!(error, ServiceError::NotAuthorized { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "not authorized: client certificates may not send operator commands; operator commands need the admin certificate (--tls-dir D/admin)"
        );
        let source = std::error::Error::source(&error).expect("the refusal is the source");
        assert_eq!(
            source.downcast_ref::<NotAuthorized>(),
            Some(&refused),
            "the typed refusal is kept"
        );
        let members: BTreeSet<NodeId> = [1, 2].into();
        for refused in [
            authorize(
                Some(Role::Node(2)),
                &Request::Handoff {
                    from: 1,
                    epoch: 1,
                    shards: Vec::new(),
                },
                Some(&members),
            ),
            authorize(Some(Role::Node(9)), &Request::Routing, Some(&members)).and(authorize(
                Some(Role::Node(9)),
                &Request::Propose(Command::Released {
                    from: 9,
                    epoch: 1,
                    shards: Vec::new(),
                }),
                Some(&members),
            )),
        ] {
            let sent = refused
                .expect_err("refused")
                .into_service_error()
                .to_string();
            assert!(sent.starts_with(crate::tls::NOT_AUTHORIZED), "{sent}");
        }
    }
}
