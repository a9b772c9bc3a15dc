//! Handoff rounds (rule 5): hand this node's shards to their next owners on planned moves (join,
//! drain, remove, undrain). The router actor ([`crate::cluster`]'s `RouterActor`) runs one round
//! at a time, after every applied state and again shortly after a round that must retry.
//!
//! A round only drives the router's ledger ([`crate::ledger`]), which knows where each shard's state
//! is: for each shard pending away from this node it asks the ledger for the next step (retire
//! the running actor, or send the parked snapshot), waits (bounded) for retiring actors, sends
//! the snapshots to the new owner — in batches, and a snapshot too large for one request in
//! ordered chunks — and once that node holds them proposes `Released` through the leader. It
//! reports each outcome back to the ledger: a failed send or a release that did not commit
//! leaves the snapshot parked here for the next attempt (also towards a re-targeted owner, or
//! back into a local actor when the move was cancelled). It never hands over a shard whose
//! actor has not retired: a slow deactivation delays the move instead of emptying it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::codec;
use crate::codec::{Handoff, SNAPSHOT_BYTES_MAX};
use crate::consensus::{Command, CommandResponse, Consensus};
use crate::ledger::{MoveStep, Sent};
use crate::router::Router;
use crate::shard::ShardHandler;
use crate::shard_map::{NodeId, ShardId};
use crate::transport::TransportError;
use crate::wire::{Request, Response};

/// Shards per handoff request, so a drain's snapshots fit in frames.
const SHARDS_PER_BATCH: usize = 64;
/// Snapshot bytes per handoff request: a quarter of the transport's default frame limit. A
/// larger snapshot travels in chunks of this size.
const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Pause before retrying a failed handoff.
pub(crate) const RETRY: Duration = Duration::from_millis(100);
/// How long the new owner may take to accept one request of snapshots.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a handoff attempt failed; the move is retried and the state stays here meanwhile.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoffError {
    /// The shard's actor did not retire in time (a handler still running).
    #[error("shard {shard} did not deactivate within {after:?}: its handler is still running, so the move waits and the state stays with it")]
    Deactivating {
        /// The shard.
        shard: ShardId,
        /// How long the task waited this round.
        after: Duration,
    },
    /// The snapshot is larger than any node accepts.
    #[error("shard {shard}'s snapshot is {size} bytes, above the {limit}-byte limit of a handoff: the move cannot proceed; keep a shard's state smaller (more shards, or less per key)")]
    TooLarge {
        /// The shard.
        shard: ShardId,
        /// The snapshot's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The new owner did not take the snapshots.
    #[error("node {to} did not take the snapshots: {source}")]
    NotDelivered {
        /// The new owner.
        to: NodeId,
        /// Why.
        source: DeliveryError,
    },
}

/// Why snapshots did not reach their new owner (the cause of [`HandoffError::NotDelivered`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliveryError {
    /// The membership holds no address for the new owner.
    #[error("no address for node {to}")]
    NoAddress {
        /// The new owner.
        to: NodeId,
    },
    /// The request could not be encoded.
    #[error(transparent)]
    Encode(crate::error::Error),
    /// The request did not get an answer: the node is unreachable, the connection broke, or
    /// the answer did not come within the handoff timeout.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The new owner answered that it did not keep the snapshots.
    #[error("{reason}")]
    Refused {
        /// The new owner's reason, as it sent it.
        reason: String,
    },
    /// The answer could not be decoded.
    #[error("undecodable answer to a handoff: {0}")]
    Undecodable(#[source] crate::error::Error),
    /// The answer was of another kind than a handoff's.
    #[error("unexpected answer to a handoff")]
    Unexpected,
}

/// One request's worth of snapshots: several small ones, or one large one in chunks.
enum Transfer {
    Batch(Vec<(ShardId, Option<Handoff>)>),
    Chunked(ShardId, Handoff),
}

impl Transfer {
    fn shards(&self) -> Vec<ShardId> {
        match self {
            Transfer::Batch(batch) => batch.iter().map(|(shard, _)| *shard).collect(),
            Transfer::Chunked(shard, _) => vec![*shard],
        }
    }
}

