//! Keys that land on chosen shards, found by search over `PREFIX-0`, `PREFIX-1`, …. Does not
//! own the hash: that is [`shard_for`].

use crate::shard_map::shard_for;
use crate::ShardId;

/// One key per shard of `shard_count`: entry `s` is the first key `PREFIX-N` that hashes to
/// shard `s`. Bounded: about `shard_count · ln(shard_count)` candidates fill every slot, and
/// the search gives up after 64 times the shard count; `None` when some shard got no key.
pub fn keys_per_shard(prefix: &str, shard_count: u32) -> Option<Vec<String>> {
    let mut keys: Vec<Option<String>> = vec![None; shard_count as usize];
    let mut missing = shard_count as usize;
    for i in 0..u64::from(shard_count) * 64 {
        if missing == 0 {
            break;
        }
        let key = format!("{prefix}-{i}");
        let slot = &mut keys[shard_for(key.as_bytes(), shard_count) as usize];
        if slot.is_none() {
            *slot = Some(key);
            missing -= 1;
        }
    }
    keys.into_iter().collect()
}

/// The first key `PREFIX-N` that hashes to `shard` of `shard_count`, searching the first
/// `64 · shard_count` candidates; `None` when none of them does.
pub fn key_of_shard(prefix: &str, shard: ShardId, shard_count: u32) -> Option<String> {
    (0..u64::from(shard_count) * 64)
        .map(|i| format!("{prefix}-{i}"))
        .find(|key| shard_for(key.as_bytes(), shard_count) == shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_gets_a_key_that_hashes_to_it() {
        let keys = keys_per_shard("key", 64).expect("a key for every shard");
        for (shard, key) in keys.iter().enumerate() {
            assert_eq!(shard_for(key.as_bytes(), 64), shard as u32);
            assert_eq!(
                key_of_shard("key", shard as u32, 64).as_deref(),
                Some(key.as_str())
            );
        }
    }
}
