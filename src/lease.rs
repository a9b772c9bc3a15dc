//! Leases (protocol rule 4), as pure state machines: [`LeaseHolder`] on every node and
//! [`LeaseGranter`] on the leader. They take events and the time, and return decisions; the
//! node's lease task and the consensus module carry out the I/O.
//!
//! The argument they keep true: whenever a shard changes owner without the old owner's release,
//! every lease the old owner could still be using has expired. A node asks at local time `t0`
//! and, once granted, serves until `t0 + L` on its own clock. The leader grants only (i) after an
//! entry of its own term is committed and applied, (ii) after a quorum round that began after
//! the request arrived (both given by openraft's `ensure_linearizable`), and (iii) when the
//! node's allocation epoch is the newest committed one. Any newer leader was therefore elected
//! after `t0`; it waits `L·(1+ρ)/(1−ρ)` after its election, and after its own last grant to a
//! node, before it marks the node down and moves its shards. With the receipt rule
//! ([`LeaseGranter::with_evidence`]) the wait after the election starts instead at the latest
//! time any voter of the election heard from an earlier leader (a quorum heard from the old
//! leader after each of its grants' requests), but only for the leader it replaces (the one
//! whose silence caused the election), which also gets a short grace after the election to
//! answer. Every other member, live as far as anyone knows, keeps the full wait from the
//! election to renew with the new leader: a follower paused briefly around an election must not
//! lose its shards. This module does not send anything, read clocks or touch raft.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::consensus::ClusterState;
use crate::error::ConfigError;
use crate::shard_map::NodeId;

/// Lease timing. Validated against the raft timing at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    /// How long a granted lease lasts, from the moment the node asked (L). Default: 500 ms.
    pub lease: Duration,
    /// How often a node renews its lease. Default: 125 ms (L/4).
    pub renew_period: Duration,
    /// The bound ρ on any clock's rate error, as a fraction. Default: 0.05.
    pub clock_drift_max: f64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease: Duration::from_millis(500),
            renew_period: Duration::from_millis(125),
            clock_drift_max: 0.05,
        }
    }
}

impl LeaseConfig {
    /// The fast profile: L = 300 ms, renewed every 75 ms, ρ = 5 %. Pair it with
    /// [`ConsensusConfig::fast`](crate::ConsensusConfig::fast). A dead node's shards move in
    /// about a third of a second instead of half a second, at the price of pausing healthy
    /// shards sooner when a loaded machine delays renewals. The lease model
    /// (`shared/models/leasesim.py --timing 300,100,200,30 --variant amended --harsh`) finds no
    /// double ownership with it.
    pub fn fast() -> Self {
        LeaseConfig {
            lease: Duration::from_millis(300),
            renew_period: Duration::from_millis(75),
            clock_drift_max: 0.05,
        }
    }

    /// How long a leader waits, after its election and after its last grant to a node, before it
    /// may take the node's shards without a release: `L·(1+ρ)/(1−ρ)`.
    pub fn markdown_wait(&self) -> Duration {
        self.lease
            .mul_f64((1.0 + self.clock_drift_max) / (1.0 - self.clock_drift_max))
    }

    /// How long a new leader gives a member it knows to be alive (it answered a vote or append
    /// request of this leader's election or term) but has not granted anything yet to renew with
    /// it, counted from its election: two renew periods (a first renewal may time out once).
    /// Marking down later is always safe; this bound keeps the receipt rule from marking a live
    /// node down whose lease lapsed only because the old leader is gone (its shards would move
    /// without a handoff). A member that answered nothing gets the consensus's two heartbeat
    /// intervals instead (the answer to the new leader's first heartbeat may be on its way).
    pub fn renew_grace(&self) -> Duration {
        self.renew_period * 2
    }

