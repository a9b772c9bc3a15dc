//! The steps the router actor takes (following consensus, undraining after a restart) and the
//! node's metrics sampler task.

use std::sync::{Arc, Weak};
use std::time::Instant;

use super::config::NodeConfig;
use crate::admin::AdminRequest;
use crate::consensus::Consensus;
use crate::error::NotReadyReason;
use crate::metrics::{
    HANDOFFS_IN_PROGRESS, IS_LEADER, LEARNERS, LEASE_REMAINING, MAP_EPOCH, MEMBERS_DOWN,
    QUEUE_DEPTH, RAFT_LAST_APPLIED, RAFT_LEADER_ID, RAFT_TERM, READY, SAMPLE_EVERY, SHARDS_ACTIVE,
    SHARDS_OWNED, VOTERS, WAITING_REQUESTS,
};
use crate::router::{Router, RoutingTable};
use crate::shard::ShardHandler;
use metrics::Gauge;

/// Follows consensus for the router actor: installs every newly applied cluster state in the
/// router, and tracks since when the node has known no leader (a node without a leader keeps
/// serving while its lease lasts, rule 4; requests then fail fast instead of waiting once the
/// outage is older than the wait bound).
#[derive(Debug)]
pub(super) struct Follower {
    /// The applied index and leaderlessness last installed.
    seen: Option<(Option<u64>, bool)>,
    leaderless_since: Option<Instant>,
}

/// What following consensus found.
#[derive(Debug)]
pub(super) enum Followed {
    /// The router's table is current.
    Current,
    /// `Node::shutdown` stopped raft: nothing more to follow.
    RaftStopped,
    /// Raft stopped on a fatal error: the node must stop serving for good, for this reason.
    RaftFailed(String),
    /// The membership records another zone for this node than it was configured with.
    ZoneMismatch(crate::error::ConfigError),
}

impl Follower {
    /// A follower that has installed nothing yet and knows no leader.
    pub(super) fn new() -> Self {
        Follower {
            seen: None,
            leaderless_since: Some(Instant::now()),
        }
    }

    /// Installs the table again at the next step even if nothing changed (after the router
    /// actor restarted).
    pub(super) fn forget(&mut self) {
        self.seen = None;
    }

    /// One step: reads raft's metrics and the applied state, and installs a new routing table
    /// when either changed what the router must know.
    pub(super) fn step<H: ShardHandler>(
        &mut self,
        router: &Router<H>,
        consensus: &Consensus,
        config: &NodeConfig,
    ) -> Followed {
        let (leader, running) = {
            let metrics = consensus.raft().metrics();
            let current = metrics.borrow();
            (current.current_leader, current.running_state.clone())
        };
        match running {
            Ok(()) => {}
            Err(openraft::error::Fatal::Stopped) => return Followed::RaftStopped,
            Err(fatal) => return Followed::RaftFailed(raft_failed(consensus, &fatal.to_string())),
        }
        match (leader, self.leaderless_since) {
            (Some(_), _) => self.leaderless_since = None,
            (None, None) => self.leaderless_since = Some(Instant::now()),
            (None, Some(_)) => {}
        }
        let current = consensus.applied();
        let index = current.last_applied.as_ref().map(|l| l.index);
        let leaderless = self.leaderless_since.is_some();
        if self.seen == Some((index, leaderless)) {
            return Followed::Current;
        }
        self.seen = Some((index, leaderless));
        let recorded = current
            .state
            .members
            .get(&config.node_id)
            .map(|member| member.zone.as_deref());
        if let Err(mismatch) = config.check_zone(recorded, "the cluster's membership") {
            return Followed::ZoneMismatch(mismatch);
        }
        let state = Arc::new(current.state.clone());
        let not_ready = match state.shard_count {
            Some(cluster) if cluster != router.shard_count() => {
                tracing::error!(
                    node = router.node_id(),
                    configured = router.shard_count(),
                    cluster,
                    "this node was started with {} shards but the cluster has {cluster}: it answers NotReady until restarted with {cluster}",
                    router.shard_count()
                );
                Some(NotReadyReason::ShardCountMismatch)
            }
            _ if state.map.is_none() => Some(NotReadyReason::NoMap),
            _ => None,
        };
        router.set_table(RoutingTable {
            state,
            not_ready,
            leaderless_since: self.leaderless_since,
        });
        Followed::Current
    }
}

/// The raft task ended without saying why (it panicked), unless it was stopped.
pub(super) fn raft_task_ended(consensus: &Consensus) -> Option<String> {
    let stopped = consensus.raft().metrics().borrow().running_state.is_err();
    (!stopped).then(|| raft_failed(consensus, "the raft task ended unexpectedly"))
}

/// Why a node whose raft stopped on a fatal error (its log could not be written) serves no more.
fn raft_failed(consensus: &Consensus, cause: &str) -> String {
    format!(
        "node {} stopped serving for good: raft failed ({cause}). A full disk or an I/O error on the data dir is the usual cause: fix it and restart the node; its shards fail over to the other nodes meanwhile",
        consensus.node_id()
    )
}

/// The membership records another zone for this node than it was configured with: the
/// allocator would place shards by a zone the node does not run in. The node stops serving
/// for good (as [`stop_for_good`]) and stops its raft, so that its lease is no longer renewed
/// and its shards fail over; [`Node::stopped`](super::Node::stopped) resolves with the reason.
pub(super) async fn zone_mismatch(consensus: Consensus, mismatch: crate::error::ConfigError) {
    // The router already stopped serving (`stop_for_good`): only raft is left to stop.
    tracing::debug!(%mismatch, "stopping raft after a zone mismatch");
    if let Err(error) = consensus.raft().shutdown().await {
        tracing::warn!(%error, "raft did not shut down cleanly after a zone mismatch");
    }
}

