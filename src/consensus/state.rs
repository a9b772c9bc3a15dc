//! The replicated cluster state and its transitions: pure code, applied identically on every node
//! from log entries only (no clocks, no randomness, no I/O).
//!
//! Members mirror raft's membership (voters and learners, with their address and zone); every
//! change of the set of members that may own shards recomputes the shard map with the allocator
//! and bumps its epoch, so every node holds the same map for the same log index. This module does
//! not talk to raft or the network: the consensus actor feeds it entries.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::shard_map::{allocate, Member, NodeId, ShardId, ShardMap};

openraft::declare_raft_types!(
    /// The raft types of clusterfunk: commands change the [`ClusterState`].
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = NodeInfo,
);

// `declare_raft_types!` names `Cursor` for the snapshot data type.
#[allow(dead_code)]
type SnapshotData = Cursor<Vec<u8>>;

/// What the cluster knows of one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The address the node listens on (`IP:PORT`).
    pub addr: String,
    /// The zone (failure domain) the node runs in, if the operator gave one.
    pub zone: Option<String>,
    /// Whether the node votes in raft (a learner does not, but still hosts shards).
    pub voter: bool,
    /// Whether the operator is draining it: it keeps its membership but owns no shards.
    #[serde(default)]
    pub draining: bool,
    /// Whether the leader saw its lease expire: its shards moved to live nodes until it renews.
    #[serde(default)]
    pub down: bool,
}

impl MemberRecord {
    /// Whether the allocator may give the node shards.
    pub fn eligible(&self) -> bool {
        !self.draining && !self.down
    }
}

/// A planned move of one shard that waits for the old owner's release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingMove {
    /// The owner handing the shard over; it keeps `owner` until it releases.
    pub from: NodeId,
    /// The node the shard goes to.
    pub to: NodeId,
    /// The allocation epoch that started the move; a release must name it.
    pub epoch: u64,
}

/// The raft node record: what openraft stores of each member in its membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The address the node listens on (`IP:PORT`).
    pub addr: String,
    /// The node's zone, if any.
    pub zone: Option<String>,
}

/// The one spelling of an address that members are compared by: an IPv4 address written as
/// IPv6 (`[::ffff:127.0.0.1]:7000`) is the IPv4 address, so one process cannot be listed twice
/// under two spellings.
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether two member addresses (as stored in [`NodeInfo::addr`]) name the same socket; an
/// address that does not parse is compared as written.
pub fn same_addr(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(a), Ok(b)) => canonical_addr(a) == canonical_addr(b),
        _ => a == b,
    }
}

impl NodeInfo {
    /// Parses a member list `ID=IP:PORT[@ZONE],...` (as `kv serve --init` and `clusterfunk
    /// recover --members` take it). Errors say which item is wrong.
    pub fn parse_members(list: &str) -> Result<BTreeMap<NodeId, NodeInfo>, MemberListError> {
        let mut members: BTreeMap<NodeId, NodeInfo> = BTreeMap::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, rest) = item
                .split_once('=')
                .ok_or_else(|| MemberListError::Malformed {
                    item: item.to_owned(),
                })?;
            let id: NodeId = id
                .trim()
                .parse()
                .map_err(|source| MemberListError::NotANodeId {
                    id: id.to_owned(),
                    source,
                })?;
            let (addr, zone) = match rest.split_once('@') {
                Some((addr, zone)) if !zone.trim().is_empty() => {
                    (addr, Some(zone.trim().to_string()))
                }
                Some(_) => {
                    return Err(MemberListError::EmptyZone {
                        item: item.to_owned(),
                    })
                }
                None => (rest, None),
            };
            let addr: SocketAddr = canonical_addr(addr.trim().parse().map_err(|source| {
                MemberListError::NotAnAddress {
                    addr: addr.to_owned(),
                    source,
                }
            })?);
            let info = NodeInfo {
                addr: addr.to_string(),
                zone,
            };
            if members.contains_key(&id) {
                return Err(MemberListError::ListedTwice { id });
            }
            if let Some((other, _)) = members.iter().find(|(_, m)| same_addr(&m.addr, &info.addr)) {
                return Err(MemberListError::SharedAddress {
                    first: *other,
                    second: id,
                    addr,
                });
            }
            members.insert(id, info);
        }
        if members.is_empty() {
            return Err(MemberListError::Empty);
        }
        Ok(members)
    }
}

