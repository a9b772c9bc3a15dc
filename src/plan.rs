//! The topology planner: given how many voters (and learners) run in each zone, which failures
//! the cluster survives, what is wrong with the layout, and the nearest layout that is better.
//!
//! Pure code: no I/O, no clocks. The `clusterfunk plan` command builds a [`Layout`] from
//! `--zones a=2,b=2,c=1` or from a running cluster's `nodes` answer ([`Layout::from_nodes`]) and
//! prints [`Plan::of`] it; `add-node` and `remove-node` print the plan of the layout they leave.
//! This module neither reads nor changes a cluster.
//!
//! # The model
//!
//! - **Quorum.** Membership changes only by operator command, never because a node failed: a
//!   dead voter stays a voter. A quorum is therefore always a majority of *all* voters,
//!   `voters / 2 + 1` ([`quorum`]), however many have failed.
//! - **Zones.** A zone is a failure domain: a data centre, an availability zone, a rack. All
//!   nodes of a zone may fail together. Nodes without a zone count as one zone named `-`
//!   ([`NO_ZONE`]): the planner cannot tell where they run, so it assumes the worst, that they
//!   share a fate, and says so in a [`WarningKind::NoZones`] warning.
//! - **Scenarios.** One row per failure: one node in each zone (nodes of a zone are alike, so one
//!   row per zone stands for all of them; it fails a voter when the zone has one, the worse case),
//!   each whole zone, and each pair of zones when there are at least three (with two zones a pair
//!   is the whole cluster, and with one there is no pair).
//! - **Every shard stays served** iff a quorum survives and at least one node survives. Why, from
//!   the lease rules (`crate::lease`, `crate::consensus`): a node serves only while it holds a
//!   lease, and only a leader grants one, after a quorum confirmation round. Without a quorum no
//!   leader is elected or confirmed, so every surviving node's lease runs out and nothing is
//!   served. With a quorum, a leader is (or is soon) elected; once a failed node's lease has
//!   certainly expired the leader commits `MarkDown` for it, which needs that same quorum, and
//!   the allocator hands the node's shards to the members that are neither down nor draining.
//!   The surviving voters are such members, so with a quorum there is always a host. "Served"
//!   means served again after that failover: the shards of the failed nodes are unavailable for
//!   up to the lease wait plus an election, and their in-memory state is lost. The planner does
//!   not model draining (a draining node votes but hosts nothing); a partitioned zone behaves as
//!   a failed one for the other side, and its own side stops serving when its leases run out.
//! - **Suggestion.** A layout is *sound* when it has an odd number of voters, at least three,
//!   and no zone holds so many that losing it loses the quorum (each zone at most
//!   `(voters - 1) / 2`; this takes at least three zones). For a layout that is not, the planner
//!   suggests the sound layout reached with the fewest changes, counting each voter added,
//!   removed or moved to another zone as one change; among equally near layouts it prefers more
//!   voters (more failures tolerated). Learners are left where they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::admin::NodesReport;

/// The zone that nodes without a zone are counted in.
pub const NO_ZONE: &str = "-";

/// The most voters a layout may have (raft clusters run 3 to 9; the limit only guards the tool).
pub const VOTERS_MAX: usize = 99;

/// The most learners a layout may have.
pub const LEARNERS_MAX: usize = 999;

/// The most zones a layout may have.
pub const ZONES_MAX: usize = 32;

/// The longest zone name a layout spec may give, in bytes.
pub const ZONE_NAME_LENGTH_MAX: usize = 64;

/// How many voter failures a cluster of `voters` voters tolerates with a quorum left.
pub fn failures_tolerated(voters: usize) -> usize {
    voters.saturating_sub(1) / 2
}

/// How many voters a quorum of a cluster of `voters` voters takes: a majority of all of them.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Warnings for a layout of `voters` voters: even counts and fewer than three. The membership
/// commands report these; [`Plan::of`] reports the same problems, and more, for a whole layout.
pub fn layout_warnings(voters: usize) -> Vec<String> {
    voter_count_problem(voters)
        .map(|(_, problem)| format!("the cluster now has {problem}"))
        .into_iter()
        .collect()
}

