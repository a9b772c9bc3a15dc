//! The node's lease actor: a task that renews this node's lease with the leader every renew
//! period, at once when it learns of a new leader or applies a new allocation, and installs each
//! grant in the router. The decisions are [`LeaseHolder`]'s; this task only does the I/O.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::codec;
use crate::consensus::Consensus;
use crate::lease::{LeaseGrant, LeaseHolder, LeaseRefusal, RenewLease};
use crate::router::Router;
use crate::shard::ShardHandler;
use crate::shard_map::NodeId;
use crate::wire::{Request, Response};

/// How soon a refused or failed renewal is retried.
const RETRY: Duration = Duration::from_millis(10);

/// Renews the lease until the router is gone.
pub(crate) async fn keep_lease<H: ShardHandler>(router: Weak<Router<H>>, consensus: Consensus) {
    let config = consensus.lease_config().clone();
    let me = consensus.node_id();
    let mut incarnation = [0u8; 8];
    if getrandom::fill(&mut incarnation).is_err() {
        // Without randomness the start time still tells incarnations apart.
        incarnation = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64))
        .to_le_bytes();
    }
    let mut holder = LeaseHolder::new(config.clone(), me, u64::from_le_bytes(incarnation));
    let mut metrics = consensus.raft().metrics();
    let mut applied = consensus.subscribe();
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        let epoch = applied.borrow_and_update().state.epoch;
        let sent_at = Instant::now();
        let mut retry = true;
        if let Some(leader) = leader {
            let request = holder.request(sent_at, epoch);
            let result = if leader == me {
                // Bounded: the leader answers every renewal within the renew period.
                consensus.renew(request).await
            } else {
                renew_remote(&consensus, leader, request, config.renew_period).await
            };
            match result {
                Ok(grant) => {
                    retry = false;
                    if let Some(until) = holder.on_grant(&grant) {
                        match router.upgrade() {
                            Some(router) => router.set_lease(until, grant.epoch),
                            None => return,
                        }
                    }
                }
                Err(
                    LeaseRefusal::Down | LeaseRefusal::NotMember | LeaseRefusal::Overloaded { .. },
                ) => retry = false,
                // A renewal that timed out (the leader's own included: `renew` gives up after
                // a renew period) is retried at once, since `sent_at` is a period ago.
                Err(refusal) => tracing::debug!(%refusal, "lease renewal refused"),
            }
        }
        if router.strong_count() == 0 {
            return;
        }
        // Next renewal: after the period, sooner after a refusal, and at once when the leader
        // or the allocation epoch changes.
        let next = sent_at + if retry { RETRY } else { config.renew_period };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => break,
                changed = metrics.changed() => {
                    if changed.is_err() { return }
                    if metrics.borrow().current_leader != leader { break }
                }
                changed = applied.changed() => {
                    if changed.is_err() { return }
                    if applied.borrow().state.epoch != epoch { break }
                }
            }
        }
    }
}

async fn renew_remote(
    consensus: &Consensus,
    leader: NodeId,
    request: RenewLease,
    timeout: Duration,
) -> Result<LeaseGrant, LeaseRefusal> {
    let not_reached = |reason: String| LeaseRefusal::NoQuorum { reason };
    let addr = consensus
        .member_addr(leader)
        .ok_or_else(|| not_reached(format!("no address for leader {leader}")))?;
    let payload =
        codec::encode(&Request::RenewLease(request)).map_err(|e| not_reached(e.to_string()))?;
    let answer = consensus
        .transport()
        .request_node(leader, addr, payload, timeout)
        .await
        .map_err(|e| not_reached(e.to_string()))?;
    match codec::decode::<Response>(&answer) {
        Ok(Response::Lease(result)) => result,
        _ => Err(not_reached("unexpected answer to a lease renewal".into())),
    }
}
