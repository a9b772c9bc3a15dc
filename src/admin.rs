//! The admin API: the operator's commands (status, nodes, shards, add-node, remove-node,
//! step-down), their reports, and [`AdminClient`], which the `clusterfunk` tool uses.
//!
//! Any node answers reads from its own view; writes go to the leader (a follower forwards them
//! one hop). Membership changes only through these commands: the leader never adds or removes
//! nodes by itself. This module holds the shapes and the client; the consensus actor carries the
//! commands out.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::shard_map::{Epoch, NodeId, ShardId};
use crate::transport::{Secret, Transport, TransportConfig, TransportError};
use crate::wire::{Request, Response};

/// An operator command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminRequest {
    /// The answering node's state.
    Status,
    /// Every member with its address, zone and role.
    Nodes,
    /// The shard map.
    Shards,
    /// Adds a node: as a learner first, promoted to voter once it caught up (unless `learner`).
    AddNode {
        /// The new node's id (unique in the cluster).
        id: NodeId,
        /// The address it listens on, `IP:PORT`.
        addr: String,
        /// Its zone, if any.
        zone: Option<String>,
        /// Keep it a non-voting learner (it still hosts shards).
        learner: bool,
    },
    /// Removes a node from the cluster.
    RemoveNode {
        /// The node to remove.
        id: NodeId,
    },
    /// Hands leadership to another voter.
    StepDown,
    /// Moves every shard off a node (it stays a member); answers when it owns none.
    Drain {
        /// The node to drain.
        id: NodeId,
    },
    /// Lets a drained node own shards again.
    Undrain {
        /// The node.
        id: NodeId,
    },
    /// Internal: asks a follower to start an election now (the second half of a step-down).
    Elect,
}

impl AdminRequest {
    /// Whether the command changes the cluster (and so must run on the leader).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            AdminRequest::AddNode { .. }
                | AdminRequest::RemoveNode { .. }
                | AdminRequest::StepDown
                | AdminRequest::Drain { .. }
                | AdminRequest::Undrain { .. }
        )
    }
}

/// Whether a node serves requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// It has a committed shard map and a leader: it serves its shards.
    Serving,
    /// It does not serve (no leader, no map); `reason` in the status says why.
    NotReady,
    /// It is shutting down.
    ShuttingDown,
}

/// `status`: one node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The answering node.
    pub node_id: NodeId,
    /// Whether it serves.
    pub state: NodeState,
    /// Why it does not serve, when it does not.
    pub reason: Option<String>,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its raft term.
    pub term: u64,
    /// The epoch of its newest shard map (0: none yet).
    pub epoch: Epoch,
    /// The voting members.
    pub voters: Vec<NodeId>,
    /// The non-voting members (they host shards too).
    pub learners: Vec<NodeId>,
    /// Shards this node owns in its newest map.
    pub shards_owned: u32,
    /// The cluster's shard count, once fixed.
    pub shard_count: Option<u32>,
    /// The raft role: `leader`, `follower`, `candidate` or `learner`.
    pub raft_state: String,
    /// Index of the last entry in its raft log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to its state.
    pub last_applied_index: Option<u64>,
    /// How many voters may fail with a quorum left.
    pub failures_tolerated: usize,
    /// How long the node's lease still runs, in milliseconds (absent without one).
    #[serde(default)]
    pub lease_remaining_ms: Option<u64>,
    /// Members the leader marked down (their shards moved to live nodes).
    #[serde(default)]
    pub down: Vec<NodeId>,
    /// Members being drained.
    #[serde(default)]
    pub draining: Vec<NodeId>,
    /// Shards moving between nodes now.
    #[serde(default)]
    pub shards_moving: u32,
}

/// One member in `nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its id.
    pub id: NodeId,
    /// Its address.
    pub addr: String,
    /// Its zone.
    pub zone: Option<String>,
    /// `voter` or `learner`.
    pub role: String,
    /// Whether it is the leader.
    pub leader: bool,
    /// Shards it owns.
    pub shards: u32,
    /// Whether the leader marked it down.
    #[serde(default)]
    pub down: bool,
    /// Whether it is being drained.
    #[serde(default)]
    pub draining: bool,
}

/// `nodes`: every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesReport {
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// The members, by id.
    pub nodes: Vec<NodeReport>,
}

impl NodesReport {
    /// The layout of these members, voters and learners by zone, for
    /// [`Plan::of`](crate::plan::Plan::of).
    pub fn layout(&self) -> Result<crate::plan::Layout, crate::plan::LayoutError> {
        use crate::plan::{Layout, LayoutError, Role};
        let members = self
            .nodes
            .iter()
            .map(|node| {
                let role = match node.role.as_str() {
                    "voter" => Role::Voter,
                    "learner" => Role::Learner,
                    other => {
                        return Err(LayoutError::UnknownRole {
                            id: node.id,
                            role: other.to_string(),
                        })
                    }
                };
                Ok((node.zone.as_deref(), role))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Layout::from_members(members)
    }
}

/// One shard's owner in `shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardOwner {
    /// The shard.
    pub shard: ShardId,
    /// Its owner.
    pub node: NodeId,
}

/// `shards`: the shard map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardsReport {
    /// The map's epoch (0: no map yet).
    pub epoch: Epoch,
    /// Every shard's owner, by shard.
    pub shards: Vec<ShardOwner>,
}

