//! The node's long-lived tasks: following consensus, undraining after a restart, sampling metrics.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

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

/// Installs every newly applied cluster state in the router, and tracks since when the node has
/// known no leader (a node without a leader keeps serving while its lease lasts, rule 4; requests
/// then fail fast instead of waiting once the outage is older than the wait bound). A node whose
/// configured zone differs from the zone the membership records for it stops serving for good
/// ([`zone_mismatch`]).
pub(super) async fn follow_consensus<H: ShardHandler>(
    weak: Weak<Router<H>>,
    consensus: Consensus,
    stopped: tokio::sync::watch::Sender<Option<String>>,
    config: NodeConfig,
) {
    let mut metrics = consensus.raft().metrics();
    let mut applied = consensus.subscribe();
    let mut seen: Option<(Option<u64>, bool)> = None;
    let mut leaderless_since = Some(Instant::now());
    loop {
        let Some(router) = weak.upgrade() else {
            return;
        };
        let (leader, running) = {
            let current = metrics.borrow_and_update();
            (current.current_leader, current.running_state.clone())
        };
        match running {
            Ok(()) => {}
            // `Node::shutdown` stopped raft: nothing to report.
            Err(openraft::error::Fatal::Stopped) => return,
            Err(fatal) => {
                stop_for_good(
                    &router,
                    &stopped,
                    raft_failed(&consensus, &fatal.to_string()),
                );
                return;
            }
        }
        match (leader, leaderless_since) {
            (Some(_), _) => leaderless_since = None,
            (None, None) => leaderless_since = Some(Instant::now()),
            (None, Some(_)) => {}
        }
        let current = applied.borrow_and_update().clone();
        let index = current.last_applied.as_ref().map(|l| l.index);
        if seen != Some((index, leaderless_since.is_some())) {
            seen = Some((index, leaderless_since.is_some()));
            let recorded = current
                .state
                .members
                .get(&config.node_id)
                .map(|member| member.zone.as_deref());
            if let Err(mismatch) = config.check_zone(recorded, "the cluster's membership") {
                drop(router);
                zone_mismatch(&weak, &consensus, &stopped, &mismatch).await;
                return;
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
                leaderless_since,
            });
        }
        drop(router);
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                // The raft task ended without saying why (it panicked), unless it was stopped.
                if let (Some(router), true) = (weak.upgrade(), metrics.borrow().running_state.is_ok()) {
                    stop_for_good(&router, &stopped, raft_failed(&consensus, "the raft task ended unexpectedly"));
                }
                return;
            },
            changed = applied.changed() => if changed.is_err() { return },
        }
    }
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
async fn zone_mismatch<H: ShardHandler>(
    weak: &Weak<Router<H>>,
    consensus: &Consensus,
    stopped: &tokio::sync::watch::Sender<Option<String>>,
    mismatch: &crate::error::ConfigError,
) {
    let Some(router) = weak.upgrade() else {
        return;
    };
    let reason = format!(
        "node {} stopped serving for good: {mismatch}",
        consensus.node_id()
    );
    stop_for_good(&router, stopped, reason);
    drop(router);
    if let Err(error) = consensus.raft().shutdown().await {
        tracing::warn!(%error, "raft did not shut down cleanly after a zone mismatch");
    }
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

/// Undrains a node that a graceful shutdown drained, once it has rejoined (it knows a leader and
/// sees itself as a draining member), then removes the marker. An operator's undrain (or
/// removal) meanwhile also ends it.
pub(super) async fn undrain_after_restart<H: ShardHandler>(
    router: Weak<Router<H>>,
    consensus: Consensus,
    marker: PathBuf,
) {
    let me = consensus.node_id();
    let mut applied = consensus.subscribe();
    let mut metrics = consensus.raft().metrics();
    loop {
        let Some(leased) = router.upgrade().map(|r| r.lease_remaining().is_some()) else {
            return;
        };
        // A lease is granted only for the newest allocation: with one the node has caught up.
        let caught_up = leased && metrics.borrow_and_update().current_leader.is_some();
        let draining = applied
            .borrow_and_update()
            .state
            .members
            .get(&me)
            .map(|m| m.draining);
        match (caught_up, draining) {
            (true, Some(false)) | (true, None) => {
                // Undrained already, or no longer a member: nothing left to do.
                break;
            }
            (true, Some(true)) => {
                match consensus
                    .admin(AdminRequest::Undrain { id: me }, false)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(
                            node = me,
                            "rejoined after a graceful shutdown; undrained, shards come back"
                        );
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot undrain yet; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            (false, _) => {}
        }
        // Lease renewals are not announced on these channels: look again every so often.
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    if let Err(error) = std::fs::remove_file(&marker) {
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