/// Why a member list `ID=IP:PORT[@ZONE],...` does not parse ([`NodeInfo::parse_members`]).
/// Each message names the item that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberListError {
    /// An item is not of the form `ID=IP:PORT[@ZONE]`.
    #[error("`{item}`: expected ID=IP:PORT[@ZONE]")]
    Malformed {
        /// The item as written.
        item: String,
    },
    /// The part before `=` is not a node id.
    #[error("`{id}` is not a node id (a positive integer)")]
    NotANodeId {
        /// The id as written.
        id: String,
        /// Why it does not parse.
        source: std::num::ParseIntError,
    },
    /// An item ends in `@` with no zone after it.
    #[error("`{item}`: the zone after `@` is empty; write ID=IP:PORT@ZONE, or leave out the `@`")]
    EmptyZone {
        /// The item as written.
        item: String,
    },
    /// The address of an item is not `IP:PORT`.
    #[error("`{addr}` is not IP:PORT")]
    NotAnAddress {
        /// The address as written.
        addr: String,
        /// Why it does not parse.
        source: std::net::AddrParseError,
    },
    /// A node id appears in two items.
    #[error("node {id} is listed twice")]
    ListedTwice {
        /// The node.
        id: NodeId,
    },
    /// Two nodes have the same address.
    #[error("nodes {first} and {second} have the same address {addr}: every node needs its own address (one process must not count twice toward the quorum)")]
    SharedAddress {
        /// The node listed first.
        first: NodeId,
        /// The node listed later.
        second: NodeId,
        /// The address both have.
        addr: SocketAddr,
    },
    /// The list names no node.
    #[error("the list is empty: expected ID=IP:PORT[@ZONE],...")]
    Empty,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.zone {
            Some(zone) => write!(f, "{} (zone {zone})", self.addr),
            None => f.write_str(&self.addr),
        }
    }
}

/// A command in the raft log (the normal entries; membership entries are raft's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// Fixes the shard count of a new cluster. Written once by the first leader; later ones are
    /// ignored, so the cluster's shard count can never change under its keys.
    Init {
        /// The number of shards keys are hashed into.
        shard_count: u32,
    },
    /// Starts (true) or ends (false) draining a node: a draining node keeps its membership and
    /// hands all its shards to others.
    SetDraining {
        /// The node.
        node: NodeId,
        /// Drain or undrain.
        draining: bool,
    },
    /// The leader saw `node`'s lease expire (rule 3): its shards go straight to live nodes.
    MarkDown {
        /// The node.
        node: NodeId,
    },
    /// A node marked down renewed again: it becomes eligible and gets shards back by handoff.
    MarkUp {
        /// The node.
        node: NodeId,
    },
    /// `from` handed these shards over for the move started at allocation epoch `epoch`.
    Released {
        /// The shards.
        shards: Vec<ShardId>,
        /// The allocation epoch of the moves.
        epoch: u64,
        /// The old owner.
        from: NodeId,
    },
    /// `from` could not hand these shards to `to` for a bound of time (the move of allocation
    /// `epoch` made no progress, e.g. `from` cannot reach `to` while both stay up): each such
    /// move is cancelled if `from` may keep the shard, or else re-targeted to the eligible node
    /// other than `to` that holds the fewest shards. Moves that changed meanwhile are left alone.
    // New variants go last: the log and the wire number them in order.
    MoveStuck {
        /// The shards.
        shards: Vec<ShardId>,
        /// The allocation epoch of the moves.
        epoch: u64,
        /// The old owner.
        from: NodeId,
        /// The target it could not reach.
        to: NodeId,
    },
}

/// The result of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CommandResponse {
    /// Applied; the shard map now has this epoch (0 when there is none yet).
    Applied {
        /// The map epoch after the command.
        epoch: u64,
    },
    /// A release: these shards changed owner (others named in it were not pending any more).
    Released {
        /// The shards released.
        shards: Vec<ShardId>,
        /// The map epoch after the command.
        epoch: u64,
    },
    /// Not applied, for the reason given (e.g. the cluster was already initialised).
    Ignored {
        /// Why.
        reason: String,
    },
}

/// The replicated state of the cluster.
///
/// `map` says who serves each shard now; `target` is where the allocator wants each shard. They
/// differ exactly at the `pending` moves: a planned move keeps the old owner in `map` until it
/// releases the shard. `epoch` counts allocations (leases are granted only to nodes that applied
/// the newest one); `map.epoch` counts every change of owners, releases included, and is the
/// fencing token handlers see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The shard count, once the first leader wrote `Command::Init`.
    pub shard_count: Option<u32>,
    /// Every member (voter or learner), by id.
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// The allocation epoch: bumped by every re-allocation.
    pub epoch: u64,
    /// Who serves each shard now, once the cluster has a shard count and members.
    pub map: Option<ShardMap>,
    /// Where the allocator places each shard.
    pub target: Option<ShardMap>,
    /// Planned moves waiting for the old owner's release, by shard.
    pub pending: BTreeMap<ShardId, PendingMove>,
    /// The map epoch at which each shard's current owner became its owner, for the shards whose
    /// owner changed since the first map (the others are owned since the first map, epoch 1).
    /// A durable shard activates with this epoch as its fencing token, so a restart in place or
    /// a reactivation after passivation uses the same token as before ([`Self::owned_since`]).
    pub owned_since: BTreeMap<ShardId, u64>,
}

