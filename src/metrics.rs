//! Prometheus metrics: the scrape endpoint, the request counters and latency histograms of the
//! router, and the names of the gauges the node's sampler (in `cluster`) publishes.
//!
//! Metrics go through the [`metrics`] facade into one process-wide recorder, installed by the
//! first node started with [`ClusterBuilder::metrics`](crate::ClusterBuilder::metrics); the
//! endpoint runs on a thread of its own, so it answers even while a node's runtime is busy.
//! Without an endpoint every recording is skipped (the router holds no handles). The guide's
//! metrics reference lists every metric this module names.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
#[cfg(feature = "prometheus")]
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::error::Error;

/// Requests by route and outcome.
pub(crate) const REQUESTS: &str = "clusterfunk_requests_total";
/// Request latency by route.
pub(crate) const REQUEST_DURATION: &str = "clusterfunk_request_duration_seconds";
/// Shards the map assigns to this node.
pub(crate) const SHARDS_OWNED: &str = "clusterfunk_shards_owned";
/// Shard actors running on this node.
pub(crate) const SHARDS_ACTIVE: &str = "clusterfunk_shards_active";
/// The map's fencing epoch.
pub(crate) const MAP_EPOCH: &str = "clusterfunk_map_epoch";
/// The raft term.
pub(crate) const RAFT_TERM: &str = "clusterfunk_raft_term";
/// The leader's id, -1 when none is known.
pub(crate) const RAFT_LEADER_ID: &str = "clusterfunk_raft_leader_id";
/// 1 on the leader.
pub(crate) const IS_LEADER: &str = "clusterfunk_is_leader";
/// The index of the last applied raft entry.
pub(crate) const RAFT_LAST_APPLIED: &str = "clusterfunk_raft_last_applied";
/// Seconds left on this node's lease (0 without one).
pub(crate) const LEASE_REMAINING: &str = "clusterfunk_lease_remaining_seconds";
/// 1 when the node serves, 0 when it answers `NotReady`.
pub(crate) const READY: &str = "clusterfunk_ready";
/// Voting members.
pub(crate) const VOTERS: &str = "clusterfunk_voters";
/// Non-voting members.
pub(crate) const LEARNERS: &str = "clusterfunk_learners";
/// Members marked down.
pub(crate) const MEMBERS_DOWN: &str = "clusterfunk_members_down";
/// Shards this node is handing over now.
pub(crate) const HANDOFFS_IN_PROGRESS: &str = "clusterfunk_handoffs_in_progress";
/// Shards handed over, by direction.
pub(crate) const HANDOFFS_COMPLETED: &str = "clusterfunk_handoffs_completed_total";
/// Messages queued in this node's shard mailboxes.
pub(crate) const QUEUE_DEPTH: &str = "clusterfunk_queue_depth";
/// Requests waiting at the router for a serving owner.
pub(crate) const WAITING_REQUESTS: &str = "clusterfunk_waiting_requests";
/// Membership changes run by this node, by change and outcome.
pub(crate) const MEMBERSHIP_CHANGES: &str = "clusterfunk_membership_changes_total";
/// Handler panics.
pub(crate) const SHARD_FAILURES: &str = "clusterfunk_shard_failures_total";

/// How often the sampler publishes the gauges.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Latency buckets, in seconds: 50 µs to 10 s.
#[cfg(feature = "prometheus")]
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

pub use crate::error::MetricsError;

static INSTALLED: OnceLock<SocketAddr> = OnceLock::new();
static INSTALLING: Mutex<()> = Mutex::new(());

/// Whether this process has a metrics endpoint (and so a recorder).
pub(crate) fn enabled() -> bool {
    INSTALLED.get().is_some()
}

/// Serves Prometheus metrics at `http://addr/metrics` for this process. Idempotent for the
/// same address.
pub(crate) fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    let _guard = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = INSTALLED.get() {
        return if *existing == addr {
            Ok(())
        } else {
            Err(MetricsError::AlreadyInstalled {
                existing: *existing,
            })
        };
    }
    #[cfg(not(feature = "prometheus"))]
    {
        Err(MetricsError::NotBuilt { addr })
    }
    #[cfg(feature = "prometheus")]
    {
        serve(addr)?;
        // Only after the recorder is in place: set fails once set.
        let _ = INSTALLED.set(addr);
        describe();
        tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
        Ok(())
    }
}

