//! The ledger's transitions one by one, and a property test that drives three nodes' ledgers
//! through random planned moves, cancels, re-targets, lost sends, slow deactivations and
//! lagging map views, checking that a shard's state is never dropped or duplicated and that at
//! most one node may serve it.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn snap(value: u64) -> Option<Handoff> {
    Some(Handoff::from_bytes(value.to_le_bytes().to_vec()))
}

fn value_of(snapshot: &Option<Handoff>) -> u64 {
    snapshot.as_ref().map_or(0, |h| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(h.as_bytes());
        u64::from_le_bytes(bytes)
    })
}

const OWNED: ShardView = ShardView {
    owned: true,
    leaving: false,
    coming: false,
    epoch: 5,
};

#[test]
fn a_request_starts_an_actor_with_the_parked_snapshot() {
    let mut ledger = ShardLedger::<&str>::default();
    assert!(ledger.received(3, snap(7)));
    assert_eq!(
        ledger.request(true, 1, || "actor"),
        Intake::Start { restore: snap(7) }
    );
    assert_eq!(ledger.running(), Some(&"actor"));
}

#[test]
fn a_passivated_shard_starts_an_actor_that_reloads_on_the_next_request() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    assert_eq!(
        ledger.passivate(2),
        None,
        "only the running actor passivates"
    );
    assert_eq!(ledger.passivate(1), Some("actor"));
    assert_eq!(
        ledger.request(true, 2, || "next"),
        Intake::Elsewhere,
        "requests wait while the actor commits and stops"
    );
    assert!(
        !ledger.passivated(2, true),
        "another actor's report changes nothing"
    );
    assert!(ledger.passivated(1, true));
    assert_eq!(ledger.place(), &Place::Passivated);
    assert_eq!(
        ledger.request(true, 2, || "next"),
        Intake::Start { restore: None }
    );
    assert_eq!(ledger.running(), Some(&"next"));
}

#[test]
fn an_actor_that_declines_to_passivate_keeps_running() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    ledger.passivate(1);
    assert!(ledger.passivated(1, false));
    assert_eq!(ledger.running(), Some(&"actor"));
}

#[test]
fn a_shard_with_nothing_in_memory_wakes_an_actor_to_hand_over_its_stored_state() {
    // After a restart, or once passivated, a node-local store may hold the shard's state.
    for mut ledger in [ShardLedger::<&str>::default(), {
        let mut passivated = ShardLedger::<&str>::default();
        passivated.request(true, 1, || "actor");
        passivated.passivate(1);
        passivated.passivated(1, true);
        passivated
    }] {
        assert_eq!(
            ledger.begin_move_waking(9, 4, Some((7, || "woken"))),
            MoveStep::Retire("woken")
        );
        assert_eq!(ledger.begin_move(9, 4), MoveStep::Wait, "still retiring");
        assert!(ledger.retired(7, snap(3), 4));
        assert_eq!(ledger.begin_move(9, 4), MoveStep::Send(snap(3)));
    }
    // Without a store to read, nothing is woken: the shard goes on empty, as before.
    let mut ledger = ShardLedger::<&str>::default();
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Send(None));
}

#[test]
fn a_woken_actor_that_cannot_load_the_stored_state_lets_the_move_try_again() {
    let mut ledger = ShardLedger::<&str>::default();
    assert_eq!(
        ledger.begin_move_waking(9, 4, Some((7, || "woken"))),
        MoveStep::Retire("woken")
    );
    assert!(
        !ledger.retire_failed(8),
        "another actor's failure changes nothing"
    );
    assert!(ledger.retire_failed(7));
    assert_eq!(
        ledger.place(),
        &Place::Absent,
        "nothing sent, nothing released"
    );
    assert_eq!(
        ledger.begin_move_waking(9, 4, Some((8, || "again"))),
        MoveStep::Retire("again")
    );
}

