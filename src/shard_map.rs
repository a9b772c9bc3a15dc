//! Keys, shards and the shard map: which shard a key belongs to, which node owns each shard, and
//! the allocator that computes the next map when the set of members changes.
//!
//! This module is pure code: no I/O, no clocks, no randomness, no global state. Every node runs
//! [`allocate`] inside the replicated state machine's `apply`, so the same inputs must give the
//! same map on every machine and in every release; that is why the key hash is a documented
//! xxh3-64 (never `std`'s `DefaultHasher`) and why the allocator sorts its inputs and breaks every
//! tie by node id or zone name.
//!
//! This module does not own: deciding *when* to re-allocate or which members are eligible
//! (consensus applies membership commands and calls [`allocate`]), moving shard state between
//! nodes and fencing with the epoch (router and handoff), or leases. It also knows nothing of
//! addresses: a [`Member`] is an id and an optional zone.
//!
//! ```
//! use clusterfunk::shard_map::{allocate, Member};
//!
//! let three = [Member::in_zone(1, "a"), Member::in_zone(2, "b"), Member::in_zone(3, "a")];
//! let map = allocate(None, &three, 12)?;
//! assert_eq!(map.epoch, 1);
//! assert!(map.counts().values().all(|&owned| owned == 4));
//!
//! // A fourth node joins: only shards onto the new node move, 3 of them (12 / 4).
//! let four = [three.as_slice(), &[Member::in_zone(4, "b")]].concat();
//! let next = allocate(Some(&map), &four, 12)?;
//! let moved = next.moved_from(&map);
//! assert_eq!(moved.len(), 3);
//! assert!(moved.iter().all(|&(_shard, _from, to)| to == 4));
//! # Ok::<(), clusterfunk::shard_map::AllocateError>(())
//! ```

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::xxh3_64;

/// The id of a node, chosen by the operator; any `u64` is valid.
pub type NodeId = u64;

/// The index of a shard, in `0..shard_count`.
pub type ShardId = u32;

/// The version of a shard map. Each [`allocate`] returns the previous epoch plus one; the epoch
/// doubles as a fencing token for handlers that write to external stores.
pub type Epoch = u64;

/// A routing key: arbitrary bytes. All keys that hash to one shard are served by that shard's
/// owner; see [`shard_for`].
///
/// Serialized as a byte string (length and bytes in bincode). `Display` prints the key as text
/// when it is printable UTF-8 and as `0x`-prefixed hex otherwise, so binary keys stay readable in
/// logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<[u8]>);

impl Key {
    /// The key's bytes, as hashed by [`shard_for`].
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key's bytes as a vector (a copy: keys share their bytes, so cloning one is cheap).
    pub fn into_bytes(self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The shard this key belongs to among `shard_count` shards: [`shard_for`] of its bytes.
    pub fn shard(&self, shard_count: u32) -> ShardId {
        shard_for(&self.0, shard_count)
    }
}

impl From<&str> for Key {
    fn from(text: &str) -> Self {
        Key(text.as_bytes().into())
    }
}

impl From<String> for Key {
    fn from(text: String) -> Self {
        Key(text.into_bytes().into())
    }
}

impl From<&String> for Key {
    fn from(text: &String) -> Self {
        Key::from(text.as_str())
    }
}

impl From<&[u8]> for Key {
    fn from(bytes: &[u8]) -> Self {
        Key(bytes.into())
    }
}

impl From<Vec<u8>> for Key {
    fn from(bytes: Vec<u8>) -> Self {
        Key(bytes.into())
    }
}

impl From<&Key> for Key {
    fn from(key: &Key) -> Self {
        key.clone()
    }
}

/// A numeric key is its 8 big-endian bytes, so that the same number routes the same way from any
/// language and any machine.
impl From<u64> for Key {
    fn from(number: u64) -> Self {
        Key(number.to_be_bytes().into())
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Lets maps keyed by `Key` be searched with a plain `&[u8]`; `Hash`, `Eq` and `Ord` of a `Key`
/// are those of its bytes, as `Borrow` requires.
impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl Key {
    /// The key as text when it is valid UTF-8 without control characters; `None` means it is
    /// shown as hex. Control characters are excluded so that a key cannot break a log line.
    fn printable(&self) -> Option<&str> {
        std::str::from_utf8(&self.0)
            .ok()
            .filter(|text| !text.chars().any(char::is_control))
    }

    fn write_hex(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for byte in self.0.iter() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.printable() {
            Some(text) => f.write_str(text),
            None => self.write_hex(f),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(")?;
        match self.printable() {
            Some(text) => write!(f, "{text:?}")?,
            None => self.write_hex(f)?,
        }
        f.write_str(")")
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(KeyVisitor)
    }
}

/// Accepts a byte string, or a sequence of `u8` for formats (such as JSON) that have no bytes.
struct KeyVisitor;

impl<'de> serde::de::Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key as a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Key, E> {
        Ok(Key::from(bytes))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Key, E> {
        Ok(Key::from(bytes))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Key, A::Error> {
        // The size hint comes from the input: cap the up-front reservation so a hostile length
        // cannot make us allocate before any byte has arrived.
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Key::from(bytes))
    }
}

/// The shard of a key: xxh3-64 of the key bytes with seed 0, modulo `shard_count`.
///
/// This is part of the wire contract: clients in other languages compute it too, and changing it
/// would route every key to a different shard. The golden vectors in this module's tests pin it.
///
/// `shard_count` 0 is a caller bug: it fails a debug assertion, and returns shard 0 in release
/// builds rather than panicking.
#[inline]
pub fn shard_for(key: &[u8], shard_count: u32) -> ShardId {
    debug_assert!(shard_count > 0, "shard_for needs at least one shard");
    let shard = xxh3_64(key)
        .checked_rem(u64::from(shard_count))
        .unwrap_or(0);
    // The remainder is below `shard_count`, which is a u32, so this never truncates.
    shard as ShardId
}

/// A node that can own shards, as the allocator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's id.
    pub id: NodeId,
    /// The failure domain the node is in (rack, availability zone). When members have zones, the
    /// allocator gives each zone a share of shards proportional to its number of nodes and
    /// spreads a lost zone's shards over all the others. Members without a zone form one group
    /// of their own.
    pub zone: Option<String>,
}

impl Member {
    /// A member without a zone.
    pub fn new(id: NodeId) -> Self {
        Member { id, zone: None }
    }

    /// A member in the given zone.
    pub fn in_zone(id: NodeId, zone: impl Into<String>) -> Self {
        Member {
            id,
            zone: Some(zone.into()),
        }
    }
}

/// Which node owns each shard, at one epoch.
///
/// A map made by [`allocate`] has at least one shard, every owner is in `members`, and `members`
/// is sorted by id without duplicates. The fields are public so that the map can be stored and
/// sent; code that builds one by hand must keep those rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// The version of this map; each allocation adds one.
    pub epoch: Epoch,
    /// The owner of each shard: `shards[s]` owns shard `s`.
    pub shards: Vec<NodeId>,
    /// The members the map was allocated over, sorted by id.
    pub members: Vec<Member>,
}

impl ShardMap {
    /// The number of shards.
    pub fn shard_count(&self) -> u32 {
        // `allocate` takes the count as a u32, so a real map never saturates here.
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// The owner of `shard`, or `None` when the map has no such shard.
    pub fn owner(&self, shard: ShardId) -> Option<NodeId> {
        self.shards.get(shard as usize).copied()
    }

    /// The shard of `key` and its owner: the routing hot path, one hash and one index.
    ///
    /// # Panics
    /// If the map has no shards, which a map from [`allocate`] never has.
    #[inline]
    pub fn owner_of_key(&self, key: &[u8]) -> (ShardId, NodeId) {
        let shard = shard_for(key, self.shard_count());
        (shard, self.shards[shard as usize])
    }

    /// The shards owned by `node`, in increasing order.
    pub fn shards_of(&self, node: NodeId) -> impl Iterator<Item = ShardId> + '_ {
        self.shards
            .iter()
            .enumerate()
            .filter(move |&(_, &owner)| owner == node)
            // Shard indexes are below `shard_count`, a u32.
            .map(|(shard, _)| shard as ShardId)
    }

