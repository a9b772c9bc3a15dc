//! The admin API: the operator's commands (status, nodes, shards, add-node, remove-node,
//! step-down, drain), their reports and [`AdminError`], plus [`AdminClient`], which the
//! `clusterfunk` tool uses.
//!
//! Any node answers reads from its own view; writes go to the leader (a follower forwards them
//! one hop). Membership changes only through these commands: the leader never adds or removes
//! nodes by itself. This file holds the protocol's shapes, plain data that the wire format
//! carries and that imports no transport; `client` sends them and `credentials` says how a
//! caller authenticates (both re-exported here). The consensus actor carries the commands out.

mod client;
mod credentials;

use serde::{Deserialize, Serialize};

use crate::shard_map::{Epoch, NodeId, ShardId};

pub(crate) use client::call_admin;
pub use client::AdminClient;
pub use credentials::{resolve_credentials, resolve_secret, Credentials, CredentialsError};

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