#[test]
fn a_passivating_shard_moves_only_once_its_actor_stopped() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    ledger.passivate(1);
    assert_eq!(
        ledger.begin_move_waking(9, 4, Some((2, || "woken"))),
        MoveStep::Wait
    );
    ledger.passivated(1, true);
    assert_eq!(
        ledger.begin_move_waking(9, 4, Some((2, || "woken"))),
        MoveStep::Retire("woken")
    );
}

#[test]
fn no_actor_starts_while_the_node_does_not_serve_the_shard() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(3, snap(7));
    assert_eq!(ledger.request(false, 1, || "actor"), Intake::NotServing);
    assert_eq!(
        ledger.place(),
        &Place::Parked {
            snapshot: snap(7),
            epoch: 3
        },
        "the snapshot stays parked"
    );
}

#[test]
fn a_parked_snapshot_that_was_never_read_moves_on() {
    // Cause 1 of the lost values: a shard received by handoff and handed on before any request.
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(3, snap(7));
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Send(snap(7)));
    ledger.sent(9, 4, Sent::Released);
    assert_eq!(ledger.place(), &Place::Gone { epoch: 4 });
}

#[test]
fn an_older_view_of_a_released_move_sends_nothing_again() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(3, snap(7));
    ledger.begin_move(9, 4);
    ledger.sent(9, 4, Sent::Released);
    let stale = ShardView {
        owned: true,
        leaving: true,
        coming: false,
        epoch: 4,
    };
    assert_eq!(ledger.reconcile(stale), None);
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Wait, "no empty resend");
    let applied = ShardView {
        owned: false,
        leaving: false,
        coming: false,
        epoch: 5,
    };
    ledger.reconcile(applied);
    assert_eq!(ledger.place(), &Place::Absent);
}

#[test]
fn a_running_actor_retires_before_its_state_moves() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Retire("actor"));
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Wait, "still retiring");
    assert_eq!(
        ledger.request(true, 2, || "other"),
        Intake::Elsewhere,
        "requests wait while the state is in the retiring actor"
    );
    assert!(ledger.retired(1, snap(3), 4));
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Send(snap(3)));
}

#[test]
fn a_slow_deactivation_keeps_the_state_for_later() {
    // Cause 3: the snapshot of an actor that retires late still comes back to the ledger.
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    ledger.begin_move(9, 4);
    // The handoff task gave up waiting this round; the actor reports much later.
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Wait);
    assert!(ledger.retired(1, snap(11), 4));
    assert_eq!(ledger.begin_move(9, 4), MoveStep::Send(snap(11)));
}

#[test]
fn a_failed_send_parks_the_snapshot_again() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(2, snap(5));
    ledger.begin_move(9, 4);
    ledger.sent(9, 4, Sent::Failed);
    assert_eq!(
        ledger.place(),
        &Place::Parked {
            snapshot: snap(5),
            epoch: 4
        }
    );
    // Re-targeted: the same snapshot goes to the new target.
    assert_eq!(ledger.begin_move(8, 6), MoveStep::Send(snap(5)));
}

#[test]
fn an_outcome_for_another_send_changes_nothing() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(2, snap(5));
    ledger.begin_move(9, 4);
    ledger.sent(8, 4, Sent::Released);
    ledger.sent(9, 3, Sent::Released);
    assert!(matches!(
        ledger.place(),
        Place::Sending {
            to: 9,
            epoch: 4,
            ..
        }
    ));
}

#[test]
fn a_cancelled_move_restores_the_state_where_it_was() {
    // Cause 2: a request during a cancelled move waits, then starts from the snapshot.
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    ledger.begin_move(9, 4);
    ledger.retired(1, snap(3), 4);
    ledger.begin_move(9, 4);
    // The move is cancelled while the send is under way: the state is not here yet.
    assert_eq!(ledger.reconcile(OWNED), None);
    assert_eq!(ledger.request(true, 2, || "new"), Intake::Elsewhere);
    ledger.sent(9, 4, Sent::Failed);
    assert_eq!(
        ledger.request(true, 2, || "new"),
        Intake::Start { restore: snap(3) }
    );
}