    /// The number of shards each node owns. Every member is present, with 0 if it owns none; an
    /// owner that is not a member (only possible in a hand-built map) is counted too.
    pub fn counts(&self) -> BTreeMap<NodeId, u32> {
        let mut counts: BTreeMap<NodeId, u32> =
            self.members.iter().map(|member| (member.id, 0)).collect();
        for &owner in &self.shards {
            *counts.entry(owner).or_insert(0) += 1;
        }
        counts
    }

    /// The shards whose owner differs between `previous` and this map, as
    /// `(shard, previous owner, new owner)` in increasing shard order. Only shards present in
    /// both maps are compared (allocation never changes the shard count).
    pub fn moved_from(&self, previous: &ShardMap) -> Vec<(ShardId, NodeId, NodeId)> {
        self.shards
            .iter()
            .zip(&previous.shards)
            .enumerate()
            .filter(|&(_, (new, old))| new != old)
            .map(|(shard, (&new, &old))| (shard as ShardId, old, new))
            .collect()
    }
}

/// Why [`allocate`] could not compute a map. Each of these is a caller bug or a configuration
/// mistake, never a transient condition: retrying with the same inputs fails the same way.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocateError {
    /// The member list was empty.
    #[error("cannot allocate shards without members: add a node first")]
    NoMembers,
    /// The shard count was zero.
    #[error("cannot allocate zero shards: configure a shard count of at least 1")]
    NoShards,
    /// A node id appeared more than once in the member list (the smallest such id is reported).
    #[error("node {0} appears more than once in the member list: pass each node once")]
    DuplicateMember(NodeId),
    /// The previous map has a different number of shards. Keys hash modulo the shard count, so
    /// changing it would re-route almost every key.
    #[error(
        "the shard count cannot change from {previous} to {requested}: every key would move to \
         another shard; keep the cluster's shard count of {previous}"
    )]
    ShardCountChanged {
        /// The shard count of the previous map.
        previous: u32,
        /// The shard count that was asked for.
        requested: u32,
    },
}

/// Marks a shard whose previous owner is no longer a member.
const NOT_A_MEMBER: usize = usize::MAX;

/// Computes the shard map for `members`, starting from `previous` when there is one.
///
/// `previous` `None` gives a fresh map at epoch 1; otherwise the epoch is `previous.epoch + 1`.
/// The result is:
/// - **deterministic**: it depends only on `previous`, the *set* of members (their order in the
///   slice does not matter) and `shard_count`, and is the same on every machine;
/// - **balanced**: every member owns ⌊S/N⌋ or ⌈S/N⌉ shards (some own none when S < N);
/// - **minimal in movement**: a shard keeps its owner unless that owner left or holds more than
///   its quota; the ⌈S/N⌉ quotas go first to members that already hold more than ⌊S/N⌋, which
///   is what makes the number of moved shards the smallest any balanced map allows. A leave moves
///   only the leaver's shards, and a join (from a map made here) only moves shards onto the new
///   nodes;
/// - **zone-aware**: where moves allow a choice, the ⌈S/N⌉ quotas are spread over zones in
///   proportion to their nodes, weighted so that the shards being placed (a lost zone's, say) are
///   shared by all zones in proportion too; shards are handed out round-robin over members
///   interleaved by zone, so a fresh map alternates zones along the shard range.
///
/// It runs in O(S + N log N) time, with no allocation per shard.
///
/// # Errors
/// In this order of checking: [`AllocateError::NoMembers`] when `members` is empty,
/// [`AllocateError::NoShards`] when `shard_count` is 0, [`AllocateError::ShardCountChanged`]
/// when `previous` has another number of shards, and [`AllocateError::DuplicateMember`] when an
/// id appears twice.
pub fn allocate(
    previous: Option<&ShardMap>,
    members: &[Member],
    shard_count: u32,
) -> Result<ShardMap, AllocateError> {
    if members.is_empty() {
        return Err(AllocateError::NoMembers);
    }
    if shard_count == 0 {
        return Err(AllocateError::NoShards);
    }
    if let Some(previous) = previous {
        if previous.shards.len() != shard_count as usize {
            return Err(AllocateError::ShardCountChanged {
                previous: previous.shard_count(),
                requested: shard_count,
            });
        }
    }
    // Everything below works on members sorted by id, which is what makes the result
    // independent of the caller's order.
    let mut sorted = members.to_vec();
    sorted.sort_unstable_by_key(|member| member.id);
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].id == pair[1].id) {
        return Err(AllocateError::DuplicateMember(pair[0].id));
    }

    let ids: Vec<NodeId> = sorted.iter().map(|member| member.id).collect();
    let zones = Zones::of(&sorted);
    let shard_total = shard_count as usize;

    // Which member (index into `ids`) owns each shard now, and how many each holds.
    let mut held = vec![0_usize; ids.len()];
    let current_owners: Option<Vec<usize>> = previous.map(|previous| {
        let index = MemberIndex::new(&ids);
        previous
            .shards
            .iter()
            .map(|&owner| match index.get(owner) {
                Some(member) => {
                    held[member] += 1;
                    member
                }
                None => NOT_A_MEMBER,
            })
            .collect()
    });

    let quota = quotas(&held, &zones, shard_total);

    // `remaining[m]`: how many more shards member m takes once it has kept what it may keep.
    let mut remaining = quota;
    let mut shards: Vec<NodeId> = vec![0; shard_total];
    match current_owners {
        None => {
            let receivers = interleave_by_zone(&remaining, &zones);
            hand_out(
                &mut shards,
                0..shard_count,
                &receivers,
                &mut remaining,
                &ids,
            );
        }
        Some(current_owners) => {
            let free = keep_within_quota(&current_owners, &held, &mut remaining, &mut shards, &ids);
            let receivers = interleave_by_zone(&remaining, &zones);
            hand_out(
                &mut shards,
                free.into_iter(),
                &receivers,
                &mut remaining,
                &ids,
            );
        }
    }
    debug_assert!(remaining.iter().all(|&left| left == 0));

    Ok(ShardMap {
        // Saturating: 2^64 allocations will not happen, and wrapping to 0 would break fencing.
        epoch: previous.map_or(1, |previous| previous.epoch.saturating_add(1)),
        shards,
        members: sorted,
    })
}

