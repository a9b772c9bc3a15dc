//! Consensus: the openraft instance that replicates the cluster state (members and the shard
//! map), its start-up and bootstrap, and the consensus actor that carries out admin commands.
//!
//! The state and its transitions are pure code in [`state`]; raft RPCs travel over the
//! transport ([`network`]); the log and snapshots live in [`storage`](crate::storage). This
//! module does not route messages: it publishes applied states, and the node installs each new
//! map in the router.

mod contact;
pub mod network;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, LogId, Membership, RaftMetrics, ServerState};
use tokio::sync::watch;

pub use contact::Contact;
pub use state::{
    ClusterState, Command, CommandResponse, MemberListError, MemberRecord, NodeInfo, TypeConfig,
};

use crate::admin::{
    call_admin, failures_tolerated, layout_warnings, AdminError, AdminRequest, AdminResponse,
    ChangeReport, NodeReport, NodeState, NodesReport, ShardOwner, ShardsReport, StatusReport,
};
use crate::error::ConfigError;
use crate::lease::{Decision, LeaseConfig, LeaseGrant, LeaseGranter, LeaseRefusal, RenewLease};
use crate::shard_map::NodeId;
use crate::storage::{Applied, StateMachineApp};
use crate::tasks::NodeTasks;
use crate::transport::Transport;
use crate::wire::Request;

/// The raft instance of a node.
pub type Raft = openraft::Raft<TypeConfig>;

/// The applied cluster state as the storage layer publishes it.
pub type AppliedState = Applied<TypeConfig, ClusterState>;

/// The application side of the replicated state machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClusterApp;

impl StateMachineApp<TypeConfig> for ClusterApp {
    type State = ClusterState;

    fn apply(
        &self,
        state: &mut ClusterState,
        _log_id: &LogId<NodeId>,
        request: &Command,
    ) -> CommandResponse {
        state.apply(request)
    }

    fn empty_response(&self) -> CommandResponse {
        CommandResponse::Applied { epoch: 0 }
    }

    fn apply_membership(
        &self,
        state: &mut ClusterState,
        _log_id: &LogId<NodeId>,
        membership: &Membership<NodeId, NodeInfo>,
    ) {
        state.apply_membership(
            membership.nodes().map(|(id, node)| (*id, node)),
            membership.voter_ids(),
        );
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<ClusterState, crate::storage::CodecError> {
        state::decode_stored(bytes)
    }
}

/// Raft timing and log settings. Durations are validated at start-up.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    /// How often the leader sends heartbeats. Default: 50 ms.
    pub heartbeat_interval: Duration,
    /// The shortest election timeout. Default: 150 ms.
    pub election_timeout_min: Duration,
    /// The longest election timeout. Default: 300 ms.
    pub election_timeout_max: Duration,
    /// A snapshot is taken after this many log entries since the last one. Default: 1000.
    pub snapshot_logs_since_last: u64,
    /// How long add-node waits for a new node to catch up before giving up. Default: 30 s.
    pub catch_up_timeout: Duration,
    /// How long an admin command may take, including forwarding. Default: 60 s.
    pub admin_timeout: Duration,
    /// How long drain and remove-node wait for a node to hand all its shards over. Default: 50 s.
    pub drain_timeout: Duration,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        ConsensusConfig {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            snapshot_logs_since_last: 1000,
            catch_up_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(50),
        }
    }
}

impl ConsensusConfig {
    /// The fast profile: heartbeats every 30 ms, election timeouts of 100–200 ms, for use with
    /// [`LeaseConfig::fast`]; a dead leader is replaced sooner, and a busy machine risks
    /// needless elections sooner.
    pub fn fast() -> Self {
        ConsensusConfig {
            heartbeat_interval: Duration::from_millis(30),
            election_timeout_min: Duration::from_millis(100),
            election_timeout_max: Duration::from_millis(200),
            ..ConsensusConfig::default()
        }
    }

    /// The openraft configuration, validated.
    pub fn raft_config(&self, cluster_name: &str) -> Result<Arc<openraft::Config>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            name: "consensus",
            reason,
        };
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.election_timeout_min
        {
            return Err(invalid(format!(
                "heartbeat_interval ({:?}) must be above zero and below election_timeout_min ({:?})",
                self.heartbeat_interval, self.election_timeout_min
            )));
        }
        let config = openraft::Config {
            cluster_name: cluster_name.to_string(),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: 100,
            ..Default::default()
        };
        config
            .validate()
            .map(Arc::new)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// What the node needs of consensus: the raft handle, the applied state, and admin commands.