/// What is wrong with `voters` as a voter count, completing "the cluster has …".
fn voter_count_problem(voters: usize) -> Option<(WarningKind, String)> {
    let tolerated = failures_tolerated(voters);
    let failures = if tolerated == 1 {
        "failure"
    } else {
        "failures"
    };
    if voters < 3 {
        Some((
            WarningKind::FewVoters,
            format!("{voters} voter(s) and tolerates {tolerated} {failures}: run at least 3 voters"),
        ))
    } else if voters.is_multiple_of(2) {
        Some((
            WarningKind::EvenVoters,
            format!(
                "an even number of voters ({voters}) and tolerates {tolerated} {failures}, no more than {} voters would: use an odd count",
                voters - 1
            ),
        ))
    } else {
        None
    }
}

/// Why a layout could not be built. Each message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The spec is empty.
    #[error("no zones given: write ZONE=COUNT for each zone, e.g. `a=2,b=2,c=1`")]
    Empty,
    /// One comma-separated entry is empty.
    #[error("entry {position} of the zone list is empty (a doubled or trailing comma?): write ZONE=COUNT entries separated by single commas, e.g. `a=2,b=2,c=1`")]
    EmptyEntry {
        /// Which entry, counting from 1.
        position: usize,
    },
    /// An entry has no `=COUNT`.
    #[error("`{entry}` has no count: write ZONE=COUNT, e.g. `{entry}=1`")]
    MissingCount {
        /// The entry as written.
        entry: String,
    },
    /// An entry has no zone before its `=`.
    #[error("`{entry}` has no zone name before `=`: write ZONE=COUNT, e.g. `a{entry}`")]
    MissingZone {
        /// The entry as written.
        entry: String,
    },
    /// A zone name holds characters other than letters, digits, `-`, `_`, `.` and `:`, or is
    /// too long.
    #[error("`{zone}` is not a zone name: use up to 64 letters, digits, `-`, `_`, `.` or `:`, e.g. `eu-west-1a`")]
    BadZoneName {
        /// The name as written.
        zone: String,
    },
    /// A count is not a whole number.
    #[error("`{count}` is not a node count (zone {zone}): write a whole number of at least 1, e.g. `{zone}=2`")]
    BadCount {
        /// The zone.
        zone: String,
        /// The count as written.
        count: String,
    },
    /// A count is zero.
    #[error("zone {zone} has 0 nodes: leave the zone out, or give it at least 1, e.g. `{zone}=1`")]
    ZeroCount {
        /// The zone.
        zone: String,
    },
    /// A zone is given twice.
    #[error("zone {zone} is given twice: give each zone once with its total, e.g. `{zone}=3`")]
    DuplicateZone {
        /// The zone.
        zone: String,
    },
    /// More voters or learners than the planner takes.
    #[error("{count} {what} is more than the planner takes ({max}): raft clusters run 3 to 9 voters; add learners beyond that")]
    TooMany {
        /// `voters` or `learners`.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More zones than the planner takes.
    #[error("{zones} zones is more than the planner takes ({max}): group nodes into fewer zones")]
    TooManyZones {
        /// How many were given.
        zones: usize,
        /// The limit.
        max: usize,
    },
    /// The layout has learners only.
    #[error("the layout has no voters: a cluster needs at least one (run 3, 5, 7 or 9 over three zones)")]
    NoVoters,
    /// A `nodes` answer names a role other than `voter` and `learner`.
    #[error("node {id} has the unknown role `{role}`: upgrade the clusterfunk tool")]
    UnknownRole {
        /// The node.
        id: u64,
        /// Its role as reported.
        role: String,
    },
}

/// Whether a member votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A raft voter: counts towards the quorum and hosts shards.
    Voter,
    /// A raft learner: hosts shards but does not vote.
    Learner,
}

/// How many nodes of each role run in one zone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ZoneNodes {
    /// Voters in the zone.
    pub voters: usize,
    /// Learners in the zone.
    pub learners: usize,
}

impl ZoneNodes {
    /// Voters and learners together.
    pub fn nodes(&self) -> usize {
        self.voters + self.learners
    }
}

/// How many voters and learners run in each zone. Zones are kept in name order; every zone
/// holds at least one node. Serialises as `{"zone": {"voters": V, "learners": L}, ..}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Layout {
    zones: BTreeMap<String, ZoneNodes>,
}

