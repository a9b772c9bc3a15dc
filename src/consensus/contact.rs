//! The evidence of the receipt rule (issue 15; `tests/model`, variant `amended_receipt`): when
//! this process last heard from a leader, and, per election it runs, the latest such time over
//! every voter that granted it its vote.
//!
//! Every lease grant needs a confirmation round acknowledged by a quorum, so a quorum heard
//! from the granting leader at or after each grant's request. A new leader's voters intersect
//! that quorum, so the latest receipt over every voter that granted the vote bounds the old
//! leader's last grant: the new leader's wait of `L·(1+ρ)/(1−ρ)` before it may take a silent
//! node's shards can start there instead of at its election. Conditions the model checks, each
//! of which breaks safety when dropped:
//! - a voter records a receipt before raft sees the append, and a leader records its own sends;
//! - a process starts with its own start as its last receipt (a restarted voter knows nothing
//!   of what it heard before);
//! - the new leader takes the **latest** receipt over every granting voter, itself included,
//!   never the earliest or its own alone;
//! - a voter's elapsed time is subtracted as measured from the grant's arrival on the new
//!   leader's clock (the clocks' errors cancel; crediting more fails).
//!
//! This file owns the bookkeeping and the rule; the network and the service call it.

use std::collections::BTreeMap;