/// Cheap to clone.
#[derive(Clone)]
pub struct Consensus {
    node_id: NodeId,
    raft: Raft,
    applied: watch::Receiver<Arc<AppliedState>>,
    transport: Transport,
    config: ConsensusConfig,
    lease: LeaseConfig,
    actor: Addr<ConsensusActor>,
    /// The lease granter while this node leads, with the term it leads in.
    granter: Arc<Mutex<Option<(u64, LeaseGranter)>>>,
    /// The lease renewals this node answers as leader, and their confirmation rounds.
    renewals: Arc<Renewals>,
    /// Leader contacts and the evidence of this node's elections (the receipt rule).
    contact: Arc<Contact>,
    /// The node's long-lived tasks (these and the node's own), ended by the node's shutdown.
    tasks: NodeTasks,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Consensus {
    /// Wraps a started raft instance and starts the consensus actor and the task that writes the
    /// shard count once this node leads a cluster that has none. `contact` must be the one the
    /// raft instance's [`Network`](network::Network) records into.
    // Eight parts that each come from a different place in the node's start; a struct for
    // them would only be built here once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        raft: Raft,
        applied: watch::Receiver<Arc<AppliedState>>,
        transport: Transport,
        config: ConsensusConfig,
        lease: LeaseConfig,
        shard_count: u32,
        contact: Arc<Contact>,
    ) -> Self {
        let actor = ConsensusActor { consensus: None }.start();
        let consensus = Consensus {
            node_id,
            raft,
            applied,
            transport,
            config,
            lease,
            actor,
            granter: Arc::new(Mutex::new(None)),
            renewals: Arc::new(Renewals::default()),
            contact,
            tasks: NodeTasks::default(),
        };
        consensus.actor.do_send(Attach(consensus.clone()));
        consensus.tasks.spawn(write_shard_count_when_leading(
            consensus.clone(),
            shard_count,
        ));
        consensus.tasks.spawn(lead(consensus.clone()));
        consensus
    }

    /// The node's tasks: spawn long-lived work through them so shutdown ends it.
    pub(crate) fn tasks(&self) -> &NodeTasks {
        &self.tasks
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Leader contacts and the evidence of this node's elections (the receipt rule).
    pub fn contact(&self) -> &Contact {
        &self.contact
    }

    /// The lease settings.
    pub fn lease_config(&self) -> &LeaseConfig {
        &self.lease
    }

    /// The transport to the other nodes.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The address of a member, from this node's applied state.
    pub fn member_addr(&self, node: NodeId) -> Option<SocketAddr> {
        self.applied()
            .state
            .members
            .get(&node)
            .and_then(|m| m.addr.parse().ok())
    }

    /// Answers a lease renewal (on the leader): grants only after an entry of this leader's
    /// term is committed and applied and a quorum round begun after the request arrived
    /// confirmed the leadership (`ensure_linearizable`), and only for the newest allocation.
    ///
    /// Renewals arriving together share one confirmation round. Every renewal, this node's own
    /// included, is answered within the renew period: when the round does not finish in time
    /// (a raft core that stalls, or a no-op that never commits because leadership was lost
    /// before it did) the renewal is refused with [`LeaseRefusal::TimedOut`], and the asking
    /// node tries again. At most [`RENEWALS_IN_FLIGHT_MAX`] renewals wait at once; more are
    /// refused with [`LeaseRefusal::Overloaded`].
    pub async fn renew(&self, request: RenewLease) -> Result<LeaseGrant, LeaseRefusal> {
        let leader = self.raft.metrics().borrow().current_leader;
        if leader != Some(self.node_id) {
            return Err(LeaseRefusal::NotLeader { leader });
        }
        let renew_period = self.lease.renew_period;
        let deadline = tokio::time::Instant::now() + renew_period;
        // Only members take a place among the waiting renewals (a stranger could otherwise
        // fill them and starve the members), and this node's own renewal is never refused for
        // load: the limit protects the leader from others, not from itself.
        let member = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&request.node)
            .is_some();
        if !member {
            return Err(LeaseRefusal::NotMember);
        }
        let _in_flight = match self.renewals.admit() {
            Some(admitted) => Some(admitted),
            None if request.node == self.node_id => None,
            None => {
                return Err(LeaseRefusal::Overloaded {
                    in_flight_max: RENEWALS_IN_FLIGHT_MAX,
                })
            }
        };
        let unfinished = || LeaseRefusal::NoQuorum {
            reason: "the confirmation round ended without an outcome; is the node shutting down?"
                .into(),
        };
        let mut round = self.join_round();
        let confirmed =
            match tokio::time::timeout_at(deadline, round.wait_for(Option::is_some)).await {
                Err(_elapsed) => Err(LeaseRefusal::TimedOut {
                    after: renew_period,
                }),
                Ok(Err(_closed)) => Err(unfinished()),
                // `wait_for` returns once the round published its outcome; a missing one refuses.
                Ok(Ok(outcome)) => outcome.clone().unwrap_or_else(|| Err(unfinished())),
            };
        confirmed?;
        let state = self.applied();
        let term = self.raft.metrics().borrow().current_term;
        let decision = {
            let mut granter = lock(&self.granter);
            match granter.as_mut() {
                Some((granter_term, granter)) if *granter_term == term => {
                    granter.decide(&request, &state.state, Instant::now())
                }
                _ => return Err(LeaseRefusal::NotLeader { leader: None }),
            }
        };
        match decision {
            Decision::Grant(grant) => Ok(grant),
            Decision::Refuse(refusal) => Err(refusal),
            Decision::RefuseAndMarkUp => {
                let consensus = self.clone();
                let node = request.node;
                self.tasks.spawn(async move {
                    if let Err(error) = consensus.raft.client_write(Command::MarkUp { node }).await
                    {
                        tracing::warn!(node, %error, "could not mark the node up");
                        if let Some((_, granter)) = lock(&consensus.granter).as_mut() {
                            granter.proposal_failed(node, false);
                        }
                    } else {
                        tracing::info!(node, "node renewed again: marked up");
                    }
                });
                Err(LeaseRefusal::Down)
            }
        }
    }