impl Layout {
    /// The layout of a cluster's members, each given by its zone (`None` or empty: no zone,
    /// counted in [`NO_ZONE`]) and role. Zone names from a cluster are taken as they are.
    pub fn from_members<'a>(
        members: impl IntoIterator<Item = (Option<&'a str>, Role)>,
    ) -> Result<Layout, LayoutError> {
        let mut layout = Layout::default();
        for (zone, role) in members {
            let zone = zone.filter(|z| !z.trim().is_empty()).unwrap_or(NO_ZONE);
            let entry = layout.zones.entry(zone.to_string()).or_default();
            match role {
                Role::Voter => entry.voters += 1,
                Role::Learner => entry.learners += 1,
            }
        }
        layout.validate()?;
        Ok(layout)
    }

    /// The layout of the members in a `nodes` answer, voters and learners by zone.
    pub fn from_nodes(report: &NodesReport) -> Result<Layout, LayoutError> {
        let members = report
            .nodes
            .iter()
            .map(|node| {
                let role = match node.role.as_str() {
                    "voter" => Role::Voter,
                    "learner" => Role::Learner,
                    other => {
                        return Err(LayoutError::UnknownRole {
                            id: node.id,
                            role: other.to_string(),
                        })
                    }
                };
                Ok((node.zone.as_deref(), role))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Layout::from_members(members)
    }

    /// This layout with learners added per zone, from a spec in the voters' syntax
    /// (`a=1,c=2`); a zone may be new.
    pub fn with_learners(mut self, spec: &str) -> Result<Layout, LayoutError> {
        for (zone, count) in parse_counts(spec, "learners", LEARNERS_MAX)? {
            self.zones.entry(zone).or_default().learners += count;
        }
        self.validate()?;
        Ok(self)
    }

    /// Every zone with its nodes, in name order.
    pub fn zones(&self) -> impl Iterator<Item = (&str, ZoneNodes)> + '_ {
        self.zones.iter().map(|(zone, nodes)| (zone.as_str(), *nodes))
    }

    /// The nodes of one zone, if the layout has it.
    pub fn zone(&self, zone: &str) -> Option<ZoneNodes> {
        self.zones.get(zone).copied()
    }

    /// How many zones hold a node.
    pub fn zone_count(&self) -> usize {
        self.zones.len()
    }

    /// All voters.
    pub fn voters(&self) -> usize {
        self.zones.values().map(|z| z.voters).sum()
    }

    /// All learners.
    pub fn learners(&self) -> usize {
        self.zones.values().map(|z| z.learners).sum()
    }

    /// The voters as a spec, `a=2,b=2,c=1` (zones without voters left out).
    pub fn voters_spec(&self) -> String {
        spec(self.zones.iter().map(|(zone, nodes)| (zone, nodes.voters)))
    }

    /// The learners as a spec, `a=1`; `None` without learners.
    pub fn learners_spec(&self) -> Option<String> {
        (self.learners() > 0)
            .then(|| spec(self.zones.iter().map(|(zone, nodes)| (zone, nodes.learners))))
    }

    fn validate(&self) -> Result<(), LayoutError> {
        let (voters, learners) = (self.voters(), self.learners());
        if voters > VOTERS_MAX {
            return Err(LayoutError::TooMany {
                what: "voters",
                count: voters,
                max: VOTERS_MAX,
            });
        }
        if learners > LEARNERS_MAX {
            return Err(LayoutError::TooMany {
                what: "learners",
                count: learners,
                max: LEARNERS_MAX,
            });
        }
        if self.zones.len() > ZONES_MAX {
            return Err(LayoutError::TooManyZones {
                zones: self.zones.len(),
                max: ZONES_MAX,
            });
        }
        if voters == 0 {
            return Err(LayoutError::NoVoters);
        }
        Ok(())
    }
}

/// Parses the voters' spec, `ZONE=COUNT,...` (e.g. `a=2,b=2,c=1`). `-` names the nodes without
/// a zone. Spaces around entries are ignored; zone names are letters, digits, `-`, `_`, `.`, `:`.
impl FromStr for Layout {
    type Err = LayoutError;