    /// Checks the relations the protocol needs, given the raft election timeout and heartbeat
    /// interval.
    pub fn validate(
        &self,
        election_timeout_max: Duration,
        heartbeat_interval: Duration,
    ) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            name: "lease",
            reason,
        };
        if !(0.0..0.5).contains(&self.clock_drift_max) {
            return Err(invalid(format!(
                "clock_drift_max is {}, it must be at least 0 and below 0.5",
                self.clock_drift_max
            )));
        }
        if self.renew_period.is_zero() || self.renew_period * 2 > self.lease {
            return Err(invalid(format!(
                "renew_period ({:?}) must be above zero and at most half the lease ({:?}), so one lost renewal does not end the lease",
                self.renew_period, self.lease
            )));
        }
        if self.renew_period < heartbeat_interval * 2 {
            return Err(invalid(format!(
                "renew_period ({:?}) must be at least two heartbeat intervals ({heartbeat_interval:?} each): a renewal may wait for two confirmation rounds of up to one heartbeat interval, and is refused after one renew period",
                self.renew_period
            )));
        }
        if self.lease < election_timeout_max {
            return Err(invalid(format!(
                "the lease ({:?}) must be at least the longest election timeout ({election_timeout_max:?}), or every election interrupts service",
                self.lease
            )));
        }
        Ok(())
    }
}

/// A renewal request, from a node to the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewLease {
    /// The asking node.
    pub node: NodeId,
    /// The allocation epoch the node has applied.
    pub epoch: u64,
    /// The node process's incarnation: a grant for an earlier incarnation is ignored.
    pub incarnation: u64,
    /// Identifies the request, so the node knows its `t0`.
    pub request_id: u64,
}

/// A granted renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The request granted.
    pub request_id: u64,
    /// The incarnation it was granted to.
    pub incarnation: u64,
    /// The allocation epoch it was granted for.
    pub epoch: u64,
}

/// Why the leader refused a renewal. Encoded on the wire (bincode numbers variants by
/// position): add new variants at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseRefusal {
    /// The receiver is not the leader.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader it knows of.
        leader: Option<NodeId>,
    },
    /// The leader could not confirm its leadership with a quorum.
    #[error("no quorum: {reason}")]
    NoQuorum {
        /// Why.
        reason: String,
    },
    /// The node has not applied the newest allocation yet.
    #[error("stale epoch: the newest allocation epoch is {newest}")]
    StaleEpoch {
        /// The newest committed allocation epoch.
        newest: u64,
    },
    /// The node is marked down (it will be marked up) or about to be.
    #[error("the node is marked down; it gets a lease once marked up again")]
    Down,
    /// The node is not a member of the cluster.
    #[error("not a member of the cluster")]
    NotMember,
    /// The leader could not confirm its leadership (the quorum round, or the wait for its
    /// state to be applied up to the read index) within the renew period; the node asks again.
    #[error("the leader could not confirm its leadership within {after:?}; retry")]
    TimedOut {
        /// How long the leader tried: its renew period.
        after: Duration,
    },
    /// The leader answers as many renewals as it admits at once already; the node asks again
    /// after a renew period.
    #[error("the leader answers {in_flight_max} renewals already; retry after a renew period")]
    Overloaded {
        /// How many renewals the leader answers at once.
        in_flight_max: usize,
    },
}

/// How many recent requests a holder remembers the send time of.
const REQUESTS_REMEMBERED: usize = 16;

/// The node side of the lease: when to renew, and until when the node may serve.
#[derive(Debug)]
pub struct LeaseHolder {
    config: LeaseConfig,
    node: NodeId,
    incarnation: u64,
    next_request_id: u64,
    sent: VecDeque<(u64, Instant)>,
    valid_until: Option<Instant>,
}

impl LeaseHolder {
    /// A holder for `node` in the process incarnation `incarnation` (random per process start).
    pub fn new(config: LeaseConfig, node: NodeId, incarnation: u64) -> Self {
        LeaseHolder {
            config,
            node,
            incarnation,
            next_request_id: 0,
            sent: VecDeque::with_capacity(REQUESTS_REMEMBERED),
            valid_until: None,
        }
    }

    /// A renewal request sent at `now` (the `t0` of its lease) for allocation `epoch`.
    pub fn request(&mut self, now: Instant, epoch: u64) -> RenewLease {
        self.next_request_id += 1;
        if self.sent.len() == REQUESTS_REMEMBERED {
            self.sent.pop_front();
        }
        self.sent.push_back((self.next_request_id, now));
        RenewLease {
            node: self.node,
            epoch,
            incarnation: self.incarnation,
            request_id: self.next_request_id,
        }
    }