/// The reason a node with a zone mismatch gives for stopping.
pub(super) fn zone_mismatch_reason(
    consensus: &Consensus,
    mismatch: &crate::error::ConfigError,
) -> String {
    format!(
        "node {} stopped serving for good: {mismatch}",
        consensus.node_id()
    )
}

/// This node serves nothing more, for `reason`: its lease is revoked at once and every
/// request is refused as [`NotReadyReason::Stopped`]; without renewals the leader marks it
/// down and its shards fail over. [`Node::stopped`](super::Node::stopped) resolves, so the
/// program can exit.
pub(super) fn stop_for_good<H: ShardHandler>(
    router: &Router<H>,
    stopped: &tokio::sync::watch::Sender<Option<String>>,
    reason: String,
) {
    tracing::error!("{reason}");
    router.stop_for_good();
    stopped.send_replace(Some(reason));
}

/// The file in the data dir that marks a node drained by its own graceful shutdown.
pub(super) const UNDRAIN_MARKER: &str = "drained-by-shutdown";

/// What the undrain after a graceful shutdown's restart does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum UndrainStep {
    /// Not caught up yet (no lease or no leader): look again later.
    Wait,
    /// The node rejoined and is still draining: ask the leader to undrain it.
    Undrain,
    /// Undrained already (by an operator too), or no longer a member: remove the marker.
    Done,
}

/// Where the undrain of a node that a graceful shutdown drained stands: it undrains once the
/// node has rejoined (it holds a lease, which is granted only for the newest allocation, and
/// knows a leader) and sees itself as a draining member.
pub(super) fn undrain_step<H: ShardHandler>(
    router: &Router<H>,
    consensus: &Consensus,
) -> UndrainStep {
    let me = consensus.node_id();
    let caught_up = router.lease_remaining().is_some()
        && consensus.raft().metrics().borrow().current_leader.is_some();
    let draining = consensus
        .applied()
        .state
        .members
        .get(&me)
        .map(|m| m.draining);
    match (caught_up, draining) {
        (false, _) => UndrainStep::Wait,
        (true, Some(true)) => UndrainStep::Undrain,
        (true, Some(false) | None) => UndrainStep::Done,
    }
}

/// Asks the leader to undrain this node; returns whether it did.
pub(super) async fn undrain(consensus: Consensus) -> bool {
    let me = consensus.node_id();
    match consensus
        .admin(AdminRequest::Undrain { id: me }, false)
        .await
    {
        Ok(_) => {
            tracing::info!(
                node = me,
                "rejoined after a graceful shutdown; undrained, shards come back"
            );
            true
        }
        Err(error) => {
            tracing::warn!(%error, "cannot undrain yet; retrying");
            false
        }
    }
}

/// Removes the marker of a graceful shutdown's drain once the node undrained.
pub(super) fn remove_undrain_marker(marker: &std::path::Path) {
    if let Err(error) = std::fs::remove_file(marker) {
        tracing::warn!(%error, path = %marker.display(), "cannot remove the shutdown marker");
    }
}

/// Publishes the node's state as gauges every [`SAMPLE_EVERY`](crate::metrics::SAMPLE_EVERY) until the router is gone.
pub(super) async fn sample_metrics<H: ShardHandler>(router: Weak<Router<H>>, consensus: Consensus) {
    let gauge = |name: &'static str| -> Gauge { metrics::gauge!(name) };
    let (owned, active, epoch, term, leader_id, is_leader, applied_index) = (
        gauge(SHARDS_OWNED),
        gauge(SHARDS_ACTIVE),
        gauge(MAP_EPOCH),
        gauge(RAFT_TERM),
        gauge(RAFT_LEADER_ID),
        gauge(IS_LEADER),
        gauge(RAFT_LAST_APPLIED),
    );
    let (lease, ready, voters, learners, down, moving, queued, waiting) = (
        gauge(LEASE_REMAINING),
        gauge(READY),
        gauge(VOTERS),
        gauge(LEARNERS),
        gauge(MEMBERS_DOWN),
        gauge(HANDOFFS_IN_PROGRESS),
        gauge(QUEUE_DEPTH),
        gauge(WAITING_REQUESTS),
    );
    let me = consensus.node_id();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let table = router.table();
        let state = &table.state;
        owned.set(state.map.as_ref().map_or(0, |m| m.shards_of(me).count()) as f64);
        active.set(router.active_shards() as f64);
        epoch.set(state.map_epoch() as f64);
        let raft = consensus.raft().metrics().borrow().clone();
        term.set(raft.current_term as f64);
        leader_id.set(raft.current_leader.map_or(-1.0, |id| id as f64));
        is_leader.set(f64::from(u8::from(raft.current_leader == Some(me))));
        applied_index.set(raft.last_applied.map_or(0.0, |l| l.index as f64));
        let remaining = router.lease_remaining();
        lease.set(remaining.map_or(0.0, |d| d.as_secs_f64().min(1e9)));
        let serving = table.not_ready.is_none() && state.map.is_some() && remaining.is_some();
        ready.set(f64::from(u8::from(serving)));
        voters.set(state.members.values().filter(|m| m.voter).count() as f64);
        learners.set(state.members.values().filter(|m| !m.voter).count() as f64);
        down.set(state.members.values().filter(|m| m.down).count() as f64);
        moving.set(state.moving_away(me).count() as f64);
        queued.set(router.queue_depth() as f64);
        waiting.set(router.waiting_requests() as f64);
    }
}