    fn from_str(spec: &str) -> Result<Layout, LayoutError> {
        let zones = parse_counts(spec, "voters", VOTERS_MAX)?
            .into_iter()
            .map(|(zone, voters)| {
                (
                    zone,
                    ZoneNodes {
                        voters,
                        learners: 0,
                    },
                )
            })
            .collect();
        let layout = Layout { zones };
        layout.validate()?;
        Ok(layout)
    }
}

/// The voters' spec, followed by the learners' as `(learners: a=1)` when there are any.
impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.voters_spec())?;
        if let Some(learners) = self.learners_spec() {
            write!(f, " (learners: {learners})")?;
        }
        Ok(())
    }
}

fn spec<'a>(counts: impl Iterator<Item = (&'a String, usize)>) -> String {
    counts
        .filter(|(_, count)| *count > 0)
        .map(|(zone, count)| format!("{zone}={count}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `ZONE=COUNT,...` into counts by zone, each at least 1, `max` in all.
fn parse_counts(
    spec: &str,
    what: &'static str,
    max: usize,
) -> Result<BTreeMap<String, usize>, LayoutError> {
    if spec.trim().is_empty() {
        return Err(LayoutError::Empty);
    }
    let mut counts = BTreeMap::new();
    let mut total = 0usize;
    for (index, entry) in spec.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(LayoutError::EmptyEntry {
                position: index + 1,
            });
        }
        let Some((zone, count)) = entry.split_once('=') else {
            return Err(LayoutError::MissingCount {
                entry: entry.to_string(),
            });
        };
        let (zone, count) = (zone.trim(), count.trim());
        if zone.is_empty() {
            return Err(LayoutError::MissingZone {
                entry: entry.to_string(),
            });
        }
        let valid_name = zone.len() <= ZONE_NAME_LENGTH_MAX
            && zone
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if !valid_name {
            return Err(LayoutError::BadZoneName {
                zone: zone.to_string(),
            });
        }
        let count: usize = count.parse().map_err(|_| LayoutError::BadCount {
            zone: zone.to_string(),
            count: count.to_string(),
        })?;
        if count == 0 {
            return Err(LayoutError::ZeroCount {
                zone: zone.to_string(),
            });
        }
        total = total.saturating_add(count);
        if total > max {
            return Err(LayoutError::TooMany {
                what,
                count: total,
                max,
            });
        }
        if counts.insert(zone.to_string(), count).is_some() {
            return Err(LayoutError::DuplicateZone {
                zone: zone.to_string(),
            });
        }
        if counts.len() > ZONES_MAX {
            return Err(LayoutError::TooManyZones {
                zones: counts.len(),
                max: ZONES_MAX,
            });
        }
    }
    Ok(counts)
}

/// What fails in a [`Scenario`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// One node of the zone (a voter if the zone has one).
    Node,
    /// A whole zone.
    Zone,
    /// Two whole zones at once.
    TwoZones,
}

/// One failure and what the cluster keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// What fails.
    pub failure: Failure,
    /// The zone of the failed node, the failed zone, or the two failed zones.
    pub zones: Vec<String>,
    /// The failure in words: `one voter in zone a`, `zone a`, `zones a and b`.
    pub description: String,
    /// Voters lost.
    pub voters_lost: usize,
    /// Voters left.
    pub voters_left: usize,
    /// Voters a quorum takes (a majority of all voters, failed ones included).
    pub quorum: usize,
    /// Whether the voters left make a quorum, so a leader can be elected and change the map.
    pub quorum_survives: bool,
    /// Nodes (voters and learners) left.
    pub nodes_left: usize,
    /// Whether every shard is served again once the failed nodes' shards moved: a quorum
    /// survives and a node is left to host them (see the module docs).
    pub shards_served: bool,
}

/// What a [`Warning`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// Fewer than three voters: one failure (or none) loses the quorum.
    FewVoters,
    /// An even number of voters tolerates no more failures than one voter fewer.
    EvenVoters,
    /// Every voter is in one zone: losing it stops the cluster.
    SingleZone,
    /// Nodes without a zone, counted as one zone `-`.
    NoZones,
    /// The voters are in two zones: losing the bigger one loses the quorum.
    TwoZones,
    /// One zone holds so many voters (a majority, or half of an even count) that losing it
    /// loses the quorum.
    ZoneMajority,
}

/// A problem with a layout, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// What it is about.
    pub kind: WarningKind,
    /// The zone it names, if any.
    pub zone: Option<String>,
    /// The problem and what to do, in one sentence.
    pub message: String,
}