use crate::shard_map::NodeId;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Receipts from leaders, and the evidence of the elections this node runs.
#[derive(Debug)]
pub struct Contact {
    /// When this process started: the receipt it reports before it heard from any leader.
    started: Instant,
    /// The latest receipt of an append from a leader, or send of one as leader, and that
    /// leader.
    last: Mutex<(Instant, Option<NodeId>)>,
    /// Per term this node campaigned in: the latest receipt over itself and every voter that
    /// granted its vote, on this node's clock, and the leader this node last heard from before
    /// it campaigned (the one a win replaces).
    elections: Mutex<BTreeMap<u64, (Instant, Option<NodeId>)>>,
    /// When each peer last answered a vote or append request of this node: a live peer, which a
    /// new leader gives time to renew (not part of the rule's safety, only of availability).
    answers: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Default for Contact {
    fn default() -> Self {
        Self::started_at(Instant::now())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Contact {
    fn started_at(started: Instant) -> Self {
        Contact {
            started,
            last: Mutex::new((started, None)),
            elections: Mutex::new(BTreeMap::new()),
            answers: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records an append received from `leader` (call before raft sees it), or sent as leader
    /// (`leader` is this node).
    pub fn heard_from_leader(&self, leader: NodeId) {
        let now = Instant::now();
        let mut last = lock(&self.last);
        if now >= last.0 {
            *last = (now, Some(leader));
        }
    }

    /// The time since the last receipt (or since this process started), rounded down to whole
    /// microseconds: what a voter reports with a granted vote.
    pub fn since_last(&self) -> Duration {
        let elapsed = lock(&self.last).0.elapsed();
        Duration::from_micros(elapsed.as_micros().try_into().unwrap_or(u64::MAX))
    }

    /// This node starts campaigning in `term`: its own receipt counts among the voters'.
    pub fn campaigning(&self, term: u64) {
        let (own, leader) = *lock(&self.last);
        let mut elections = lock(&self.elections);
        let entry = elections.entry(term).or_insert((own, leader));
        if own >= entry.0 {
            *entry = (own, leader);
        }
        // Older campaigns can no longer make this node leader.
        elections.retain(|t, _| *t + 8 > term);
    }

    /// A voter granted this node its vote in `term`, reporting `elapsed` since its last receipt;
    /// the grant arrived at `arrived` on this node's clock.
    pub fn granted(&self, term: u64, arrived: Instant, elapsed: Duration) {
        let receipt = arrived.checked_sub(elapsed).unwrap_or(self.started);
        let mut elections = lock(&self.elections);
        let entry = elections.entry(term).or_insert((receipt, None));
        entry.0 = entry.0.max(receipt);
    }

    /// Peer `node` answered a vote or append request of this node just now.
    pub fn answered(&self, node: NodeId) {
        lock(&self.answers).insert(node, Instant::now());
    }

    /// When peer `node` last answered a vote or append request of this node, if ever.
    pub fn last_answer(&self, node: NodeId) -> Option<Instant> {
        lock(&self.answers).get(&node).copied()
    }

    /// Where the wait of a leader elected in `term`, that noticed its leadership at
    /// `elected`, starts: the latest receipt over the voters that granted it, never later than
    /// `elected`; `elected` when there is no evidence (a single-node cluster).
    pub fn wait_from(&self, term: u64, elected: Instant) -> Instant {
        wait_from(lock(&self.elections).get(&term).map(|e| e.0), elected)
    }

    /// The leader this node last heard from before it campaigned in `term`: the one a win in
    /// `term` replaces, whose silence the receipt rule may credit. `None` when it heard from no
    /// leader (a fresh process), or heard last from itself.
    pub fn previous_leader(&self, term: u64, me: NodeId) -> Option<NodeId> {
        lock(&self.elections)
            .get(&term)
            .and_then(|e| e.1)
            .filter(|leader| *leader != me)
    }
}

/// The rule: `min(elected, latest receipt)`, or `elected` without evidence.
fn wait_from(latest_receipt: Option<Instant>, elected: Instant) -> Instant {
    latest_receipt.map_or(elected, |receipt| receipt.min(elected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_wait_starts_from_the_latest_receipt_over_granting_voters_never_the_earliest() {
        let now = Instant::now();
        // A process that started a second ago and never heard from a leader.
        let contact = Contact::started_at(now - ms(1000));
        contact.campaigning(5);
        // Voter A heard from the old leader 400 ms before its grant arrived, voter B 40 ms.
        contact.granted(5, now, ms(400));
        contact.granted(5, now, ms(40));
        let elected = now + ms(10);
        let from = contact.wait_from(5, elected);
        // The candidate's own receipt is its start, a second ago: B's receipt, the latest,
        // decides.
        assert_eq!(from, now - ms(40));
        assert!(
            from > now - ms(400),
            "the earliest receipt would start the wait too early"
        );
    }

    #[test]
    fn the_candidates_own_receipt_counts() {
        let contact = Contact::default();
        let now = Instant::now();
        contact.heard_from_leader(9);
        let own = lock(&contact.last).0;
        contact.campaigning(3);
        contact.granted(3, now, ms(500));
        assert_eq!(contact.wait_from(3, now + ms(5)), own.min(now + ms(5)));
    }

    #[test]
    fn a_restarted_voter_reports_its_own_start() {
        // A fresh process has heard from nobody: its report is the time since it started.
        let contact = Contact::default();
        let reported = contact.since_last();
        assert!(reported <= contact.started.elapsed());
        std::thread::sleep(ms(2));
        assert!(
            contact.since_last() >= ms(2),
            "the start is its receipt until it hears more"
        );
    }

    #[test]
    fn without_evidence_or_with_only_later_receipts_the_wait_starts_at_the_election() {
        let contact = Contact::default();
        let elected = Instant::now();
        assert_eq!(contact.wait_from(7, elected), elected);
        contact.granted(7, elected + ms(50), Duration::ZERO);
        assert_eq!(contact.wait_from(7, elected), elected);
    }

    #[test]
    fn a_leader_counts_its_own_sends_as_receipts() {
        let contact = Contact::default();
        let before = lock(&contact.last).0;
        std::thread::sleep(ms(1));
        contact.heard_from_leader(9);
        assert!(lock(&contact.last).0 > before);
    }

    #[test]
    fn the_previous_leader_is_the_last_one_heard_from_before_campaigning_never_oneself() {
        let contact = Contact::default();
        contact.campaigning(2);
        assert_eq!(contact.previous_leader(2, 1), None, "heard from no leader");
        contact.heard_from_leader(3);
        contact.heard_from_leader(4);
        contact.campaigning(5);
        assert_eq!(contact.previous_leader(5, 1), Some(4));
        // Hearing from a leader after campaigning does not change whom a win replaces.
        contact.heard_from_leader(6);
        contact.granted(5, Instant::now(), Duration::ZERO);
        assert_eq!(contact.previous_leader(5, 1), Some(4));
        // A node that led last (its own sends) replaces nobody it could mark down early.
        contact.heard_from_leader(1);
        contact.campaigning(7);
        assert_eq!(contact.previous_leader(7, 1), None);
    }
}
