//! The handoff ledger: where one shard's state is on this node, as a pure state machine.
//!
//! A shard's state lives in exactly one place on a node: nowhere, in a running shard actor, in
//! an actor that was asked to retire (its snapshot is on the way back), parked as a snapshot
//! (handed over by the previous owner, or taken back from a retired actor), or on its way to
//! the next owner (a copy stays until the release commits). Each event of a planned move — a
//! request arrives, the move begins, the actor retired, the snapshot was sent or not, the move
//! was released, cancelled or re-targeted, a snapshot arrived, the node applied a new map —
//! moves the place by one rule here, and says what the caller must do (start an actor with a
//! restore, stop an actor, send a snapshot). The router and the router actor only carry that
//! out; they keep no bookkeeping of their own (openraft's engine is the model: decisions
//! without I/O, so every transition is unit-tested and random event sequences are
//! property-tested below).
//!
//! The rules that keep state from being dropped or duplicated:
//! - an actor starts only when the node serves the shard, and takes the parked snapshot with
//!   it; while the state is retiring or on its way out, requests wait instead of starting an
//!   empty actor;
//! - a retiring actor's snapshot always comes back here (never to a caller that may have given
//!   up waiting), so a slow deactivation delays a move but never empties it;
//! - a snapshot is dropped only when the applied map shows the shard is no longer this node's
//!   nor coming to it (the release committed, or the move was re-targeted or cancelled away
//!   from this node).
//!
//! It does not decide the map (consensus does), nor run handler code (shard actors do).

use std::sync::{Mutex, PoisonError};

use crate::codec::Handoff;
use crate::shard_map::NodeId;

/// Where a shard's state is on this node. `A` is the handle of a running actor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Place<A> {
    /// No state of the shard is here: never active here, or handed on.
    #[default]
    Absent,
    /// A shard actor holds the state (restored from a snapshot or not yet activated).
    Running {
        /// The actor's number, unique on this node.
        actor: u64,
        /// Its handle.
        handle: A,
    },
    /// The actor was asked to retire: its snapshot comes back through
    /// [`ShardLedger::retired`].
    Retiring {
        /// The retiring actor's number.
        actor: u64,
    },
    /// A snapshot kept here without an actor. `None` means the handler hands over nothing.
    Parked {
        /// The state.
        snapshot: Option<Handoff>,
        /// The allocation epoch of the move it came with or was meant for.
        epoch: u64,
    },
    /// Handed on by the move of allocation `epoch`, whose release committed; kept apart from
    /// [`Place::Absent`] until the applied map shows the release, so that a look at an older map
    /// (still showing the move pending) does not send the shard again, empty.
    Gone {
        /// The allocation epoch of the released move.
        epoch: u64,
    },
    /// The snapshot is on its way to `to` for the move of allocation `epoch`; this copy stays
    /// until the release commits or the send fails.
    Sending {
        /// The next owner.
        to: NodeId,
        /// The allocation epoch of the move.
        epoch: u64,
        /// The copy kept here.
        snapshot: Option<Handoff>,
    },
    /// The actor was asked to passivate (it was idle, or the least recently used beyond the
    /// bound of active shards): it commits its last changes and drops its state, or declines
    /// and keeps running. Requests wait meanwhile.
    Passivating {
        /// The passivating actor's number.
        actor: u64,
        /// Its handle, kept in case it declines.
        handle: A,
    },
    /// Passivated: the shard's state is in the node's store only, and nothing of it in memory.
    /// The next request starts an actor that loads it again.
    Passivated,
}

/// What to do with a request for a shard that has no running actor here.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Intake {
    /// Start an actor (numbered as asked) with this restore.
    Start {
        /// The snapshot the actor restores before its first message, if any.
        restore: Option<Handoff>,
    },
    /// The node does not serve the shard now: route the request again.
    NotServing,
    /// The shard's state is retiring or on its way out: the request waits.
    Elsewhere,
}

/// What a handoff round does next for a shard moving away.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MoveStep<A> {
    /// Ask this actor to retire; its snapshot comes back through [`ShardLedger::retired`].
    Retire(A),
    /// Waiting for a retiring actor, or a send of this shard is under way.
    Wait,
    /// Send this snapshot to the next owner.
    Send(Option<Handoff>),
}

/// How a send of a shard's snapshot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The release committed: the next owner has the state.
    Released,
    /// Not delivered, or the release did not commit: keep the snapshot and try again.
    Failed,
}

/// What the applied cluster state says about a shard, for [`ShardLedger::reconcile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShardView {
    /// This node owns the shard (also while it moves away from it).
    pub(crate) owned: bool,
    /// A move of the shard to this node is pending.
    pub(crate) coming: bool,
    /// A move of the shard away from this node is pending.
    pub(crate) leaving: bool,
    /// The applied allocation epoch.
    pub(crate) epoch: u64,
}

/// One shard's place on this node, changed only by the events below, each applied by value
/// ([`apply`]).
#[derive(Debug, Clone)]
pub(crate) struct ShardLedger<A> {
    place: Place<A>,
}