/// Finds a member's index from its id in O(1), for the owner of every shard: a binary search
/// there, with its unpredictable branches, took two thirds of an allocation's time.
///
/// Open addressing with linear probing, at most half full so that every probe sequence ends at
/// an empty slot. The slot hash (Fibonacci hashing: multiply by 2^64/φ, keep the top bits) only
/// affects speed, never the result, so it needs no stability across machines; it spreads
/// operator-chosen ids with regular strides well.
struct MemberIndex {
    /// `(id, member index)`, with index `NOT_A_MEMBER` for an empty slot.
    slots: Vec<(NodeId, usize)>,
    /// 64 minus the number of bits of a slot number.
    shift: u32,
}

impl MemberIndex {
    fn new(ids: &[NodeId]) -> MemberIndex {
        let slot_total = (ids.len() * 2).next_power_of_two().max(2);
        let mut index = MemberIndex {
            slots: vec![(0, NOT_A_MEMBER); slot_total],
            shift: 64 - slot_total.trailing_zeros(),
        };
        for (member, &id) in ids.iter().enumerate() {
            let mut slot = index.home(id);
            while index.slots[slot].1 != NOT_A_MEMBER {
                slot = (slot + 1) & (slot_total - 1);
            }
            index.slots[slot] = (id, member);
        }
        index
    }