/// One step from a layout to its [`Suggestion`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Run voters in another zone instead (for a live cluster: `remove-node`, then `add-node
    /// --zone` on a host in the other zone).
    Move {
        /// The zone they leave.
        from: String,
        /// The zone they go to.
        to: String,
        /// How many.
        voters: usize,
        /// Whether `to` is a zone the layout does not use yet.
        new_zone: bool,
    },
    /// Add voters.
    Add {
        /// Their zone.
        zone: String,
        /// How many.
        voters: usize,
        /// Whether the zone is one the layout does not use yet.
        new_zone: bool,
    },
    /// Remove voters.
    Remove {
        /// Their zone.
        zone: String,
        /// How many.
        voters: usize,
    },
}

fn voters_word(count: usize) -> &'static str {
    if count == 1 {
        "voter"
    } else {
        "voters"
    }
}

fn zone_words(zone: &str, new_zone: bool) -> String {
    if new_zone {
        format!("new zone {zone}")
    } else {
        format!("zone {zone}")
    }
}

/// `move 1 voter from zone a to new zone c`, `add 1 voter in zone b`, `remove 2 voters from
/// zone a`.
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Move {
                from,
                to,
                voters,
                new_zone,
            } => write!(
                f,
                "move {voters} {} from zone {from} to {}",
                voters_word(*voters),
                zone_words(to, *new_zone)
            ),
            Change::Add {
                zone,
                voters,
                new_zone,
            } => write!(
                f,
                "add {voters} {} in {}",
                voters_word(*voters),
                zone_words(zone, *new_zone)
            ),
            Change::Remove { zone, voters } => write!(
                f,
                "remove {voters} {} from zone {zone}",
                voters_word(*voters)
            ),
        }
    }
}

/// The nearest sound layout (see the module docs) and how to get there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    /// The suggested layout (learners where they were).
    pub layout: Layout,
    /// Its voters as a spec for `plan --zones`.
    pub spec: String,
    /// The steps from the current layout: moves, then additions, then removals.
    pub changes: Vec<Change>,
    /// Voters added.
    pub voters_added: usize,
    /// Voters removed.
    pub voters_removed: usize,
    /// Voters moved to another zone.
    pub voters_moved: usize,
    /// Voter failures the suggested layout tolerates.
    pub node_failures_tolerated: usize,
    /// Zone failures the suggested layout tolerates.
    pub zone_failures_tolerated: usize,
}

/// The planner's verdict on a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The layout judged.
    pub layout: Layout,
    /// All voters.
    pub voters: usize,
    /// All learners.
    pub learners: usize,
    /// Voters a quorum takes.
    pub quorum: usize,
    /// Each failure and what survives it: single nodes (one row per zone), single zones, pairs
    /// of zones (with three zones or more).
    pub scenarios: Vec<Scenario>,
    /// How many voters may fail, wherever they are, with every shard still served.
    pub node_failures_tolerated: usize,
    /// How many zones may fail, whichever they are, with every shard still served.
    pub zone_failures_tolerated: usize,
    /// Whether every single-node failure leaves every shard served.
    pub survives_node_failure: bool,
    /// Whether every single-zone failure leaves every shard served.
    pub survives_zone_failure: bool,
    /// Both of the above: what `clusterfunk plan`'s exit code reports.
    pub survives: bool,
    /// What is wrong with the layout: the voter count first, then the zones.
    pub warnings: Vec<Warning>,
    /// The nearest sound layout, when this one is not sound.
    pub suggestion: Option<Suggestion>,
}