impl ClusterState {
    /// Applies a normal log entry.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        match command {
            Command::SetDraining { node, draining } => {
                let Some(member) = self.members.get_mut(node) else {
                    return ignored(format!("node {node} is not a member"));
                };
                if member.draining != *draining {
                    member.draining = *draining;
                    self.reallocate();
                }
                self.applied()
            }
            Command::MarkDown { node } => {
                let Some(member) = self.members.get_mut(node) else {
                    return ignored(format!("node {node} is not a member"));
                };
                if !member.down {
                    member.down = true;
                    self.reallocate();
                }
                self.applied()
            }
            Command::MarkUp { node } => {
                let Some(member) = self.members.get_mut(node) else {
                    return ignored(format!("node {node} is not a member"));
                };
                if member.down {
                    member.down = false;
                    self.reallocate();
                }
                self.applied()
            }
            Command::Released {
                shards,
                epoch,
                from,
            } => {
                let mut released = Vec::new();
                for shard in shards {
                    if let Some(pending) = self.pending.get(shard) {
                        if pending.from == *from && pending.epoch == *epoch {
                            released.push((*shard, pending.to));
                        }
                    }
                }
                if released.is_empty() {
                    return ignored(
                        "no matching pending move (superseded or already released)".into(),
                    );
                }
                if let Some(map) = self.map.as_mut() {
                    map.epoch += 1;
                    for (shard, to) in &released {
                        self.pending.remove(shard);
                        if let Some(owner) = map.shards.get_mut(*shard as usize) {
                            *owner = *to;
                            self.owned_since.insert(*shard, map.epoch);
                        }
                    }
                }
                CommandResponse::Released {
                    shards: released.into_iter().map(|(shard, _)| shard).collect(),
                    epoch: self.map_epoch(),
                }
            }
            Command::MoveStuck {
                shards,
                epoch,
                from,
                to,
            } => self.move_stuck(shards, *epoch, *from, *to),
            Command::Init { shard_count } => {
                if let Some(existing) = self.shard_count {
                    return CommandResponse::Ignored {
                        reason: format!("the cluster already has {existing} shards"),
                    };
                }
                if *shard_count == 0 {
                    return CommandResponse::Ignored {
                        reason: "a cluster needs at least one shard".into(),
                    };
                }
                self.shard_count = Some(*shard_count);
                self.reallocate();
                self.applied()
            }
        }
    }

    /// Applies a raft membership entry: `nodes` are all members (voters and learners) with their
    /// records, `voters` the voting ones (of every configuration during a joint change).
    pub fn apply_membership<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = (NodeId, &'a NodeInfo)>,
        voters: impl IntoIterator<Item = NodeId>,
    ) {
        let voters: std::collections::BTreeSet<NodeId> = voters.into_iter().collect();
        let members: BTreeMap<NodeId, MemberRecord> = nodes
            .into_iter()
            .map(|(id, info)| {
                let previous = self.members.get(&id);
                (
                    id,
                    MemberRecord {
                        addr: info.addr.clone(),
                        zone: info.zone.clone(),
                        voter: voters.contains(&id),
                        draining: previous.is_some_and(|m| m.draining),
                        down: previous.is_some_and(|m| m.down),
                    },
                )
            })
            .collect();
        if members == self.members {
            return;
        }
        let eligible_changed = self.eligible() != eligible_of(&members);
        self.members = members;
        if eligible_changed || self.map.is_none() {
            self.reallocate();
        }
    }

    /// The members that may own shards, as the allocator sees them.
    fn eligible(&self) -> Vec<Member> {
        eligible_of(&self.members)
    }

    /// Re-allocates: the allocator places shards over the eligible members, starting from the
    /// previous placement (minimal movement). A shard whose owner is down or gone moves at once;
    /// one whose owner is alive becomes a pending move until the owner releases it. Without
    /// eligible members nothing moves.
    /// Applies [`Command::MoveStuck`].
    fn move_stuck(
        &mut self,
        shards: &[ShardId],
        epoch: u64,
        from: NodeId,
        to: NodeId,
    ) -> CommandResponse {
        let stuck: Vec<ShardId> = shards
            .iter()
            .copied()
            .filter(|shard| {
                self.pending
                    .get(shard)
                    .is_some_and(|p| p.from == from && p.to == to && p.epoch == epoch)
            })
            .collect();
        let keep_at_source = self.members.get(&from).is_some_and(|m| m.eligible());
        let (Some(target), Some(map)) = (self.target.as_mut(), self.map.as_mut()) else {
            return ignored("no shard map yet".into());
        };
        let mut counts: BTreeMap<NodeId, usize> = self
            .members
            .iter()
            .filter(|(id, m)| m.eligible() && **id != from && **id != to)
            .map(|(id, _)| (*id, 0))
            .collect();
        for owner in &target.shards {
            if let Some(count) = counts.get_mut(owner) {
                *count += 1;
            }
        }
        if stuck.is_empty() || (!keep_at_source && counts.is_empty()) {
            return ignored("no stuck move that could be cancelled or re-targeted".into());
        }
        self.epoch += 1;
        for shard in stuck {
            let index = shard as usize;
            if keep_at_source {
                self.pending.remove(&shard);
                if let Some(wanted) = target.shards.get_mut(index) {
                    *wanted = from;
                }
                continue;
            }
            let Some((&next, _)) = counts.iter().min_by_key(|(id, count)| (**count, **id)) else {
                break;
            };
            if let Some(count) = counts.get_mut(&next) {
                *count += 1;
            }
            if let Some(wanted) = target.shards.get_mut(index) {
                *wanted = next;
            }
            self.pending.insert(
                shard,
                PendingMove {
                    from,
                    to: next,
                    epoch: self.epoch,
                },
            );
        }
        // The pending moves changed what nodes may serve: the fencing token moves too.
        map.epoch += 1;
        self.applied()
    }

    fn reallocate(&mut self) {
        let Some(shard_count) = self.shard_count else {
            return;
        };
        let eligible = self.eligible();
        if eligible.is_empty() {
            return;
        }
        // Members and shard count are validated, so allocation cannot fail; if it did, keeping
        // the previous placement is the safe choice (no shard changes owner).
        let Ok(target) = allocate(self.target.as_ref(), &eligible, shard_count) else {
            return;
        };
        self.epoch += 1;
        let epoch = self.epoch;
        let Some(map) = self.map.as_mut() else {
            self.map = Some(ShardMap {
                epoch: 1,
                ..target.clone()
            });
            self.target = Some(target);
            return;
        };
        // Every allocation bumps the map's version too: pending moves change what each node may
        // serve, and handlers' fencing tokens must move with it.
        map.epoch += 1;
        for (shard, (owner, wanted)) in map.shards.iter_mut().zip(&target.shards).enumerate() {
            let shard = shard as ShardId;
            let owner_alive = self.members.get(owner).is_some_and(|m| !m.down);
            if owner == wanted {
                self.pending.remove(&shard);
            } else if !owner_alive {
                // The old owner's lease is known to have expired (or it left): move now.
                *owner = *wanted;
                self.pending.remove(&shard);
                self.owned_since.insert(shard, map.epoch);
            } else if self.pending.get(&shard).is_none_or(|p| p.to != *wanted) {
                self.pending.insert(
                    shard,
                    PendingMove {
                        from: *owner,
                        to: *wanted,
                        epoch,
                    },
                );
            }
        }
        map.members = target.members.clone();
        self.target = Some(target);
    }

    /// Whether `node` serves `shard` by this state: it owns it and it is not moving away.
    pub fn serves(&self, node: NodeId, shard: ShardId) -> bool {
        self.map.as_ref().and_then(|m| m.owner(shard)) == Some(node)
            && !self.pending.contains_key(&shard)
    }

    /// The shards `node` must hand over: pending moves away from it.
    pub fn moving_away(&self, node: NodeId) -> impl Iterator<Item = (ShardId, PendingMove)> + '_ {
        self.pending
            .iter()
            .filter(move |(_, p)| p.from == node)
            .map(|(s, p)| (*s, *p))
    }

    /// Whether draining `node` would leave no member to take its shards, so that the drain
    /// could never finish: every other member is draining or marked down.
    ///
    /// When `node` is eligible it is the last member that may own shards, and draining it would
    /// leave the allocator nothing to place shards on, now or at any later change. When it is
    /// already draining (a repeated drain), the drain changes nothing and is stranded only if
    /// the node is alive and still owns shards or has some moving to it. A node marked down
    /// counts as drained: its shards are not waiting for it. A node that is not a member is
    /// not this check's business (the caller refuses it by name).
    pub fn draining_leaves_no_taker(&self, node: NodeId) -> bool {
        let Some(member) = self.members.get(&node) else {
            return false;
        };
        let another_eligible = self
            .members
            .iter()
            .any(|(id, other)| *id != node && other.eligible());
        if another_eligible {
            return false;
        }
        if member.eligible() {
            return true;
        }
        let owns = self
            .map
            .as_ref()
            .is_some_and(|map| map.shards_of(node).next().is_some());
        let receiving = self.pending.values().any(|p| p.to == node);
        !member.down && (owns || receiving)
    }

    fn applied(&self) -> CommandResponse {
        CommandResponse::Applied {
            epoch: self.map_epoch(),
        }
    }

    /// The current map version (the fencing token), 0 before the first map.
    pub fn map_epoch(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.epoch)
    }

    /// The map epoch at which `shard`'s current owner became its owner: the fencing token of a
    /// durable shard's activation. It changes only when the shard changes owner, so the same
    /// node activating the shard again (after a restart in place or passivation) presents the
    /// same token, and a new owner always a greater one than every owner before it.
    pub fn owned_since(&self, shard: ShardId) -> u64 {
        self.owned_since.get(&shard).copied().unwrap_or(1)
    }
}

