//! The fencing rules, as pure functions over a shard's [`Fence`] record: which activations,
//! commits and releases a store accepts, and what an activation reports as the [`Origin`] of the
//! state it loads. Every store calls these inside its transaction, so all stores decide alike;
//! this file does no I/O.

use serde::{Deserialize, Serialize};

use super::error::StoreError;
use crate::shard_map::{Epoch, NodeId, ShardId};

/// What a store keeps per shard beside its records: the newest activation it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The newest activation epoch: writes with an older epoch are refused.
    pub epoch: Epoch,
    /// The node that activated the shard at `epoch` (the last owner).
    pub owner: NodeId,
    /// Whether the activation of `epoch` released the shard (a planned move handed it on).
    pub released: bool,
}

impl Fence {
    /// Decides an activation of `shard` by `owner` at `epoch` against the stored fence
    /// (`current`, `None` if the shard was never activated): the fence to store, or the refusal.
    ///
    /// Accepted if `epoch` is above the fence, or equal to it with the same owner (a restart or
    /// a reactivation: it also undoes a release of that activation, since no newer owner took the
    /// shard). Refused with [`StoreError::Fenced`] below the fence and with
    /// [`StoreError::EpochTaken`] at the fence's epoch by another node.
    pub fn activate(
        current: Option<Fence>,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
    ) -> Result<Fence, StoreError> {
        match current {
            Some(fence) if epoch < fence.epoch => Err(StoreError::Fenced {
                shard,
                epoch,
                fence: fence.epoch,
            }),
            Some(fence) if epoch == fence.epoch && owner != fence.owner => {
                Err(StoreError::EpochTaken {
                    shard,
                    epoch,
                    owner: fence.owner,
                })
            }
            _ => Ok(Fence {
                epoch,
                owner,
                released: false,
            }),
        }
    }

    /// Decides a commit to `shard` at `epoch`: accepted only while the activation of `epoch` is
    /// the newest one and has not released the shard.
    pub fn check_commit(
        current: Option<Fence>,
        shard: ShardId,
        epoch: Epoch,
    ) -> Result<(), StoreError> {
        match current {
            Some(fence) if epoch < fence.epoch => Err(StoreError::Fenced {
                shard,
                epoch,
                fence: fence.epoch,
            }),
            Some(fence) if epoch == fence.epoch && fence.released => {
                Err(StoreError::Released { shard, epoch })
            }
            Some(fence) if epoch == fence.epoch => Ok(()),
            _ => Err(StoreError::NotActivated {
                shard,
                epoch,
                fence: current.map(|fence| fence.epoch),
            }),
        }
    }

    /// Decides a release of `shard` by the activation of `epoch`: the fence to store (the same
    /// one, marked released; releasing twice gives the same answer), or [`StoreError::Fenced`]
    /// if a newer activation replaced it, or [`StoreError::NotActivated`].
    pub fn release(
        current: Option<Fence>,
        shard: ShardId,
        epoch: Epoch,
    ) -> Result<Fence, StoreError> {
        match current {
            Some(fence) if epoch == fence.epoch => Ok(Fence {
                released: true,
                ..fence
            }),
            Some(fence) if epoch < fence.epoch => Err(StoreError::Fenced {
                shard,
                epoch,
                fence: fence.epoch,
            }),
            _ => Err(StoreError::NotActivated {
                shard,
                epoch,
                fence: current.map(|fence| fence.epoch),
            }),
        }
    }
}

/// Where the state an activation loaded comes from ([`Loaded::origin`](super::Loaded::origin)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// The store had never seen the shard: it starts empty.
    New,
    /// The state is what the store holds for the shard: everything every earlier activation
    /// committed.
    Stored {
        /// The node of the activation before this one (this node itself after a restart).
        last_owner: NodeId,
        /// That activation's epoch.
        last_epoch: Epoch,
        /// Whether that activation released the shard (a planned move) rather than stopping
        /// without a release (a crash, or a node cut off past its lease).
        released: bool,
    },
    /// A node-local store whose records for the shard may be older than what other nodes
    /// committed since: the shard's last activation here was by another node or at another
    /// epoch, so this is not a restart in place. The local records were dropped in the same
    /// step and the shard starts empty.
    Stale {
        /// The node of the last activation this store saw.
        last_owner: NodeId,
        /// That activation's epoch.
        last_epoch: Epoch,
    },
}

impl Origin {
    /// The origin in a [`Shared`](super::Locality::Shared) store: whatever it holds is current,
    /// since every owner wrote to it.
    pub fn shared(previous: Option<Fence>) -> Origin {
        match previous {
            None => Origin::New,
            Some(fence) => Origin::Stored {
                last_owner: fence.owner,
                last_epoch: fence.epoch,
                released: fence.released,
            },
        }
    }

    /// The origin in a [`NodeLocal`](super::Locality::NodeLocal) store for an activation by
    /// `owner` at `epoch`: the local records are current only in a restart in place, i.e. when
    /// the last activation this store saw was by the same node at the same epoch. At a newer
    /// epoch the shard may have been owned elsewhere in between (it moved away and back, or this
    /// node was failed over and came back), and what was committed there is not here.
    pub fn node_local(previous: Option<Fence>, owner: NodeId, epoch: Epoch) -> Origin {
        match previous {
            None => Origin::New,
            Some(fence) if fence.owner == owner && fence.epoch == epoch => Origin::shared(previous),
            Some(fence) => Origin::Stale {
                last_owner: fence.owner,
                last_epoch: fence.epoch,
            },
        }
    }

    /// Whether the store's records are the shard's state (so they were loaded).
    pub fn is_loaded(&self) -> bool {
        matches!(self, Origin::Stored { .. })
    }
}
