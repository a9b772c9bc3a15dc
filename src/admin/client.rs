//! [`AdminClient`]: sends the operator's commands ([`AdminRequest`]) to one node over the
//! transport and decodes its answer. The `clusterfunk` tool is a thin layer over it, and the
//! consensus actor forwards writes to the leader with [`call_admin`].
//!
//! This module owns the admin side of the connection (the wire envelope, the transport errors
//! mapped to [`AdminError`]); the shapes of the commands and reports live in
//! [`admin`](super), and how a caller proves who it is in
//! [`Credentials`](super::Credentials).

use std::net::SocketAddr;
use std::time::Duration;

use super::{AdminError, AdminRequest, AdminResponse, Credentials};
use crate::codec;
use crate::shard_map::NodeId;
use crate::transport::{Secret, Transport, TransportConfig, TransportError};
use crate::wire::{Request, Response};

/// Sends admin commands to one node. The `clusterfunk` tool is a thin layer over it.
#[derive(Debug, Clone)]
pub struct AdminClient {
    transport: Transport,
    node: SocketAddr,
    timeout: Duration,
}

impl AdminClient {
    /// A client for the node at `node`, authenticating with `secret` (`None`: insecure mode,
    /// which only insecure clusters accept). `timeout` bounds each command.
    pub fn new(
        node: SocketAddr,
        cluster_name: &str,
        secret: Option<Secret>,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let credentials = match secret {
            Some(secret) => Credentials::Secret(secret),
            None => Credentials::Insecure,
        };
        Self::with_credentials(node, cluster_name, &credentials, timeout)
    }

    /// A client for the node at `node` over TLS with the certificate in `tls` (the `admin`
    /// certificate for operator commands; a `client` certificate may only read status, nodes
    /// and shards). The cluster name is the one the certificate names.
    pub fn with_tls(
        node: SocketAddr,
        tls: crate::tls::TlsConfig,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let cluster_name = tls.identity().cluster.clone();
        Self::with_credentials(node, &cluster_name, &Credentials::Tls(tls), timeout)
    }

    /// A client for the node at `node` with resolved [`Credentials`]; with TLS the cluster
    /// name must be the one the certificate names.
    pub fn with_credentials(
        node: SocketAddr,
        cluster_name: &str,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        Self::with_transport_config(
            node,
            TransportConfig {
                cluster_name: cluster_name.to_string(),
                node_id: None,
                secret: credentials.secret(),
                tls: credentials.tls(),
                ..TransportConfig::default()
            },
            timeout,
        )
    }

    fn with_transport_config(
        node: SocketAddr,
        config: TransportConfig,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let transport = Transport::new(config).map_err(|e| AdminError::Invalid {
            reason: e.to_string(),
        })?;
        Ok(AdminClient {
            transport,
            node,
            timeout,
        })
    }

    /// Sends `request` and waits for the answer.
    pub async fn request(&self, request: AdminRequest) -> Result<AdminResponse, AdminError> {
        let request = Request::Admin {
            request,
            forwarded: false,
        };
        call_admin(&self.transport, None, self.node, &request, self.timeout).await
    }
}

/// Sends an admin request to `node` over `transport`.
pub(crate) async fn call_admin(
    transport: &Transport,
    node: Option<NodeId>,
    addr: SocketAddr,
    request: &Request,
    timeout: Duration,
) -> Result<AdminResponse, AdminError> {
    let payload = codec::encode(request).map_err(|e| AdminError::Invalid {
        reason: e.to_string(),
    })?;
    let answer = match node {
        Some(node) => transport.request_node(node, addr, payload, timeout).await,
        None => transport.request(addr, payload, timeout).await,
    }
    .map_err(|e| match e {
        TransportError::Remote { reason } if reason.starts_with(crate::tls::NOT_AUTHORIZED) => {
            AdminError::NotAuthorized { reason }
        }
        e => AdminError::Unreachable {
            reason: e.to_string(),
        },
    })?;
    match codec::decode::<Response>(&answer) {
        Ok(Response::Admin(result)) => result,
        Ok(_) => Err(AdminError::Failed {
            reason: "the node answered with an unexpected message".into(),
        }),
        Err(e) => Err(AdminError::Failed {
            reason: format!("undecodable answer: {e}"),
        }),
    }
}
