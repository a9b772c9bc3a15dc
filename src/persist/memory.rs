//! [`MemoryStore`]: a [`ShardStore`] in memory, for tests and examples. Clones share one store,
//! so the nodes of an in-process cluster can hand shards to each other through it as through a
//! database. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};

use super::error::StoreError;
use super::fence::{Fence, Origin};
use super::{Batch, Change, Loaded, Locality, Scope, ShardStore};
use crate::shard_map::{Epoch, Key, NodeId, ShardId};

/// A shared, in-memory [`ShardStore`] (its [`Locality`] is [`Shared`](Locality::Shared)): clone
/// it to give every node of an in-process cluster the same store. Each call is one step under a
/// lock, so it is atomic; "durable" here means until the last clone is dropped. **For tests and
/// examples**: a real cluster needs a store that outlives its processes.
#[derive(Clone)]
pub struct MemoryStore {
    shards: Arc<Mutex<HashMap<ShardId, MemoryShard>>>,
    locality: Locality,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            shards: Arc::default(),
            locality: Locality::Shared,
        }
    }
}

/// One shard's fence and records.
struct MemoryShard {
    fence: Fence,
    state: Option<Bytes>,
    records: BTreeMap<Key, Bytes>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.lock().len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store, shared by every node that holds a clone of it.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// An empty store for one node alone, which behaves like a node-local store on disk
    /// ([`Locality::NodeLocal`]): a shard loads its records only when this node was its last
    /// owner at the same activation epoch, and a planned move carries the shard's state to the
    /// next owner in its handoff. What the `kv` example's `--store memory` uses, since its nodes
    /// are separate processes.
    pub fn node_local() -> Self {
        MemoryStore {
            shards: Arc::default(),
            locality: Locality::NodeLocal,
        }
    }

    /// The shard's fence, if it was ever activated: for tests that check what a store recorded.
    pub fn fence(&self, shard: ShardId) -> Option<Fence> {
        self.lock().get(&shard).map(|entry| entry.fence)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ShardId, MemoryShard>> {
        // Every change below is checked before it is made, so a panic elsewhere cannot leave a
        // shard half-changed: poisoning carries no meaning here.
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn activate_now(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> Result<Loaded, StoreError> {
        let mut shards = self.lock();
        let previous = shards.get(&shard).map(|entry| entry.fence);
        let fence = Fence::activate(previous, shard, owner, epoch)?;
        let origin = match self.locality {
            Locality::NodeLocal => Origin::node_local(previous, owner, epoch),
            _ => Origin::shared(previous),
        };
        let entry = shards.entry(shard).or_insert_with(|| MemoryShard {
            fence,
            state: None,
            records: BTreeMap::new(),
        });
        entry.fence = fence;
        if !origin.is_loaded() {
            // Node-local records that may be older than the shard's state elsewhere go.
            entry.state = None;
            entry.records.clear();
        }
        Ok(Loaded {
            origin,
            state: entry.state.clone(),
            records: match scope {
                Scope::All => entry.records.clone(),
                Scope::State => BTreeMap::new(),
            },
        })
    }

    fn read_now(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: &Key,
    ) -> Result<Option<Bytes>, StoreError> {
        let shards = self.lock();
        let entry = shards.get(&shard);
        Fence::check_commit(entry.map(|entry| entry.fence), shard, epoch)?;
        Ok(entry.and_then(|entry| entry.records.get(key).cloned()))
    }

    fn commit_now(&self, shard: ShardId, epoch: Epoch, batch: Batch) -> Result<(), StoreError> {
        let mut shards = self.lock();
        let Some(entry) = shards.get_mut(&shard) else {
            // Never activated: `check_commit` refuses it.
            return Fence::check_commit(None, shard, epoch);
        };
        Fence::check_commit(Some(entry.fence), shard, epoch)?;
        let (state, records) = batch.into_parts();
        match state {
            Some(Change::Put(value)) => entry.state = Some(value),
            Some(Change::Delete) => entry.state = None,
            None => {}
        }
        for (key, change) in records {
            match change {
                Change::Put(value) => {
                    entry.records.insert(key, value);
                }
                Change::Delete => {
                    entry.records.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn release_now(&self, shard: ShardId, epoch: Epoch) -> Result<(), StoreError> {
        let mut shards = self.lock();
        let entry = shards.get_mut(&shard);
        let fence = Fence::release(entry.as_ref().map(|entry| entry.fence), shard, epoch)?;
        if let Some(entry) = entry {
            entry.fence = fence;
        }
        Ok(())
    }
}

impl ShardStore for MemoryStore {
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        future::ready(self.activate_now(shard, owner, epoch, scope)).boxed()
    }

    fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> BoxFuture<'static, Result<Option<Bytes>, StoreError>> {
        future::ready(self.read_now(shard, epoch, &key)).boxed()
    }

    fn commit(
        &self,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        future::ready(self.commit_now(shard, epoch, batch)).boxed()
    }

    fn release(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, Result<(), StoreError>> {
        future::ready(self.release_now(shard, epoch)).boxed()
    }

    fn locality(&self) -> Locality {
        self.locality
    }
}