    /// Takes a grant; returns the new end of the lease, or `None` when the grant is ignored
    /// (another incarnation's, or for a request this holder no longer remembers).
    pub fn on_grant(&mut self, grant: &LeaseGrant) -> Option<Instant> {
        if grant.incarnation != self.incarnation {
            return None;
        }
        let t0 = self.sent.iter().find(|(id, _)| *id == grant.request_id)?.1;
        let until = t0 + self.config.lease;
        self.valid_until = Some(self.valid_until.map_or(until, |current| current.max(until)));
        self.valid_until
    }

    /// Until when the node may serve, if it holds a lease.
    #[cfg(test)]
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// Whether the lease is valid at `now`.
    #[cfg(test)]
    pub fn is_valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }
}

/// What the leader does with a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Grant it.
    Grant(LeaseGrant),
    /// Refuse it.
    Refuse(LeaseRefusal),
    /// Refuse it, and propose `MarkUp` for the node (it is marked down but alive).
    RefuseAndMarkUp,
}

/// The leader side: grants, and when a silent node's shards may be taken.
///
/// Made anew whenever this node becomes leader (its memory of grants is per term).
#[derive(Debug)]
pub struct LeaseGranter {
    config: LeaseConfig,
    me: NodeId,
    /// Where the markdown wait of the previous leader (without a grant from this leader) starts:
    /// the receipt rule's evidence, or the election.
    leader_since: Instant,
    /// When this leader noticed its election: where every other member's wait starts.
    elected: Instant,
    /// The leader this one replaces, when known: the only member the receipt rule applies to.
    previous_leader: Option<NodeId>,
    /// The previous leader's grace after the election when it answered nothing of this leader
    /// ([`LeaseConfig::renew_grace`] when it did: a leader that stepped down is alive).
    silent_grace: Duration,
    /// When each member last answered this leader (from its network layer).
    answered: BTreeMap<NodeId, Instant>,
    /// Whether this leader can confirm its leadership now: `Lost` after a confirmation round
    /// failed (no quorum), `Regained(t)` once a round begun at `t` succeeded again. Members cannot
    /// renew while it is lost, so none is blamed for that.
    quorum: Quorum,
    last_grant: BTreeMap<NodeId, Instant>,
    markdown_proposed: BTreeSet<NodeId>,
    markup_proposed: BTreeSet<NodeId>,
    /// The members that were down in the last applied state seen.
    known_down: BTreeSet<NodeId>,
    /// The members seen so far; a new one gets a full wait to take its first lease.
    known: BTreeSet<NodeId>,
}

/// Whether a leader could confirm its leadership lately (see [`LeaseGranter::round_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quorum {
    /// No confirmation round failed, or members had time to renew since one succeeded again.
    Held,
    /// The last confirmation round failed.
    Lost,
    /// A round begun at this time succeeded after a failure.
    Regained(Instant),
}

impl LeaseGranter {
    /// A granter for leader `me`, elected at `leader_since` (its own clock).
    #[cfg(test)]
    pub fn new(config: LeaseConfig, me: NodeId, leader_since: Instant) -> Self {
        Self::with_evidence(config, me, leader_since, leader_since, None, Duration::ZERO)
    }

    /// A granter for leader `me`, elected at `elected`, whose voters last heard from an earlier
    /// leader at `last_contact` (the receipt rule; never after `elected`), that leader being
    /// `previous_leader` when known. Only the previous leader's wait starts at `last_contact`, and
    /// it is not marked down before a grace after the election: [`LeaseConfig::renew_grace`] if
    /// it answered this leader ([`LeaseGranter::answered`]), `silent_grace` if not. Every other
    /// member's wait starts at the election.
    pub fn with_evidence(
        config: LeaseConfig,
        me: NodeId,
        elected: Instant,
        last_contact: Instant,
        previous_leader: Option<NodeId>,
        silent_grace: Duration,
    ) -> Self {
        LeaseGranter {
            config,
            me,
            leader_since: last_contact.min(elected),
            elected,
            previous_leader,
            silent_grace,
            answered: BTreeMap::new(),
            quorum: Quorum::Held,
            last_grant: BTreeMap::new(),
            markdown_proposed: BTreeSet::new(),
            markup_proposed: BTreeSet::new(),
            known_down: BTreeSet::new(),
            known: BTreeSet::new(),
        }
    }

