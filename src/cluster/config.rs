//! A node's settings ([`NodeConfig`]) and their validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::consensus::ConsensusConfig;
use crate::error::ConfigError;
use crate::lease::LeaseConfig;
use crate::router::RouterLimits;
use crate::shard_map::NodeId;
use crate::transport::TransportConfig;

/// Settings of one node. Build it with `..Default::default()` or through [`ClusterBuilder`](crate::ClusterBuilder);
/// [`validate`](NodeConfig::validate) runs before the node starts.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster. Default: 1.
    pub node_id: NodeId,
    /// How many shards keys are hashed into; fixed for the life of a cluster. Default: 1024.
    pub shard_count: u32,
    /// Messages a shard actor's mailbox holds before senders get [`Error::Overloaded`](crate::Error::Overloaded).
    /// Default: 1024.
    pub mailbox_capacity: usize,
    /// How long `send` waits for a reply before [`Error::Timeout`](crate::Error::Timeout). Default: 5 s.
    pub request_timeout: Duration,
    /// How long shutdown waits for each shard's `on_deactivate`, and how long a planned move
    /// waits for a shard to retire before it tries again later (the state is never handed
    /// over before the shard retired). Default: 5 s.
    pub deactivate_timeout: Duration,
    /// The cluster's name; nodes of differently named clusters refuse each other.
    /// Default: `"clusterfunk"`.
    pub cluster_name: String,
    /// The address the node listens on for peers, clients and the admin tool (cluster mode).
    /// Default: none (required unless standalone).
    pub listen: Option<SocketAddr>,
    /// The directory of the node's LMDB storage (cluster mode). Default: none (required unless
    /// standalone or in-memory for tests).
    pub data_dir: Option<PathBuf>,
    /// The node's zone (failure domain), if any. Default: none. The shard allocator places
    /// shards by the zone the cluster's membership records for each node (the initial members'
    /// `ID=IP:PORT@ZONE`, or `add-node --zone`); a node given a zone here refuses to start, or
    /// stops serving for good ([`Node::stopped`](crate::Node::stopped)), when the membership
    /// records another zone for it, or none. Without a zone here, nothing is checked.
    pub zone: Option<String>,
    /// Raft timing and log settings.
    pub consensus: ConsensusConfig,
    /// Lease timing (rule 4).
    pub lease: LeaseConfig,
    /// How long a request waits for its shard to get a serving owner (during failover or
    /// handoff) before `NotReady`. Default: 3 s.
    pub unavailable_wait: Duration,
    /// How many requests may wait at once before `Overloaded`. Default: 10 000.
    pub waiting_max: usize,
    /// Where to serve Prometheus metrics (`http://ADDR/metrics`), process-wide. Default: none.
    pub metrics: Option<SocketAddr>,
    /// Most connections (peers, clients, admin tools) the node holds at once; further ones
    /// wait in the listen backlog until one closes, while the open ones keep being served.
    /// Count two per other node plus your clients. Default: 1024
    /// ([`TransportConfig::connections_max`]).
    pub connections_max: usize,
    /// Passivate a shard after this long without a message: it commits its durable state and
    /// frees its memory, and the next message loads it again. Applies to shards whose handler
    /// keeps durable state in a store, and to handlers that opt in
    /// ([`ShardHandler::may_passivate`](crate::ShardHandler::may_passivate)). Default: never.
    pub passivate_after: Option<Duration>,
    /// Keep at most this many shards active on the node: beyond it, the least recently used
    /// passivate. Each shard start queues a check, so the count exceeds the bound at most by
    /// the starts that race a check (about one per concurrent sender). Default: no bound.
    pub active_shards_max: Option<usize>,
    /// How long a client session stays answerable without a request: a durable shard keeps the
    /// session's record of replies (for retries) at least this long after its last request,
    /// and deletes it after twice as long; a retry older than this that finds no record is
    /// refused with [`Error::SessionExpired`](crate::Error::SessionExpired). The nodes' clocks
    /// must agree to within three quarters of it. Default: 15 minutes.
    pub session_idle: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            shard_count: 1024,
            mailbox_capacity: 1024,
            request_timeout: Duration::from_secs(5),
            deactivate_timeout: Duration::from_secs(5),
            cluster_name: "clusterfunk".to_string(),
            listen: None,
            data_dir: None,
            zone: None,
            consensus: ConsensusConfig::default(),
            lease: LeaseConfig::default(),
            unavailable_wait: Duration::from_secs(3),
            waiting_max: 10_000,
            metrics: None,
            connections_max: TransportConfig::default().connections_max,
            passivate_after: None,
            active_shards_max: None,
            session_idle: Duration::from_secs(15 * 60),
        }
    }
}