/// Starts the Prometheus exporter on a thread of its own and installs its recorder.
#[cfg(feature = "prometheus")]
fn serve(addr: SocketAddr) -> Result<(), MetricsError> {
    let exporter_error = move |source: Box<dyn std::error::Error + Send + Sync>| {
        MetricsError::Exporter { addr, source }
    };
    // The exporter binds and serves on a runtime of its own, on its own thread.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), MetricsError>>();
    std::thread::Builder::new()
        .name("clusterfunk-metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(exporter_error(Box::new(e))));
                    return;
                }
            };
            let built = runtime.block_on(async {
                PrometheusBuilder::new()
                    .with_http_listener(addr)
                    .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), BUCKETS)?
                    .build()
            });
            let (recorder, exporter) = match built {
                Ok(parts) => parts,
                Err(e) => {
                    let _ = ready_tx.send(Err(exporter_error(Box::new(e))));
                    return;
                }
            };
            if metrics::set_global_recorder(recorder).is_err() {
                // The error holds only the recorder that was not installed.
                let _ = ready_tx.send(Err(MetricsError::RecorderInstalled { addr }));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            if let Err(e) = runtime.block_on(exporter) {
                tracing::error!(%addr, error = ?e, "metrics endpoint stopped");
            }
        })
        .map_err(|e| exporter_error(Box::new(e)))?;
    ready_rx
        .recv()
        .map_err(|_| MetricsError::ExporterThreadEnded { addr })?
}

#[cfg(feature = "prometheus")]
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        "Requests by route (local, forwarded, client) and outcome"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request latency by route, from arrival at this node to the reply"
    );
    describe_gauge!(
        SHARDS_OWNED,
        "Shards the committed map assigns to this node"
    );
    describe_gauge!(SHARDS_ACTIVE, "Shard actors running on this node");
    describe_gauge!(MAP_EPOCH, "Fencing epoch of the newest applied shard map");
    describe_gauge!(RAFT_TERM, "Current raft term");
    describe_gauge!(RAFT_LEADER_ID, "Id of the known leader, -1 when none");
    describe_gauge!(IS_LEADER, "1 when this node is the raft leader");
    describe_gauge!(RAFT_LAST_APPLIED, "Index of the last applied raft entry");
    describe_gauge!(
        LEASE_REMAINING,
        Unit::Seconds,
        "Time left on this node's serving lease, 0 without one"
    );
    describe_gauge!(
        READY,
        "1 when the node has a map and a lease, 0 when it answers NotReady"
    );
    describe_gauge!(VOTERS, "Voting members in the applied membership");
    describe_gauge!(LEARNERS, "Non-voting members in the applied membership");
    describe_gauge!(MEMBERS_DOWN, "Members marked down by the leader");
    describe_gauge!(HANDOFFS_IN_PROGRESS, "Shards this node is handing over now");
    describe_counter!(
        HANDOFFS_COMPLETED,
        "Shards handed over (direction out) or received (direction in)"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Messages queued in this node's shard mailboxes"
    );
    describe_gauge!(
        WAITING_REQUESTS,
        "Requests waiting at the router for a serving owner"
    );
    describe_counter!(
        MEMBERSHIP_CHANGES,
        "Membership changes run by this node, by change and outcome"
    );
    describe_counter!(SHARD_FAILURES, "Handler panics (the shard restarts fresh)");
}

/// Where a request entered this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteLabel {
    /// Sent on this node (`Node::send` or a handler's `cluster().send`).
    Local = 0,
    /// Forwarded by another node.
    Forwarded = 1,
    /// Sent by an external client.
    Client = 2,
}

const ROUTES: [&str; 3] = ["local", "forwarded", "client"];
const OUTCOMES: [&str; 10] = [
    "ok",
    "not_ready",
    "wrong_owner",
    "overloaded",
    "timeout",
    "unreachable",
    "shard_failed",
    "shutting_down",
    "outcome_unknown",
    "error",
];