/// The outcome of a membership command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeReport {
    /// What happened, in one sentence.
    pub message: String,
    /// Warnings about the resulting layout (even voter counts, fewer than three voters).
    pub warnings: Vec<String>,
    /// The voters afterwards.
    pub voters: Vec<NodeId>,
    /// The learners afterwards.
    pub learners: Vec<NodeId>,
    /// How many voter failures the cluster now tolerates.
    pub failures_tolerated: usize,
    /// The leader afterwards, if known.
    pub leader: Option<NodeId>,
}

/// A successful answer to an [`AdminRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminResponse {
    /// Answer to `Status`.
    Status(StatusReport),
    /// Answer to `Nodes`.
    Nodes(NodesReport),
    /// Answer to `Shards`.
    Shards(ShardsReport),
    /// Answer to `AddNode`, `RemoveNode`, `StepDown` and `Elect`.
    Changed(ChangeReport),
}

/// Why an admin command failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The cluster has no leader now, so nothing can change. Wait for an election, or check
    /// that a majority of voters is up.
    #[error(
        "no leader: the cluster cannot change now; check that a majority of voters is running"
    )]
    NoLeader,
    /// This node is not the leader (and the command was already forwarded once).
    #[error("node is not the leader (leader: {leader:?}); send the command to the leader")]
    NotLeader {
        /// The leader it knows of.
        leader: Option<NodeId>,
    },
    /// The command makes no sense for this cluster (e.g. an unknown node id).
    #[error("invalid request: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
    /// The command was accepted but did not finish; the reason says what to check.
    #[error("failed: {reason}")]
    Failed {
        /// Why.
        reason: String,
    },
    /// The command names a node that is not a member of the cluster.
    #[error("invalid request: node {node} is not a member")]
    NotAMember {
        /// The node named.
        node: NodeId,
    },
    /// The node could not be reached or refused the connection.
    #[error("cannot reach the node: {reason}")]
    Unreachable {
        /// Why.
        reason: String,
    },
    /// `drain` (or `remove-node` of a live node, which drains it first) was refused before
    /// anything was written: every other member is draining or marked down, so no node could
    /// take the shards and the drain could never finish. Undrain a node or add one, then retry.
    // Last in the enum: the wire format numbers variants in order, so new ones go at the end.
    #[error("draining node {node} would leave no node to take its shards (every other member is draining or marked down): undrain a node or add one first")]
    NoNodeToTakeShards {
        /// The node the command would drain.
        node: NodeId,
    },
    /// With TLS: the certificate this tool connected with does not allow the command (a
    /// `client` certificate asked for an operator command). The reason names the certificate
    /// that would.
    #[error("{reason}")]
    NotAuthorized {
        /// The node's refusal.
        reason: String,
    },
}

// The voter-count rules live in the planner, their one home; re-exported here for the
// consensus actor and for callers that knew them as `admin::`.
pub use crate::plan::{failures_tolerated, layout_warnings};

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
        Self::with_transport_config(
            node,
            TransportConfig {
                cluster_name: cluster_name.to_string(),
                node_id: None,
                secret,
                ..TransportConfig::default()
            },
            timeout,
        )
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

/// How a tool, client or node proves who it is: what the binaries' `--tls-dir`,
/// `--secret-file`, `CLUSTERFUNK_SECRET` and `--insecure` resolve to.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// TLS with the certificates of one directory (`clusterfunk certs` writes them).
    Tls(crate::tls::TlsConfig),
    /// The shared cluster secret.
    Secret(Secret),
    /// Nothing: only clusters that run insecure accept it.
    Insecure,
}

impl Credentials {
    /// The cluster secret, if these are secret credentials.
    pub fn secret(&self) -> Option<Secret> {
        match self {
            Credentials::Secret(secret) => Some(secret.clone()),
            _ => None,
        }
    }

    /// The TLS settings, if these are TLS credentials.
    pub fn tls(&self) -> Option<crate::tls::TlsConfig> {
        match self {
            Credentials::Tls(tls) => Some(tls.clone()),
            _ => None,
        }
    }
}

