//! What a handler declares durable: the [`DurableState`] trait and its two ready-made kinds,
//! [`Durable`] (the shard's state as one value: the whole-shard record) and [`DurableMap`]
//! (one value per key: per-key records). Both track what changed since the last commit, so a
//! commit writes only that; the shard actor collects the changes after every message.
//!
//! Values are encoded with the same codec as messages (bincode through serde), so a type that
//! can be a message can be durable state.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Batch, Loaded, Scope};
use crate::shard_map::Key;

/// Why durable state could not be loaded or its changes collected.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A stored value does not decode as the declared type: the type changed incompatibly
    /// since it was written, or the record was written by another handler.
    #[error("the stored {record} does not decode as the declared type ({reason}); keep stored types compatible, or migrate the store before deploying the new type")]
    Decode {
        /// Which record (`whole-shard record` or `record of key …`).
        record: String,
        /// The decoder's message.
        reason: String,
    },
    /// A value could not be encoded (a `Serialize` implementation failed): the change was not
    /// committed.
    #[error(
        "the {record} could not be encoded ({reason}); fix the type's Serialize implementation"
    )]
    Encode {
        /// Which record.
        record: String,
        /// The encoder's message.
        reason: String,
    },
}

/// State a handler keeps in its node's [`ShardStore`](super::ShardStore): loaded when the shard
/// activates, and changed only through commits that the shard's replies wait for.
///
/// A handler declares its durable state by returning it from
/// [`ShardHandler::durable`](crate::ShardHandler::durable). [`Durable`] and [`DurableMap`]
/// implement this trait; implement it yourself for other layouts.
pub trait DurableState: Send {
    /// Replaces the state with what the store holds (the whole-shard record and every per-key
    /// record of the shard) and forgets any uncommitted change. Called when the shard activates
    /// and after a failed commit (the shard reloads before it serves again).
    fn load(&mut self, loaded: &Loaded) -> Result<(), StateError>;

    /// Adds the changes made since the last call to `batch` and forgets them. Called after every
    /// message the shard handled; the batch commits before the message's reply is sent.
    fn take_changes(&mut self, batch: &mut Batch) -> Result<(), StateError>;

    /// Adds the whole state to `batch`, as puts. Called when a planned move hands a shard that
    /// has no store to the next owner (with a node-local store, the framework exports what the
    /// store holds instead).
    fn export(&self, batch: &mut Batch) -> Result<(), StateError>;

    /// What an activation loads: every record ([`Scope::All`], the default), or only the
    /// whole-shard record ([`Scope::State`]), per-key records then being read before the
    /// messages of their keys (see [`needs`](Self::needs)).
    fn scope(&self) -> Scope {
        Scope::All
    }

    /// Whether the record of `key` must be read from the store before a message for `key` is
    /// handled. Asked only of a state activated with [`Scope::State`]. Default: `false`.
    fn needs(&self, key: &Key) -> bool {
        let _ = key;
        false
    }

    /// Takes in the record of `key` as read from the store (`None`: it has none). Default:
    /// ignores it.
    fn insert_read(&mut self, key: &Key, record: Option<&[u8]>) -> Result<(), StateError> {
        let _ = (key, record);
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T, record: impl FnOnce() -> String) -> Result<Vec<u8>, StateError> {
    crate::codec::encode(value).map_err(|e| StateError::Encode {
        record: record(),
        reason: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    record: impl FnOnce() -> String,
) -> Result<T, StateError> {
    crate::codec::decode(bytes).map_err(|e| StateError::Decode {
        record: record(),
        reason: e.to_string(),
    })
}

fn whole_shard() -> String {
    "whole-shard record".to_owned()
}

/// A shard's whole state as one durable value (the whole-shard record): read it through `Deref`,
/// change it through `DerefMut`. Any mutable access marks it changed, and the next commit writes
/// the whole value, so keep it small or use [`DurableMap`].
///
/// ```
/// use clusterfunk::persist::Durable;
///
/// let mut total: Durable<u64> = Durable::default();
/// *total += 5;
/// assert_eq!(*total, 5);
/// ```
#[derive(Debug, Default)]
pub struct Durable<T> {
    value: T,
    changed: bool,
}

impl<T> Durable<T> {
    /// A durable value starting as `value` (what a shard holds when the store has no record).
    pub fn new(value: T) -> Self {
        Durable {
            value,
            changed: false,
        }
    }

    /// Whether the value changed since the last commit took its changes.
    pub fn is_changed(&self) -> bool {
        self.changed
    }
}

impl<T> Deref for Durable<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Durable<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.changed = true;
        &mut self.value
    }
}

impl<T> DurableState for Durable<T>
where
    T: Serialize + DeserializeOwned + Default + Send,
{
    fn load(&mut self, loaded: &Loaded) -> Result<(), StateError> {
        self.value = match &loaded.state {
            Some(bytes) => decode(bytes, whole_shard)?,
            None => T::default(),
        };
        self.changed = false;
        Ok(())
    }

    fn take_changes(&mut self, batch: &mut Batch) -> Result<(), StateError> {
        if self.changed {
            batch.put_state(encode(&self.value, whole_shard)?);
            self.changed = false;
        }
        Ok(())
    }

    fn export(&self, batch: &mut Batch) -> Result<(), StateError> {
        batch.put_state(encode(&self.value, whole_shard)?);
        Ok(())
    }
}

/// Durable values by key (per-key records): a map from the keys of the shard's messages to one
/// value each. Reads are plain; [`get_mut`](Self::get_mut), [`entry`](Self::entry),
/// [`insert`](Self::insert) and [`remove`](Self::remove) mark the key changed, and the next
/// commit writes (or deletes) only the changed keys.
///
/// With a store, values load key by key: an activation loads none, and before each message the
/// framework reads the record of the message's key if this activation has not seen it yet. So a
/// shard holds in memory only the keys its messages touched since it activated, whatever the
/// number of keys in the store, and a message sees **its own key's** value. The value of another
/// key is there only if a message for that key came first ([`get`](Self::get) returns `None`
/// otherwise); keep state that several keys share in a [`Durable`] instead. [`len`](Self::len)
/// and [`iter`](Self::iter) cover the loaded keys.
///
/// ```
/// use clusterfunk::persist::DurableMap;
///
/// let mut counts: DurableMap<u64> = DurableMap::default();
/// *counts.entry("apples") += 1;
/// assert_eq!(counts.get("apples"), Some(&1));
/// ```
#[derive(Debug)]
pub struct DurableMap<V> {
    values: HashMap<Key, V>,
    /// Keys read from the store without a record, or removed: known to have no value.
    absent: HashSet<Key>,
    changed: HashSet<Key>,
}

impl<V> Default for DurableMap<V> {
    fn default() -> Self {
        DurableMap {
            values: HashMap::new(),
            absent: HashSet::new(),
            changed: HashSet::new(),
        }
    }
}

impl<V> DurableMap<V> {
    /// The value of `key`, if it has one.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&V> {
        self.values.get(key.as_ref())
    }