    fn home(&self, id: NodeId) -> usize {
        // The top bits of the product: below the slot count, so the cast keeps them all.
        (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn get(&self, id: NodeId) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut slot = self.home(id);
        loop {
            let (slot_id, member) = self.slots[slot];
            if member == NOT_A_MEMBER {
                return None;
            }
            if slot_id == id {
                return Some(member);
            }
            slot = (slot + 1) & mask;
        }
    }
}

/// The members grouped by zone. Zones are numbered in sorted order of their names (no zone
/// first), so that every tie between zones breaks the same way on every machine.
struct Zones {
    /// The zone number of each member.
    of_member: Vec<usize>,
    /// The number of members in each zone.
    sizes: Vec<usize>,
}

impl Zones {
    fn of(members: &[Member]) -> Zones {
        let mut names: Vec<Option<&str>> = members
            .iter()
            .map(|member| member.zone.as_deref())
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut sizes = vec![0; names.len()];
        let of_member = members
            .iter()
            .map(|member| {
                let zone = names
                    .binary_search(&member.zone.as_deref())
                    .expect("the zone list was built from these members");
                sizes[zone] += 1;
                zone
            })
            .collect();
        Zones { of_member, sizes }
    }
}

/// Each member's shard quota: ⌊S/N⌋, plus one for S mod N of them.
///
/// Who gets the extra one decides how many shards move. A member holding more than ⌊S/N⌋ saves
/// exactly one move by getting it, whatever it holds, and any other member saves none; so the
/// extras go to those members first, and only the choice that is left is made for zones, one
/// extra at a time to the zone furthest below its fair share (within a zone: members holding
/// more first, then lower ids):
/// - when more members hold more than ⌊S/N⌋ than there are extras (after a join, typically),
///   which of them keeps one more decides the zones' final shares, so the fair share is
///   S·n_z/N of the map: the extras go round the zones in proportion to their nodes;
/// - when fewer do (after a leave), all of them keep one more and the rest of the extras go to
///   members that will receive shards anyway, so they decide how the shards being placed are
///   shared out: the fair share is what a zone holds now plus a part of the shards being placed
///   proportional to its nodes. This is what spreads a lost zone's shards over all the others.
///
/// In a fresh map both come to the same: S·n_z/N.
fn quotas(held: &[usize], zones: &Zones, shard_total: usize) -> Vec<usize> {
    let member_total = held.len();
    let base = shard_total / member_total;
    let extra = shard_total % member_total;
    let mut quota = vec![base; member_total];
    if extra == 0 {
        return quota;
    }

    let holds_more = |member: &usize| held[*member] > base;
    let holding_more: Vec<usize> = (0..member_total).filter(holds_more).collect();
    let chosen = if holding_more.len() > extra {
        // `deficit[z] / N` is how far zone z is below S·n_z/N, given that every member gets
        // at least `base`: (S mod N)·n_z/N.
        let mut deficit: Vec<i128> = zones
            .sizes
            .iter()
            .map(|&size| extra as i128 * size as i128)
            .collect();
        choose_zone_fairly(holding_more, extra, held, zones, &mut deficit)
    } else {
        // `deficit[z] / N` is how far zone z is below held_z + (S - held)·n_z/N, against the
        // n_z·base + extras_z it has so far.
        let held_total: usize = held.iter().sum();
        let unplaced = (shard_total - held_total) as i128;
        let mut deficit: Vec<i128> = zones
            .sizes
            .iter()
            .map(|&size| (unplaced - (member_total * base) as i128) * size as i128)
            .collect();
        for (member, &count) in held.iter().enumerate() {
            deficit[zones.of_member[member]] += member_total as i128 * count as i128;
        }
        for &member in &holding_more {
            deficit[zones.of_member[member]] -= member_total as i128;
        }
        let others: Vec<usize> = (0..member_total).filter(|m| !holds_more(m)).collect();
        let mut chosen = choose_zone_fairly(
            others,
            extra - holding_more.len(),
            held,
            zones,
            &mut deficit,
        );
        chosen.extend(holding_more);
        chosen
    };
    for member in chosen {
        quota[member] += 1;
    }
    quota
}

/// Picks `count` of `candidates`, each time from the zone with the largest deficit (then the
/// larger zone, then the lower zone number), and within a zone the member holding most (then the
/// lowest id). Lowers the chosen zone's deficit by one member's worth after each pick.
fn choose_zone_fairly(
    mut candidates: Vec<usize>,
    count: usize,
    held: &[usize],
    zones: &Zones,
    deficit: &mut [i128],
) -> Vec<usize> {
    let member_total = zones.of_member.len() as i128;
    candidates
        .sort_unstable_by_key(|&member| (zones.of_member[member], Reverse(held[member]), member));
    // `next[z]..end[z]`: zone z's candidates not yet chosen, best first.
    let mut next = vec![0; zones.sizes.len()];
    let mut end = vec![0; zones.sizes.len()];
    for (position, &member) in candidates.iter().enumerate().rev() {
        next[zones.of_member[member]] = position;
    }
    for (position, &member) in candidates.iter().enumerate() {
        end[zones.of_member[member]] = position + 1;
    }
    let mut heap: BinaryHeap<(i128, usize, Reverse<usize>)> = (0..zones.sizes.len())
        .filter(|&zone| next[zone] < end[zone])
        .map(|zone| (deficit[zone], zones.sizes[zone], Reverse(zone)))
        .collect();

    let mut chosen = Vec::with_capacity(count);
    while chosen.len() < count {
        let Some((_, size, Reverse(zone))) = heap.pop() else {
            break;
        };
        chosen.push(candidates[next[zone]]);
        next[zone] += 1;
        deficit[zone] -= member_total;
        if next[zone] < end[zone] {
            heap.push((deficit[zone], size, Reverse(zone)));
        }
    }
    debug_assert_eq!(chosen.len(), count, "fewer candidates than extra quotas");
    chosen
}

/// Keeps each shard with its current owner while the owner is within quota, writing the kept
/// owners into `shards`, and returns the shards that must move, in increasing order.
///
/// A member over quota gives up its excess spread evenly over its shards (a Bresenham-style
/// counter: give up its j-th shard when ⌊(j + 1)·excess/held + phase⌋ passes an integer) rather
/// than a block at the end of the range. The phase is staggered by member index: after a fresh,
/// round-robin map every member would otherwise shed the shards at the same relative points,
/// and those sit side by side, handing a joining node contiguous blocks of shards.
fn keep_within_quota(
    current_owners: &[usize],
    held: &[usize],
    remaining: &mut [usize],
    shards: &mut [NodeId],
    ids: &[NodeId],
) -> Vec<ShardId> {
    let excess: Vec<usize> = held
        .iter()
        .zip(remaining.iter())
        .map(|(&held, &quota)| held.saturating_sub(quota))
        .collect();
    let member_total = held.len();
    let mut counter: Vec<usize> = held
        .iter()
        .enumerate()
        // Below `count`, as member < member_total; u128 rules out overflow.
        .map(|(member, &count)| (count as u128 * member as u128 / member_total as u128) as usize)
        .collect();
    let mut free = Vec::new();
    for (shard, &member) in current_owners.iter().enumerate() {
        // Shard indexes are below the u32 shard count.
        let shard_id = shard as ShardId;
        if member == NOT_A_MEMBER {
            free.push(shard_id);
            continue;
        }
        if excess[member] > 0 {
            counter[member] += excess[member];
            if counter[member] >= held[member] {
                counter[member] -= held[member];
                free.push(shard_id);
                continue;
            }
        }
        shards[shard] = ids[member];
        remaining[member] -= 1;
    }
    free
}

/// The members that still take shards, in an order that interleaves zones: the j-th of a zone's
/// m receivers sits at position (j + ½)/m, and positions are merged in order (ties by zone
/// number). Within a zone, members keep their id order.
fn interleave_by_zone(remaining: &[usize], zones: &Zones) -> Vec<usize> {
    let mut per_zone = vec![0_usize; zones.sizes.len()];
    // (member, zone, rank within zone)
    let mut receivers: Vec<(usize, usize, usize)> = Vec::new();
    for (member, _) in remaining.iter().enumerate().filter(|&(_, &left)| left > 0) {
        let zone = zones.of_member[member];
        receivers.push((member, zone, per_zone[zone]));
        per_zone[zone] += 1;
    }
    if zones.sizes.len() > 1 {
        receivers.sort_unstable_by(|&(_, zone_a, rank_a), &(_, zone_b, rank_b)| {
            // (2·rank_a + 1) / (2·m_a) against (2·rank_b + 1) / (2·m_b), cross-multiplied.
            let position_a = (2 * rank_a as u128 + 1) * per_zone[zone_b] as u128;
            let position_b = (2 * rank_b as u128 + 1) * per_zone[zone_a] as u128;
            position_a.cmp(&position_b).then(zone_a.cmp(&zone_b))
        });
    }
    receivers.into_iter().map(|(member, _, _)| member).collect()
}

/// Gives the `free` shards, in order, round-robin to `receivers` until each has its remaining
/// quota, so that every receiver's new shards are spread over the free ones.
fn hand_out(
    shards: &mut [NodeId],
    mut free: impl Iterator<Item = ShardId>,
    receivers: &[usize],
    remaining: &mut [usize],
    ids: &[NodeId],
) {
    let mut active = receivers.to_vec();
    while !active.is_empty() {
        for &member in &active {
            let shard = free
                .next()
                .expect("quotas add up to the shard count, so free shards match remaining quotas");
            shards[shard as usize] = ids[member];
            remaining[member] -= 1;
        }
        active.retain(|&member| remaining[member] > 0);
    }
    debug_assert!(free.next().is_none(), "a free shard was left without owner");
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::Config;

    use super::*;

    // ---- helpers -------------------------------------------------------------------------

    fn plain(ids: &[NodeId]) -> Vec<Member> {
        ids.iter().copied().map(Member::new).collect()
    }

    fn zoned(members: &[(NodeId, &str)]) -> Vec<Member> {
        members
            .iter()
            .map(|&(id, zone)| Member::in_zone(id, zone))
            .collect()
    }

    /// Every owner is a member, members are sorted and unique, and each member owns ⌊S/N⌋ or
    /// ⌈S/N⌉ shards.
    fn assert_balanced(map: &ShardMap) {
        let shard_total = map.shards.len();
        let member_total = map.members.len();
        assert!(shard_total > 0 && member_total > 0);
        assert!(
            map.members.windows(2).all(|pair| pair[0].id < pair[1].id),
            "members must be sorted by id without duplicates"
        );
        let counts = map.counts();
        assert_eq!(counts.len(), member_total, "an owner is not a member");
        let low = shard_total / member_total;
        let high = shard_total.div_ceil(member_total);
        for (&node, &count) in &counts {
            let count = count as usize;
            assert!(
                count == low || count == high,
                "node {node} owns {count} of {shard_total} shards over {member_total} members"
            );
        }
    }

    /// Checks `next` against `previous` for minimal movement: a shard leaves a surviving owner
    /// only if that owner held more than its new quota, each such owner gives up exactly its
    /// excess, receivers were below quota, and the total equals the smallest number of moves any
    /// balanced map allows (computed independently of the allocator's choices).
    fn assert_minimal_movement(previous: &ShardMap, next: &ShardMap) {
        assert_eq!(next.epoch, previous.epoch + 1);
        let shard_total = next.shards.len();
        let member_total = next.members.len();
        let base = shard_total / member_total;
        let extra = shard_total % member_total;
        let quota = next.counts();
        let mut held: BTreeMap<NodeId, usize> = quota.keys().map(|&id| (id, 0)).collect();
        for owner in &previous.shards {
            if let Some(count) = held.get_mut(owner) {
                *count += 1;
            }
        }
        let mut orphans = 0;
        let mut given: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (shard, (&old, &new)) in previous.shards.iter().zip(&next.shards).enumerate() {
            if old == new {
                continue;
            }
            match held.get(&old) {
                None => orphans += 1,
                Some(&count) => {
                    assert!(
                        count > quota[&old] as usize,
                        "shard {shard} left node {old}, which held {count} within its quota {}",
                        quota[&old]
                    );
                    *given.entry(old).or_insert(0) += 1;
                }
            }
            assert!(
                held[&new] < quota[&new] as usize,
                "shard {shard} went to node {new}, which was not below its quota"
            );
        }
        for (&node, &count) in &held {
            let excess = count.saturating_sub(quota[&node] as usize);
            assert_eq!(
                given.get(&node).copied().unwrap_or(0),
                excess,
                "node {node}"
            );
        }
        let holding_more = held.values().filter(|&&count| count > base).count();
        let minimum = orphans
            + held
                .values()
                .map(|&count| count.saturating_sub(base + 1))
                .sum::<usize>()
            + holding_more.saturating_sub(extra);
        assert_eq!(
            next.moved_from(previous).len(),
            minimum,
            "moves beyond the minimum"
        );
    }

    /// A transition where no member left moves shards only onto the new members; one where no
    /// member joined moves exactly the leavers' shards.
    fn assert_join_and_leave_rules(previous: &ShardMap, next: &ShardMap) {
        let before: BTreeSet<NodeId> = previous.members.iter().map(|m| m.id).collect();
        let after: BTreeSet<NodeId> = next.members.iter().map(|m| m.id).collect();
        let moved = next.moved_from(previous);
        if before.is_subset(&after) {
            for &(shard, from, to) in &moved {
                assert!(
                    !before.contains(&to),
                    "join moved shard {shard} between old nodes {from} -> {to}"
                );
            }
        }
        if after.is_subset(&before) {
            let moved_shards: Vec<ShardId> = moved.iter().map(|&(shard, _, _)| shard).collect();
            let leavers_shards: Vec<ShardId> = (0..previous.shard_count())
                .filter(|&shard| !after.contains(&previous.shards[shard as usize]))
                .collect();
            assert_eq!(moved_shards, leavers_shards, "a leave moved other shards");
        }
    }

    /// Shards per zone (members without a zone under `None`) and nodes per zone.
    fn zone_shares(map: &ShardMap) -> BTreeMap<Option<String>, (usize, usize)> {
        let counts = map.counts();
        let mut shares = BTreeMap::new();
        for member in &map.members {
            let entry = shares.entry(member.zone.clone()).or_insert((0, 0));
            entry.0 += counts[&member.id] as usize;
            entry.1 += 1;
        }
        shares
    }

    /// Each zone's share is within ±(its nodes) of S·n_z/N.
    fn assert_zone_shares_proportional(map: &ShardMap) {
        let shard_total = map.shards.len();
        let member_total = map.members.len();
        for (zone, (share, nodes)) in zone_shares(map) {
            let distance = (share * member_total).abs_diff(shard_total * nodes);
            assert!(
                distance <= nodes * member_total,
                "zone {zone:?} with {nodes} of {member_total} nodes owns {share} of \
                 {shard_total} shards"
            );
        }
    }

    fn assert_transition(previous: &ShardMap, next: &ShardMap) {
        assert_balanced(next);
        assert_minimal_movement(previous, next);
        assert_join_and_leave_rules(previous, next);
        assert_zone_shares_proportional(next);
    }

    // ---- keys and the key hash --------------------------------------------------------------

    /// The 100-byte key of the golden vectors: byte i is (7·i + 3) mod 256.
    fn hundred_byte_key() -> Vec<u8> {
        (0..100_u32).map(|i| ((i * 7 + 3) % 256) as u8).collect()
    }

    #[test]
    fn shard_for_golden_vectors() {
        // Computed once with the Python package `xxhash` 3.x (libxxhash 0.8.x), independently of
        // the Rust crate: `xxhash.xxh3_64_intdigest(key, seed=0) % n` for n = 1, 7, 1024, 16384.
        // These pin the wire contract: a change here re-routes every key in every cluster.
        let vectors: [(Key, [ShardId; 4]); 8] = [
            (Key::from(""), [0, 4, 194, 5314]),
            (Key::from("a"), [0, 1, 543, 3615]),
            (Key::from("user-42"), [0, 3, 461, 2509]),
            (Key::from("hello world"), [0, 1, 139, 6283]),
            (Key::from(hundred_byte_key()), [0, 6, 159, 3231]),
            (Key::from(0_u64), [0, 3, 217, 11481]),
            (Key::from(1_u64), [0, 4, 1011, 3059]),
            (Key::from(42_u64), [0, 2, 172, 4268]),
        ];
        for (key, expected) in &vectors {
            for (&shard_count, &shard) in [1, 7, 1024, 16384].iter().zip(expected) {
                assert_eq!(
                    shard_for(key.as_bytes(), shard_count),
                    shard,
                    "key {key:?} over {shard_count} shards"
                );
                assert_eq!(key.shard(shard_count), shard);
            }
        }
        // The 16-byte key of the `key_to_shard` bench.
        assert_eq!(shard_for(b"0123456789abcdef", 16384), 8493);
    }

    #[test]
    fn raw_xxh3_of_user_42_is_pinned() {
        // From the same Python computation as the golden vectors.
        assert_eq!(xxh3_64(b"user-42"), 0x50fe_4b21_cf7b_09cd);
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "at least one shard"))]
    fn shard_for_zero_shards_is_a_caller_bug_that_returns_shard_0_in_release() {
        assert_eq!(shard_for(b"user-42", 0), 0);
    }

    #[test]
    fn key_conversions_keep_the_bytes() {
        let text = String::from("user-42");
        let bytes = b"user-42".to_vec();
        let keys = [
            Key::from("user-42"),
            Key::from(text.clone()),
            Key::from(&text),
            Key::from(&bytes[..]),
            Key::from(bytes.clone()),
            Key::from(&Key::from("user-42")),
        ];
        for key in &keys {
            assert_eq!(key.as_bytes(), b"user-42");
            assert_eq!(key.as_ref(), b"user-42");
            assert_eq!(key, &keys[0]);
        }
        assert_eq!(keys[0].clone().into_bytes(), bytes);
        // `Borrow<[u8]>` lets a map keyed by `Key` be searched with plain bytes.
        let mut counters = std::collections::HashMap::new();
        counters.insert(Key::from("user-42"), 1);
        assert_eq!(counters.get(&b"user-42"[..]), Some(&1));
    }

    #[test]
    fn key_from_u64_is_eight_big_endian_bytes() {
        assert_eq!(
            Key::from(0x0102_0304_0506_0708_u64).as_bytes(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(Key::from(42_u64).as_bytes(), [0, 0, 0, 0, 0, 0, 0, 42]);
    }

    #[test]
    fn key_displays_printable_utf8_as_text_and_anything_else_as_hex() {
        assert_eq!(Key::from("user-42").to_string(), "user-42");
        assert_eq!(Key::from("grüße").to_string(), "grüße");
        assert_eq!(Key::from(&[0x0a, 0x1b, 0xff][..]).to_string(), "0x0a1bff");
        // Valid UTF-8, but control characters would break a log line.
        assert_eq!(Key::from(1_u64).to_string(), "0x0000000000000001");
        assert_eq!(Key::from("a\nb").to_string(), "0x610a62");
        assert_eq!(format!("{:?}", Key::from("user-42")), "Key(\"user-42\")");
        assert_eq!(format!("{:?}", Key::from(&[0xff][..])), "Key(0xff)");
    }

    #[test]
    fn key_is_a_byte_string_on_the_wire() {
        let config = bincode::config::standard();
        let key = Key::from(hundred_byte_key());
        let encoded = bincode::serde::encode_to_vec(&key, config).expect("encodes");
        // A byte string: length then the raw bytes, like a `Vec<u8>`.
        assert_eq!(
            encoded,
            bincode::serde::encode_to_vec(hundred_byte_key(), config).expect("encodes")
        );
        let (decoded, read): (Key, usize) =
            bincode::serde::decode_from_slice(&encoded, config).expect("decodes");
        assert_eq!((decoded, read), (key, encoded.len()));
    }

    #[test]
    fn shard_map_round_trips_through_bincode() {
        let members = zoned(&[(1, "a"), (2, "b"), (u64::MAX, "a")]);
        let map = allocate(None, &members, 100).expect("valid input");
        let config = bincode::config::standard();
        let encoded = bincode::serde::encode_to_vec(&map, config).expect("encodes");
        let (decoded, _): (ShardMap, usize) =
            bincode::serde::decode_from_slice(&encoded, config).expect("decodes");
        assert_eq!(decoded, map);
    }

    // ---- map accessors ------------------------------------------------------------------------

    fn hand_built_map() -> ShardMap {
        ShardMap {
            epoch: 7,
            shards: vec![10, 20, 10, 30, 10],
            members: plain(&[10, 20, 30, 40]),
        }
    }

    #[test]
    fn owner_of_key_is_shard_for_then_an_index() {
        let map = allocate(None, &plain(&[1, 2, 3]), 1024).expect("valid input");
        for key in ["", "a", "user-42", "hello world"] {
            let shard = shard_for(key.as_bytes(), 1024);
            assert_eq!(
                map.owner_of_key(key.as_bytes()),
                (shard, map.shards[shard as usize])
            );
        }
        assert_eq!(map.owner_of_key(b"user-42").0, 461);
    }

    #[test]
    fn owner_is_none_past_the_last_shard() {
        let map = hand_built_map();
        assert_eq!(map.shard_count(), 5);
        assert_eq!(map.owner(0), Some(10));
        assert_eq!(map.owner(4), Some(10));
        assert_eq!(map.owner(5), None);
        assert_eq!(map.owner(ShardId::MAX), None);
    }

    #[test]
    fn shards_of_lists_a_nodes_shards_in_order() {
        let map = hand_built_map();
        assert_eq!(map.shards_of(10).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(map.shards_of(30).collect::<Vec<_>>(), [3]);
        assert_eq!(map.shards_of(40).count(), 0);
        assert_eq!(map.shards_of(99).count(), 0);
    }

    #[test]
    fn counts_include_members_that_own_nothing() {
        let counts = hand_built_map().counts();
        assert_eq!(counts, BTreeMap::from([(10, 3), (20, 1), (30, 1), (40, 0)]));
    }

    #[test]
    fn moved_from_lists_each_changed_shard_once() {
        let previous = hand_built_map();
        let mut next = previous.clone();
        next.shards[1] = 40;
        next.shards[4] = 40;
        assert_eq!(next.moved_from(&previous), [(1, 20, 40), (4, 10, 40)]);
        assert!(previous.moved_from(&previous).is_empty());
    }

    // ---- allocate: errors ---------------------------------------------------------------------

    #[test]
    fn allocate_without_members_fails() {
        assert_eq!(allocate(None, &[], 16), Err(AllocateError::NoMembers));
    }

    #[test]
    fn allocate_zero_shards_fails() {
        assert_eq!(
            allocate(None, &plain(&[1]), 0),
            Err(AllocateError::NoShards)
        );
    }

    #[test]
    fn allocate_reports_the_smallest_duplicate_member_whatever_the_order() {
        let members = [
            Member::new(9),
            Member::in_zone(5, "a"),
            Member::new(9),
            Member::new(5),
        ];
        assert_eq!(
            allocate(None, &members, 16),
            Err(AllocateError::DuplicateMember(5))
        );
    }

    #[test]
    fn allocate_refuses_to_change_the_shard_count() {
        let previous = allocate(None, &plain(&[1, 2]), 16).expect("valid input");
        assert_eq!(
            allocate(Some(&previous), &plain(&[1, 2]), 32),
            Err(AllocateError::ShardCountChanged {
                previous: 16,
                requested: 32
            })
        );
    }

    #[test]
    fn allocate_errors_say_what_to_do() {
        let messages = [
            AllocateError::NoMembers.to_string(),
            AllocateError::NoShards.to_string(),
            AllocateError::DuplicateMember(7).to_string(),
            AllocateError::ShardCountChanged {
                previous: 16,
                requested: 32,
            }
            .to_string(),
        ];
        assert!(messages[0].contains("add a node"));
        assert!(messages[1].contains("at least 1"));
        assert!(messages[2].contains("node 7") && messages[2].contains("pass each node once"));
        assert!(messages[3].contains("from 16 to 32") && messages[3].contains("keep"));
    }

    // ---- allocate: examples -------------------------------------------------------------------

    #[test]
    fn fresh_map_starts_at_epoch_1_and_each_allocation_adds_one() {
        let first = allocate(None, &plain(&[1, 2]), 8).expect("valid input");
        let second = allocate(Some(&first), &plain(&[1, 2, 3]), 8).expect("valid input");
        let third = allocate(Some(&second), &plain(&[1, 2, 3]), 8).expect("valid input");
        assert_eq!((first.epoch, second.epoch, third.epoch), (1, 2, 3));
    }

    #[test]
    fn fresh_map_hands_out_shards_round_robin_by_id() {
        let map = allocate(None, &plain(&[30, 10, 20]), 7).expect("valid input");
        assert_eq!(map.shards, [10, 20, 30, 10, 20, 30, 10]);
        assert_eq!(map.members, plain(&[10, 20, 30]));
    }

    #[test]
    fn reallocating_the_same_members_moves_nothing() {
        let members = zoned(&[(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b")]);
        let first = allocate(None, &members, 1003).expect("valid input");
        let second = allocate(Some(&first), &members, 1003).expect("valid input");
        assert_eq!(second.shards, first.shards);
        assert_eq!(second.epoch, 2);
    }

    #[test]
    fn one_join_moves_one_share_onto_the_new_node_only() {
        let ids: Vec<NodeId> = (1..=49).collect();
        let before = allocate(None, &plain(&ids), 10_000).expect("valid input");
        let after = allocate(
            Some(&before),
            &plain(&[ids.as_slice(), &[50]].concat()),
            10_000,
        )
        .expect("valid input");
        let moved = after.moved_from(&before);
        assert_eq!(moved.len(), 200);
        assert!(moved.iter().all(|&(_, _, to)| to == 50));
        assert_transition(&before, &after);
    }

    #[test]
    fn a_leave_moves_only_the_leavers_shards_spread_over_the_rest() {
        let before = allocate(None, &plain(&[1, 2, 3, 4, 5]), 100).expect("valid input");
        let after = allocate(Some(&before), &plain(&[1, 2, 4, 5]), 100).expect("valid input");
        let moved = after.moved_from(&before);
        assert_eq!(moved.len(), 20);
        assert!(moved.iter().all(|&(_, from, _)| from == 3));
        assert!(after.counts().values().all(|&count| count == 25));
    }

    #[test]
    fn fresh_map_alternates_zones_along_the_shard_range() {
        let members = zoned(&[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")]);
        let map = allocate(None, &members, 30).expect("valid input");
        let zone_of = |node: NodeId| map.members.iter().find(|m| m.id == node).map(|m| &m.zone);
        for window in map.shards.windows(3) {
            let zones: BTreeSet<_> = window.iter().map(|&node| zone_of(node)).collect();
            assert_eq!(zones.len(), 3, "shards {window:?} are not in three zones");
        }
    }

    #[test]
    fn losing_one_of_three_equal_zones_splits_its_shards_evenly() {
        let members = zoned(&[
            (1, "a"),
            (2, "a"),
            (3, "b"),
            (4, "b"),
            (5, "c"),
            (6, "c"),
            (7, "a"),
            (8, "b"),
            (9, "c"),
        ]);
        let before = allocate(None, &members, 900).expect("valid input");
        let survivors: Vec<Member> = members
            .iter()
            .filter(|m| m.zone.as_deref() != Some("c"))
            .cloned()
            .collect();
        let after = allocate(Some(&before), &survivors, 900).expect("valid input");
        assert_transition(&before, &after);
        let zone_of = |node: NodeId| {
            members
                .iter()
                .find(|m| m.id == node)
                .map(|m| m.zone.clone())
        };
        let mut received: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for (_, _, to) in after.moved_from(&before) {
            *received.entry(zone_of(to).flatten()).or_insert(0) += 1;
        }
        assert_eq!(
            received,
            BTreeMap::from([(Some("a".to_string()), 150), (Some("b".to_string()), 150)])
        );
    }

    #[test]
    fn allocation_golden_vectors() {
        // Every node runs `allocate` when it applies a membership change, so nodes of different
        // builds (a rolling upgrade) must compute identical maps. These vectors pin the
        // algorithm: if a change to it is intended, it needs a versioned rollout, not an edit here.
        let members = zoned(&[(7, "a"), (3, "b"), (11, "a"), (5, "c"), (2, "b")]);
        let fresh = allocate(None, &members, 16).expect("valid input");
        assert_eq!(fresh.shards, GOLDEN_FRESH);
        let joined = [members.as_slice(), &[Member::in_zone(13, "c")]].concat();
        let after_join = allocate(Some(&fresh), &joined, 16).expect("valid input");
        assert_eq!(after_join.shards, GOLDEN_AFTER_JOIN);
        let left: Vec<Member> = joined.iter().filter(|m| m.id != 3).cloned().collect();
        let after_leave = allocate(Some(&after_join), &left, 16).expect("valid input");
        assert_eq!(after_leave.shards, GOLDEN_AFTER_LEAVE);
    }

    const GOLDEN_FRESH: [NodeId; 16] = [7, 2, 5, 11, 3, 7, 2, 5, 11, 3, 7, 2, 5, 11, 3, 7];
    const GOLDEN_AFTER_JOIN: [NodeId; 16] = [7, 2, 5, 11, 3, 13, 2, 5, 11, 3, 7, 2, 5, 11, 13, 7];
    const GOLDEN_AFTER_LEAVE: [NodeId; 16] = [7, 2, 5, 11, 7, 13, 2, 5, 11, 13, 7, 2, 5, 11, 13, 7];

    #[test]
    fn small_cases_exhaustively() {
        // Every shard count up to 12 over up to 6 nodes, without zones and with 2 or 3 zones:
        // the fresh map, every single leave, a join, and every leave combined with a join.
        for shard_count in 1..=12_u32 {
            for node_total in 1..=6_u64 {
                for zone_total in [0, 2, 3] {
                    let member = |id: NodeId| match zone_total {
                        0 => Member::new(id),
                        _ => Member::in_zone(id, format!("z{}", id % zone_total)),
                    };
                    let members: Vec<Member> = (1..=node_total).map(member).collect();
                    let fresh = allocate(None, &members, shard_count).expect("valid input");
                    assert_balanced(&fresh);
                    assert_zone_shares_proportional(&fresh);
                    let joined = [members.as_slice(), &[member(100)]].concat();
                    let next = allocate(Some(&fresh), &joined, shard_count).expect("valid input");
                    assert_transition(&fresh, &next);
                    for leaver in 1..=node_total {
                        let rest: Vec<Member> =
                            members.iter().filter(|m| m.id != leaver).cloned().collect();
                        if !rest.is_empty() {
                            let next =
                                allocate(Some(&fresh), &rest, shard_count).expect("valid input");
                            assert_transition(&fresh, &next);
                        }
                        let swapped = [rest.as_slice(), &[member(100)]].concat();
                        let next =
                            allocate(Some(&fresh), &swapped, shard_count).expect("valid input");
                        assert_transition(&fresh, &next);
                    }
                }
            }
        }
    }

    // ---- property tests -----------------------------------------------------------------------

    /// Moderate case counts keep the module's tests fast on a 2-core debug build. Failures are
    /// not persisted to a file next to the source: proptest prints the minimal failing input,
    /// which belongs in a regression unit test named after the bug.
    fn config(cases: u32) -> Config {
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// Node ids of three kinds: small serials, ids near `u64::MAX`, and hashed ones.
    fn node_id(id_seed: u64, serial: u64) -> NodeId {
        match id_seed % 3 {
            0 => serial,
            1 => u64::MAX - serial,
            _ => xxhash_rust::xxh3::xxh3_64_with_seed(&serial.to_le_bytes(), id_seed),
        }
    }

    fn zone_member(id: NodeId, zone_total: usize, zone_seed: usize) -> Member {
        match zone_total {
            0 => Member::new(id),
            _ => Member::in_zone(id, format!("zone-{}", zone_seed % zone_total)),
        }
    }

    fn shard_counts() -> impl Strategy<Value = u32> {
        // Small counts exercise S < N and large remainders; large ones the realistic case.
        prop_oneof![1_u32..=80, 1_u32..=16384]
    }

    #[derive(Clone, Debug)]
    struct Step {
        /// The zone seed of each joining node.
        joins: Vec<usize>,
        /// Which current members leave (applied before the joins).
        leaves: Vec<Index>,
    }

    #[derive(Clone, Debug)]
    struct Scenario {
        shard_count: u32,
        /// 0 means members have no zone.
        zone_total: usize,
        /// The zone seed of each initial node (1 to 64 nodes).
        initial: Vec<usize>,
        steps: Vec<Step>,
        id_seed: u64,
    }

    fn scenarios() -> impl Strategy<Value = Scenario> {
        let step = (
            prop::collection::vec(any::<usize>(), 0..=3),
            prop::collection::vec(any::<Index>(), 0..=3),
        )
            .prop_map(|(joins, leaves)| Step { joins, leaves });
        (
            shard_counts(),
            0_usize..=4,
            prop::collection::vec(any::<usize>(), 1..=64),
            prop::collection::vec(step, 1..=5),
            any::<u64>(),
        )
            .prop_map(
                |(shard_count, zone_total, initial, steps, id_seed)| Scenario {
                    shard_count,
                    zone_total,
                    initial,
                    steps,
                    id_seed,
                },
            )
    }

    /// Runs the scenario's joins and leaves (keeping 1 to 64 members), calling `check` with
    /// each previous and next map.
    fn run_scenario(scenario: &Scenario, mut check: impl FnMut(&ShardMap, &ShardMap)) {
        let mut serial = 0;
        let mut new_member = |zone_seed: usize| {
            serial += 1;
            zone_member(
                node_id(scenario.id_seed, serial),
                scenario.zone_total,
                zone_seed,
            )
        };
        let mut members: Vec<Member> = scenario.initial.iter().map(|&z| new_member(z)).collect();
        let mut map = allocate(None, &members, scenario.shard_count).expect("valid input");
        assert_balanced(&map);
        assert_zone_shares_proportional(&map);
        for step in &scenario.steps {
            for leaver in &step.leaves {
                if members.len() > 1 {
                    members.remove(leaver.index(members.len()));
                }
            }
            for &zone_seed in &step.joins {
                if members.len() < 64 {
                    members.push(new_member(zone_seed));
                }
            }
            let next = allocate(Some(&map), &members, scenario.shard_count).expect("valid input");
            check(&map, &next);
            map = next;
        }
    }

    proptest! {
        #![proptest_config(config(64))]

        #[test]
        fn allocation_ignores_member_order(
            shard_count in shard_counts(),
            zone_total in 0_usize..=4,
            zone_seeds in prop::collection::vec(any::<usize>(), 1..=64),
            previous_members in prop::collection::vec(any::<bool>(), 64),
            id_seed in any::<u64>(),
            shuffle_seed in any::<u64>(),
        ) {
            let members: Vec<Member> = zone_seeds
                .iter()
                .enumerate()
                .map(|(serial, &z)| zone_member(node_id(id_seed, serial as u64), zone_total, z))
                .collect();
            // The previous map is over a subset of these members plus one that left.
            let mut before: Vec<Member> = members
                .iter()
                .zip(&previous_members)
                .filter(|&(_, &kept)| kept)
                .map(|(member, _)| member.clone())
                .collect();
            before.push(zone_member(node_id(id_seed, 1000), zone_total, 0));
            let previous = allocate(None, &before, shard_count).expect("valid input");

            // A deterministic shuffle (sorting by a seeded hash) and a reversal.
            let mut shuffled = members.clone();
            shuffled.sort_by_key(|m| {
                xxhash_rust::xxh3::xxh3_64_with_seed(&m.id.to_le_bytes(), shuffle_seed)
            });
            let mut reversed = members.clone();
            reversed.reverse();
            for previous in [None, Some(&previous)] {
                let reference = allocate(previous, &members, shard_count).expect("valid input");
                for order in [&shuffled, &reversed] {
                    prop_assert_eq!(&allocate(previous, order, shard_count)
                        .expect("valid input"), &reference);
                }
            }
        }

        #[test]
        fn joins_and_leaves_keep_every_map_balanced(scenario in scenarios()) {
            run_scenario(&scenario, |_, next| assert_balanced(next));
        }

        #[test]
        fn joins_and_leaves_move_the_fewest_shards(scenario in scenarios()) {
            run_scenario(&scenario, |previous, next| {
                assert_minimal_movement(previous, next);
                assert_join_and_leave_rules(previous, next);
            });
        }

        #[test]
        fn zone_shares_stay_proportional_to_zone_sizes(
            scenario in scenarios().prop_filter("needs zones", |s| s.zone_total > 0),
        ) {
            run_scenario(&scenario, |_, next| assert_zone_shares_proportional(next));
        }

        #[test]
        fn fresh_maps_spread_extra_quotas_over_zones(
            shard_count in shard_counts(),
            zone_sizes in prop::collection::vec(1_usize..=8, 1..=6),
            id_seed in any::<u64>(),
        ) {
            let mut members = Vec::new();
            for (zone, &size) in zone_sizes.iter().enumerate() {
                for _ in 0..size {
                    let serial = members.len() as u64;
                    members.push(Member::in_zone(node_id(id_seed, serial), format!("z{zone}")));
                }
            }
            let map = allocate(None, &members, shard_count).expect("valid input");
            let shard_total = shard_count as usize;
            let member_total = members.len();
            let base = shard_total / member_total;
            let extra = shard_total % member_total;
            for (zone, (share, nodes)) in zone_shares(&map) {
                // The zone's extra quotas are the floor or the ceiling of its proportional part.
                let extras = share - nodes * base;
                let fair = extra * nodes;
                prop_assert!(
                    extras >= fair / member_total && extras <= fair.div_ceil(member_total),
                    "zone {:?} ({} of {} nodes) got {} of {} extra quotas",
                    zone, nodes, member_total, extras, extra
                );
            }
        }

        #[test]
        fn losing_a_zone_spreads_its_shards_over_all_surviving_zones(
            shard_count in shard_counts(),
            zone_sizes in prop::collection::vec(1_usize..=6, 2..=5),
            joins_before in prop::collection::vec(any::<usize>(), 0..=2),
            lost in any::<Index>(),
            id_seed in any::<u64>(),
        ) {
            let zone_total = zone_sizes.len();
            let mut members = Vec::new();
            for (zone, &size) in zone_sizes.iter().enumerate() {
                for _ in 0..size {
                    let serial = members.len() as u64;
                    members.push(zone_member(node_id(id_seed, serial), zone_total, zone));
                }
            }
            // Start from a fresh map or one that has seen a join or two.
            let mut map = allocate(None, &members, shard_count).expect("valid input");
            for zone_seed in joins_before {
                let serial = members.len() as u64;
                members.push(zone_member(node_id(id_seed, serial), zone_total, zone_seed));
                map = allocate(Some(&map), &members, shard_count).expect("valid input");
            }
            let lost_zone = Some(format!("zone-{}", lost.index(zone_total)));
            let survivors: Vec<Member> =
                members.iter().filter(|m| m.zone != lost_zone).cloned().collect();
            let next = allocate(Some(&map), &survivors, shard_count).expect("valid input");
            assert_transition(&map, &next);

            let orphans = next.moved_from(&map).len();
            let survivor_total = survivors.len();
            let zone_of: BTreeMap<NodeId, &Option<String>> =
                survivors.iter().map(|m| (m.id, &m.zone)).collect();
            let mut received: BTreeMap<&Option<String>, usize> = BTreeMap::new();
            for (_, _, to) in next.moved_from(&map) {
                *received.entry(zone_of[&to]).or_insert(0) += 1;
            }
            for (zone, (_, nodes)) in zone_shares(&next) {
                let got = received.get(&zone).copied().unwrap_or(0);
                // Within ±(its nodes) of its proportional part of the lost shards ...
                let distance = (got * survivor_total).abs_diff(orphans * nodes);
                prop_assert!(
                    distance <= nodes * survivor_total,
                    "zone {:?} ({} of {} nodes) received {} of {} shards",
                    zone, nodes, survivor_total, got, orphans
                );
                // ... and something whenever there is at least one shard per surviving node.
                prop_assert!(
                    got > 0 || orphans < survivor_total,
                    "zone {:?} received none of {} shards", zone, orphans
                );
            }
        }

        #[test]
        fn removing_and_readding_a_member_keeps_the_map_balanced(
            shard_count in shard_counts(),
            zone_total in 0_usize..=3,
            zone_seeds in prop::collection::vec(any::<usize>(), 1..=64),
            removed in any::<Index>(),
            id_seed in any::<u64>(),
        ) {
            let members: Vec<Member> = zone_seeds
                .iter()
                .enumerate()
                .map(|(serial, &z)| zone_member(node_id(id_seed, serial as u64), zone_total, z))
                .collect();
            let fresh = allocate(None, &members, shard_count).expect("valid input");
            let removed = removed.index(members.len());
            let rest: Vec<Member> = [&members[..removed], &members[removed + 1..]].concat();
            prop_assume!(!rest.is_empty());
            let without = allocate(Some(&fresh), &rest, shard_count).expect("valid input");
            assert_transition(&fresh, &without);
            let with = allocate(Some(&without), &members, shard_count).expect("valid input");
            assert_transition(&without, &with);
            prop_assert_eq!(with.members, fresh.members);
        }
    }
}
