//! The replicated cluster state and its transitions: pure code, applied identically on every node
//! from log entries only (no clocks, no randomness, no I/O).
//!
//! Members mirror raft's membership (voters and learners, with their address and zone); every
//! change of the set of members that may own shards recomputes the shard map with the allocator
//! and bumps its epoch, so every node holds the same map for the same log index. This module does
//! not talk to raft or the network: the consensus actor feeds it entries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::shard_map::{allocate, Member, NodeId, ShardMap};

/// What the cluster knows of one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The address the node listens on (`IP:PORT`).
    pub addr: String,
    /// The zone (failure domain) the node runs in, if the operator gave one.
    pub zone: Option<String>,
    /// Whether the node votes in raft (a learner does not, but still hosts shards).
    pub voter: bool,
}

/// The raft node record: what openraft stores of each member in its membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The address the node listens on (`IP:PORT`).
    pub addr: String,
    /// The node's zone, if any.
    pub zone: Option<String>,
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
    /// Not applied, for the reason given (e.g. the cluster was already initialised).
    Ignored {
        /// Why.
        reason: String,
    },
}

/// The replicated state of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The shard count, once the first leader wrote [`Command::Init`].
    pub shard_count: Option<u32>,
    /// Every member (voter or learner), by id.
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// The current shard map, once the cluster has a shard count and members.
    pub map: Option<ShardMap>,
}

impl ClusterState {
    /// Applies a normal log entry.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        match command {
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
                (
                    id,
                    MemberRecord {
                        addr: info.addr.clone(),
                        zone: info.zone.clone(),
                        voter: voters.contains(&id),
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

    /// Recomputes the map from the previous one (minimal movement) when there is anything to
    /// allocate; without eligible members the previous map stays.
    fn reallocate(&mut self) {
        let Some(shard_count) = self.shard_count else {
            return;
        };
        let eligible = self.eligible();
        if eligible.is_empty() {
            return;
        }
        // Members and shard count are validated above, so allocation cannot fail; if it did,
        // keeping the previous map is the safe choice (no shard changes owner).
        if let Ok(map) = allocate(self.map.as_ref(), &eligible, shard_count) {
            self.map = Some(map);
        }
    }

    fn applied(&self) -> CommandResponse {
        CommandResponse::Applied {
            epoch: self.map.as_ref().map_or(0, |m| m.epoch),
        }
    }

    /// The current map epoch, 0 before the first map.
    pub fn epoch(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.epoch)
    }
}

fn eligible_of(members: &BTreeMap<NodeId, MemberRecord>) -> Vec<Member> {
    members
        .iter()
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

    #[test]
    fn membership_changes_bump_the_epoch_and_move_only_what_they_must() {
        let mut state = ClusterState::default();
        state.apply(&Command::Init { shard_count: 30 });
        let three = [
            (1, info("a:1", None)),
            (2, info("a:2", None)),
            (3, info("a:3", None)),
        ];
        state.apply_membership(three.iter().map(|(i, n)| (*i, n)), [1, 2, 3]);
        let before = state.map.clone().unwrap();
        // A learner joins: it gets shards too.
        let four = [three.to_vec(), vec![(4, info("a:4", None))]].concat();
        state.apply_membership(four.iter().map(|(i, n)| (*i, n)), [1, 2, 3]);
        let after = state.map.clone().unwrap();
        assert_eq!(after.epoch, before.epoch + 1);
        assert!(after.moved_from(&before).iter().all(|(_, _, to)| *to == 4));
        assert!(!state.members[&4].voter);
        // Promoting it to voter changes no shard.
        state.apply_membership(four.iter().map(|(i, n)| (*i, n)), [1, 2, 3, 4]);
        assert_eq!(state.map.as_ref().unwrap().epoch, after.epoch);
        assert!(state.members[&4].voter);
        // Removing node 2 moves only node 2's shards.
        let without_two: Vec<_> = four.iter().filter(|(i, _)| *i != 2).cloned().collect();
        state.apply_membership(without_two.iter().map(|(i, n)| (*i, n)), [1, 3, 4]);
        let last = state.map.clone().unwrap();
        assert!(last
            .moved_from(&after)
            .iter()
            .all(|(_, from, _)| *from == 2));
        assert_eq!(last.shards_of(2).count(), 0);
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
}