#[test]
fn a_snapshot_is_dropped_once_the_shard_went_elsewhere() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(4, snap(1));
    let coming = ShardView {
        owned: false,
        leaving: false,
        coming: true,
        epoch: 4,
    };
    assert_eq!(ledger.reconcile(coming), None);
    assert!(matches!(ledger.place(), Place::Parked { .. }));
    let ahead = ShardView {
        owned: false,
        leaving: false,
        coming: false,
        epoch: 3,
    };
    ledger.reconcile(ahead);
    assert!(
        matches!(ledger.place(), Place::Parked { .. }),
        "a snapshot ahead of the applied map is kept"
    );
    let retargeted = ShardView {
        owned: false,
        leaving: false,
        coming: false,
        epoch: 5,
    };
    ledger.reconcile(retargeted);
    assert_eq!(ledger.place(), &Place::Absent);
}

#[test]
fn a_late_duplicate_never_replaces_a_running_or_newer_state() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.received(4, snap(1));
    assert!(!ledger.received(3, snap(0)), "an older move's snapshot");
    assert!(
        !ledger.received(4, None),
        "a second snapshot of the same move (from a sender restarted since) is not newer"
    );
    assert_eq!(
        ledger.place(),
        &Place::Parked {
            snapshot: snap(1),
            epoch: 4
        }
    );
    assert!(ledger.received(5, snap(2)), "a later move's snapshot");
    ledger.request(true, 1, || "actor");
    assert!(
        !ledger.received(4, snap(1)),
        "the actor restored it already"
    );
}

#[test]
fn a_shard_lost_without_handoff_stops_its_actor_and_ignores_its_snapshot() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    let lost = ShardView {
        owned: false,
        leaving: false,
        coming: false,
        epoch: 9,
    };
    assert_eq!(ledger.reconcile(lost), Some("actor"));
    assert!(!ledger.retired(1, snap(4), 9));
    assert_eq!(ledger.place(), &Place::Absent);
}

#[test]
fn an_actor_that_vanished_loses_only_its_own_place() {
    let mut ledger = ShardLedger::<&str>::default();
    ledger.request(true, 1, || "actor");
    assert!(!ledger.actor_gone(2));
    assert!(ledger.actor_gone(1));
    assert_eq!(ledger.place(), &Place::Absent);
}

// ---------------------------------------------------------------------------------------------
// Property test: three nodes, one shard, a replicated log of map states that each node applies
// at its own pace, and the handoff protocol as the handoff task and router run it.

const NODES: [NodeId; 3] = [1, 2, 3];

/// One committed cluster state, as far as the shard is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapState {
    owner: NodeId,
    /// (from, to, allocation epoch)
    pending: Option<(NodeId, NodeId, u64)>,
    epoch: u64,
}

impl MapState {
    fn serves(&self, node: NodeId) -> bool {
        self.owner == node && self.pending.is_none()
    }

    fn view(&self, node: NodeId) -> ShardView {
        ShardView {
            owned: self.owner == node,
            coming: self.pending.is_some_and(|(_, to, _)| to == node),
            leaving: self.pending.is_some_and(|(from, _, _)| from == node),
            epoch: self.epoch,
        }
    }
}

/// A simulated shard actor: the restore it started with, and its value once activated.
#[derive(Debug)]
struct Actor {
    value: u64,
}

#[derive(Debug)]
struct Node {
    ledger: ShardLedger<u64>,
    /// The index of the newest state consensus applied: what the handoff task sees.
    applied: usize,
    /// The index of the state in the router's table, installed from `applied` later and
    /// possibly skipping states: what requests and the ledger's reconciliation see.
    table: usize,
    /// Whether it holds a lease. A restarted node gets one only once it applied the newest
    /// committed state (the leader grants leases only for the newest epoch).
    leased: bool,
    /// The index of the state its newest lease was granted for: it serves only while its
    /// table is at least there (rule 4(b)).
    lease_for: usize,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            ledger: ShardLedger::default(),
            applied: 0,
            table: 0,
            leased: true,
            lease_for: 0,
        }
    }
}