/// What handoff rounds remember from one round to the next: the errors already logged (so a
/// stuck move says so once, not every retry) and since when each move (shard, target, epoch)
/// has failed to deliver without a success. The router actor keeps it and lends it to each
/// round by value.
#[derive(Debug, Default, Clone)]
pub(crate) struct HandoffBook {
    reported: HashSet<(ShardId, u64)>,
    undelivered: HashMap<(ShardId, NodeId, u64), Instant>,
}

/// One handoff round: hands every shard that the applied state moves away from this node to its
/// next owner, once. Returns whether some move must be tried again ([`RETRY`] later, or at the
/// next applied state). A move whose snapshots could not be delivered for `stuck_after` is
/// reported to the leader as stuck ([`Command::MoveStuck`]), which cancels or re-targets it,
/// instead of being retried forever.
pub(crate) async fn round<H: ShardHandler>(
    router: &Router<H>,
    consensus: &Consensus,
    book: &mut HandoffBook,
    deactivate_timeout: Duration,
    stuck_after: Duration,
) -> bool {
    let me = consensus.node_id();
    let current = consensus.applied();
    let state = &current.state;
    let HandoffBook {
        reported,
        undelivered,
    } = book;
    reported.retain(|(shard, epoch)| {
        state
            .pending
            .get(shard)
            .is_some_and(|p| p.from == me && p.epoch == *epoch)
    });
    undelivered.retain(|(shard, to, epoch), _| {
        state
            .pending
            .get(shard)
            .is_some_and(|p| p.from == me && p.to == *to && p.epoch == *epoch)
    });
    report_stuck(consensus, me, undelivered, stuck_after).await;
    let mut groups: BTreeMap<(NodeId, u64), Vec<ShardId>> = BTreeMap::new();
    for (shard, pending) in state.moving_away(me) {
        groups
            .entry((pending.to, pending.epoch))
            .or_default()
            .push(shard);
    }
    let mut failed = false;
    for ((to, epoch), shards) in groups {
        for chunk in shards.chunks(SHARDS_PER_BATCH) {
            let (ready, stuck, later) =
                take_snapshots(router, chunk, to, epoch, deactivate_timeout).await;
            failed |= later;
            for error in stuck {
                failed = true;
                report(reported, epoch, error);
            }
            let (transfers, refused) = transfers(ready);
            for (shard, error) in refused {
                failed = true;
                report(reported, epoch, error);
                router.sent(shard, to, epoch, Sent::Failed);
            }
            for transfer in transfers {
                let shards = transfer.shards();
                let span =
                    tracing::info_span!("handoff", from = me, to, epoch, shards = shards.len());
                let outcome = async {
                    if let Err(error) = send(consensus, me, to, epoch, transfer).await {
                        tracing::warn!(%error, "handoff failed; keeping the snapshots and retrying");
                        let now = Instant::now();
                        for shard in &shards {
                            undelivered.entry((*shard, to, epoch)).or_insert(now);
                        }
                        return Err(());
                    }
                    for shard in &shards {
                        undelivered.remove(&(*shard, to, epoch));
                    }
                    let command = Command::Released {
                        shards: shards.clone(),
                        epoch,
                        from: me,
                    };
                    match propose(consensus, command, stuck_after).await {
                        Ok(CommandResponse::Released { shards, .. }) => {
                            tracing::info!(released = shards.len(), "shards released");
                            crate::metrics::handoffs_completed("out", shards.len());
                            Ok(shards)
                        }
                        Ok(_) => {
                            tracing::info!("moves superseded before their release; retrying");
                            Ok(Vec::new())
                        }
                        Err(error) => {
                            // It may have committed: the applied map settles it (the
                            // ledger drops the copy once it shows the shard released).
                            tracing::warn!(%error, "release not committed; retrying");
                            Err(())
                        }
                    }
                }
                .instrument(span)
                .await;
                let released = outcome.unwrap_or_else(|()| {
                    failed = true;
                    Vec::new()
                });
                for shard in shards {
                    let result = if released.contains(&shard) {
                        Sent::Released
                    } else {
                        Sent::Failed
                    };
                    router.sent(shard, to, epoch, result);
                }
            }
        }
    }
    failed
}