impl Plan {
    /// Judges `layout`.
    pub fn of(layout: &Layout) -> Plan {
        let voters = layout.voters();
        let nodes = voters + layout.learners();
        let quorum = quorum(voters);
        let row = |failure, zones: Vec<&str>, voters_lost: usize, nodes_lost: usize| {
            let voters_left = voters.saturating_sub(voters_lost);
            let nodes_left = nodes.saturating_sub(nodes_lost);
            let quorum_survives = voters_left >= quorum;
            let description = match (failure, zones.as_slice()) {
                (Failure::Node, [zone]) if voters_lost > 0 => format!("one voter in zone {zone}"),
                (Failure::Node, [zone]) => format!("one learner in zone {zone}"),
                (Failure::TwoZones, [first, second]) => format!("zones {first} and {second}"),
                _ => format!("zone {}", zones.join(",")),
            };
            Scenario {
                failure,
                zones: zones.iter().map(|zone| zone.to_string()).collect(),
                description,
                voters_lost,
                voters_left,
                quorum,
                quorum_survives,
                nodes_left,
                shards_served: quorum_survives && nodes_left > 0,
            }
        };
        let zones: Vec<(&str, ZoneNodes)> = layout.zones().collect();
        let mut scenarios = Vec::new();
        for (zone, counts) in &zones {
            scenarios.push(row(Failure::Node, vec![zone], counts.voters.min(1), 1));
        }
        for (zone, counts) in &zones {
            scenarios.push(row(
                Failure::Zone,
                vec![zone],
                counts.voters,
                counts.nodes(),
            ));
        }
        if zones.len() >= 3 {
            for (index, (first, a)) in zones.iter().enumerate() {
                for (second, b) in &zones[index + 1..] {
                    scenarios.push(row(
                        Failure::TwoZones,
                        vec![first, second],
                        a.voters + b.voters,
                        a.nodes() + b.nodes(),
                    ));
                }
            }
        }
        let survives_all = |failure| {
            scenarios
                .iter()
                .filter(|s| s.failure == failure)
                .all(|s| s.shards_served)
        };
        let survives_node_failure = survives_all(Failure::Node);
        let survives_zone_failure = survives_all(Failure::Zone);
        let voters_by_zone: Vec<usize> = zones.iter().map(|(_, z)| z.voters).collect();
        Plan {
            layout: layout.clone(),
            voters,
            learners: layout.learners(),
            quorum,
            node_failures_tolerated: failures_tolerated(voters),
            zone_failures_tolerated: zone_failures_tolerated(&voters_by_zone),
            survives_node_failure,
            survives_zone_failure,
            survives: survives_node_failure && survives_zone_failure,
            warnings: warnings(layout),
            suggestion: suggest(layout),
            scenarios,
        }
    }
}

/// The most zones that may fail, whichever they are, with a quorum left: the worst `k` zones
/// to lose are the `k` with the most voters.
fn zone_failures_tolerated(voters_by_zone: &[usize]) -> usize {
    let voters: usize = voters_by_zone.iter().sum();
    let quorum = quorum(voters);
    let mut descending = voters_by_zone.to_vec();
    descending.sort_unstable_by(|a, b| b.cmp(a));
    let mut lost = 0;
    descending
        .iter()
        .take_while(|&&zone| {
            lost += zone;
            voters - lost >= quorum
        })
        .count()
}

/// Whether a layout with these voters per zone is sound: an odd count of at least three, no
/// zone whose loss loses the quorum.
fn sound(voters_by_zone: &[usize]) -> bool {
    let voters: usize = voters_by_zone.iter().sum();
    voters >= 3
        && !voters.is_multiple_of(2)
        && voters_by_zone.iter().all(|&zone| zone <= (voters - 1) / 2)
}

fn warnings(layout: &Layout) -> Vec<Warning> {
    let voters = layout.voters();
    let quorum = quorum(voters);
    let mut warnings = Vec::new();
    if let Some((kind, problem)) = voter_count_problem(voters) {
        warnings.push(Warning {
            kind,
            zone: None,
            message: format!("the layout has {problem}"),
        });
    }
    let voter_zones: Vec<(&str, usize)> = layout
        .zones()
        .filter(|(_, nodes)| nodes.voters > 0)
        .map(|(zone, nodes)| (zone, nodes.voters))
        .collect();
    match voter_zones.as_slice() {
        [(NO_ZONE, _)] => {}
        [(zone, _)] => warnings.push(Warning {
            kind: WarningKind::SingleZone,
            zone: Some(zone.to_string()),
            message: format!(
                "all {voters} voters are in zone {zone}: losing it stops the cluster; spread them over three zones"
            ),
        }),
        [first, second] => {
            // With two zones the bigger one holds at least half the voters, so losing it
            // always leaves fewer than a quorum.
            let (zone, held) = if second.1 > first.1 { second } else { first };
            warnings.push(Warning {
                kind: WarningKind::TwoZones,
                zone: Some(zone.to_string()),
                message: format!(
                    "the voters are in two zones only: losing zone {zone} ({held} of {voters} voters) leaves {}, fewer than the {quorum} a quorum takes; use three zones",
                    voters - held
                ),
            });
        }
        _ => {
            for (zone, held) in &voter_zones {
                if voters - held < quorum {
                    warnings.push(Warning {
                        kind: WarningKind::ZoneMajority,
                        zone: Some(zone.to_string()),
                        message: format!(
                            "zone {zone} holds {held} of {voters} voters: losing it leaves {}, fewer than the {quorum} a quorum takes; move voters out of it",
                            voters - held
                        ),
                    });
                }
            }
        }
    }
    if let Some(unzoned) = layout.zone(NO_ZONE) {
        let message = if layout.zone_count() == 1 {
            format!(
                "no node has a zone, so the planner counts all {} as one zone `-` whose loss stops the cluster: give each node its zone (`add-node --zone Z`) and spread the voters over three zones",
                unzoned.nodes()
            )
        } else {
            format!(
                "{} node(s) have no zone; the planner counts them as one zone `-`: give each its zone (`add-node --zone Z`)",
                unzoned.nodes()
            )
        };
        warnings.push(Warning {
            kind: WarningKind::NoZones,
            zone: Some(NO_ZONE.to_string()),
            message,
        });
    }
    warnings
}

