//! A node's state through the library's [`AdminClient`]: its status report and every shard's
//! owner, and [`wait_settled`], which waits until a cluster is at rest. Beyond "at rest" it
//! does not judge the answers: the tests and tools decide what they mean.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{wait_for, TestingError, WaitError};
use crate::admin::{AdminClient, AdminRequest, AdminResponse, NodeState, StatusReport};
use crate::NodeId;

/// The node's status report.
pub async fn status(client: &AdminClient) -> Result<StatusReport, TestingError> {
    match client.request(AdminRequest::Status).await {
        Ok(AdminResponse::Status(status)) => Ok(status),
        Ok(other) => Err(TestingError::UnexpectedAnswer {
            request: "Status",
            answer: format!("{other:?}"),
        }),
        Err(source) => Err(TestingError::Admin(source)),
    }
}

/// Every client's node status, asked all at once, in the order of the node ids.
pub async fn statuses(
    clients: &BTreeMap<NodeId, AdminClient>,
) -> Vec<(NodeId, Result<StatusReport, TestingError>)> {
    futures_util::future::join_all(
        clients
            .iter()
            .map(|(&id, client)| async move { (id, status(client).await) }),
    )
    .await
}

/// Every shard's owner in the node's map, which must have `shard_count` shards.
pub async fn shard_owners(
    client: &AdminClient,
    shard_count: u32,
) -> Result<Vec<NodeId>, TestingError> {
    match client.request(AdminRequest::Shards).await {
        Ok(AdminResponse::Shards(report)) if report.shards.len() == shard_count as usize => {
            Ok(report.shards.iter().map(|shard| shard.node).collect())
        }
        Ok(other) => Err(TestingError::UnexpectedAnswer {
            request: "Shards",
            answer: format!("{other:?}"),
        }),
        Err(source) => Err(TestingError::Admin(source)),
    }
}

/// The cluster at rest, as [`wait_settled`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The leader every node names.
    pub leader: NodeId,
    /// The leader's term.
    pub term: u64,
    /// The map epoch every node holds.
    pub epoch: u64,
    /// Every shard's owner.
    pub owners: Vec<NodeId>,
}

/// Waits until every node of `clients` serves, names one leader (which says it leads), holds
/// one map epoch, marks nobody down, moves no shard, and `draining` (if any) is the only node
/// drained and owns nothing while the others own balanced shares of `shard_count`. With
/// `polled_are_voters`, also that the voters are exactly the polled nodes. Polls every 10 ms
/// for at most `limit`; the error's last reason says what was still missing.
pub async fn wait_settled(
    clients: &BTreeMap<NodeId, AdminClient>,
    shard_count: u32,
    draining: Option<NodeId>,
    polled_are_voters: bool,
    limit: Duration,
) -> Result<Settled, TestingError> {
    let what = match draining {
        Some(id) => format!("the cluster to settle with node {id} drained"),
        None => "the cluster to settle with balanced shares".to_string(),
    };
    let (leader, term, epoch) = wait_for(&what, Duration::from_millis(10), limit, || async move {
        settled_once(clients, shard_count, draining, polled_are_voters).await
    })
    .await?;
    let client = clients.get(&leader).ok_or_else(|| {
        TestingError::Wait(WaitError::TimedOut {
            what,
            limit,
            last: Some(format!("the leader {leader} is not among the polled nodes")),
        })
    })?;
    let owners = shard_owners(client, shard_count).await?;
    Ok(Settled {
        leader,
        term,
        epoch,
        owners,
    })
}

/// One look for [`wait_settled`]: the leader, term and epoch, or what is not settled yet.
async fn settled_once(
    clients: &BTreeMap<NodeId, AdminClient>,
    shard_count: u32,
    draining: Option<NodeId>,
    polled_are_voters: bool,
) -> Result<(NodeId, u64, u64), String> {
    let mut reports = BTreeMap::new();
    for (id, answer) in statuses(clients).await {
        let report = answer.map_err(|e| format!("node {id}: {e}"))?;
        if report.state != NodeState::Serving {
            return Err(format!("node {id}: {:?} {:?}", report.state, report.reason));
        }
        reports.insert(id, report);
    }
    let first = reports.values().next().ok_or("no nodes")?;
    let leader = first.leader.ok_or("no leader")?;
    let (term, epoch) = (first.term, first.epoch);
    let active = if draining.is_some() {
        clients.len() - 1
    } else {
        clients.len()
    };
    let fair_share = if active == 0 {
        0..=0
    } else {
        shard_count / active as u32..=shard_count.div_ceil(active as u32)
    };
    for (id, report) in &reports {
        if report.leader != Some(leader) || report.term != term || report.epoch != epoch {
            return Err(format!(
                "node {id} names leader {:?} in term {} at epoch {}, node {} names {leader} in {term} at {epoch}",
                report.leader, report.term, report.epoch, first.node_id
            ));
        }
        if polled_are_voters && !report.voters.iter().eq(reports.keys()) {
            return Err(format!("node {id}: voters {:?}", report.voters));
        }
        if !report.down.is_empty() || report.shards_moving != 0 {
            return Err(format!(
                "node {id}: down {:?}, {} shard(s) moving",
                report.down, report.shards_moving
            ));
        }
        if report.draining != draining.into_iter().collect::<Vec<_>>() {
            return Err(format!("node {id}: draining {:?}", report.draining));
        }
        let fair = if Some(*id) == draining {
            report.shards_owned == 0
        } else {
            fair_share.contains(&report.shards_owned)
        };
        if !fair {
            return Err(format!("node {id} owns {} shards", report.shards_owned));
        }
    }
    match reports.get(&leader) {
        Some(report) if report.raft_state == "leader" => Ok((leader, term, epoch)),
        _ => Err(format!("node {leader} does not say it leads")),
    }
}