#[derive(Debug)]
struct World {
    log: Vec<MapState>,
    nodes: BTreeMap<NodeId, Node>,
    actors: BTreeMap<u64, Actor>,
    next_actor: u64,
    /// Actors asked to retire, with their node.
    retiring: Vec<(NodeId, u64)>,
    /// Snapshots on the wire: (from, to, epoch, snapshot).
    wire: Vec<(NodeId, NodeId, u64, Option<Handoff>)>,
    /// Increments acknowledged to clients.
    acked: u64,
    trace: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Request(usize),
    Apply(usize),
    Install(usize),
    StartMove(usize),
    Cancel,
    Retarget(usize),
    HandoffStep(usize),
    RetireDone(usize),
    Deliver(usize),
    DeliverCommitUnknown(usize),
    Lose(usize),
    /// A node that holds none of the shard's state stops gracefully and starts again: its
    /// ledger is empty and it replays its log from an older point.
    Restart(usize),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (0..3usize).prop_map(Event::Request),
        4 => (0..3usize).prop_map(Event::Apply),
        3 => (0..3usize).prop_map(Event::Install),
        1 => (0..3usize).prop_map(Event::StartMove),
        1 => Just(Event::Cancel),
        1 => (0..3usize).prop_map(Event::Retarget),
        3 => (0..3usize).prop_map(Event::HandoffStep),
        2 => (0..4usize).prop_map(Event::RetireDone),
        2 => (0..4usize).prop_map(Event::Deliver),
        1 => (0..4usize).prop_map(Event::DeliverCommitUnknown),
        1 => (0..4usize).prop_map(Event::Lose),
        1 => (0..3usize).prop_map(Event::Restart),
    ]
}

impl World {
    fn new() -> World {
        World {
            log: vec![MapState {
                owner: 1,
                pending: None,
                epoch: 1,
            }],
            nodes: NODES.iter().map(|id| (*id, Node::default())).collect(),
            actors: BTreeMap::new(),
            next_actor: 1,
            retiring: Vec::new(),
            wire: Vec::new(),
            acked: 0,
            trace: Vec::new(),
        }
    }

    fn committed(&self) -> MapState {
        *self.log.last().expect("the log starts with a state")
    }

    /// The router's table of `node`.
    fn view(&self, node: NodeId) -> MapState {
        self.log[self.nodes[&node].table]
    }

    fn commit(&mut self, state: MapState) {
        self.log.push(state);
    }

    fn apply(&mut self, node: NodeId) {
        let next = self.nodes[&node].applied + 1;
        let n = self.nodes.get_mut(&node).expect("a node of the world");
        if next < self.log.len() {
            n.applied = next;
        }
        if n.applied + 1 == self.log.len() {
            // Caught up: the next renewal is granted, for this state.
            n.leased = true;
            n.lease_for = n.applied;
        }
    }

    /// The router installs the newest applied state as its table (skipping any in between).
    fn install(&mut self, node: NodeId) {
        let n = self.nodes.get_mut(&node).expect("a node of the world");
        if n.table == n.applied {
            return;
        }
        n.table = n.applied;
        let state = self.log[n.table];
        let stopped = n.ledger.reconcile(state.view(node));
        assert!(
            stopped.is_none(),
            "planned moves never stop an actor without handoff: {:?}",
            self.trace
        );
    }

    fn serves(&self, node: NodeId) -> bool {
        let n = &self.nodes[&node];
        n.leased && n.table >= n.lease_for && self.view(node).serves(node)
    }

    fn request(&mut self, node: NodeId) {
        let serves = self.serves(node);
        let n = self.nodes.get_mut(&node).expect("a node of the world");
        if let Some(actor) = n.ledger.running() {
            // The actor checks that its node serves the shard for every message.
            if serves {
                let actor = self.actors.get_mut(actor).expect("a running actor exists");
                actor.value += 1;
                self.acked += 1;
            }
            return;
        }
        let id = self.next_actor;
        if let Intake::Start { restore } = n.ledger.request(serves, id, || id) {
            self.next_actor += 1;
            let value = value_of(&restore);
            assert_eq!(
                value, self.acked,
                "node {node} started the shard from an old or empty state: {:?}",
                self.trace
            );
            self.actors.insert(id, Actor { value: value + 1 });
            self.acked += 1;
        }
    }