/// The nearest sound layout, or `None` when `layout` is sound.
///
/// For a target voter count `T` (odd, at least 3) each zone may hold at most `M = (T - 1) / 2`.
/// Every zone above `M` must shed its excess; call the voters shed `S`. The voters to place
/// `D` follow from `D - S = T - V`. Each change moves, adds or removes one voter, so reaching
/// `T` takes `max(S, D)` changes, which is least when `S` is least: cap every zone at `M`, then
/// remove from the biggest zones (if more than `T` are left) or fill the smallest zones with
/// room and then new zones, each up to `M` (if fewer). The planner tries every `T` up to
/// `2V + 3` (beyond that, adding alone costs more than any nearer layout) and keeps the
/// cheapest, preferring the larger `T` on ties.
fn suggest(layout: &Layout) -> Option<Suggestion> {
    let current: Vec<(String, usize)> = layout
        .zones()
        .map(|(zone, nodes)| (zone.to_string(), nodes.voters))
        .collect();
    let counts: Vec<usize> = current.iter().map(|(_, voters)| *voters).collect();
    if sound(&counts) {
        return None;
    }
    let voters: usize = counts.iter().sum();
    let mut best: Option<(usize, usize)> = None;
    for target in (3..=2 * voters + 3).step_by(2) {
        let cost = changes_to_reach(&counts, target);
        if best.is_none_or(|(best_cost, _)| cost <= best_cost) {
            best = Some((cost, target));
        }
    }
    let (_, target) = best?;
    let zone_max = (target - 1) / 2;

    // Targets per zone: existing zones first (in name order), then new ones.
    let mut targets: Vec<(String, usize, bool)> = current
        .iter()
        .map(|(zone, voters)| (zone.clone(), (*voters).min(zone_max), false))
        .collect();
    let mut placed: usize = targets.iter().map(|(_, voters, _)| voters).sum();
    while placed > target {
        // Remove from the biggest zone; the first in name order among equals.
        let biggest = targets
            .iter_mut()
            .fold(None::<&mut (String, usize, bool)>, |best, zone| match best {
                Some(best) if best.1 >= zone.1 => Some(best),
                _ => Some(zone),
            })?;
        biggest.1 -= 1;
        placed -= 1;
    }
    while placed < target {
        // Fill the smallest existing zone with room; the first in name order among equals.
        let smallest = targets
            .iter_mut()
            .filter(|(_, voters, _)| *voters < zone_max)
            .fold(None::<&mut (String, usize, bool)>, |best, zone| match best {
                Some(best) if best.1 <= zone.1 => Some(best),
                _ => Some(zone),
            });
        match smallest {
            Some(zone) => {
                zone.1 += 1;
                placed += 1;
            }
            None => {
                let name = new_zone_names(layout, &targets, 1).pop()?;
                let voters = zone_max.min(target - placed);
                targets.push((name, voters, true));
                placed += voters;
            }
        }
    }

    let mut surplus: Vec<(String, usize)> = Vec::new();
    let mut deficit: Vec<(String, usize, bool)> = Vec::new();
    for (zone, wanted, new_zone) in &targets {
        let have = layout.zone(zone).map_or(0, |nodes| nodes.voters);
        if have > *wanted {
            surplus.push((zone.clone(), have - wanted));
        } else if *wanted > have {
            deficit.push((zone.clone(), wanted - have, *new_zone));
        }
    }
    let mut changes = Vec::new();
    let (mut voters_moved, mut voters_added, mut voters_removed) = (0, 0, 0);
    let mut surplus_iter = surplus.into_iter().peekable();
    let mut additions = Vec::new();
    for (to, mut needed, new_zone) in deficit {
        while needed > 0 {
            let Some((from, available)) = surplus_iter.peek_mut() else {
                break;
            };
            let moved = needed.min(*available);
            changes.push(Change::Move {
                from: from.clone(),
                to: to.clone(),
                voters: moved,
                new_zone,
            });
            voters_moved += moved;
            needed -= moved;
            *available -= moved;
            if *available == 0 {
                surplus_iter.next();
            }
        }
        if needed > 0 {
            voters_added += needed;
            additions.push(Change::Add {
                zone: to,
                voters: needed,
                new_zone,
            });
        }
    }
    changes.extend(additions);
    for (zone, voters) in surplus_iter {
        voters_removed += voters;
        changes.push(Change::Remove { zone, voters });
    }

    let mut suggested = layout.clone();
    for (zone, voters, _) in &targets {
        suggested.zones.entry(zone.clone()).or_default().voters = *voters;
    }
    suggested
        .zones
        .retain(|_, nodes: &mut ZoneNodes| nodes.nodes() > 0);
    let by_zone: Vec<usize> = suggested.zones().map(|(_, nodes)| nodes.voters).collect();
    Some(Suggestion {
        spec: suggested.voters_spec(),
        node_failures_tolerated: failures_tolerated(target),
        zone_failures_tolerated: zone_failures_tolerated(&by_zone),
        layout: suggested,
        changes,
        voters_added,
        voters_removed,
        voters_moved,
    })
}