/// The largest shard count a cluster may have.
pub const SHARD_COUNT_MAX: u32 = 1 << 20;
/// The largest mailbox a shard may have.
pub const MAILBOX_CAPACITY_MAX: usize = 1 << 20;

impl NodeConfig {
    /// Checks every limit; the node refuses to start on the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn out_of_range(
            name: &'static str,
            value: impl std::fmt::Debug,
            expected: &'static str,
        ) -> ConfigError {
            ConfigError::OutOfRange {
                name,
                value: format!("{value:?}"),
                expected,
            }
        }
        if self.shard_count == 0 || self.shard_count > SHARD_COUNT_MAX {
            return Err(out_of_range(
                "shard_count",
                self.shard_count,
                "between 1 and 1048576",
            ));
        }
        if self.mailbox_capacity == 0 || self.mailbox_capacity > MAILBOX_CAPACITY_MAX {
            return Err(out_of_range(
                "mailbox_capacity",
                self.mailbox_capacity,
                "between 1 and 1048576",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(out_of_range(
                "request_timeout",
                self.request_timeout,
                "more than zero",
            ));
        }
        if self.waiting_max == 0 {
            return Err(out_of_range(
                "waiting_max",
                self.waiting_max,
                "more than zero",
            ));
        }
        self.lease.validate(
            self.consensus.election_timeout_max,
            self.consensus.heartbeat_interval,
        )?;
        if self.deactivate_timeout.is_zero() {
            return Err(out_of_range(
                "deactivate_timeout",
                self.deactivate_timeout,
                "more than zero",
            ));
        }
        if self.session_idle.is_zero() {
            return Err(out_of_range(
                "session_idle",
                self.session_idle,
                "more than zero",
            ));
        }
        if self.passivate_after.is_some_and(|idle| idle.is_zero()) {
            return Err(out_of_range(
                "passivate_after",
                self.passivate_after,
                "more than zero",
            ));
        }
        if self.active_shards_max == Some(0) {
            return Err(out_of_range(
                "active_shards_max",
                self.active_shards_max,
                "at least 1",
            ));
        }
        Ok(())
    }
}

impl NodeConfig {
    /// Refuses this node's zone when it differs from `recorded`, the zone that the membership
    /// named by `record` holds for it (`None`: the membership does not list this node, so
    /// there is nothing to compare). A node configured without a zone makes no claim.
    pub(crate) fn check_zone(
        &self,
        recorded: Option<Option<&str>>,
        record: &'static str,
    ) -> Result<(), ConfigError> {
        match (self.zone.as_deref(), recorded) {
            (Some(configured), Some(recorded)) if recorded != Some(configured) => {
                Err(ConfigError::ZoneMismatch {
                    node: self.node_id,
                    configured: configured.to_string(),
                    recorded: recorded.map(str::to_string),
                    record,
                })
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn router_limits(&self) -> RouterLimits {
        RouterLimits {
            mailbox_capacity: self.mailbox_capacity,
            request_timeout: self.request_timeout,
            deactivate_timeout: self.deactivate_timeout,
            unavailable_wait: self.unavailable_wait,
            waiting_max: self.waiting_max,
            passivate_after: self.passivate_after,
            active_shards_max: self.active_shards_max,
            session_idle: self.session_idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zoned(zone: Option<&str>) -> NodeConfig {
        NodeConfig {
            node_id: 4,
            zone: zone.map(str::to_string),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn a_zone_that_differs_from_the_membership_is_refused_with_what_to_do() {
        let refused = zoned(Some("b"))
            .check_zone(Some(Some("a")), "the cluster's membership")
            .expect_err("b is not a");
        assert_eq!(
            refused,
            ConfigError::ZoneMismatch {
                node: 4,
                configured: "b".into(),
                recorded: Some("a".into()),
                record: "the cluster's membership",
            }
        );
        let message = refused.to_string();
        assert!(message.contains("zone `b`"), "{message}");
        assert!(message.contains("in zone `a`"), "{message}");
        assert!(message.contains("remove-node --id 4"), "{message}");
        // A membership without a zone for the node differs from a configured zone too.
        let unzoned = zoned(Some("b"))
            .check_zone(Some(None), "the initial members")
            .expect_err("none is not b");
        assert!(unzoned.to_string().contains("without a zone"), "{unzoned}");
    }

    #[test]
    fn a_matching_absent_or_unclaimed_zone_is_accepted() {
        assert_eq!(zoned(Some("a")).check_zone(Some(Some("a")), "x"), Ok(()));
        // Not in the membership (yet): nothing to compare.
        assert_eq!(zoned(Some("a")).check_zone(None, "x"), Ok(()));
        // No zone configured: the node makes no claim.
        assert_eq!(zoned(None).check_zone(Some(Some("a")), "x"), Ok(()));
        assert_eq!(zoned(None).check_zone(Some(None), "x"), Ok(()));
    }
}