fn outcome_index(error: Option<&Error>) -> usize {
    match error {
        None => 0,
        Some(Error::NotReady { .. }) => 1,
        Some(Error::WrongOwner { .. }) => 2,
        Some(Error::Overloaded { .. }) => 3,
        Some(Error::Timeout { .. }) => 4,
        Some(Error::Unreachable { .. }) => 5,
        Some(Error::ShardFailed { .. }) => 6,
        Some(Error::ShuttingDown) => 7,
        Some(Error::OutcomeUnknown { .. }) => 8,
        Some(_) => 9,
    }
}

/// The router's request counters and histograms, registered once per node so the hot path only
/// bumps atomics.
pub(crate) struct RequestMetrics {
    requests: Vec<Counter>,
    latency: Vec<Histogram>,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// Handles for every route and outcome, or `None` when the process has no endpoint.
    pub(crate) fn new() -> Option<Self> {
        if !enabled() {
            return None;
        }
        let mut requests = Vec::with_capacity(ROUTES.len() * OUTCOMES.len());
        for route in ROUTES {
            for outcome in OUTCOMES {
                requests.push(metrics::counter!(REQUESTS, "route" => route, "outcome" => outcome));
            }
        }
        let latency = ROUTES
            .iter()
            .map(|route| metrics::histogram!(REQUEST_DURATION, "route" => *route))
            .collect();
        Some(RequestMetrics { requests, latency })
    }

    /// Counts one request that entered by `route`, began at `started` and ended with `error`.
    pub(crate) fn record(&self, route: RouteLabel, error: Option<&Error>, started: Instant) {
        let route = route as usize;
        if let Some(counter) = self
            .requests
            .get(route * OUTCOMES.len() + outcome_index(error))
        {
            counter.increment(1);
        }
        if let Some(histogram) = self.latency.get(route) {
            histogram.record(started.elapsed().as_secs_f64());
        }
    }
}

/// Counts shards handed over (`out`) or received (`in`).
pub(crate) fn handoffs_completed(direction: &'static str, shards: usize) {
    if enabled() {
        metrics::counter!(HANDOFFS_COMPLETED, "direction" => direction).increment(shards as u64);
    }
}

/// Counts a membership change run by this node.
pub(crate) fn membership_change(change: &'static str, ok: bool) {
    if enabled() {
        let outcome = if ok { "ok" } else { "error" };
        metrics::counter!(MEMBERSHIP_CHANGES, "change" => change, "outcome" => outcome)
            .increment(1);
    }
}

/// Counts a handler panic.
pub(crate) fn shard_failure() {
    if enabled() {
        metrics::counter!(SHARD_FAILURES).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_an_outcome_label() {
        let errors = [
            Error::NotReady {
                reason: crate::NotReadyReason::NoLeader,
            },
            Error::WrongOwner {
                shard: 1,
                owner: 2,
                epoch: 3,
            },
            Error::Overloaded { shard: 1 },
            Error::Timeout {
                shard: 1,
                after: Duration::from_secs(1),
            },
            Error::Unreachable {
                node: 1,
                reason: "x".into(),
            },
            Error::ShardFailed {
                shard: 1,
                reason: "x".into(),
            },
            Error::ShuttingDown,
            Error::OutcomeUnknown { shard: 1 },
            Error::Codec("x".into()),
            Error::Protocol { detail: "x".into() },
            Error::Internal { detail: "x".into() },
        ];
        let labels: Vec<_> = errors
            .iter()
            .map(|e| OUTCOMES[outcome_index(Some(e))])
            .collect();
        assert_eq!(
            labels,
            [
                "not_ready",
                "wrong_owner",
                "overloaded",
                "timeout",
                "unreachable",
                "shard_failed",
                "shutting_down",
                "outcome_unknown",
                "error",
                "error",
                "error"
            ]
        );
        assert_eq!(OUTCOMES[outcome_index(None)], "ok");
    }
}