impl<A> Default for ShardLedger<A> {
    fn default() -> Self {
        ShardLedger {
            place: Place::Absent,
        }
    }
}

impl<A: Clone> ShardLedger<A> {
    /// The place, for inspection.
    pub(crate) fn place(&self) -> &Place<A> {
        &self.place
    }

    /// The running actor's handle, if one runs.
    pub(crate) fn running(&self) -> Option<&A> {
        match &self.place {
            Place::Running { handle, .. } => Some(handle),
            _ => None,
        }
    }

    /// A request arrives and no actor runs: start one numbered `actor` with the parked state if
    /// the node serves the shard (`serves`), else say why not.
    pub(crate) fn request(
        &mut self,
        serves: bool,
        actor: u64,
        handle: impl FnOnce() -> A,
    ) -> Intake {
        match &mut self.place {
            Place::Retiring { .. } | Place::Sending { .. } | Place::Passivating { .. } => {
                Intake::Elsewhere
            }
            _ if !serves => Intake::NotServing,
            Place::Running { .. } => Intake::NotServing,
            // Served again here without a handoff (its next owner crashed and the shard came
            // back straight): it starts empty, as after any crash. A passivated shard starts
            // an actor that loads its state from the store.
            Place::Absent | Place::Gone { .. } | Place::Passivated => {
                self.place = Place::Running {
                    actor,
                    handle: handle(),
                };
                Intake::Start { restore: None }
            }
            Place::Parked { snapshot, .. } => {
                let restore = snapshot.take();
                self.place = Place::Running {
                    actor,
                    handle: handle(),
                };
                Intake::Start { restore }
            }
        }
    }

    /// The running actor is gone without retiring (its arbiter stopped): its state is lost.
    /// Returns whether it was the running one.
    pub(crate) fn actor_gone(&mut self, actor: u64) -> bool {
        if matches!(self.place,
            Place::Running { actor: a, .. } | Place::Passivating { actor: a, .. } if a == actor)
        {
            self.place = Place::Absent;
            return true;
        }
        false
    }

    /// The move of allocation `epoch` to `to` proceeds one step.
    pub(crate) fn begin_move(&mut self, to: NodeId, epoch: u64) -> MoveStep<A> {
        self.begin_move_waking(to, epoch, None::<(u64, fn() -> A)>)
    }

    /// [`begin_move`](Self::begin_move), where a shard with no state in memory (never active
    /// since the node started, or passivated) may still have state in the node's own store,
    /// which the next owner cannot read: `wake` gives the number and the handle of a new actor,
    /// which loads that state and retires with it (the caller starts it and asks it to retire,
    /// as for [`MoveStep::Retire`]).
    pub(crate) fn begin_move_waking(
        &mut self,
        to: NodeId,
        epoch: u64,
        wake: Option<(u64, impl FnOnce() -> A)>,
    ) -> MoveStep<A> {
        match std::mem::take(&mut self.place) {
            Place::Running { actor, handle } => {
                self.place = Place::Retiring { actor };
                MoveStep::Retire(handle)
            }
            place
            @ (Place::Retiring { .. } | Place::Sending { .. } | Place::Passivating { .. }) => {
                self.place = place;
                MoveStep::Wait
            }
            // The release of this move (or a later one) committed: only an older view of the
            // map still shows it pending.
            Place::Gone { epoch: gone } if epoch <= gone => {
                self.place = Place::Gone { epoch: gone };
                MoveStep::Wait
            }
            // Nothing in memory: the node's own store may still hold the shard's state (wake an
            // actor to load and hand it over), or the shard came back without a handoff.
            Place::Absent | Place::Gone { .. } | Place::Passivated => match wake {
                Some((actor, handle)) => {
                    self.place = Place::Retiring { actor };
                    MoveStep::Retire(handle())
                }
                None => {
                    self.place = Place::Sending {
                        to,
                        epoch,
                        snapshot: None,
                    };
                    MoveStep::Send(None)
                }
            },
            Place::Parked { snapshot, .. } => {
                self.place = Place::Sending {
                    to,
                    epoch,
                    snapshot: snapshot.clone(),
                };
                MoveStep::Send(snapshot)
            }
        }
    }

    /// Actor `actor` retired and handed back `snapshot`. Returns whether the ledger kept it
    /// (a snapshot of an actor the ledger already let go of, because the shard was lost
    /// without handoff, is stale and dropped).
    pub(crate) fn retired(&mut self, actor: u64, snapshot: Option<Handoff>, epoch: u64) -> bool {
        match self.place {
            Place::Retiring { actor: a } | Place::Running { actor: a, .. } if a == actor => {
                self.place = Place::Parked { snapshot, epoch };
                true
            }
            _ => false,
        }
    }