/// Reports the moves that could not be delivered for `stuck_after` to the leader, which cancels
/// or re-targets them; each report is made once (the move's epoch changes when it applies).
async fn report_stuck(
    consensus: &Consensus,
    me: NodeId,
    undelivered: &mut HashMap<(ShardId, NodeId, u64), Instant>,
    stuck_after: Duration,
) {
    let mut stuck: BTreeMap<(NodeId, u64), Vec<ShardId>> = BTreeMap::new();
    for ((shard, to, epoch), since) in undelivered.iter() {
        if since.elapsed() >= stuck_after {
            stuck.entry((*to, *epoch)).or_default().push(*shard);
        }
    }
    for ((to, epoch), shards) in stuck {
        tracing::warn!(
            to,
            epoch,
            shards = shards.len(),
            after = ?stuck_after,
            "moves made no progress: asking the leader to cancel or re-target them"
        );
        let command = Command::MoveStuck {
            shards: shards.clone(),
            epoch,
            from: me,
            to,
        };
        match propose(consensus, command, stuck_after).await {
            Ok(response) => {
                tracing::info!(?response, "stuck moves reported");
                // Whether applied or ignored, do not ask again for these moves: a re-target
                // gives them a new epoch; an ignored report means nothing else can take them.
                for shard in shards {
                    undelivered.remove(&(shard, to, epoch));
                }
            }
            Err(error) => tracing::warn!(%error, "could not report stuck moves; retrying"),
        }
    }
}

/// Proposes `command` through the leader, giving up after `bound` (a stalled raft core or an
/// unreachable leader must not hold up every other move of this node); the outcome is then
/// unknown, and the applied map settles it.
async fn propose(
    consensus: &Consensus,
    command: Command,
    bound: Duration,
) -> Result<CommandResponse, crate::admin::AdminError> {
    tokio::time::timeout(bound, consensus.propose(command, false))
        .await
        .unwrap_or_else(|_| {
            Err(crate::admin::AdminError::Failed {
                reason: format!("no answer from the leader within {bound:?}"),
            })
        })
}

/// Logs a handoff error once per shard and move.
fn report(reported: &mut HashSet<(ShardId, u64)>, epoch: u64, error: HandoffError) {
    let shard = match &error {
        HandoffError::Deactivating { shard, .. } | HandoffError::TooLarge { shard, .. } => *shard,
        HandoffError::NotDelivered { .. } => {
            tracing::warn!(%error, "handoff failed; retrying");
            return;
        }
    };
    if reported.insert((shard, epoch)) {
        tracing::error!(%error, "handoff of a shard cannot proceed yet");
    }
}

/// Takes the snapshots of `shards` out of the ledger: retires running actors and waits for them
/// (bounded by `timeout`). Returns the snapshots to send, an error for each shard whose actor is
/// still retiring, and whether some shard must be looked at again shortly.
async fn take_snapshots<H: ShardHandler>(
    router: &Router<H>,
    shards: &[ShardId],
    to: NodeId,
    epoch: u64,
    timeout: Duration,
) -> (Vec<(ShardId, Option<Handoff>)>, Vec<HandoffError>, bool) {
    let mut ready = Vec::new();
    let mut retiring = Vec::new();
    for &shard in shards {
        match router.begin_move(shard, to, epoch) {
            MoveStep::Send(snapshot) => ready.push((shard, snapshot)),
            MoveStep::Retire(()) | MoveStep::Wait => retiring.push(shard),
        }
    }
    if retiring.is_empty() {
        return (ready, Vec::new(), false);
    }
    let stuck = router.wait_retired(&retiring, timeout).await;
    let mut later = false;
    for shard in retiring {
        if stuck.contains(&shard) {
            continue;
        }
        match router.begin_move(shard, to, epoch) {
            MoveStep::Send(snapshot) => ready.push((shard, snapshot)),
            // The router's table has not shown the move yet (or shows it released already):
            // look again shortly.
            MoveStep::Retire(()) | MoveStep::Wait => later = true,
        }
    }
    let errors = stuck
        .into_iter()
        .map(|shard| HandoffError::Deactivating {
            shard,
            after: timeout,
        })
        .collect();
    (ready, errors, later)
}

