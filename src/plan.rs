//! The topology planner: given how many voters (and learners) run in each zone, which failures
//! the cluster survives, what is wrong with the layout, and the nearest layout that is better.
//!
//! Pure code: no I/O, no clocks. The `clusterfunk plan` command builds a [`Layout`] from
//! `--zones a=2,b=2,c=1` or from a running cluster's `nodes` answer ([`NodesReport::layout`](crate::admin::NodesReport::layout)) and
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
            format!(
                "{voters} voter(s) and tolerates {tolerated} {failures}: run at least 3 voters"
            ),
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
// No `Default`: an empty layout has no voters, which every constructor refuses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
        let mut layout = Layout {
            zones: BTreeMap::new(),
        };
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
        self.zones
            .iter()
            .map(|(zone, nodes)| (zone.as_str(), *nodes))
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
        (self.learners() > 0).then(|| {
            spec(
                self.zones
                    .iter()
                    .map(|(zone, nodes)| (zone, nodes.learners)),
            )
        })
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
            message: if voters == 1 {
                format!("the only voter is in zone {zone}: losing it stops the cluster; run three voters in three zones")
            } else {
                format!("all {voters} voters are in zone {zone}: losing it stops the cluster; spread them over three zones")
            },
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
        let biggest = targets.iter_mut().fold(
            None::<&mut (String, usize, bool)>,
            |best, zone| match best {
                Some(best) if best.1 >= zone.1 => Some(best),
                _ => Some(zone),
            },
        )?;
        biggest.1 -= 1;
        placed -= 1;
    }
    while placed < target {
        // Fill the smallest existing zone with room; the first in name order among equals.
        let smallest = targets
            .iter_mut()
            .filter(|(_, voters, _)| *voters < zone_max)
            .fold(
                None::<&mut (String, usize, bool)>,
                |best, zone| match best {
                    Some(best) if best.1 <= zone.1 => Some(best),
                    _ => Some(zone),
                },
            );
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
    use crate::admin::{NodeReport, NodesReport};

    fn layout(spec: &str) -> Layout {
        spec.parse()
            .unwrap_or_else(|e| panic!("`{spec}` should parse: {e}"))
    }

    fn plan(spec: &str) -> Plan {
        Plan::of(&layout(spec))
    }

    /// The rows of one failure kind as (description, voters left, shards served).
    fn rows(plan: &Plan, failure: Failure) -> Vec<(&str, usize, bool)> {
        plan.scenarios
            .iter()
            .filter(|s| s.failure == failure)
            .map(|s| (s.description.as_str(), s.voters_left, s.shards_served))
            .collect()
    }

    fn kinds(plan: &Plan) -> Vec<(WarningKind, Option<&str>)> {
        plan.warnings
            .iter()
            .map(|w| (w.kind, w.zone.as_deref()))
            .collect()
    }

    fn suggested(plan: &Plan) -> Option<&str> {
        plan.suggestion.as_ref().map(|s| s.spec.as_str())
    }

    fn changes(plan: &Plan) -> Vec<String> {
        plan.suggestion
            .iter()
            .flat_map(|s| &s.changes)
            .map(Change::to_string)
            .collect()
    }

    /// Tolerated node and zone failures, and whether single node and zone failures pass.
    fn verdict(plan: &Plan) -> (usize, usize, bool, bool) {
        (
            plan.node_failures_tolerated,
            plan.zone_failures_tolerated,
            plan.survives_node_failure,
            plan.survives_zone_failure,
        )
    }

    #[test]
    fn failure_tolerance_and_quorum_by_voter_count() {
        let tolerated: Vec<_> = (0..=9).map(failures_tolerated).collect();
        assert_eq!(tolerated, vec![0, 0, 0, 1, 1, 2, 2, 3, 3, 4]);
        let quorums: Vec<_> = (1..=9).map(quorum).collect();
        assert_eq!(quorums, vec![1, 2, 2, 3, 3, 4, 4, 5, 5]);
    }

    #[test]
    fn change_reports_warn_about_even_and_small_voter_counts() {
        assert!(layout_warnings(3).is_empty());
        assert!(layout_warnings(5).is_empty());
        assert_eq!(
            layout_warnings(4),
            ["the cluster now has an even number of voters (4) and tolerates 1 failure, no more than 3 voters would: use an odd count"]
        );
        assert!(layout_warnings(2)[0].contains("at least 3"));
        assert!(layout_warnings(1)[0].contains("tolerates 0 failures"));
    }

    // The seed document: "a three-node cluster can lose one node, five can lose two, seven can
    // lose three", placed as one per zone, 2 + 2 + 1, 2 + 2 + 3 and 3 + 3 + 3 over three zones.
    #[test]
    fn seed_three_nodes_one_per_zone_survive_any_node_or_zone() {
        let plan = plan("a=1,b=1,c=1");
        assert_eq!((plan.voters, plan.quorum), (3, 2));
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 2, true),
                ("one voter in zone b", 2, true),
                ("one voter in zone c", 2, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 2, true),
                ("zone b", 2, true),
                ("zone c", 2, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::TwoZones),
            [
                ("zones a and b", 1, false),
                ("zones a and c", 1, false),
                ("zones b and c", 1, false)
            ]
        );
        assert_eq!(verdict(&plan), (1, 1, true, true));
        assert!(plan.survives);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert_eq!(plan.suggestion, None);
    }

    #[test]
    fn seed_five_nodes_two_two_one_survive_any_node_or_zone() {
        let plan = plan("a=2,b=2,c=1");
        assert_eq!((plan.voters, plan.quorum), (5, 3));
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 4, true),
                ("one voter in zone b", 4, true),
                ("one voter in zone c", 4, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 3, true),
                ("zone b", 3, true),
                ("zone c", 4, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::TwoZones),
            [
                ("zones a and b", 1, false),
                ("zones a and c", 2, false),
                ("zones b and c", 2, false)
            ]
        );
        assert_eq!(verdict(&plan), (2, 1, true, true));
        assert!(plan.survives);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert_eq!(plan.suggestion, None);
    }

    #[test]
    fn seed_seven_nodes_two_two_three_survive_any_node_or_zone() {
        let plan = plan("a=2,b=2,c=3");
        assert_eq!((plan.voters, plan.quorum), (7, 4));
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 5, true),
                ("zone b", 5, true),
                ("zone c", 4, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::TwoZones),
            [
                ("zones a and b", 3, false),
                ("zones a and c", 2, false),
                ("zones b and c", 2, false)
            ]
        );
        assert_eq!(verdict(&plan), (3, 1, true, true));
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert_eq!(plan.suggestion, None);
    }

    #[test]
    fn seed_nine_nodes_three_per_zone_survive_any_node_or_zone() {
        let plan = plan("a=3,b=3,c=3");
        assert_eq!((plan.voters, plan.quorum), (9, 5));
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 8, true),
                ("one voter in zone b", 8, true),
                ("one voter in zone c", 8, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 6, true),
                ("zone b", 6, true),
                ("zone c", 6, true)
            ]
        );
        assert!(rows(&plan, Failure::TwoZones)
            .iter()
            .all(|&(_, left, served)| left == 3 && !served));
        assert_eq!(verdict(&plan), (4, 1, true, true));
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert_eq!(plan.suggestion, None);
    }

    // The seed document's worst case: an even number of nodes over two zones.
    #[test]
    fn seed_even_count_over_two_zones_loses_quorum_with_either_zone() {
        let plan = plan("a=2,b=2");
        assert_eq!((plan.voters, plan.quorum), (4, 3));
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 3, true),
                ("one voter in zone b", 3, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::Zone),
            [("zone a", 2, false), ("zone b", 2, false)]
        );
        assert!(
            rows(&plan, Failure::TwoZones).is_empty(),
            "two zones make no pair rows"
        );
        assert_eq!(verdict(&plan), (1, 0, true, false));
        assert!(!plan.survives);
        assert_eq!(
            kinds(&plan),
            [
                (WarningKind::EvenVoters, None),
                (WarningKind::TwoZones, Some("a"))
            ]
        );
        assert_eq!(
            plan.warnings[1].message,
            "the voters are in two zones only: losing zone a (2 of 4 voters) leaves 2, fewer than the 3 a quorum takes; use three zones"
        );
        assert_eq!(suggested(&plan), Some("a=2,b=2,c=1"));
        assert_eq!(changes(&plan), ["add 1 voter in new zone c"]);
        let suggestion = plan.suggestion.as_ref().expect("a suggestion");
        assert_eq!(
            (
                suggestion.voters_added,
                suggestion.voters_moved,
                suggestion.voters_removed
            ),
            (1, 0, 0)
        );
        assert_eq!(
            (
                suggestion.node_failures_tolerated,
                suggestion.zone_failures_tolerated
            ),
            (2, 1)
        );
    }

    #[test]
    fn three_and_three_over_two_zones_gain_a_third_zone() {
        let plan = plan("a=3,b=3");
        assert_eq!(
            rows(&plan, Failure::Zone),
            [("zone a", 3, false), ("zone b", 3, false)]
        );
        assert_eq!(verdict(&plan), (2, 0, true, false));
        assert_eq!(
            kinds(&plan),
            [
                (WarningKind::EvenVoters, None),
                (WarningKind::TwoZones, Some("a"))
            ]
        );
        // 3 + 3 + 1: seven voters, no zone above three, a single addition.
        assert_eq!(suggested(&plan), Some("a=3,b=3,c=1"));
        assert_eq!(changes(&plan), ["add 1 voter in new zone c"]);
    }

    #[test]
    fn one_and_one_over_two_zones_tolerate_nothing() {
        let plan = plan("a=1,b=1");
        assert_eq!(plan.quorum, 2);
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 1, false),
                ("one voter in zone b", 1, false)
            ]
        );
        assert_eq!(verdict(&plan), (0, 0, false, false));
        assert_eq!(
            kinds(&plan),
            [
                (WarningKind::FewVoters, None),
                (WarningKind::TwoZones, Some("a"))
            ]
        );
        assert_eq!(suggested(&plan), Some("a=1,b=1,c=1"));
        assert_eq!(changes(&plan), ["add 1 voter in new zone c"]);
    }

    // The seed document: an odd count can be split over two zones, but losing the bigger one
    // loses a large part of the cluster (here: the quorum).
    #[test]
    fn seed_odd_count_over_two_zones_survives_only_the_smaller_zone() {
        let plan = plan("a=2,b=1");
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 2, true),
                ("one voter in zone b", 2, true)
            ]
        );
        assert_eq!(
            rows(&plan, Failure::Zone),
            [("zone a", 1, false), ("zone b", 2, true)]
        );
        assert_eq!(verdict(&plan), (1, 0, true, false));
        assert_eq!(kinds(&plan), [(WarningKind::TwoZones, Some("a"))]);
        assert_eq!(suggested(&plan), Some("a=1,b=1,c=1"));
        assert_eq!(changes(&plan), ["move 1 voter from zone a to new zone c"]);

        let plan = super::tests::plan("a=3,b=2");
        assert_eq!(
            rows(&plan, Failure::Zone),
            [("zone a", 2, false), ("zone b", 3, true)]
        );
        assert_eq!(verdict(&plan), (2, 0, true, false));
        assert_eq!(kinds(&plan), [(WarningKind::TwoZones, Some("a"))]);
        assert_eq!(suggested(&plan), Some("a=2,b=2,c=1"));
        assert_eq!(changes(&plan), ["move 1 voter from zone a to new zone c"]);
    }

    #[test]
    fn seven_and_nine_over_two_zones_move_one_voter_to_a_third() {
        let seven = plan("a=4,b=3");
        assert_eq!(
            rows(&seven, Failure::Zone),
            [("zone a", 3, false), ("zone b", 4, true)]
        );
        assert_eq!(verdict(&seven), (3, 0, true, false));
        assert_eq!(suggested(&seven), Some("a=3,b=3,c=1"));
        assert_eq!(changes(&seven), ["move 1 voter from zone a to new zone c"]);

        let nine = plan("a=5,b=4");
        assert_eq!(
            rows(&nine, Failure::Zone),
            [("zone a", 4, false), ("zone b", 5, true)]
        );
        assert_eq!(verdict(&nine), (4, 0, true, false));
        assert_eq!(suggested(&nine), Some("a=4,b=4,c=1"));
        assert_eq!(changes(&nine), ["move 1 voter from zone a to new zone c"]);
    }

    #[test]
    fn three_in_one_zone_survive_a_node_but_not_the_zone() {
        let plan = plan("a=3");
        assert_eq!(
            rows(&plan, Failure::Node),
            [("one voter in zone a", 2, true)]
        );
        assert_eq!(rows(&plan, Failure::Zone), [("zone a", 0, false)]);
        assert_eq!(verdict(&plan), (1, 0, true, false));
        assert_eq!(kinds(&plan), [(WarningKind::SingleZone, Some("a"))]);
        assert_eq!(suggested(&plan), Some("a=1,b=1,c=1"));
        assert_eq!(
            changes(&plan),
            [
                "move 1 voter from zone a to new zone b",
                "move 1 voter from zone a to new zone c"
            ]
        );
    }

    #[test]
    fn four_in_one_zone_become_five_over_three_zones() {
        let plan = plan("a=4");
        assert_eq!(verdict(&plan), (1, 0, true, false));
        assert_eq!(
            kinds(&plan),
            [
                (WarningKind::EvenVoters, None),
                (WarningKind::SingleZone, Some("a"))
            ]
        );
        // 1 + 1 + 1 (two moves, one removal) is as near as 2 + 2 + 1 (two moves, one
        // addition); the planner prefers the one that tolerates more.
        assert_eq!(suggested(&plan), Some("a=2,b=2,c=1"));
        assert_eq!(
            changes(&plan),
            [
                "move 2 voters from zone a to new zone b",
                "add 1 voter in new zone c"
            ]
        );
    }

    #[test]
    fn five_in_one_zone_spread_as_two_two_one() {
        let plan = plan("a=5");
        assert_eq!(verdict(&plan), (2, 0, true, false));
        assert_eq!(suggested(&plan), Some("a=2,b=2,c=1"));
        assert_eq!(
            changes(&plan),
            [
                "move 2 voters from zone a to new zone b",
                "move 1 voter from zone a to new zone c"
            ]
        );
    }

    #[test]
    fn a_single_voter_tolerates_nothing() {
        let plan = plan("a=1");
        assert_eq!(plan.quorum, 1);
        assert_eq!(
            rows(&plan, Failure::Node),
            [("one voter in zone a", 0, false)]
        );
        assert_eq!(verdict(&plan), (0, 0, false, false));
        assert_eq!(
            kinds(&plan),
            [
                (WarningKind::FewVoters, None),
                (WarningKind::SingleZone, Some("a"))
            ]
        );
        assert_eq!(suggested(&plan), Some("a=1,b=1,c=1"));
        assert_eq!(
            changes(&plan),
            ["add 1 voter in new zone b", "add 1 voter in new zone c"]
        );
    }

    #[test]
    fn even_count_over_three_zones_survives_but_wastes_a_voter() {
        let plan = plan("a=2,b=2,c=2");
        assert_eq!(plan.quorum, 4);
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 4, true),
                ("zone b", 4, true),
                ("zone c", 4, true)
            ]
        );
        assert_eq!(verdict(&plan), (2, 1, true, true));
        assert!(plan.survives);
        assert_eq!(kinds(&plan), [(WarningKind::EvenVoters, None)]);
        // Adding one (3 + 2 + 2) ties with removing one (2 + 2 + 1); adding tolerates more.
        assert_eq!(suggested(&plan), Some("a=3,b=2,c=2"));
        assert_eq!(changes(&plan), ["add 1 voter in zone a"]);
    }

    #[test]
    fn even_count_with_a_half_zone_fills_the_smallest_zone() {
        let plan = plan("a=2,b=1,c=1");
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 2, false),
                ("zone b", 3, true),
                ("zone c", 3, true)
            ]
        );
        assert_eq!(verdict(&plan), (1, 0, true, false));
        assert_eq!(
            kinds(&plan),
            [
                (WarningKind::EvenVoters, None),
                (WarningKind::ZoneMajority, Some("a"))
            ]
        );
        assert_eq!(suggested(&plan), Some("a=2,b=2,c=1"));
        assert_eq!(changes(&plan), ["add 1 voter in zone b"]);
    }

    #[test]
    fn a_zone_holding_a_majority_over_three_zones_is_flagged() {
        let plan = plan("a=3,b=1,c=1");
        assert_eq!(
            rows(&plan, Failure::Zone),
            [
                ("zone a", 2, false),
                ("zone b", 4, true),
                ("zone c", 4, true)
            ]
        );
        assert_eq!(verdict(&plan), (2, 0, true, false));
        assert_eq!(kinds(&plan), [(WarningKind::ZoneMajority, Some("a"))]);
        assert_eq!(
            plan.warnings[0].message,
            "zone a holds 3 of 5 voters: losing it leaves 2, fewer than the 3 a quorum takes; move voters out of it"
        );
        assert_eq!(suggested(&plan), Some("a=2,b=2,c=1"));
        assert_eq!(changes(&plan), ["move 1 voter from zone a to zone b"]);
    }

    #[test]
    fn nodes_without_zones_count_as_one_zone() {
        let layout = Layout::from_members([
            (None, Role::Voter),
            (Some(""), Role::Voter),
            (None, Role::Voter),
        ])
        .expect("three voters");
        assert_eq!(layout.voters_spec(), "-=3");
        let plan = Plan::of(&layout);
        assert_eq!(rows(&plan, Failure::Zone), [("zone -", 0, false)]);
        assert_eq!(verdict(&plan), (1, 0, true, false));
        assert_eq!(kinds(&plan), [(WarningKind::NoZones, Some("-"))]);
        assert_eq!(suggested(&plan), Some("-=1,a=1,b=1"));
        assert_eq!(
            changes(&plan),
            [
                "move 1 voter from zone - to new zone a",
                "move 1 voter from zone - to new zone b"
            ]
        );
    }

    #[test]
    fn learners_host_shards_but_do_not_vote() {
        let layout = layout("a=1,b=1,c=1")
            .with_learners("c=1,d=2")
            .expect("learners");
        assert_eq!(layout.to_string(), "a=1,b=1,c=1 (learners: c=1,d=2)");
        assert_eq!(
            layout.zone("c"),
            Some(ZoneNodes {
                voters: 1,
                learners: 1
            })
        );
        let plan = Plan::of(&layout);
        assert_eq!((plan.voters, plan.learners, plan.quorum), (3, 3, 2));
        assert_eq!(
            rows(&plan, Failure::Node),
            [
                ("one voter in zone a", 2, true),
                ("one voter in zone b", 2, true),
                ("one voter in zone c", 2, true),
                ("one learner in zone d", 3, true)
            ]
        );
        let zone_d = plan
            .scenarios
            .iter()
            .find(|s| s.failure == Failure::Zone && s.zones == ["d"])
            .expect("a row for zone d");
        assert_eq!((zone_d.voters_left, zone_d.nodes_left), (3, 4));
        // Losing zone d and one voter zone still leaves a quorum; two voter zones do not.
        assert_eq!(
            rows(&plan, Failure::TwoZones)
                .iter()
                .filter(|&&(_, _, served)| served)
                .count(),
            3
        );
        assert_eq!(verdict(&plan), (1, 1, true, true));
        assert!(plan.warnings.is_empty());
        assert_eq!(plan.suggestion, None);
    }

    #[test]
    fn suggestions_keep_learners_in_place() {
        let plan = Plan::of(&layout("a=2,b=2").with_learners("a=1").expect("learners"));
        let suggestion = plan.suggestion.expect("a suggestion");
        assert_eq!(suggestion.layout.to_string(), "a=2,b=2,c=1 (learners: a=1)");
    }

    #[test]
    fn layout_from_a_nodes_report_counts_roles_by_zone() {
        let node = |id: u64, zone: Option<&str>, role: &str| NodeReport {
            id,
            addr: format!("127.0.0.1:{}", 7100 + id),
            zone: zone.map(str::to_string),
            role: role.to_string(),
            leader: id == 1,
            shards: 8,
            down: false,
            draining: false,
        };
        let report = NodesReport {
            leader: Some(1),
            nodes: vec![
                node(1, Some("a"), "voter"),
                node(2, Some("b"), "voter"),
                node(3, Some("c"), "voter"),
                node(4, Some("a"), "learner"),
                node(5, None, "learner"),
            ],
        };
        let layout = report.layout().expect("a layout");
        assert_eq!(layout.to_string(), "a=1,b=1,c=1 (learners: -=1,a=1)");
        let plan = Plan::of(&layout);
        assert!(plan.survives);
        assert_eq!(kinds(&plan), [(WarningKind::NoZones, Some("-"))]);
        assert!(plan.warnings[0]
            .message
            .starts_with("1 node(s) have no zone"));

        let mut odd = report.clone();
        odd.nodes[0].role = "witness".into();
        assert_eq!(
            odd.layout(),
            Err(LayoutError::UnknownRole {
                id: 1,
                role: "witness".into()
            })
        );
        let learners_only = NodesReport {
            leader: None,
            nodes: vec![node(4, Some("a"), "learner")],
        };
        assert_eq!(learners_only.layout(), Err(LayoutError::NoVoters));
    }

    #[test]
    fn specs_parse_with_spaces_in_any_order() {
        let layout = layout(" c=1 , a = 2,b=2 ");
        assert_eq!(layout.voters_spec(), "a=2,b=2,c=1");
        assert_eq!(
            (layout.voters(), layout.learners(), layout.zone_count()),
            (5, 0, 3)
        );
        assert_eq!(layout.learners_spec(), None);
        assert_eq!(
            layout.zones().collect::<Vec<_>>(),
            [
                (
                    "a",
                    ZoneNodes {
                        voters: 2,
                        learners: 0
                    }
                ),
                (
                    "b",
                    ZoneNodes {
                        voters: 2,
                        learners: 0
                    }
                ),
                (
                    "c",
                    ZoneNodes {
                        voters: 1,
                        learners: 0
                    }
                )
            ]
        );
        assert_eq!(self::layout("eu-west-1a=1,rack_2.x:y=2").voters(), 3);
    }

    #[test]
    fn bad_specs_are_refused_with_what_to_write() {
        let error = |spec: &str| {
            spec.parse::<Layout>()
                .expect_err(&format!("`{spec}` should not parse"))
        };
        assert_eq!(error(""), LayoutError::Empty);
        assert_eq!(error("  "), LayoutError::Empty);
        assert_eq!(error("a=2,"), LayoutError::EmptyEntry { position: 2 });
        assert_eq!(error("a=2,,b=1"), LayoutError::EmptyEntry { position: 2 });
        assert_eq!(error("a"), LayoutError::MissingCount { entry: "a".into() });
        assert_eq!(error("=2"), LayoutError::MissingZone { entry: "=2".into() });
        assert_eq!(error("a=0"), LayoutError::ZeroCount { zone: "a".into() });
        assert_eq!(
            error("a=-1"),
            LayoutError::BadCount {
                zone: "a".into(),
                count: "-1".into()
            }
        );
        assert_eq!(
            error("a=two"),
            LayoutError::BadCount {
                zone: "a".into(),
                count: "two".into()
            }
        );
        assert_eq!(
            error("a=2=3"),
            LayoutError::BadCount {
                zone: "a".into(),
                count: "2=3".into()
            }
        );
        assert_eq!(
            error("a=2,b=1,a=1"),
            LayoutError::DuplicateZone { zone: "a".into() }
        );
        assert_eq!(
            error("zone a=1"),
            LayoutError::BadZoneName {
                zone: "zone a".into()
            }
        );
        assert_eq!(
            error(&format!("{}=1", "z".repeat(65))),
            LayoutError::BadZoneName {
                zone: "z".repeat(65)
            }
        );
        assert_eq!(
            error("a=60,b=60"),
            LayoutError::TooMany {
                what: "voters",
                count: 120,
                max: VOTERS_MAX
            }
        );
        assert_eq!(
            error("a=99999999999999999999999"),
            LayoutError::BadCount {
                zone: "a".into(),
                count: "99999999999999999999999".into()
            }
        );
        let many: Vec<String> = (0..=ZONES_MAX).map(|i| format!("z{i}=1")).collect();
        assert_eq!(
            error(&many.join(",")),
            LayoutError::TooManyZones {
                zones: ZONES_MAX + 1,
                max: ZONES_MAX
            }
        );
        assert_eq!(
            layout("a=1").with_learners("b=0"),
            Err(LayoutError::ZeroCount { zone: "b".into() })
        );
        // Every message says what to write instead.
        assert_eq!(
            error("a=0").to_string(),
            "zone a has 0 nodes: leave the zone out, or give it at least 1, e.g. `a=1`"
        );
        assert_eq!(
            error("a").to_string(),
            "`a` has no count: write ZONE=COUNT, e.g. `a=1`"
        );
    }

    #[test]
    fn new_zones_continue_the_naming_of_the_old_ones() {
        assert_eq!(
            suggested(&plan("eu-west-1a=2,eu-west-1b=2")),
            Some("eu-west-1a=2,eu-west-1b=2,eu-west-1c=1")
        );
        assert_eq!(
            suggested(&plan("rack1=2,rack2=1")),
            Some("rack1=1,rack2=1,rack3=1")
        );
        // Nothing to step on after `z`: numbered zones instead.
        assert_eq!(suggested(&plan("y=2,z=2")), Some("y=2,z=2,zone-1=1"));
        assert_eq!(step_on("a"), Some("b".into()));
        assert_eq!(step_on("Z"), None);
        assert_eq!(step_on("rack9"), None);
        assert_eq!(step_on(""), None);
    }

    #[test]
    fn every_suggestion_is_sound_and_no_sound_layout_is_nearer() {
        // All layouts of up to 9 voters over up to 3 zones, against a brute force over every
        // layout of up to 11 voters over up to 5 zones (the three old ones, then new ones).
        let mut targets: Vec<Vec<usize>> = vec![vec![]];
        for _ in 0..5 {
            targets = targets
                .into_iter()
                .flat_map(|t| {
                    (0..=11).map(move |c| {
                        let mut t = t.clone();
                        t.push(c);
                        t
                    })
                })
                .filter(|t: &Vec<usize>| t.iter().sum::<usize>() <= 11)
                .collect();
        }
        let sound_targets: Vec<&Vec<usize>> = targets.iter().filter(|t| sound(t)).collect();
        for a in 1..=9usize {
            for b in 0..=9 - a {
                for c in 0..=9 - a - b {
                    let counts: Vec<usize> = [a, b, c].into_iter().filter(|&n| n > 0).collect();
                    let spec = ["a", "b", "c"]
                        .iter()
                        .zip(&counts)
                        .map(|(zone, count)| format!("{zone}={count}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    let plan = plan(&spec);
                    let current = [a, b, c];
                    let nearest = sound_targets
                        .iter()
                        .map(|t| {
                            let (mut surplus, mut deficit) = (0, 0);
                            for (index, &wanted) in t.iter().enumerate() {
                                let have = current.get(index).copied().unwrap_or(0);
                                surplus += have.saturating_sub(wanted);
                                deficit += wanted.saturating_sub(have);
                            }
                            surplus.max(deficit)
                        })
                        .min()
                        .expect("sound layouts exist");
                    let Some(suggestion) = &plan.suggestion else {
                        assert!(
                            sound(&counts),
                            "{spec}: no suggestion for an unsound layout"
                        );
                        continue;
                    };
                    let by_zone: Vec<usize> =
                        suggestion.layout.zones().map(|(_, z)| z.voters).collect();
                    assert!(sound(&by_zone), "{spec} → {} is not sound", suggestion.spec);
                    let cost = suggestion.voters_added
                        + suggestion.voters_removed
                        + suggestion.voters_moved;
                    assert_eq!(cost, nearest, "{spec} → {}", suggestion.spec);
                    let voters: usize = by_zone.iter().sum();
                    assert_eq!(
                        voters,
                        plan.voters + suggestion.voters_added - suggestion.voters_removed,
                        "{spec} → {}",
                        suggestion.spec
                    );
                    assert_eq!(Plan::of(&suggestion.layout).suggestion, None);
                }
            }
        }
    }

    #[test]
    fn tolerated_counts_agree_with_the_scenario_rows() {
        for spec in [
            "a=1,b=1,c=1",
            "a=2,b=2,c=1",
            "a=2,b=2",
            "a=3",
            "a=3,b=1,c=1",
            "a=1",
        ] {
            let plan = plan(spec);
            let all_served = |failure| {
                plan.scenarios
                    .iter()
                    .filter(|s| s.failure == failure)
                    .all(|s| s.shards_served)
            };
            assert_eq!(
                plan.survives_node_failure,
                plan.node_failures_tolerated >= 1,
                "{spec}"
            );
            assert_eq!(
                plan.survives_zone_failure,
                plan.zone_failures_tolerated >= 1,
                "{spec}"
            );
            assert_eq!(
                plan.survives_zone_failure,
                all_served(Failure::Zone),
                "{spec}"
            );
            if plan.layout.zone_count() >= 3 {
                assert_eq!(
                    plan.zone_failures_tolerated >= 2,
                    all_served(Failure::TwoZones),
                    "{spec}"
                );
            }
            for row in &plan.scenarios {
                assert_eq!(row.quorum_survives, row.voters_left >= row.quorum, "{spec}");
                assert_eq!(
                    row.shards_served, row.quorum_survives,
                    "{spec}: a quorum leaves hosts"
                );
            }
        }
    }

    #[test]
    fn plans_serialise_as_one_json_object() {
        let json = serde_json::to_value(plan("a=2,b=2")).expect("serialisable");
        assert_eq!(json["layout"]["a"]["voters"], 2);
        assert_eq!(json["quorum"], 3);
        assert_eq!(json["survives"], false);
        assert_eq!(json["scenarios"][2]["failure"], "zone");
        assert_eq!(json["scenarios"][2]["description"], "zone a");
        assert_eq!(json["scenarios"][2]["shards_served"], false);
        assert_eq!(json["warnings"][1]["kind"], "two_zones");
        assert_eq!(json["suggestion"]["spec"], "a=2,b=2,c=1");
        assert_eq!(json["suggestion"]["changes"][0]["change"], "add");
        assert_eq!(json["suggestion"]["changes"][0]["new_zone"], true);
    }
}