    /// The value of `key` to change in place, if it has one; marks the key changed.
    pub fn get_mut(&mut self, key: impl Into<Key>) -> Option<&mut V> {
        let key = key.into();
        let value = self.values.get_mut(&key)?;
        self.changed.insert(key);
        Some(value)
    }

    /// The value of `key` to change in place, inserted as `V::default()` if it has none; marks
    /// the key changed.
    pub fn entry(&mut self, key: impl Into<Key>) -> &mut V
    where
        V: Default,
    {
        let key = key.into();
        self.absent.remove(&key);
        self.changed.insert(key.clone());
        self.values.entry(key).or_default()
    }

    /// Sets the value of `key`, returning the previous one.
    pub fn insert(&mut self, key: impl Into<Key>, value: V) -> Option<V> {
        let key = key.into();
        self.absent.remove(&key);
        self.changed.insert(key.clone());
        self.values.insert(key, value)
    }

    /// Removes the value of `key`, returning it.
    pub fn remove(&mut self, key: impl Into<Key>) -> Option<V> {
        let key = key.into();
        let previous = self.values.remove(&key);
        if previous.is_some() {
            self.changed.insert(key.clone());
        }
        self.absent.insert(key);
        previous
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> bool {
        self.values.contains_key(key.as_ref())
    }

    /// The number of keys with a value.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no key has a value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Every key and its value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &V)> + '_ {
        self.values.iter()
    }

    /// The number of keys changed since the last commit took its changes.
    pub fn changed_len(&self) -> usize {
        self.changed.len()
    }
}

impl<V> DurableState for DurableMap<V>
where
    V: Serialize + DeserializeOwned + Send,
{
    fn load(&mut self, loaded: &Loaded) -> Result<(), StateError> {
        let mut values = HashMap::with_capacity(loaded.records.len());
        for (key, bytes) in &loaded.records {
            let value = decode(bytes, || format!("record of key {key:?}"))?;
            values.insert(key.clone(), value);
        }
        self.values = values;
        self.absent.clear();
        self.changed.clear();
        Ok(())
    }

    fn take_changes(&mut self, batch: &mut Batch) -> Result<(), StateError> {
        for key in &self.changed {
            match self.values.get(key) {
                Some(value) => {
                    batch.put(
                        key.clone(),
                        encode(value, || format!("record of key {key:?}"))?,
                    );
                }
                None => {
                    batch.delete(key.clone());
                }
            }
        }
        self.changed.clear();
        Ok(())
    }

    fn export(&self, batch: &mut Batch) -> Result<(), StateError> {
        for (key, value) in &self.values {
            batch.put(
                key.clone(),
                encode(value, || format!("record of key {key:?}"))?,
            );
        }
        Ok(())
    }
    fn scope(&self) -> Scope {
        Scope::State
    }

    fn needs(&self, key: &Key) -> bool {
        !self.values.contains_key(key) && !self.absent.contains(key)
    }

    fn insert_read(&mut self, key: &Key, record: Option<&[u8]>) -> Result<(), StateError> {
        match record {
            Some(bytes) => {
                let value = decode(bytes, || format!("record of key {key:?}"))?;
                self.values.insert(key.clone(), value);
            }
            None => {
                self.absent.insert(key.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Origin;

    #[test]
    fn a_durable_map_loads_key_by_key_and_remembers_keys_without_a_record() {
        let mut map: DurableMap<u64> = DurableMap::default();
        assert_eq!(map.scope(), Scope::State);
        map.load(&Loaded::empty(Origin::New)).unwrap();
        let (a, b) = (Key::from("a"), Key::from("b"));
        assert!(map.needs(&a), "an unread key is read before its message");
        map.insert_read(&a, Some(&crate::codec::encode(&7u64).unwrap()))
            .unwrap();
        map.insert_read(&b, None).unwrap();
        assert!(!map.needs(&a) && !map.needs(&b), "read once per activation");
        assert_eq!(map.get("a"), Some(&7));
        assert_eq!(map.get("b"), None);
        // A removal is remembered as absent, and committed as a delete.
        assert_eq!(map.remove("a"), Some(7));
        assert!(!map.needs(&a));
        let mut batch = Batch::new();
        map.take_changes(&mut batch).unwrap();
        assert_eq!(batch.len(), 1);
        // A reload forgets what was read.
        map.load(&Loaded::empty(Origin::New)).unwrap();
        assert!(map.needs(&a) && map.needs(&b));
    }
}