    /// Member `node` answered a vote or append request of this leader at `at`: it is alive, so it
    /// gets the longer grace to renew (answers from before the voters' last contact with an
    /// earlier leader do not count).
    pub fn answered(&mut self, node: NodeId, at: Instant) {
        if at >= self.leader_since {
            let last = self.answered.entry(node).or_insert(at);
            *last = (*last).max(at);
        }
    }

    /// Decides a renewal. Call it only after `ensure_linearizable` succeeded for a round that
    /// began after the request arrived, with the state applied up to its read index.
    pub fn decide(&mut self, request: &RenewLease, state: &ClusterState, now: Instant) -> Decision {
        let Some(member) = state.members.get(&request.node) else {
            return Decision::Refuse(LeaseRefusal::NotMember);
        };
        if request.epoch != state.epoch {
            return Decision::Refuse(LeaseRefusal::StaleEpoch {
                newest: state.epoch,
            });
        }
        if member.down {
            if self.markup_proposed.insert(request.node) {
                return Decision::RefuseAndMarkUp;
            }
            return Decision::Refuse(LeaseRefusal::Down);
        }
        // A MarkDown this leader proposed may still commit: granting now would let the node
        // serve while its successor does.
        if self.markdown_proposed.contains(&request.node) {
            return Decision::Refuse(LeaseRefusal::Down);
        }
        self.last_grant.insert(request.node, now);
        Decision::Grant(LeaseGrant {
            request_id: request.request_id,
            incarnation: request.incarnation,
            epoch: request.epoch,
        })
    }

    /// Restarts every member's wait from `now`: this leader could not hear from anyone until
    /// now (its process was paused or starved), so their silence is its own. Renewals they sent
    /// meanwhile may still wait in its sockets; a markdown now would move the shards of healthy
    /// nodes, whose state would be lost. Marking down later never lets two nodes serve a shard.
    pub fn restart_waits(&mut self, state: &ClusterState, now: Instant) {
        for id in state.members.keys() {
            let last = self.last_grant.entry(*id).or_insert(now);
            *last = (*last).max(now);
        }
    }

    /// A confirmation round of this leader failed (no quorum answered in time): members could
    /// not renew, so no member is marked down until rounds succeed again and members had
    /// [`LeaseConfig::renew_grace`] to renew.
    pub fn round_failed(&mut self) {
        self.quorum = Quorum::Lost;
    }

    /// A confirmation round of this leader, begun at `started`, succeeded.
    pub fn round_confirmed(&mut self, started: Instant) {
        if self.quorum == Quorum::Lost {
            self.quorum = Quorum::Regained(started);
        }
    }

    /// Members whose leases have certainly expired by `now`: mark them down. Each is returned
    /// once; the leader grants them nothing more until they are marked up.
    pub fn markdowns_due(&mut self, state: &ClusterState, now: Instant) -> Vec<NodeId> {
        let wait = self.config.markdown_wait();
        if now < self.leader_since + wait {
            return Vec::new();
        }
        match self.quorum {
            Quorum::Held => {}
            Quorum::Lost => return Vec::new(),
            Quorum::Regained(at) if now < at + self.config.renew_grace() => return Vec::new(),
            Quorum::Regained(_) => self.quorum = Quorum::Held,
        }
        let mut due = Vec::new();
        for (id, member) in &state.members {
            if *id == self.me || member.down || self.markdown_proposed.contains(id) {
                continue;
            }
            let last = match self.last_grant.get(id) {
                Some(granted) => *granted,
                // The leader this one replaced: its leases ended by the receipt rule's wait; it
                // still gets a moment after the election to answer (a leader that stepped down,
                // or one paused just past the election timeout, is alive).
                None if self.previous_leader == Some(*id) => {
                    let grace = if self.answered.contains_key(id) {
                        self.config.renew_grace()
                    } else {
                        self.silent_grace
                    };
                    if now < self.elected + grace {
                        continue;
                    }
                    self.leader_since
                }
                // Any other member was live as far as anyone knows (a follower paused briefly
                // around the election, or cut off from a leader without a quorum): the full
                // wait from the election to renew with this leader.
                None => self.elected,
            };
            if now >= last + wait {
                self.markdown_proposed.insert(*id);
                due.push(*id);
            }
        }
        due
    }