    /// Lease renewals this node is answering now (as leader). Each ends within the renew period,
    /// and at most [`RENEWALS_IN_FLIGHT_MAX`] are admitted at once.
    #[cfg(test)]
    pub fn renewals_in_flight(&self) -> usize {
        self.renewals.in_flight.load(Ordering::Acquire)
    }

    /// Joins the next confirmation round (rule 4 (i)–(ii)): the running one, if any, began
    /// before this call and does not count, so the caller waits for the one after it. Starts
    /// the round at once when none runs. The receiver sees the round's outcome.
    fn join_round(&self) -> watch::Receiver<Option<RoundOutcome>> {
        let mut rounds = lock(&self.renewals.rounds);
        let cohort = rounds
            .next
            .get_or_insert_with(|| watch::channel(None).0)
            .subscribe();
        if !rounds.running {
            if let Some(first) = rounds.next.take() {
                rounds.running = true;
                self.tasks.spawn(run_rounds(self.clone(), first));
            }
        }
        cohort
    }

    /// Proposes a command through the leader (this node, or forwarded to it once).
    pub async fn propose(
        &self,
        command: Command,
        forwarded: bool,
    ) -> Result<CommandResponse, AdminError> {
        let leader = self.raft.metrics().borrow().current_leader;
        match leader {
            Some(leader) if leader == self.node_id => self
                .raft
                .client_write(command)
                .await
                .map(|r| r.data)
                .map_err(write_error),
            Some(leader) if !forwarded => {
                let addr = self.address_of(leader)?;
                let payload = crate::codec::encode(&Request::Propose(command)).map_err(|e| {
                    AdminError::Invalid {
                        reason: e.to_string(),
                    }
                })?;
                let answer = self
                    .transport
                    .request_node(leader, addr, payload, self.config.admin_timeout)
                    .await
                    .map_err(|e| AdminError::Unreachable {
                        reason: e.to_string(),
                    })?;
                match crate::codec::decode::<crate::wire::Response>(&answer) {
                    Ok(crate::wire::Response::Proposed(result)) => result,
                    _ => Err(AdminError::Failed {
                        reason: "unexpected answer to a proposal".into(),
                    }),
                }
            }
            Some(leader) => Err(AdminError::NotLeader {
                leader: Some(leader),
            }),
            None => Err(AdminError::NoLeader),
        }
    }

    /// The raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The newest applied state.
    pub fn applied(&self) -> Arc<AppliedState> {
        self.applied.borrow().clone()
    }