    /// The handoff task acts on the applied state; the router goes ahead only once its own
    /// table shows the same move.
    fn handoff_step(&mut self, node: NodeId) {
        let pending = self.log[self.nodes[&node].applied].pending;
        let Some((from, to, epoch)) = pending else {
            return;
        };
        if from != node || self.view(node).pending != pending {
            return;
        }
        let n = self.nodes.get_mut(&node).expect("a node of the world");
        match n.ledger.begin_move(to, epoch) {
            MoveStep::Retire(actor) => self.retiring.push((node, actor)),
            MoveStep::Wait => {}
            MoveStep::Send(snapshot) => self.wire.push((node, to, epoch, snapshot)),
        }
    }

    fn retire_done(&mut self, index: usize) {
        if self.retiring.is_empty() {
            return;
        }
        let (node, actor) = self.retiring.remove(index % self.retiring.len());
        let value = self.actors.remove(&actor).map(|a| a.value).unwrap_or(0);
        let epoch = self.view(node).epoch;
        let n = self.nodes.get_mut(&node).expect("a node of the world");
        n.ledger.retired(actor, snap(value), epoch);
    }

    /// Delivers a snapshot; the sender then proposes the release. With `unknown`, the sender
    /// does not learn that the release committed.
    fn deliver(&mut self, index: usize, unknown: bool) {
        if self.wire.is_empty() {
            return;
        }
        let (from, to, epoch, snapshot) = self.wire.remove(index % self.wire.len());
        self.nodes
            .get_mut(&to)
            .expect("a node of the world")
            .ledger
            .received(epoch, snapshot);
        let committed = self.committed();
        let released = committed.pending == Some((from, to, epoch));
        if released {
            self.commit(MapState {
                owner: to,
                pending: None,
                epoch: committed.epoch + 1,
            });
        }
        let outcome = if released && !unknown {
            Sent::Released
        } else {
            Sent::Failed
        };
        self.nodes
            .get_mut(&from)
            .expect("a node of the world")
            .ledger
            .sent(to, epoch, outcome);
    }

    fn lose(&mut self, index: usize) {
        if self.wire.is_empty() {
            return;
        }
        let (from, to, epoch, _) = self.wire.remove(index % self.wire.len());
        self.nodes
            .get_mut(&from)
            .expect("a node of the world")
            .ledger
            .sent(to, epoch, Sent::Failed);
    }

    fn restart(&mut self, node: NodeId) {
        let n = self.nodes.get_mut(&node).expect("a node of the world");
        if !matches!(n.ledger.place(), Place::Absent | Place::Gone { .. }) {
            return;
        }
        n.ledger = ShardLedger::default();
        n.applied /= 2;
        n.table = n.applied;
        n.leased = false;
    }

    fn run(&mut self, event: Event) {
        self.trace.push(format!("{event:?}"));
        let committed = self.committed();
        match event {
            Event::Request(n) => self.request(NODES[n]),
            Event::Apply(n) => self.apply(NODES[n]),
            Event::Install(n) => self.install(NODES[n]),
            Event::StartMove(n) => {
                let to = NODES[n];
                if committed.pending.is_none() && to != committed.owner {
                    self.commit(MapState {
                        owner: committed.owner,
                        pending: Some((committed.owner, to, committed.epoch + 1)),
                        epoch: committed.epoch + 1,
                    });
                }
            }
            Event::Cancel => {
                if committed.pending.is_some() {
                    self.commit(MapState {
                        owner: committed.owner,
                        pending: None,
                        epoch: committed.epoch + 1,
                    });
                }
            }
            Event::Retarget(n) => {
                if let Some((from, to, _)) = committed.pending {
                    if NODES[n] != from && NODES[n] != to {
                        self.commit(MapState {
                            owner: committed.owner,
                            pending: Some((from, NODES[n], committed.epoch + 1)),
                            epoch: committed.epoch + 1,
                        });
                    }
                }
            }
            Event::HandoffStep(n) => self.handoff_step(NODES[n]),
            Event::RetireDone(i) => self.retire_done(i),
            Event::Deliver(i) => self.deliver(i, false),
            Event::DeliverCommitUnknown(i) => self.deliver(i, true),
            Event::Lose(i) => self.lose(i),
            Event::Restart(n) => self.restart(NODES[n]),
        }
        self.check();
    }