/// Why [`resolve_credentials`] or [`resolve_secret`] found no credentials to use. Every message
/// says what to change; [`is_usage`](CredentialsError::is_usage) tells a contradictory or
/// missing choice (bad usage: the tools exit 2) from a file that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// `--tls-dir` and `--insecure` together.
    #[error("--tls-dir cannot be combined with --insecure: TLS authenticates every connection; drop one of them")]
    TlsAndInsecure,
    /// `--tls-dir` and a secret (`--secret-file` or the environment variable) together.
    #[error("--tls-dir cannot be combined with a cluster secret (--secret-file or {}): a cluster runs in one mode; drop the secret", crate::transport::SECRET_ENV_VAR)]
    TlsAndSecret,
    /// `--insecure` and a secret together: the secret would be used and `--insecure` ignored.
    #[error("--insecure cannot be combined with a cluster secret (from {origin}): a cluster runs in one mode; drop --insecure to use the secret, or {remedy} to run without one")]
    InsecureAndSecret {
        /// Where the secret came from: `--secret-file` or the environment variable.
        origin: &'static str,
        /// How to drop it.
        remedy: &'static str,
    },
    /// Neither a secret, nor `--tls-dir`, nor `--insecure`.
    #[error("no credentials: set {} or pass --secret-file FILE for a cluster with a secret, --tls-dir DIR for a cluster with certificates, or --insecure for a cluster without either", crate::transport::SECRET_ENV_VAR)]
    Missing,
    /// The secret could not be read or is unusable.
    #[error(transparent)]
    Secret(#[from] crate::transport::SecretError),
    /// The certificates could not be read or are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl CredentialsError {
    /// Whether the choice of options itself is wrong (contradictory or missing), as opposed to
    /// a secret or certificate that could not be read: command-line tools exit 2 (bad usage)
    /// on these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CredentialsError::TlsAndInsecure
                | CredentialsError::TlsAndSecret
                | CredentialsError::InsecureAndSecret { .. }
                | CredentialsError::Missing
        )
    }
}

/// Resolves credentials the way the binaries do: `--tls-dir` (which excludes a secret and
/// `--insecure`), else the secret as [`resolve_secret`] finds it.
pub fn resolve_credentials(
    tls_dir: Option<&std::path::Path>,
    secret_file: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Credentials, CredentialsError> {
    let Some(dir) = tls_dir else {
        return Ok(match resolve_secret(secret_file, insecure)? {
            Some(secret) => Credentials::Secret(secret),
            None => Credentials::Insecure,
        });
    };
    if insecure {
        return Err(CredentialsError::TlsAndInsecure);
    }
    if secret_file.is_some() || std::env::var_os(crate::transport::SECRET_ENV_VAR).is_some() {
        return Err(CredentialsError::TlsAndSecret);
    }
    Ok(Credentials::Tls(crate::tls::TlsConfig::from_dir(dir)?))
}

/// Resolves the cluster secret the way the binaries do: `--secret-file` first, then the
/// `CLUSTERFUNK_SECRET` environment variable. `insecure` means "no secret": with one of them
/// it is refused ([`CredentialsError::InsecureAndSecret`]) rather than silently ignored, and
/// without any of the three it is [`CredentialsError::Missing`].
pub fn resolve_secret(
    secret_file: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Option<Secret>, CredentialsError> {
    let env_set = std::env::var_os(crate::transport::SECRET_ENV_VAR).is_some();
    secret_choice(secret_file.is_some(), env_set, insecure)?;
    if let Some(path) = secret_file {
        return Ok(Some(Secret::from_file(path)?));
    }
    Ok(Secret::from_env()?)
}

/// The rules of [`resolve_secret`] on what was given, before anything is read.
fn secret_choice(file: bool, env: bool, insecure: bool) -> Result<(), CredentialsError> {
    match (file, env, insecure) {
        (true, _, true) => Err(CredentialsError::InsecureAndSecret {
            origin: "--secret-file",
            remedy: "drop --secret-file",
        }),
        (false, true, true) => Err(CredentialsError::InsecureAndSecret {
            origin: crate::transport::SECRET_ENV_VAR,
            remedy: "unset the environment variable",
        }),
        (false, false, false) => Err(CredentialsError::Missing),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_with_a_secret_is_refused_as_bad_usage() {
        for (file, env) in [(true, false), (false, true), (true, true)] {
            let refused = secret_choice(file, env, true).expect_err("contradictory");
            assert!(
                matches!(refused, CredentialsError::InsecureAndSecret { .. }),
                "{refused}"
            );
            assert!(refused.is_usage());
            assert!(refused.to_string().contains("drop --insecure"), "{refused}");
        }
        let from_env = secret_choice(false, true, true).expect_err("contradictory");
        assert!(
            from_env
                .to_string()
                .contains(crate::transport::SECRET_ENV_VAR),
            "{from_env}"
        );
    }

    #[test]
    fn no_credentials_at_all_is_bad_usage_and_one_choice_is_fine() {
        let missing = secret_choice(false, false, false).expect_err("nothing given");
        assert!(matches!(missing, CredentialsError::Missing));
        assert!(missing.is_usage());
        for (file, env, insecure) in [
            (true, false, false),
            (false, true, false),
            (true, true, false),
            (false, false, true),
        ] {
            assert!(secret_choice(file, env, insecure).is_ok());
        }
    }

    #[test]
    fn an_unreadable_secret_file_is_a_failure_not_bad_usage() {
        let missing = std::path::Path::new("/nonexistent/clusterfunk-secret");
        let error = resolve_secret(Some(missing), false).expect_err("no such file");
        assert!(matches!(error, CredentialsError::Secret(_)), "{error}");
        assert!(!error.is_usage());
        assert!(error.to_string().contains("--secret-file"), "{error}");
    }
}