    /// A receiver of every newly applied state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AppliedState>> {
        self.applied.clone()
    }

    /// Bootstraps a new cluster with `members` as voters, unless this node's storage already
    /// holds a cluster (then it rejoins from disk and the list is ignored).
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<bool, AdminError> {
        let initialized = self.raft.is_initialized().await.map_err(failed)?;
        if initialized {
            tracing::info!("storage holds a cluster already: rejoining from disk, ignoring the initial member list");
            return Ok(false);
        }
        if !members.contains_key(&self.node_id) {
            return Err(AdminError::Invalid {
                reason: format!(
                    "the initial member list does not contain this node ({})",
                    self.node_id
                ),
            });
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(failed(e)),
        }
    }

    /// Answers an admin command: reads from this node's view, writes on the leader (forwarded
    /// there once when this node is not the leader).
    pub async fn admin(
        &self,
        request: AdminRequest,
        forwarded: bool,
    ) -> Result<AdminResponse, AdminError> {
        match request {
            AdminRequest::Status => Ok(AdminResponse::Status(self.status(None))),
            AdminRequest::Nodes => Ok(AdminResponse::Nodes(self.nodes())),
            AdminRequest::Shards => Ok(AdminResponse::Shards(self.shards())),
            AdminRequest::Elect => {
                self.raft.trigger().elect().await.map_err(failed)?;
                Ok(AdminResponse::Changed(self.change_report(format!(
                    "node {} started an election",
                    self.node_id
                ))))
            }
            write => {
                let leader = self.raft.metrics().borrow().current_leader;
                match leader {
                    Some(leader) if leader == self.node_id => self
                        .actor
                        .send(Write(write))
                        .await
                        .map_err(|_| AdminError::Failed {
                        reason: "the node is shutting down".into(),
                    })?,
                    Some(leader) if !forwarded => self.forward(leader, write).await,
                    Some(leader) => Err(AdminError::NotLeader {
                        leader: Some(leader),
                    }),
                    None => Err(AdminError::NoLeader),
                }
            }
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        request: AdminRequest,
    ) -> Result<AdminResponse, AdminError> {
        let addr = self.address_of(leader)?;
        let request = Request::Admin {
            request,
            forwarded: true,
        };
        call_admin(
            &self.transport,
            Some(leader),
            addr,
            &request,
            self.config.admin_timeout,
        )
        .await
    }

    fn address_of(&self, node: NodeId) -> Result<SocketAddr, AdminError> {
        let metrics = self.raft.metrics().borrow().clone();
        let info = metrics
            .membership_config
            .membership()
            .get_node(&node)
            .cloned();
        let info = info.ok_or_else(|| AdminError::Failed {
            reason: format!("node {node} is not in this node's membership view yet; retry"),
        })?;
        info.addr.parse().map_err(|_| AdminError::Failed {
            reason: format!("node {node} has an invalid address `{}`", info.addr),
        })
    }

    /// This node's status, as `status` reports it. `router_state` overrides the readiness
    /// computed from raft (the node passes its router's view).
    pub fn status(&self, router_state: Option<(NodeState, Option<String>)>) -> StatusReport {
        let metrics = self.raft.metrics().borrow().clone();
        let applied = self.applied();
        let (voters, learners) = roles(&metrics);
        let map = applied.state.map.as_ref();
        let (state, reason) = router_state.unwrap_or_else(|| readiness(&metrics, &applied));
        StatusReport {
            node_id: self.node_id,
            state,
            reason,
            leader: metrics.current_leader,
            term: metrics.current_term,
            epoch: applied.state.map_epoch(),
            failures_tolerated: failures_tolerated(voters.len()),
            voters,
            learners,
            shards_owned: map.map_or(0, |m| m.shards_of(self.node_id).count() as u32),
            shard_count: applied.state.shard_count,
            raft_state: raft_state_name(metrics.state).to_string(),
            last_log_index: metrics.last_log_index,
            last_applied_index: metrics.last_applied.map(|l| l.index),
            lease_remaining_ms: None,
            down: applied
                .state
                .members
                .iter()
                .filter(|(_, m)| m.down)
                .map(|(id, _)| *id)
                .collect(),
            draining: applied
                .state
                .members
                .iter()
                .filter(|(_, m)| m.draining)
                .map(|(id, _)| *id)
                .collect(),
            shards_moving: applied.state.pending.len() as u32,
        }
    }

    fn nodes(&self) -> NodesReport {
        let metrics = self.raft.metrics().borrow().clone();
        let applied = self.applied();
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let counts = applied
            .state
            .map
            .as_ref()
            .map(|m| m.counts())
            .unwrap_or_default();
        let nodes = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, info)| NodeReport {
                id: *id,
                addr: info.addr.clone(),
                zone: info.zone.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .to_string(),
                leader: metrics.current_leader == Some(*id),
                down: applied.state.members.get(id).is_some_and(|m| m.down),
                draining: applied.state.members.get(id).is_some_and(|m| m.draining),
                shards: counts.get(id).copied().unwrap_or(0),
            })
            .collect();
        NodesReport {
            leader: metrics.current_leader,
            nodes,
        }
    }

    fn shards(&self) -> ShardsReport {
        let applied = self.applied();
        match applied.state.map.as_ref() {
            Some(map) => ShardsReport {
                epoch: map.epoch,
                shards: map
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(shard, node)| ShardOwner {
                        shard: shard as u32,
                        node: *node,
                    })
                    .collect(),
            },
            None => ShardsReport {
                epoch: 0,
                shards: Vec::new(),
            },
        }
    }

    fn change_report(&self, message: String) -> ChangeReport {
        let metrics = self.raft.metrics().borrow().clone();
        let (voters, learners) = roles(&metrics);
        ChangeReport {
            message,
            warnings: layout_warnings(voters.len()),
            failures_tolerated: failures_tolerated(voters.len()),
            voters,
            learners,
            leader: metrics.current_leader,
        }
    }

    async fn add_node(
        &self,
        id: NodeId,
        addr: String,
        zone: Option<String>,
        learner: bool,
    ) -> Result<AdminResponse, AdminError> {
        let parsed: SocketAddr =
            state::canonical_addr(addr.parse().map_err(|_| AdminError::Invalid {
                reason: format!("`{addr}` is not an IP:PORT address"),
            })?);
        let membership = self.raft.metrics().borrow().membership_config.clone();
        if let Some(existing) = membership.membership().get_node(&id) {
            if !state::same_addr(&existing.addr, &parsed.to_string()) {
                return Err(AdminError::Invalid {
                    reason: format!(
                        "node {id} is already a member at {}; remove it first",
                        existing.addr
                    ),
                });
            }
        }
        if let Some((other, _)) = membership.membership().nodes().find(|(other, info)| {
            **other != id && state::same_addr(&info.addr, &parsed.to_string())
        }) {
            return Err(AdminError::Invalid {
                reason: format!(
                    "{parsed} is the address of member {other}: every node needs its own address; start node {id} on another port (or remove node {other} first)"
                ),
            });
        }
        let node = NodeInfo {
            addr: parsed.to_string(),
            zone,
        };
        self.raft
            .add_learner(id, node, false)
            .await
            .map_err(write_error)?;
        self.wait_caught_up(id, &addr, learner).await?;
        if !learner {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(write_error)?;
        }
        let role = if learner { "learner" } else { "voter" };
        Ok(AdminResponse::Changed(self.change_report(format!(
            "node {id} at {addr} added as a {role}"
        ))))
    }

    /// Waits until the learner `id` answered the leader and holds every entry the leader had
    /// when it was added (openraft's own wait counts a learner within its lag threshold as
    /// caught up, even one that never answered). The dialling side checks the node id, so
    /// another node at that address never counts. Fails after `catch_up_timeout`; the node
    /// stays a learner.
    async fn wait_caught_up(
        &self,
        id: NodeId,
        addr: &str,
        learner: bool,
    ) -> Result<(), AdminError> {
        let target = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
        let mut metrics = self.raft.metrics();
        let caught_up = tokio::time::timeout(
            self.config.catch_up_timeout,
            metrics.wait_for(|m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .and_then(|matched| matched.as_ref())
                    .is_some_and(|log_id| log_id.index >= target)
            }),
        )
        .await;
        match caught_up {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(AdminError::Failed {
                reason: format!(
                    "this node stopped while node {id} was catching up; run add-node again"
                ),
            }),
            Err(_) => {
                let matched = self
                    .raft
                    .metrics()
                    .borrow()
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|log_id| log_id.index);
                let progress = match matched {
                    None => "it never answered".to_owned(),
                    Some(index) => format!("it holds entries up to {index} of {target}"),
                };
                let outcome = if learner {
                    "it was added as a learner"
                } else {
                    "it was added as a learner, NOT promoted to voter"
                };
                Err(AdminError::Failed {
                    reason: format!(
                        "node {id} did not catch up with the leader's log within {:?} ({progress}); {outcome}. Check that node {id} runs at {addr} with node id {id} (`kv serve --id {id}`), this cluster's name and secret, then run add-node again to promote it, or remove-node --id {id}",
                        self.config.catch_up_timeout
                    ),
                })
            }
        }
    }

    /// Drains (or undrains) a node and waits until it owns no shards and hands none over. A
    /// drain that no other node could take is refused up front ([`AdminError::NoNodeToTakeShards`]).
    async fn drain(&self, id: NodeId, draining: bool) -> Result<AdminResponse, AdminError> {
        if !self.applied().state.members.contains_key(&id) {
            return Err(AdminError::NotAMember { node: id });
        }
        let owned_before = self
            .applied()
            .state
            .map
            .as_ref()
            .map_or(0, |m| m.shards_of(id).count());
        self.set_draining(id, draining).await?;
        if !draining {
            return Ok(AdminResponse::Changed(self.change_report(format!(
                "node {id} undrained: it gets its share of shards back by handoff"
            ))));
        }
        Ok(AdminResponse::Changed(self.change_report(format!(
            "node {id} drained: {owned_before} shard(s) handed over, it owns none"
        ))))
    }

    /// Writes `SetDraining`; when draining, waits until the node owns no shard (or is down).
    ///
    /// A drain no node could take is refused before anything is written: it would wait out
    /// `drain_timeout` and hold up every other admin command meanwhile. The check reads the
    /// committed state after a linearizable read, so it sees every change committed before the
    /// command arrived (drains, down marks, members added).
    async fn set_draining(&self, id: NodeId, draining: bool) -> Result<(), AdminError> {
        if draining
            && self
                .read_committed()
                .await?
                .state
                .draining_leaves_no_taker(id)
        {
            return Err(AdminError::NoNodeToTakeShards { node: id });
        }
        self.raft
            .client_write(Command::SetDraining { node: id, draining })
            .await
            .map_err(write_error)?;
        if draining {
            self.wait_drained(id).await?;
        }
        Ok(())
    }

    /// Waits until `id` owns no shard and hands none over (or is marked down). Stops early when
    /// the last possible taker went down after the drain was written (the up-front check
    /// cannot see that coming): the drain then stays recorded and goes on once a node can take.
    async fn wait_drained(&self, id: NodeId) -> Result<(), AdminError> {
        let mut applied = self.subscribe();
        let drained = |state: &ClusterState| {
            let down = state.members.get(&id).is_none_or(|m| m.down);
            let owns = state
                .map
                .as_ref()
                .is_some_and(|m| m.shards_of(id).next().is_some());
            down || !owns
        };
        let wait = async {
            loop {
                {
                    let current = applied.borrow_and_update();
                    if drained(&current.state) {
                        return Ok(());
                    }
                    if current.state.draining_leaves_no_taker(id) {
                        return Err(AdminError::Failed {
                            reason: format!(
                                "node {id} still owns shards and no other member can take them now (each is draining or marked down): undrain a node or add one; the drain goes on by itself once a node can take the shards"
                            ),
                        });
                    }
                }
                if applied.changed().await.is_err() {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(self.config.drain_timeout, wait)
            .await
            .map_err(|_| AdminError::Failed {
                reason: format!(
                    "node {id} still owns shards after {:?}: is it running? Its shards move once it hands them over or the leader marks it down",
                    self.config.drain_timeout
                ),
            })?
    }

    /// The committed state as this node, the leader, sees it: after `ensure_linearizable`
    /// every entry committed before the call is applied here (the storage layer publishes an
    /// applied state before openraft counts it applied).
    /// Bounded by `admin_timeout`, so a stalled raft core cannot hold up every later admin
    /// command.
    async fn read_committed(&self) -> Result<Arc<AppliedState>, AdminError> {
        let read = tokio::time::timeout(self.config.admin_timeout, self.raft.ensure_linearizable());
        let Ok(result) = read.await else {
            return Err(AdminError::Failed {
                reason: format!(
                    "leadership could not be confirmed within {:?}: is a quorum reachable? Retry once the cluster has a leader",
                    self.config.admin_timeout
                ),
            });
        };
        match result {
            Ok(_) => Ok(self.applied()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                Err(AdminError::NotLeader {
                    leader: forward.leader_id,
                })
            }
            Err(error) => Err(failed(error)),
        }
    }

    /// Removes a node: a live one is drained first (its shards handed over; refused up front
    /// when no other node could take them), then raft membership changes; a node marked down
    /// is removed at once.
    async fn remove_node(&self, id: NodeId) -> Result<AdminResponse, AdminError> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(AdminError::NotAMember { node: id });
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) && voters.len() == 1 {
            return Err(AdminError::Invalid {
                reason: format!("node {id} is the last voter; a cluster needs at least one"),
            });
        }
        let down = self
            .applied()
            .state
            .members
            .get(&id)
            .is_some_and(|m| m.down);
        if !down {
            self.set_draining(id, true).await?;
        }
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        Ok(AdminResponse::Changed(
            self.change_report(format!("node {id} removed")),
        ))
    }

    /// Hands leadership to the most caught-up other voter.
    ///
    /// openraft 0.9 has no leadership transfer, and followers refuse votes while they hear from
    /// a leader (its lease). So the leader pauses its heartbeats and its own elections, waits out
    /// the longest election timeout, asks the chosen voter to campaign, and waits for a new
    /// leader; it resumes heartbeats and elections in every case.
    async fn step_down(&self) -> Result<AdminResponse, AdminError> {
        let metrics = self.raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let replication = metrics.replication.clone().unwrap_or_default();
        let target = voters
            .iter()
            .filter(|v| **v != self.node_id)
            .max_by_key(|v| {
                (
                    replication.get(*v).cloned().flatten().map(|l| l.index),
                    std::cmp::Reverse(**v),
                )
            })
            .copied()
            .ok_or_else(|| AdminError::Invalid {
                reason: "there is no other voter to hand leadership to; add one first".into(),
            })?;
        let addr = self.address_of(target)?;
        let runtime = self.raft.runtime_config();
        runtime.heartbeat(false);
        runtime.elect(false);
        let outcome = async {
            // Followers refuse to vote until the leader lease (the longest election timeout)
            // has passed since they last heard from this leader.
            tokio::time::sleep(self.config.election_timeout_max + self.config.heartbeat_interval)
                .await;
            let request = Request::Admin {
                request: AdminRequest::Elect,
                forwarded: true,
            };
            call_admin(
                &self.transport,
                Some(target),
                addr,
                &request,
                self.config.admin_timeout,
            )
            .await?;
            let mut metrics = self.raft.metrics();
            let me = self.node_id;
            let wait = tokio::time::timeout(self.config.election_timeout_max * 20, async move {
                metrics
                    .wait_for(|m| m.current_leader.is_some_and(|l| l != me))
                    .await
                    .map(|m| m.current_leader)
            });
            match wait.await {
                Ok(Ok(leader)) => Ok(leader),
                _ => Err(AdminError::Failed {
                    reason: "no other voter took over in time; leadership stays here".into(),
                }),
            }
        }
        .await;
        runtime.heartbeat(true);
        runtime.elect(true);
        let new_leader = outcome?;
        Ok(AdminResponse::Changed(self.change_report(format!(
            "node {} stepped down; node {} leads now",
            self.node_id,
            new_leader.map_or("?".to_string(), |l| l.to_string())
        ))))
    }
}