    /// Updates after applying a state: a node marked up counts as just granted (its old lease is
    /// long gone); a node marked down is no longer pending.
    pub fn on_applied(&mut self, state: &ClusterState, now: Instant) {
        let first_look = self.known.is_empty();
        for (id, member) in &state.members {
            if self.known.insert(*id) && !first_look {
                // A node that just joined: it has not had a chance to take a lease yet.
                self.last_grant.insert(*id, now);
            }
            if member.down {
                self.markdown_proposed.remove(id);
                self.known_down.insert(*id);
            } else {
                self.markup_proposed.remove(id);
                if self.known_down.remove(id) {
                    // Marked up (by this leader or an earlier one): give it a full wait to renew.
                    self.last_grant.insert(*id, now);
                }
            }
        }
        self.markdown_proposed
            .retain(|id| state.members.contains_key(id));
        self.known_down.retain(|id| state.members.contains_key(id));
        self.known.retain(|id| state.members.contains_key(id));
    }

    /// Forgets a proposal that failed to commit, so it can be proposed again.
    pub fn proposal_failed(&mut self, node: NodeId, markdown: bool) {
        if markdown {
            self.markdown_proposed.remove(&node);
        } else {
            self.markup_proposed.remove(&node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_profile_is_valid_with_its_consensus_timing() {
        let consensus = crate::ConsensusConfig::fast();
        assert_eq!(
            LeaseConfig::fast()
                .validate(consensus.election_timeout_max, consensus.heartbeat_interval),
            Ok(())
        );
        assert!(consensus.raft_config("test").is_ok());
        assert!(LeaseConfig::fast().markdown_wait() < LeaseConfig::default().markdown_wait());
    }
    use crate::consensus::{Command, NodeInfo};

    fn state() -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        let nodes: Vec<(u64, NodeInfo)> = (1..=3).map(|i| (i, NodeInfo::default())).collect();
        state.apply_membership(nodes.iter().map(|(i, n)| (*i, n)), [1, 2, 3]);
        state
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lease_runs_from_the_request_not_from_the_grant() {
        let base = Instant::now();
        let mut holder = LeaseHolder::new(LeaseConfig::default(), 2, 7);
        let request = holder.request(base, 1);
        assert!(!holder.is_valid(base));
        let grant = LeaseGrant {
            request_id: request.request_id,
            incarnation: 7,
            epoch: 1,
        };
        assert_eq!(holder.on_grant(&grant), Some(base + ms(500)));
        assert!(holder.is_valid(base + ms(499)));
        assert!(!holder.is_valid(base + ms(500)));
    }

    #[test]
    fn grants_for_another_incarnation_or_unknown_requests_are_ignored() {
        let base = Instant::now();
        let mut holder = LeaseHolder::new(LeaseConfig::default(), 2, 7);
        let request = holder.request(base, 1);
        assert_eq!(
            holder.on_grant(&LeaseGrant {
                request_id: request.request_id,
                incarnation: 6,
                epoch: 1
            }),
            None
        );
        assert_eq!(
            holder.on_grant(&LeaseGrant {
                request_id: 999,
                incarnation: 7,
                epoch: 1
            }),
            None
        );
        assert!(!holder.is_valid(base));
    }

    #[test]
    fn an_older_grant_never_shortens_the_lease() {
        let base = Instant::now();
        let mut holder = LeaseHolder::new(LeaseConfig::default(), 2, 7);
        let first = holder.request(base, 1);
        let second = holder.request(base + ms(100), 1);
        holder.on_grant(&LeaseGrant {
            request_id: second.request_id,
            incarnation: 7,
            epoch: 1,
        });
        holder.on_grant(&LeaseGrant {
            request_id: first.request_id,
            incarnation: 7,
            epoch: 1,
        });
        assert_eq!(holder.valid_until(), Some(base + ms(600)));
    }

    #[test]
    fn stale_epochs_and_strangers_are_refused() {
        let state = state();
        let now = Instant::now();
        let mut granter = LeaseGranter::new(LeaseConfig::default(), 1, now);
        let stale = RenewLease {
            node: 2,
            epoch: state.epoch - 1,
            incarnation: 1,
            request_id: 1,
        };
        assert_eq!(
            granter.decide(&stale, &state, now),
            Decision::Refuse(LeaseRefusal::StaleEpoch {
                newest: state.epoch
            })
        );
        let stranger = RenewLease {
            node: 9,
            epoch: state.epoch,
            incarnation: 1,
            request_id: 1,
        };
        assert_eq!(
            granter.decide(&stranger, &state, now),
            Decision::Refuse(LeaseRefusal::NotMember)
        );
    }

    #[test]
    fn a_new_leader_waits_the_drift_adjusted_lease_before_marking_anyone_down() {
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        assert!(
            wait > config.lease.mul_f64(1.1),
            "L(1+ρ)/(1−ρ) exceeds L(1+2ρ)"
        );
        let elected = Instant::now();
        let mut granter = LeaseGranter::new(config, 1, elected);
        assert!(granter
            .markdowns_due(&state, elected + wait - ms(1))
            .is_empty());
        assert_eq!(
            granter.markdowns_due(&state, elected + wait),
            vec![2, 3],
            "never itself"
        );
        assert!(
            granter.markdowns_due(&state, elected + wait * 2).is_empty(),
            "each once"
        );
    }

    #[test]
    fn with_the_receipt_rule_the_previous_leader_is_marked_down_a_wait_after_the_voters_last_contact(
    ) {
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let contact = Instant::now();
        // Elected 300 ms after its voters last heard from the old leader, node 3.
        let elected = contact + ms(300);
        let mut granter =
            LeaseGranter::with_evidence(config.clone(), 1, elected, contact, Some(3), ms(100));
        assert!(granter
            .markdowns_due(&state, contact + wait - ms(1))
            .is_empty());
        assert_eq!(
            granter.markdowns_due(&state, contact + wait),
            vec![3],
            "the old leader's wait starts at the contact, not at the election"
        );
        // Evidence after the election is not believed: the wait never starts later than the
        // old rule's and never after the election.
        let mut granter =
            LeaseGranter::with_evidence(config, 1, elected, elected + ms(100), Some(3), ms(100));
        assert_eq!(granter.markdowns_due(&state, elected + wait), vec![2, 3]);
    }

    #[test]
    fn a_silent_member_other_than_the_previous_leader_gets_the_full_wait_from_the_election() {
        // Regression (issue 15's attack review): a follower paused for 120 ms around the
        // election had answered nothing of the new leader and lost its shards 60 ms after the
        // election, with every value on them.
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let contact = Instant::now();
        let elected = contact + ms(300);
        let mut granter =
            LeaseGranter::with_evidence(config, 1, elected, contact, Some(3), ms(100));
        assert_eq!(granter.markdowns_due(&state, contact + wait), vec![3]);
        assert!(
            granter
                .markdowns_due(&state, elected + wait - ms(1))
                .is_empty(),
            "node 2 (silent, not the old leader) keeps the wait from the election"
        );
        assert_eq!(granter.markdowns_due(&state, elected + wait), vec![2]);
        // Without knowing the previous leader, nobody's wait is shortened.
        let mut unknown =
            LeaseGranter::with_evidence(LeaseConfig::default(), 1, elected, contact, None, ms(100));
        assert!(unknown
            .markdowns_due(&state, elected + wait - ms(1))
            .is_empty());
        assert_eq!(unknown.markdowns_due(&state, elected + wait), vec![2, 3]);
    }

    #[test]
    fn a_leader_without_a_quorum_marks_nobody_down_until_members_could_renew_again() {
        // Regression (issue 15's attack review): with the old leader dead and two of five
        // followers frozen, the new leader's rounds failed, the live followers could not renew,
        // and it proposed marking all of them down (committed once the frozen ones resumed).
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let grace = config.renew_grace();
        let elected = Instant::now();
        let mut granter =
            LeaseGranter::with_evidence(config, 1, elected, elected, Some(3), ms(100));
        granter.round_failed();
        assert!(granter.markdowns_due(&state, elected + wait * 4).is_empty());
        let regained = elected + wait * 4;
        granter.round_confirmed(regained);
        assert!(granter
            .markdowns_due(&state, regained + grace - ms(1))
            .is_empty());
        // Node 2 renewed once rounds succeeded again; node 3 (dead) did not.
        let request = RenewLease {
            node: 2,
            epoch: state.epoch,
            incarnation: 1,
            request_id: 1,
        };
        assert!(matches!(
            granter.decide(&request, &state, regained + ms(10)),
            Decision::Grant(_)
        ));
        assert_eq!(granter.markdowns_due(&state, regained + grace), vec![3]);
    }

    #[test]
    fn a_previous_leader_that_answered_gets_a_renew_grace_after_the_election() {
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let grace = config.renew_grace();
        let silent_grace = ms(100);
        let contact = Instant::now();
        // The voters' last contact is so old that the wait from it ended before the election.
        let elected = contact + wait + ms(50);
        let mut granter =
            LeaseGranter::with_evidence(config, 1, elected, contact, Some(3), silent_grace);
        assert!(
            granter.markdowns_due(&state, elected).is_empty(),
            "no member is marked down before the answer to the first heartbeat could arrive"
        );
        // The old leader answered this leader (it stepped down, or was paused): it is alive.
        granter.answered(3, elected + ms(5));
        assert!(granter
            .markdowns_due(&state, elected + grace - ms(1))
            .is_empty());
        assert_eq!(
            granter.markdowns_due(&state, elected + grace),
            vec![3],
            "the old leader, alive but not renewing, once its grace is over"
        );
    }

    #[test]
    fn a_previous_leader_that_never_answered_gets_only_the_silent_grace() {
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let silent_grace = ms(100);
        let contact = Instant::now();
        let elected = contact + wait + ms(50);
        let mut granter =
            LeaseGranter::with_evidence(config, 1, elected, contact, Some(3), silent_grace);
        // Node 3 (the dead old leader) answered nothing, or before the voters' last contact
        // with it, which does not count.
        granter.answered(3, contact - ms(1));
        assert!(granter
            .markdowns_due(&state, elected + silent_grace - ms(1))
            .is_empty());
        assert_eq!(
            granter.markdowns_due(&state, elected + silent_grace),
            vec![3]
        );
    }

    #[test]
    fn a_granted_node_is_marked_down_only_a_full_wait_after_its_last_grant() {
        let state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let elected = Instant::now();
        let mut granter = LeaseGranter::new(config, 1, elected);
        let granted_at = elected + wait;
        let request = RenewLease {
            node: 2,
            epoch: state.epoch,
            incarnation: 1,
            request_id: 1,
        };
        assert!(matches!(
            granter.decide(&request, &state, granted_at),
            Decision::Grant(_)
        ));
        assert_eq!(granter.markdowns_due(&state, granted_at + ms(1)), vec![3]);
        assert!(granter
            .markdowns_due(&state, granted_at + wait - ms(1))
            .is_empty());
        assert_eq!(granter.markdowns_due(&state, granted_at + wait), vec![2]);
        // Once proposed, the node gets no grant until it is marked up.
        assert_eq!(
            granter.decide(&request, &state, granted_at + wait),
            Decision::Refuse(LeaseRefusal::Down)
        );
    }

    #[test]
    fn a_down_node_that_renews_is_marked_up_once_and_then_granted() {
        let mut state = state();
        state.apply(&Command::MarkDown { node: 3 });
        let now = Instant::now();
        let mut granter = LeaseGranter::new(LeaseConfig::default(), 1, now);
        granter.on_applied(&state, now);
        let request = RenewLease {
            node: 3,
            epoch: state.epoch,
            incarnation: 1,
            request_id: 1,
        };
        assert_eq!(
            granter.decide(&request, &state, now),
            Decision::RefuseAndMarkUp
        );
        assert_eq!(
            granter.decide(&request, &state, now),
            Decision::Refuse(LeaseRefusal::Down)
        );
        state.apply(&Command::MarkUp { node: 3 });
        let wait = LeaseConfig::default().markdown_wait();
        let marked_up_at = now + wait * 3;
        granter.on_applied(&state, marked_up_at);
        assert!(
            granter
                .markdowns_due(&state, marked_up_at + wait - ms(1))
                .iter()
                .all(|n| *n != 3),
            "a node just marked up gets a full wait to renew"
        );
        let request = RenewLease {
            epoch: state.epoch,
            ..request
        };
        assert!(matches!(
            granter.decide(&request, &state, marked_up_at),
            Decision::Grant(_)
        ));
    }

    #[test]
    fn a_member_that_joins_later_gets_a_full_wait_to_take_its_first_lease() {
        let mut state = state();
        let config = LeaseConfig::default();
        let wait = config.markdown_wait();
        let elected = Instant::now();
        let mut granter = LeaseGranter::new(config, 1, elected);
        granter.on_applied(&state, elected);
        let joined_at = elected + wait * 4;
        let four: Vec<(u64, NodeInfo)> = (1..=4).map(|i| (i, NodeInfo::default())).collect();
        state.apply_membership(four.iter().map(|(i, n)| (*i, n)), [1, 2, 3]);
        granter.on_applied(&state, joined_at);
        let due = granter.markdowns_due(&state, joined_at + wait - ms(1));
        assert!(
            !due.contains(&4),
            "the new node is not marked down before it could renew: {due:?}"
        );
        assert!(granter.markdowns_due(&state, joined_at + wait).contains(&4));
    }

    #[test]
    fn a_leader_resumed_from_a_pause_gives_every_member_a_full_wait() {
        let state = state();
        let wait = LeaseConfig::default().markdown_wait();
        let start = Instant::now();
        let mut granter = LeaseGranter::new(LeaseConfig::default(), 1, start);
        granter.on_applied(&state, start);
        // Both followers renew, then the leader is paused for longer than the wait.
        for node in [2, 3] {
            let request = RenewLease {
                node,
                epoch: state.epoch,
                incarnation: 1,
                request_id: 1,
            };
            assert!(matches!(
                granter.decide(&request, &state, start + ms(10)),
                Decision::Grant(_)
            ));
        }
        let resumed = start + ms(10) + wait + ms(200);
        granter.restart_waits(&state, resumed);
        assert!(
            granter.markdowns_due(&state, resumed).is_empty(),
            "members are marked down for the leader's own pause"
        );
        assert!(granter
            .markdowns_due(&state, resumed + wait - ms(1))
            .is_empty());
        // A member that still does not renew goes down a full wait after the resume.
        assert_eq!(granter.markdowns_due(&state, resumed + wait), vec![2, 3]);
    }

    #[test]
    fn validation_rejects_relations_that_break_the_protocol() {
        let (election, heartbeat) = (ms(300), ms(50));
        assert!(LeaseConfig::default().validate(election, heartbeat).is_ok());
        let short = LeaseConfig {
            lease: ms(200),
            ..Default::default()
        };
        assert!(short.validate(election, heartbeat).is_err());
        let slow_renewal = LeaseConfig {
            renew_period: ms(300),
            ..Default::default()
        };
        assert!(slow_renewal.validate(election, heartbeat).is_err());
        let drifty = LeaseConfig {
            clock_drift_max: 0.6,
            ..Default::default()
        };
        assert!(drifty.validate(election, heartbeat).is_err());
        // A renewal must have time for two confirmation rounds of one heartbeat each.
        assert!(LeaseConfig::default().validate(election, ms(100)).is_err());
    }
}