/// The cluster state as format version 1 stored it (before `owned_since`).
#[derive(Deserialize)]
struct ClusterStateV1 {
    shard_count: Option<u32>,
    members: BTreeMap<NodeId, MemberRecord>,
    epoch: u64,
    map: Option<ShardMap>,
    target: Option<ShardMap>,
    pending: BTreeMap<ShardId, PendingMove>,
}

/// Decodes a cluster state stored in a snapshot, by any format version this build reads. A
/// version-1 state had no `owned_since`: every shard counts as owned since the first map, which
/// only durable shards read, and those did not exist before version 2.
pub(crate) fn decode_stored(bytes: &[u8]) -> Result<ClusterState, crate::storage::CodecError> {
    use crate::storage::codec;
    if codec::version(bytes)? != 1 {
        return codec::decode(bytes);
    }
    let old: ClusterStateV1 = codec::decode(bytes)?;
    Ok(ClusterState {
        shard_count: old.shard_count,
        members: old.members,
        epoch: old.epoch,
        map: old.map,
        target: old.target,
        pending: old.pending,
        owned_since: BTreeMap::new(),
    })
}

fn ignored(reason: String) -> CommandResponse {
    CommandResponse::Ignored { reason }
}

fn eligible_of(members: &BTreeMap<NodeId, MemberRecord>) -> Vec<Member> {
    members
        .iter()
        .filter(|(_, record)| record.eligible())
        .map(|(id, record)| Member {
            id: *id,
            zone: record.zone.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(addr: &str, zone: Option<&str>) -> NodeInfo {
        NodeInfo {
            addr: addr.into(),
            zone: zone.map(str::to_string),
        }
    }

    #[test]
    fn no_map_until_init_then_balanced_over_members() {
        let mut state = ClusterState::default();
        let nodes = [
            (1, info("a:1", None)),
            (2, info("a:2", None)),
            (3, info("a:3", None)),
        ];
        state.apply_membership(nodes.iter().map(|(i, n)| (*i, n)), [1, 2, 3]);
        assert!(state.map.is_none(), "no shard count yet, no map");
        assert_eq!(
            state.apply(&Command::Init { shard_count: 12 }),
            CommandResponse::Applied { epoch: 1 }
        );
        let map = state.map.clone().unwrap();
        assert_eq!(
            map.counts().values().copied().collect::<Vec<_>>(),
            vec![4, 4, 4]
        );
        assert!(matches!(
            state.apply(&Command::Init { shard_count: 99 }),
            CommandResponse::Ignored { .. }
        ));
        assert_eq!(state.shard_count, Some(12));
    }

    fn nodes(ids: &[u64]) -> Vec<(u64, NodeInfo)> {
        ids.iter()
            .map(|i| (*i, info(&format!("a:{i}"), None)))
            .collect()
    }

    fn members(state: &mut ClusterState, all: &[u64], voters: &[u64]) {
        let list = nodes(all);
        state.apply_membership(list.iter().map(|(i, n)| (*i, n)), voters.iter().copied());
    }

    #[test]
    fn a_join_moves_shards_only_after_the_old_owners_release_them() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 30 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        let before = state.map.clone().unwrap();
        members(&mut state, &[1, 2, 3, 4], &[1, 2, 3]);
        assert!(!state.members[&4].voter, "a learner hosts shards too");
        assert_eq!(
            state.pending.len(),
            30 / 4,
            "the new node's share is pending"
        );
        assert!(state
            .pending
            .values()
            .all(|p| p.to == 4 && p.epoch == state.epoch));
        assert_eq!(
            state.map.as_ref().unwrap().shards,
            before.shards,
            "owners keep serving until released"
        );
        for (shard, pending) in state.pending.clone() {
            assert!(
                !state.serves(pending.from, shard),
                "a shard moving away is not served"
            );
        }
        // Node 1 releases its pending shards; a stale release (wrong epoch) is ignored.
        let from_one: Vec<ShardId> = state.moving_away(1).map(|(s, _)| s).collect();
        let stale = Command::Released {
            shards: from_one.clone(),
            epoch: state.epoch - 1,
            from: 1,
        };
        assert!(matches!(
            state.apply(&stale),
            CommandResponse::Ignored { .. }
        ));
        let version = state.map_epoch();
        state.apply(&Command::Released {
            shards: from_one.clone(),
            epoch: state.epoch,
            from: 1,
        });
        assert_eq!(
            state.map_epoch(),
            version + 1,
            "a release changes the fencing token"
        );
        for shard in from_one {
            assert!(state.serves(4, shard));
        }
        assert!(state.pending.values().all(|p| p.from != 1));
    }

    #[test]
    fn a_shards_activation_epoch_changes_only_when_its_owner_changes() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        let first = state.map.clone().unwrap();
        assert!((0..12).all(|shard| state.owned_since(shard) == first.epoch));
        // A node joins: pending moves bump the map epoch, but nobody changed owner yet.
        members(&mut state, &[1, 2, 3, 4], &[1, 2, 3]);
        assert!(state.map_epoch() > first.epoch);
        assert!((0..12).all(|shard| state.owned_since(shard) == first.epoch));
        let from_one: Vec<ShardId> = state.moving_away(1).map(|(s, _)| s).collect();
        state.apply(&Command::Released {
            shards: from_one.clone(),
            epoch: state.epoch,
            from: 1,
        });
        let released_at = state.map_epoch();
        for shard in 0..12 {
            let expected = match from_one.contains(&shard) {
                true => released_at,
                false => first.epoch,
            };
            assert_eq!(state.owned_since(shard), expected, "shard {shard}");
        }
        // Node 2 fails: its shards move at once, at the new map's epoch; the rest keep theirs.
        let owned_by_2: Vec<ShardId> = state.map.as_ref().unwrap().shards_of(2).collect();
        state.apply(&Command::MarkDown { node: 2 });
        let failed_over_at = state.map_epoch();
        for shard in 0..12 {
            if owned_by_2.contains(&shard) {
                assert_eq!(state.owned_since(shard), failed_over_at);
            } else {
                assert!(state.owned_since(shard) < failed_over_at);
            }
        }
    }

    #[test]
    fn a_version_1_snapshot_state_decodes_with_every_shard_owned_since_the_first_map() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 6 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        // Version 1 laid the state out as these six fields, in this order.
        let v1 = (
            state.shard_count,
            state.members.clone(),
            state.epoch,
            state.map.clone(),
            state.target.clone(),
            state.pending.clone(),
        );
        let mut bytes = crate::storage::codec::encode(&v1).unwrap();
        bytes[0] = 1;
        let back = decode_stored(&bytes).unwrap();
        assert_eq!(back, state);
        let current = crate::storage::codec::encode(&state).unwrap();
        assert_eq!(decode_stored(&current).unwrap(), state);
    }

    #[test]
    fn a_down_node_loses_its_shards_at_once_and_gets_them_back_by_handoff() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 30 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        let owned_by_2: Vec<ShardId> = state.map.as_ref().unwrap().shards_of(2).collect();
        state.apply(&Command::MarkDown { node: 2 });
        let map = state.map.clone().unwrap();
        assert_eq!(
            map.shards_of(2).count(),
            0,
            "no release is possible from a dead node"
        );
        assert!(state.pending.is_empty());
        assert!(owned_by_2.iter().all(|s| map.owner(*s) != Some(2)));
        state.apply(&Command::MarkUp { node: 2 });
        assert!(state.members[&2].eligible());
        assert_eq!(
            state.pending.values().filter(|p| p.to == 2).count(),
            10,
            "its share comes back by planned moves"
        );
    }

    #[test]
    fn draining_hands_every_shard_away_and_membership_stays() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        state.apply(&Command::SetDraining {
            node: 3,
            draining: true,
        });
        assert_eq!(state.moving_away(3).count(), 4);
        assert!(state.members.contains_key(&3));
        let shards: Vec<ShardId> = state.moving_away(3).map(|(s, _)| s).collect();
        state.apply(&Command::Released {
            shards,
            epoch: state.epoch,
            from: 3,
        });
        assert_eq!(state.map.as_ref().unwrap().shards_of(3).count(), 0);
        // Undrain: shards come back as pending moves to node 3.
        state.apply(&Command::SetDraining {
            node: 3,
            draining: false,
        });
        assert_eq!(state.pending.values().filter(|p| p.to == 3).count(), 4);
    }

    fn drain(state: &mut ClusterState, node: NodeId, draining: bool) {
        state.apply(&Command::SetDraining { node, draining });
    }

    fn release_all(state: &mut ClusterState, from: NodeId) {
        let shards: Vec<ShardId> = state.moving_away(from).map(|(s, _)| s).collect();
        if !shards.is_empty() {
            state.apply(&Command::Released {
                shards,
                epoch: state.epoch,
                from,
            });
        }
    }

    // Goal: the admin precondition refuses exactly the drains no node could take. Method: on 3
    // nodes drain 1 and 2 (allowed), then ask about 3, about repeated drains, about a node whose
    // only possible taker is marked down, and about an undrained one.
    #[test]
    fn draining_the_last_eligible_node_is_refused_up_front() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        assert!(!state.draining_leaves_no_taker(1), "two nodes can take");
        drain(&mut state, 1, true);
        release_all(&mut state, 1);
        assert!(!state.draining_leaves_no_taker(2), "node 3 can take");
        drain(&mut state, 2, true);
        release_all(&mut state, 2);
        assert_eq!(state.map.as_ref().unwrap().shards_of(3).count(), 12);
        assert!(
            state.draining_leaves_no_taker(3),
            "node 3 is the last eligible member"
        );
        assert!(
            !state.draining_leaves_no_taker(1),
            "draining a node that is already draining still works"
        );
        assert!(!state.draining_leaves_no_taker(9), "not a member: not ours");
        // Undrained, node 1 can take node 3's shards again.
        drain(&mut state, 1, false);
        assert!(!state.draining_leaves_no_taker(3));

        // Another member marked down is no taker either.
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        drain(&mut state, 1, true);
        release_all(&mut state, 1);
        state.apply(&Command::MarkDown { node: 2 });
        assert!(state.draining_leaves_no_taker(3), "1 drains, 2 is down");
        assert!(
            !state.draining_leaves_no_taker(2),
            "a node marked down holds nothing a drain waits for"
        );
    }

    #[test]
    fn a_repeated_drain_is_stranded_only_while_the_node_still_holds_shards() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        // Node 1 drains, but before it releases anything both possible takers go down.
        drain(&mut state, 1, true);
        state.apply(&Command::MarkDown { node: 2 });
        state.apply(&Command::MarkDown { node: 3 });
        assert!(state.map.as_ref().unwrap().shards_of(1).next().is_some());
        assert!(
            state.draining_leaves_no_taker(1),
            "its shards have nowhere to go"
        );
        // Once node 2 is back up it can take them.
        state.apply(&Command::MarkUp { node: 2 });
        assert!(!state.draining_leaves_no_taker(1));
    }

    #[test]
    fn a_stuck_move_from_a_draining_node_is_retargeted_and_from_a_live_one_cancelled() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 12 });
        members(&mut state, &[1, 2, 3], &[1, 2, 3]);
        state.apply(&Command::SetDraining {
            node: 3,
            draining: true,
        });
        let to_one: Vec<ShardId> = state
            .moving_away(3)
            .filter(|(_, p)| p.to == 1)
            .map(|(s, _)| s)
            .collect();
        assert!(!to_one.is_empty());
        let epoch = state.epoch;
        let version = state.map_epoch();
        let stuck = Command::MoveStuck {
            shards: to_one.clone(),
            epoch,
            from: 3,
            to: 1,
        };
        assert!(matches!(
            state.apply(&stuck),
            CommandResponse::Applied { .. }
        ));
        for shard in &to_one {
            let pending = state.pending[shard];
            assert_eq!(
                (pending.from, pending.to),
                (3, 2),
                "re-targeted to the other node"
            );
            assert!(
                pending.epoch > epoch,
                "with a new epoch, so a late release is refused"
            );
        }
        assert!(state.map_epoch() > version, "the fencing token moves");
        assert!(
            matches!(state.apply(&stuck), CommandResponse::Ignored { .. }),
            "a second report of the same moves changes nothing"
        );

        // Node 4 joins; node 1 cannot reach it: node 1 may keep its shards, so the moves are
        // cancelled.
        state.apply(&Command::SetDraining {
            node: 3,
            draining: false,
        });
        members(&mut state, &[1, 2, 3, 4], &[1, 2, 3]);
        let to_four: Vec<ShardId> = state
            .moving_away(1)
            .filter(|(_, p)| p.to == 4)
            .map(|(s, _)| s)
            .collect();
        assert!(!to_four.is_empty());
        state.apply(&Command::MoveStuck {
            shards: to_four.clone(),
            epoch: state.epoch,
            from: 1,
            to: 4,
        });
        for shard in &to_four {
            assert!(!state.pending.contains_key(shard), "cancelled");
            assert!(state.serves(1, *shard), "served where it is");
            assert_eq!(state.target.as_ref().unwrap().owner(*shard), Some(1));
        }
    }

    #[test]
    fn removing_a_member_moves_only_its_shards() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 30 });
        members(&mut state, &[1, 2, 3, 4], &[1, 2, 3, 4]);
        let before = state.target.clone().unwrap();
        members(&mut state, &[1, 3, 4], &[1, 3, 4]);
        let after = state.target.clone().unwrap();
        assert!(after
            .moved_from(&before)
            .iter()
            .all(|(_, from, _)| *from == 2));
        assert_eq!(after.shards_of(2).count(), 0);
    }

    #[test]
    fn applying_the_same_entries_gives_the_same_state() {
        let run = || {
            let mut state = ClusterState::default();
            let nodes = [
                (5, info("x:5", Some("a"))),
                (9, info("x:9", Some("b"))),
                (2, info("x:2", Some("c"))),
            ];
            state.apply_membership(nodes.iter().map(|(i, n)| (*i, n)), [5, 9, 2]);
            state.apply(&Command::Init { shard_count: 1024 });
            state.apply_membership(nodes[..2].iter().map(|(i, n)| (*i, n)), [5, 9]);
            state
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn member_lists_parse_and_refuse_bad_items() {
        let members = NodeInfo::parse_members("1=127.0.0.1:7001@a, 2=127.0.0.2:7002").unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[&1].zone.as_deref(), Some("a"));
        assert_eq!(members[&2].addr, "127.0.0.2:7002");
        assert_eq!(members[&2].zone, None);
        assert_eq!(NodeInfo::parse_members(""), Err(MemberListError::Empty));
        assert_eq!(
            NodeInfo::parse_members("1"),
            Err(MemberListError::Malformed { item: "1".into() })
        );
        assert!(matches!(
            NodeInfo::parse_members("x=127.0.0.1:1"),
            Err(MemberListError::NotANodeId { id, .. }) if id == "x"
        ));
        assert!(matches!(
            NodeInfo::parse_members("1=nowhere"),
            Err(MemberListError::NotAnAddress { addr, .. }) if addr == "nowhere"
        ));
        assert!(matches!(
            NodeInfo::parse_members("1=127.0.0.1:1@"),
            Err(MemberListError::EmptyZone { .. })
        ));
        assert_eq!(
            NodeInfo::parse_members("1=127.0.0.1:1,1=127.0.0.1:2"),
            Err(MemberListError::ListedTwice { id: 1 })
        );
    }

    #[test]
    fn a_member_list_with_one_address_twice_is_refused() {
        let error = NodeInfo::parse_members("1=127.0.0.1:7001,2=127.0.0.1:7001")
            .expect_err("one process must not count twice");
        assert!(
            matches!(
                error,
                MemberListError::SharedAddress {
                    first: 1,
                    second: 2,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains("nodes 1 and 2 have the same address 127.0.0.1:7001"),
            "{error}"
        );
    }

    #[test]
    fn one_address_spelled_as_ipv4_and_as_ipv6_is_one_address() {
        let error = NodeInfo::parse_members("1=127.0.0.1:7001,2=[::ffff:127.0.0.1]:7001")
            .expect_err("an IPv4-mapped IPv6 address is the IPv4 address");
        assert!(
            matches!(error, MemberListError::SharedAddress { .. }),
            "{error:?}"
        );
        let members = NodeInfo::parse_members("1=[::ffff:10.0.0.1]:7001").expect("parses");
        assert_eq!(members[&1].addr, "10.0.0.1:7001", "stored in one spelling");
        assert!(same_addr("[::ffff:127.0.0.1]:1", "127.0.0.1:1"));
        assert!(!same_addr("127.0.0.1:1", "127.0.0.2:1"));
        assert!(!same_addr("[::1]:1", "127.0.0.1:1"));
    }
}