/// Whether a node with these raft metrics and this applied state may serve, and why not.
pub fn readiness(
    metrics: &RaftMetrics<NodeId, NodeInfo>,
    applied: &AppliedState,
) -> (NodeState, Option<String>) {
    if metrics.current_leader.is_none() {
        (
            NodeState::NotReady,
            Some(crate::NotReadyReason::NoLeader.to_string()),
        )
    } else if applied.state.map.is_none() {
        (
            NodeState::NotReady,
            Some(crate::NotReadyReason::NoMap.to_string()),
        )
    } else {
        (NodeState::Serving, None)
    }
}

fn roles(metrics: &RaftMetrics<NodeId, NodeInfo>) -> (Vec<NodeId>, Vec<NodeId>) {
    let membership = metrics.membership_config.membership();
    (
        membership.voter_ids().collect(),
        membership.learner_ids().collect(),
    )
}

fn raft_state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn failed(error: impl std::fmt::Display) -> AdminError {
    AdminError::Failed {
        reason: error.to_string(),
    }
}

fn write_error(error: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> AdminError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => AdminError::NotLeader {
            leader: forward.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(change)) => {
            AdminError::Invalid {
                reason: change.to_string(),
            }
        }
        other => failed(other),
    }
}

/// Once this node leads a cluster without a shard count, writes the configured one (the first
/// leader fixes it for the life of the cluster).
async fn write_shard_count_when_leading(consensus: Consensus, shard_count: u32) {
    let mut metrics = consensus.raft.metrics();
    let mut applied = consensus.subscribe();
    loop {
        let leading = metrics.borrow().current_leader == Some(consensus.node_id);
        if applied.borrow().state.shard_count.is_some() {
            return;
        }
        if leading {
            match consensus
                .raft
                .client_write(Command::Init { shard_count })
                .await
            {
                Ok(_) => {
                    tracing::info!(shard_count, "cluster initialised with its shard count");
                    continue;
                }
                // Raft has stopped (a log it cannot write): the node stops for good elsewhere;
                // retrying would spin on an error that never goes away.
                Err(RaftError::Fatal(_)) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "could not write the shard count; retrying when leading")
                }
            }
        }
        // After a failed write, look again on a change or after a pause, never in a spin.
        let pause = if leading {
            Duration::from_millis(100)
        } else {
            Duration::MAX
        };
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The leader's lease duties: keeps a [`LeaseGranter`] while this node leads (a new one per
/// term, started when the leadership is seen), and marks down members whose leases have
/// certainly expired (rule 3: only shards move; membership stays).
async fn lead(consensus: Consensus) {
    let mut metrics = consensus.raft.metrics();
    let mut applied = consensus.subscribe();
    let tick = consensus.lease.renew_period / 2;
    // This loop runs at least every `tick`; a longer gap means this process was paused or
    // starved, and could not hear any renewal meanwhile.
    let mut last_round = Instant::now();
    loop {
        let round = Instant::now();
        let stalled = round.saturating_duration_since(last_round);
        last_round = round;
        let (leading, term) = {
            let m = metrics.borrow_and_update();
            (
                m.current_leader == Some(consensus.node_id) && m.state == ServerState::Leader,
                m.current_term,
            )
        };
        let state = applied.borrow_and_update().clone();
        let now = Instant::now();
        let due = {
            let mut granter = lock(&consensus.granter);
            if !leading {
                *granter = None;
                Vec::new()
            } else {
                if granter.as_ref().is_none_or(|(t, _)| *t != term) {
                    tracing::info!(term, "leading: lease granter started");
                    // The receipt rule: the wait before this leader may take a silent node's
                    // shards starts at the latest contact any voter of its election had with
                    // an earlier leader, not at the election (tests/model, RESULTS.md).
                    let since = consensus.contact.wait_from(term, now);
                    tracing::info!(
                        term,
                        credited_ms = now.saturating_duration_since(since).as_millis() as u64,
                        previous_leader = ?consensus.contact.previous_leader(term, consensus.node_id),
                        "leading: the previous leader's markdown wait starts at the voters' last leader contact"
                    );
                    let previous = consensus.contact.previous_leader(term, consensus.node_id);
                    let mut fresh = LeaseGranter::with_evidence(
                        consensus.lease.clone(),
                        consensus.node_id,
                        now,
                        since,
                        previous,
                        consensus.config.heartbeat_interval * 2,
                    );
                    fresh.on_applied(&state.state, now);
                    *granter = Some((term, fresh));
                }
                match granter.as_mut() {
                    Some((_, granter)) => {
                        if stalled > consensus.lease.renew_period {
                            tracing::warn!(
                                ?stalled,
                                "this leader did not run for a while (paused or starved): every member gets a full wait to renew before any is marked down"
                            );
                            granter.restart_waits(&state.state, now);
                        }
                        granter.on_applied(&state.state, now);
                        for id in state.state.members.keys() {
                            if let Some(at) = consensus.contact.last_answer(*id) {
                                granter.answered(*id, at);
                            }
                        }
                        granter.markdowns_due(&state.state, now)
                    }
                    None => Vec::new(),
                }
            }
        };
        for node in due {
            let owner = consensus.clone();
            consensus.tasks.spawn(async move {
                let consensus = owner;
                tracing::warn!(node, "node stopped renewing its lease; marking it down (its shards move, its membership stays)");
                if let Err(error) = consensus
                    .raft
                    .client_write(Command::MarkDown { node })
                    .await
                {
                    tracing::warn!(node, %error, "could not mark the node down");
                    if let Some((_, granter)) = lock(&consensus.granter).as_mut() {
                        granter.proposal_failed(node, true);
                    }
                }
            });
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// How many lease renewals the leader answers at once; more are refused with
/// [`LeaseRefusal::Overloaded`]. Each member has at most about two in flight (its lease task
/// waits for an answer for a renew period, and the leader answers within one), so this leaves
/// room for hundreds of members while a misbehaving peer cannot pile renewals up.
pub const RENEWALS_IN_FLIGHT_MAX: usize = 1024;

/// What a confirmation round found: leadership confirmed and the state applied up to the read
/// index, or why not.
type RoundOutcome = Result<(), LeaseRefusal>;

/// The lease renewals a leader answers: how many wait, and the rounds they share.
#[derive(Debug, Default)]
struct Renewals {
    /// Renewals being answered now.
    in_flight: AtomicUsize,
    /// Confirmation rounds started so far.
    rounds_started: AtomicU64,
    /// Which round runs and who waits for the next one.
    rounds: Mutex<Rounds>,
}

impl Renewals {
    /// Counts a renewal in until the returned guard drops, or refuses it at the limit.
    fn admit(&self) -> Option<InFlight<'_>> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        // Refused or not, the guard counts the renewal out again when it drops.
        let guard = InFlight(&self.in_flight);
        (before < RENEWALS_IN_FLIGHT_MAX).then_some(guard)
    }
}

/// One admitted renewal; counted out when dropped, however the renewal ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The schedule of confirmation rounds: at most one runs at a time.
#[derive(Debug, Default)]
struct Rounds {
    /// Whether a round runs now.
    running: bool,
    /// The renewals waiting for the round after the running one (they arrived after it began).
    next: Option<watch::Sender<Option<RoundOutcome>>>,
}

/// Runs confirmation rounds while renewals wait for one, each bounded by the renew period,
/// starting with the round for `cohort`. A round is one `ensure_linearizable`: a quorum
/// heartbeat round begun after every renewal in its cohort arrived, then the wait until the
/// state is applied up to the read index (which includes this leader's no-op). Unbounded in
/// openraft (a stalled core, or a no-op that never commits), so the round gives up after the
/// renew period; the renewals waiting for the next round then start it. Ends when no renewal
/// waits.
async fn run_rounds(consensus: Consensus, mut cohort: watch::Sender<Option<RoundOutcome>>) {
    let renewals = &consensus.renewals;
    let renew_period = consensus.lease.renew_period;
    let mut schedule = Schedule {
        rounds: &renewals.rounds,
        armed: true,
    };
    loop {
        let round = renewals.rounds_started.fetch_add(1, Ordering::AcqRel) + 1;
        let started = Instant::now();
        let outcome =
            match tokio::time::timeout(renew_period, consensus.raft.ensure_linearizable()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                    Err(LeaseRefusal::NotLeader {
                        leader: forward.leader_id,
                    })
                }
                Ok(Err(error)) => Err(LeaseRefusal::NoQuorum {
                    reason: error.to_string(),
                }),
                Err(_elapsed) => Err(LeaseRefusal::TimedOut {
                    after: renew_period,
                }),
            };
        if let Err(refusal) = &outcome {
            tracing::debug!(round, %refusal, "lease confirmation round failed");
        }
        // Members cannot renew while rounds fail: the granter blames none of them meanwhile.
        if let Some((_, granter)) = lock(&consensus.granter).as_mut() {
            match &outcome {
                Ok(()) => granter.round_confirmed(started),
                Err(LeaseRefusal::NotLeader { .. }) => {}
                Err(_) => granter.round_failed(),
            }
        }
        cohort.send_replace(Some(outcome));
        let mut rounds = lock(&renewals.rounds);
        match rounds.next.take() {
            // Renewals that gave up meanwhile need no round.
            Some(next) if next.receiver_count() > 0 => cohort = next,
            _ => {
                rounds.running = false;
                schedule.armed = false;
                return;
            }
        }
    }
}

/// Marks the schedule idle when the round task ends without doing so itself (a panic), so that
/// later renewals start rounds again instead of waiting for one that nobody runs.
struct Schedule<'a> {
    rounds: &'a Mutex<Rounds>,
    armed: bool,
}

