//! The node's handoff actor (rule 5): a task that hands this node's shards to their next owners
//! on planned moves (join, drain, remove).
//!
//! For each shard pending away from this node it retires the local shard actor (after its
//! in-flight messages; `on_deactivate` gives the snapshot), sends the snapshots to the new owner,
//! and once that node holds them proposes `Released` through the leader. Requests for a moving
//! shard wait at the routers meanwhile. If the new owner cannot be reached the snapshots stay
//! here and the move is retried, also towards a re-targeted owner; a move cancelled before its
//! release restores the snapshot locally.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Weak;
use std::time::Duration;

use tracing::Instrument;

use crate::codec;
use crate::consensus::{Command, CommandResponse, Consensus};
use crate::router::Router;
use crate::shard::{Handoff, ShardHandler};
use crate::shard_map::{NodeId, ShardId};
use crate::wire::{Request, Response};

/// Shards per handoff request, so a drain's snapshots fit in frames.
const SHARDS_PER_BATCH: usize = 64;
/// Snapshot bytes per handoff request: a quarter of the transport's default frame limit.
const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Snapshots this large cannot travel in one frame (the transport's default limit is 16 MiB).
const SNAPSHOT_BYTES_MAX: usize = 16 * 1024 * 1024 - 4096;
/// Pause before retrying a failed handoff.
const RETRY: Duration = Duration::from_millis(100);
/// How long the new owner may take to accept snapshots.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands shards over until the router is gone.
pub(crate) async fn hand_off<H: ShardHandler>(router: Weak<Router<H>>, consensus: Consensus) {
    let me = consensus.node_id();
    let mut applied = consensus.subscribe();
    // Snapshots taken but not yet released, by shard.
    let mut held: HashMap<ShardId, Option<Handoff>> = HashMap::new();
    // Moves this node already released, by (shard, allocation epoch).
    let mut released: HashSet<(ShardId, u64)> = HashSet::new();
    loop {
        let current = applied.borrow_and_update().clone();
        let state = &current.state;
        let Some(router) = router.upgrade() else {
            return;
        };
        // A move cancelled before its release: the shard stays here, with its state.
        held.retain(|shard, snapshot| {
            let still_moving = state.pending.get(shard).is_some_and(|p| p.from == me);
            if !still_moving {
                if let (true, Some(snapshot)) = (state.serves(me, *shard), snapshot.take()) {
                    router.accept_handoff(*shard, state.epoch, snapshot);
                }
            }
            still_moving
        });
        released
            .retain(|(shard, epoch)| state.pending.get(shard).is_some_and(|p| p.epoch == *epoch));
        let mut groups: BTreeMap<(NodeId, u64), Vec<ShardId>> = BTreeMap::new();
        for (shard, pending) in state.moving_away(me) {
            if !released.contains(&(shard, pending.epoch)) {
                groups
                    .entry((pending.to, pending.epoch))
                    .or_default()
                    .push(shard);
            }
        }
        let mut failed = false;
        for ((to, epoch), shards) in groups {
            for chunk in shards.chunks(SHARDS_PER_BATCH) {
                // Snapshots first, then as many requests as it takes to keep each one well
                // inside the transport's frame limit.
                let mut batches: Vec<Vec<(ShardId, Option<Handoff>)>> = vec![Vec::new()];
                let mut bytes = 0;
                for shard in chunk {
                    let snapshot = match held.remove(shard) {
                        Some(snapshot) => snapshot,
                        None => router.deactivate(*shard).await,
                    };
                    let size = snapshot.as_ref().map_or(0, |s| s.as_bytes().len());
                    if size >= SNAPSHOT_BYTES_MAX {
                        tracing::error!(shard, size, "a shard's handoff snapshot does not fit in a transport frame (16 MiB), so the move keeps failing: keep per-shard state well below that");
                    }
                    if bytes + size > BATCH_BYTES_MAX
                        && batches.last().is_some_and(|b| !b.is_empty())
                    {
                        batches.push(Vec::new());
                        bytes = 0;
                    }
                    bytes += size;
                    if let Some(last) = batches.last_mut() {
                        last.push((*shard, snapshot));
                    }
                }
                for batch in batches {
                    let span =
                        tracing::info_span!("handoff", from = me, to, epoch, shards = batch.len());
                    async {
                        match send(&consensus, me, to, epoch, &batch).await {
                            Ok(()) => {
                                let command = Command::Released {
                                    shards: batch.iter().map(|(shard, _)| *shard).collect(),
                                    epoch,
                                    from: me,
                                };
                                match consensus.propose(command, false).await {
                                    Ok(CommandResponse::Released { shards, .. }) => {
                                        released.extend(shards.iter().map(|s| (*s, epoch)));
                                        tracing::info!(released = shards.len(), "shards released");
                                        crate::metrics::handoffs_completed("out", shards.len());
                                        // A shard whose move was re-targeted before this release keeps
                                        // its snapshot here, for the new target.
                                        for (shard, snapshot) in batch {
                                            if !shards.contains(&shard) {
                                                held.insert(shard, snapshot);
                                            }
                                        }
                                    }
                                    Ok(_) => {
                                        tracing::info!("moves superseded before their release; retrying");
                                        held.extend(batch);
                                    }
                                    Err(error) => {
                                        tracing::warn!(%error, "release not committed; retrying");
                                        failed = true;
                                        // The new owner holds the snapshots; keep copies for a retry.
                                        held.extend(batch);
                                    }
                                }
                            }
                            Err(reason) => {
                                tracing::warn!(%reason, "handoff failed; keeping the snapshots and retrying");
                                failed = true;
                                held.extend(batch);
                            }
                        }
                    }
                    .instrument(span)
                    .await;
                }
            }
        }
        drop(router);
        if failed {
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY) => {}
            }
        } else if applied.changed().await.is_err() {
            return;
        }
    }
}

async fn send(
    consensus: &Consensus,
    me: NodeId,
    to: NodeId,
    epoch: u64,
    batch: &[(ShardId, Option<Handoff>)],
) -> Result<(), String> {
    let addr = consensus
        .member_addr(to)
        .ok_or(format!("no address for node {to}"))?;
    let request = Request::Handoff {
        from: me,
        epoch,
        shards: batch.to_vec(),
    };
    let payload = codec::encode(&request).map_err(|e| e.to_string())?;
    let answer = consensus
        .transport()
        .request(addr, payload, HANDOFF_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    match codec::decode::<Response>(&answer) {
        Ok(Response::HandoffAccepted) => Ok(()),
        _ => Err("unexpected answer to a handoff".into()),
    }
}