    /// At most one node may serve, and whatever a serving node would start from is the newest
    /// state.
    fn check(&self) {
        let serving: Vec<NodeId> = NODES
            .iter()
            .copied()
            .filter(|n| self.serves(*n))
            .filter(|n| {
                !matches!(
                    self.nodes[n].ledger.place(),
                    Place::Retiring { .. } | Place::Sending { .. }
                )
            })
            .collect();
        assert!(
            serving.len() <= 1,
            "nodes {serving:?} may serve the shard at once: {:?}",
            self.trace
        );
        for node in serving {
            let value = match self.nodes[&node].ledger.place() {
                Place::Running { handle, .. } => self.actors[handle].value,
                Place::Parked { snapshot, .. } => value_of(snapshot),
                _ => 0,
            };
            assert_eq!(
                value, self.acked,
                "node {node} would serve an old or empty state: {:?}",
                self.trace
            );
        }
    }

    /// Lets every message arrive and every move finish, then reads the state.
    fn settle(&mut self) {
        for _ in 0..100 {
            while !self.retiring.is_empty() {
                self.run(Event::RetireDone(0));
            }
            while !self.wire.is_empty() {
                self.run(Event::Deliver(0));
            }
            for (n, node) in NODES.iter().enumerate() {
                while self.nodes[node].applied + 1 < self.log.len() {
                    self.run(Event::Apply(n));
                }
                // Caught up: renew, and the router installs it.
                self.run(Event::Apply(n));
                self.run(Event::Install(n));
                self.run(Event::HandoffStep(n));
            }
            let done = self.committed().pending.is_none()
                && self.retiring.is_empty()
                && self.wire.is_empty()
                && NODES
                    .iter()
                    .all(|n| self.nodes[n].table + 1 == self.log.len());
            if done {
                let owner = self.committed().owner;
                let before = self.acked;
                self.request(owner);
                assert_eq!(
                    self.acked,
                    before + 1,
                    "the owner serves once the moves settled: {:?}",
                    self.trace
                );
                return;
            }
        }
        panic!("the moves did not settle: {:?}", self.trace);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_moves_never_drop_or_duplicate_a_shards_state(
        events in proptest::collection::vec(event(), 0..120)
    ) {
        let mut world = World::new();
        for event in events {
            world.run(event);
        }
        world.settle();
    }
}

#[test]
fn an_event_that_panics_midway_leaves_the_ledger_at_its_prior_state() {
    let slot = Mutex::new(ShardLedger::<u32> {
        place: Place::Parked {
            snapshot: snap(42),
            epoch: 3,
        },
    });
    // The event takes the snapshot into a new actor, then fails (a bug) before it returns.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        apply_locked(&slot, |ledger| {
            let intake = ledger.request(true, 7, || 1);
            assert!(matches!(intake, Intake::Start { .. }));
            panic!("a bug after the state moved");
        })
    }));
    assert!(outcome.is_err(), "the event panicked");
    // The snapshot is still parked: the half-applied event was thrown away with its copy.
    let place = slot
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .place()
        .clone();
    assert!(
        matches!(&place, Place::Parked { snapshot, epoch: 3 } if value_of(snapshot) == 42),
        "{place:?}"
    );
    // And the ledger goes on: the next request starts the actor with the snapshot.
    let intake = apply_locked(&slot, |ledger| ledger.request(true, 8, || 2));
    assert!(
        matches!(&intake, Intake::Start { restore } if value_of(restore) == 42),
        "{intake:?}"
    );
    let running = slot
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .running()
        .copied();
    assert_eq!(running, Some(2));
}