impl Drop for Schedule<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut rounds = lock(self.rounds);
            rounds.running = false;
            // Its waiters see the channel close and are refused.
            rounds.next = None;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The granter is replaced or updated in single statements, and the round schedule is
    // reset by `Schedule` when its task panics: a panic cannot leave either half-written, so a
    // poisoned lock is safe to keep using.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Carries out membership commands one at a time (a second waits for the first to finish).
struct ConsensusActor {
    consensus: Option<Consensus>,
}

impl Actor for ConsensusActor {
    type Context = Context<Self>;
}

/// Gives the actor its consensus handle (which holds the actor's own address).
struct Attach(Consensus);

impl Message for Attach {
    type Result = ();
}

impl Handler<Attach> for ConsensusActor {
    type Result = ();

    fn handle(&mut self, attach: Attach, _ctx: &mut Self::Context) {
        self.consensus = Some(attach.0);
    }
}

/// A membership command to run on the leader.
struct Write(AdminRequest);

impl Message for Write {
    type Result = Result<AdminResponse, AdminError>;
}

impl Handler<Write> for ConsensusActor {
    type Result = AtomicResponse<Self, Result<AdminResponse, AdminError>>;

    fn handle(&mut self, Write(request): Write, _ctx: &mut Self::Context) -> Self::Result {
        let consensus = self.consensus.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let Some(consensus) = consensus else {
                    return Err(AdminError::Failed {
                        reason: "consensus is still starting; retry".into(),
                    });
                };
                let span = tracing::info_span!("membership", ?request);
                let change = match &request {
                    AdminRequest::AddNode { .. } => Some("add_node"),
                    AdminRequest::RemoveNode { .. } => Some("remove_node"),
                    AdminRequest::Drain { .. } => Some("drain"),
                    AdminRequest::Undrain { .. } => Some("undrain"),
                    AdminRequest::StepDown => Some("step_down"),
                    _ => None,
                };
                let work = async move {
                    match request {
                        AdminRequest::AddNode {
                            id,
                            addr,
                            zone,
                            learner,
                        } => consensus.add_node(id, addr, zone, learner).await,
                        AdminRequest::RemoveNode { id } => consensus.remove_node(id).await,
                        AdminRequest::Drain { id } => consensus.drain(id, true).await,
                        AdminRequest::Undrain { id } => consensus.drain(id, false).await,
                        AdminRequest::StepDown => consensus.step_down().await,
                        other => Err(AdminError::Invalid {
                            reason: format!("{other:?} is not a membership command"),
                        }),
                    }
                };
                let result = tracing::Instrument::instrument(work, span).await;
                if let Some(change) = change {
                    crate::metrics::membership_change(change, result.is_ok());
                }
                result
            }
            .into_actor(self),
        ))
    }
}