/// The fewest changes (voters added, removed or moved) that turn `counts` into a sound layout
/// of `target` voters (see [`suggest`]).
fn changes_to_reach(counts: &[usize], target: usize) -> usize {
    let zone_max = (target - 1) / 2;
    let voters: usize = counts.iter().sum();
    let shed: usize = counts.iter().map(|&c| c.saturating_sub(zone_max)).sum();
    let kept = voters - shed;
    let (removed, placed) = if kept >= target {
        (shed + kept - target, 0)
    } else {
        (shed, target - kept)
    };
    removed.max(placed)
}

/// `count` names for new zones, none used by `layout` or `targets`: the last named zone with
/// its last letter or digit stepped on (`a`, `b` → `c`; `eu-west-1b` → `eu-west-1c`; `rack2` →
/// `rack3`), `a`, `b`, … when no zone has a name, and `zone-1`, `zone-2`, … when stepping on
/// runs out.
fn new_zone_names(layout: &Layout, targets: &[(String, usize, bool)], count: usize) -> Vec<String> {
    let mut taken: BTreeSet<String> = layout.zones.keys().cloned().collect();
    taken.extend(targets.iter().map(|(zone, _, _)| zone.clone()));
    let mut cursor = taken.iter().filter(|zone| *zone != NO_ZONE).max().cloned();
    let mut stepping = true;
    let mut fallback = 1;
    let mut names = Vec::new();
    while names.len() < count {
        let name = if stepping {
            match cursor.as_deref().map_or(Some("a".to_string()), step_on) {
                Some(name) => {
                    cursor = Some(name.clone());
                    name
                }
                None => {
                    stepping = false;
                    continue;
                }
            }
        } else {
            fallback += 1;
            format!("zone-{}", fallback - 1)
        };
        if taken.insert(name.clone()) {
            names.push(name);
        }
    }
    names
}

/// `name` with its last character stepped on by one, if that is a letter below `z`/`Z` or a
/// digit below 9.
fn step_on(name: &str) -> Option<String> {
    let last = name.chars().last()?;
    let next = match last {
        'a'..='y' | 'A'..='Y' | '0'..='8' => char::from_u32(last as u32 + 1)?,
        _ => return None,
    };
    let mut stepped = name[..name.len() - last.len_utf8()].to_string();
    stepped.push(next);
    Some(stepped)
}

#[cfg(test)]
mod tests {
    use super::*;
}