    /// The send for the move of `epoch` to `to` ended with `outcome`. An outcome for a send the
    /// ledger no longer waits on (the applied map settled it first) changes nothing.
    pub(crate) fn sent(&mut self, to: NodeId, epoch: u64, outcome: Sent) {
        let Place::Sending {
            to: t, epoch: e, ..
        } = &self.place
        else {
            return;
        };
        if (*t, *e) != (to, epoch) {
            return;
        }
        let Place::Sending { snapshot, .. } = std::mem::take(&mut self.place) else {
            return;
        };
        self.place = match outcome {
            Sent::Released => Place::Gone { epoch },
            Sent::Failed => Place::Parked { snapshot, epoch },
        };
    }

    /// A snapshot arrived from the previous owner for the move of allocation `epoch`. Kept
    /// unless the state is already here (a running actor restored it, or a snapshot of this
    /// move or a later one is parked) or is moving away. A second snapshot of the same move is
    /// never newer: a retry carries the same state, and a sender that restarted since (its
    /// ledger empty, its map older than the release) would send an empty one.
    pub(crate) fn received(&mut self, epoch: u64, snapshot: Option<Handoff>) -> bool {
        match &self.place {
            Place::Absent | Place::Gone { .. } => {}
            Place::Parked { epoch: parked, .. } if *parked < epoch => {}
            _ => return false,
        }
        self.place = Place::Parked { snapshot, epoch };
        true
    }

    /// The node applied a new cluster state. Returns the handle of an actor to stop when the
    /// shard went elsewhere without a handoff (its node was marked down: its state is lost, as
    /// after a crash).
    pub(crate) fn reconcile(&mut self, view: ShardView) -> Option<A> {
        if let Place::Gone { .. } = self.place {
            if !(view.owned && view.leaving) {
                self.place = Place::Absent;
            }
            return None;
        }
        if view.owned {
            return None;
        }
        match std::mem::take(&mut self.place) {
            Place::Running { handle, .. } => Some(handle),
            // Snapshots can arrive before this node applied the allocation that moves them.
            Place::Parked { snapshot, epoch } if view.coming || epoch > view.epoch => {
                self.place = Place::Parked { snapshot, epoch };
                None
            }
            // Released (the next owner has it), lost, or stale: nothing to keep.
            _ => None,
        }
    }

    /// Actor `actor` could not load the state it was to hand over (its node's store failed, or
    /// the node's lease lapsed): nothing is in memory, and the state stays in the node's store.
    /// The move's next step wakes another actor to try again. Returns whether it was retiring.
    pub(crate) fn retire_failed(&mut self, actor: u64) -> bool {
        if matches!(self.place, Place::Retiring { actor: a } if a == actor) {
            self.place = Place::Absent;
            return true;
        }
        false
    }

    /// The running actor `actor` was idle: passivate it. Returns its handle, to ask it to.
    pub(crate) fn passivate(&mut self, actor: u64) -> Option<A> {
        match std::mem::take(&mut self.place) {
            Place::Running { actor: a, handle } if a == actor => {
                self.place = Place::Passivating {
                    actor,
                    handle: handle.clone(),
                };
                Some(handle)
            }
            place => {
                self.place = place;
                None
            }
        }
    }

    /// Actor `actor` passivated (`done`: its state is in the store and it stopped) or declined
    /// (it keeps running). Returns whether the ledger was waiting for it.
    pub(crate) fn passivated(&mut self, actor: u64, done: bool) -> bool {
        match std::mem::take(&mut self.place) {
            Place::Passivating { actor: a, handle } if a == actor => {
                self.place = match done {
                    true => Place::Passivated,
                    false => Place::Running { actor, handle },
                };
                true
            }
            place => {
                self.place = place;
                false
            }
        }
    }

    /// The node stops: the running actor's handle, to retire it.
    pub(crate) fn shutdown(&mut self) -> Option<A> {
        match std::mem::take(&mut self.place) {
            Place::Running { actor, handle } => {
                self.place = Place::Retiring { actor };
                Some(handle)
            }
            place => {
                self.place = place;
                None
            }
        }
    }
}

/// Applies one event to `ledger` by value: the event runs on a copy, and the copy replaces the
/// ledger only once the event completed. An event that panics midway (a bug) unwinds with the
/// ledger as it was before the event, never half-changed: the shard's state is still where the
/// ledger says. Copies are cheap: a place holds at most an actor handle and a snapshot, whose
/// bytes are shared.
pub(crate) fn apply<A: Clone, R>(
    ledger: &mut ShardLedger<A>,
    event: impl FnOnce(&mut ShardLedger<A>) -> R,
) -> R {
    let mut next = ledger.clone();
    let outcome = event(&mut next);
    *ledger = next;
    outcome
}

/// [`apply`] to the ledger behind `slot`. The lock's poisoning is ignored: a panic while it was
/// held left the ledger at its prior state.
pub(crate) fn apply_locked<A: Clone, R>(
    slot: &Mutex<ShardLedger<A>>,
    event: impl FnOnce(&mut ShardLedger<A>) -> R,
) -> R {
    let mut ledger = slot.lock().unwrap_or_else(PoisonError::into_inner);
    apply(&mut ledger, event)
}

#[cfg(test)]
mod tests;