/// Groups snapshots into requests that stay well inside the transport's frame limit: small ones
/// together, each large one alone in chunks. Snapshots above [`SNAPSHOT_BYTES_MAX`] stay out,
/// each with its error.
fn transfers(
    ready: Vec<(ShardId, Option<Handoff>)>,
) -> (Vec<Transfer>, Vec<(ShardId, HandoffError)>) {
    let mut transfers = Vec::new();
    let mut refused = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for (shard, snapshot) in ready {
        let size = snapshot.as_ref().map_or(0, |s| s.as_bytes().len());
        if size as u64 > SNAPSHOT_BYTES_MAX {
            refused.push((
                shard,
                HandoffError::TooLarge {
                    shard,
                    size: size as u64,
                    limit: SNAPSHOT_BYTES_MAX,
                },
            ));
            continue;
        }
        if let (true, Some(snapshot)) = (size > BATCH_BYTES_MAX, &snapshot) {
            transfers.push(Transfer::Chunked(shard, snapshot.clone()));
            continue;
        }
        if bytes + size > BATCH_BYTES_MAX && !batch.is_empty() {
            transfers.push(Transfer::Batch(std::mem::take(&mut batch)));
            bytes = 0;
        }
        bytes += size;
        batch.push((shard, snapshot));
    }
    if !batch.is_empty() {
        transfers.push(Transfer::Batch(batch));
    }
    (transfers, refused)
}

async fn send(
    consensus: &Consensus,
    me: NodeId,
    to: NodeId,
    epoch: u64,
    transfer: Transfer,
) -> Result<(), HandoffError> {
    let requests = match transfer {
        Transfer::Batch(shards) => vec![Request::Handoff {
            from: me,
            epoch,
            shards,
        }],
        Transfer::Chunked(shard, snapshot) => {
            let bytes = snapshot.as_bytes();
            let total = bytes.len() as u64;
            bytes
                .chunks(BATCH_BYTES_MAX)
                .scan(0u64, |offset, piece| {
                    let at = *offset;
                    *offset += piece.len() as u64;
                    Some(Request::HandoffChunk {
                        from: me,
                        epoch,
                        shard,
                        offset: at,
                        total,
                        bytes: piece.to_vec(),
                    })
                })
                .collect()
        }
    };
    let not_delivered = |source: DeliveryError| HandoffError::NotDelivered { to, source };
    let addr = consensus
        .member_addr(to)
        .ok_or_else(|| not_delivered(DeliveryError::NoAddress { to }))?;
    for request in requests {
        let payload =
            codec::encode(&request).map_err(|e| not_delivered(DeliveryError::Encode(e)))?;
        let answer = consensus
            .transport()
            .request_node(to, addr, payload, HANDOFF_TIMEOUT)
            .await
            .map_err(|e| not_delivered(DeliveryError::Transport(e)))?;
        match codec::decode::<Response>(&answer) {
            Ok(Response::HandoffAccepted) => {}
            Ok(Response::HandoffRefused { reason }) => {
                return Err(not_delivered(DeliveryError::Refused { reason }))
            }
            Ok(_) => return Err(not_delivered(DeliveryError::Unexpected)),
            Err(e) => return Err(not_delivered(DeliveryError::Undecodable(e))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(size: usize) -> Option<Handoff> {
        Some(Handoff::from_bytes(vec![7; size]))
    }

    #[test]
    fn small_snapshots_share_requests_and_large_ones_travel_in_chunks() {
        let ready = vec![
            (1, sized(10)),
            (2, None),
            (3, sized(BATCH_BYTES_MAX + 1)),
            (4, sized(BATCH_BYTES_MAX - 5)),
        ];
        let (transfers, refused) = transfers(ready);
        assert!(refused.is_empty());
        let shape: Vec<(bool, Vec<ShardId>)> = transfers
            .iter()
            .map(|t| (matches!(t, Transfer::Chunked(..)), t.shards()))
            .collect();
        assert_eq!(
            shape,
            vec![(true, vec![3]), (false, vec![1, 2]), (false, vec![4]),]
        );
    }
}
