//! Durable shard state: the [`ShardStore`] trait that a store implements, the fencing rules every
//! store enforces ([`Fence`]), and three stores: [`MemoryStore`] (tests and examples, shared by
//! the nodes of an in-process cluster), [`LmdbShardStore`] (node-local, on disk) and, with the
//! `postgres` feature, `PostgresShardStore` (shared by every node, in PostgreSQL).
//!
//! A shard's durable state is a set of per-key records plus, optionally, one whole-shard record
//! (the handler's state as one value). Values are bytes: the handler API above this layer decides
//! how they are encoded.
//!
//! # The contract, in short
//!
//! The guide's persistence chapter states it in full; every store must keep it:
//!
//! - **Fencing.** Each shard has a fence: the newest activation epoch the store has seen for it.
//!   [`ShardStore::activate`] raises it; [`ShardStore::commit`] and [`ShardStore::release`] with
//!   an older epoch are refused with [`StoreError::Fenced`]. The store checks this in the same
//!   transaction as the write, so a deposed owner's late write can never land.
//! - **Atomic load-and-raise.** `activate` raises the fence and reads the shard's records in one
//!   step: every commit the store accepted before it is in what it returns, and every commit of
//!   an older activation after it is refused.
//! - **Durable when acknowledged.** A commit that returned `Ok` survives a crash of the process
//!   (and, with fsync on, of the machine); a commit that returned a refusal changed nothing.
//!   Stores may group the commits of many shards into one transaction, but each commit is
//!   accepted or refused as a whole.
//! - **Planned moves hand over through the store.** The old owner flushes its last commit and
//!   calls [`ShardStore::release`]; the next owner's `activate` loads what was released.
//!
//! This module does **not** own: when shards activate, which epoch an activation uses, holding
//! replies until their commit, or passivation (the shard actor and the router drive those), nor
//! the encoding of values (the handler API).
//!
//! # Example
//!
//! ```
//! use clusterfunk::persist::{Batch, MemoryStore, Origin, Scope, ShardStore, StoreError};
//!
//! # fn main() -> Result<(), StoreError> {
//! # actix::System::new().block_on(async {
//! let store = MemoryStore::new();
//! // Node 1 activates shard 7 at epoch 3: the fence rises to 3, nothing is stored yet.
//! let loaded = store.activate(7, 1, 3, Scope::All).await?;
//! assert_eq!(loaded.origin, Origin::New);
//! let mut batch = Batch::new();
//! batch.put("user-42", b"1".to_vec());
//! store.commit(7, 3, batch).await?;
//!
//! // Node 2 takes the shard over at epoch 5 and loads what node 1 committed.
//! let loaded = store.activate(7, 2, 5, Scope::All).await?;
//! assert_eq!(loaded.records.get(&b"user-42"[..]).map(|v| &v[..]), Some(&b"1"[..]));
//!
//! // Node 1, deposed, writes late with its old epoch: the store refuses it.
//! let late = store.commit(7, 3, Batch::new()).await;
//! assert!(matches!(late, Err(StoreError::Fenced { fence: 5, .. })));
//! # Ok(())
//! # })
//! # }
//! ```

mod error;
mod fence;
mod lmdb;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::shard_map::{Epoch, Key, NodeId, ShardId};

pub use error::{StoreError, Table};
pub use fence::{Fence, Origin};
pub use lmdb::LmdbShardStore;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PostgresOptions, PostgresShardStore};
pub use state::{Durable, DurableMap, DurableState, StateError};

/// Where a store keeps its data, which decides what survives a node's crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Locality {
    /// Every node reads and writes the same data (a database, or a [`MemoryStore`] shared within
    /// one process): a shard's state follows it to any new owner, after a planned move and after
    /// a crash failover alike.
    Shared,
    /// Each node has its own data (an [`LmdbShardStore`] in the node's directory, or a
    /// [`MemoryStore::node_local`]): a planned move carries a shard's state to its next owner in
    /// the handoff, but a crashed node's shards restart empty on their new owners. Whether state
    /// survives a restart of the node in place depends on the store: on disk it does, in the
    /// process's memory it does not.
    NodeLocal,
}

/// One change to one record in a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store this value, replacing any previous one.
    Put(Bytes),
    /// Remove the record, if there is one.
    Delete,
}

/// The changes of one commit to one shard: per-key records and, optionally, the whole-shard
/// record. A later change to the same record replaces an earlier one in the batch, so a batch
/// holds at most one change per record and applies in any order with the same result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    state: Option<Change>,
    records: BTreeMap<Key, Change>,
}

impl Batch {
    /// An empty batch. Committing it still checks the fence, which makes it a cheap way to ask
    /// whether an activation is still current.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Stores `value` under `key` (a per-key record).
    pub fn put(&mut self, key: impl Into<Key>, value: impl Into<Bytes>) -> &mut Self {
        self.records.insert(key.into(), Change::Put(value.into()));
        self
    }

    /// Removes the record of `key`.
    pub fn delete(&mut self, key: impl Into<Key>) -> &mut Self {
        self.records.insert(key.into(), Change::Delete);
        self
    }

    /// Stores `value` as the whole-shard record (the shard's state as one value).
    pub fn put_state(&mut self, value: impl Into<Bytes>) -> &mut Self {
        self.state = Some(Change::Put(value.into()));
        self
    }

    /// Removes the whole-shard record.
    pub fn delete_state(&mut self) -> &mut Self {
        self.state = Some(Change::Delete);
        self
    }

    /// Appends the changes of `later` to this batch; where both change one record, `later`'s
    /// change wins. This is how the changes of several messages share one commit.
    pub fn merge(&mut self, later: Batch) -> &mut Self {
        if later.state.is_some() {
            self.state = later.state;
        }
        self.records.extend(later.records);
        self
    }

    /// The change to the whole-shard record, if any.
    pub fn state(&self) -> Option<&Change> {
        self.state.as_ref()
    }

    /// The changes to per-key records, in key order.
    pub fn records(&self) -> impl ExactSizeIterator<Item = (&Key, &Change)> + '_ {
        self.records.iter()
    }

    /// The number of records changed, the whole-shard record included.
    pub fn len(&self) -> usize {
        self.records.len() + usize::from(self.state.is_some())
    }

    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits the batch into the whole-shard change and the per-key changes.
    pub fn into_parts(self) -> (Option<Change>, BTreeMap<Key, Change>) {
        (self.state, self.records)
    }
}

/// What [`ShardStore::activate`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole-shard record and every per-key record.
    All,
    /// The whole-shard record only: per-key records are read as they are needed
    /// ([`ShardStore::read`]), so a shard with many keys activates in constant time and holds
    /// only the keys its messages touched.
    State,
}

/// What [`ShardStore::activate`] found for the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Where the state comes from, and why it is empty when it is.
    pub origin: Origin,
    /// The whole-shard record, if one is stored.
    pub state: Option<Bytes>,
    /// Every per-key record of the shard.
    pub records: BTreeMap<Key, Bytes>,
}

impl Loaded {
    /// No state, with the reason `origin`.
    pub fn empty(origin: Origin) -> Self {
        Loaded {
            origin,
            state: None,
            records: BTreeMap::new(),
        }
    }
}

/// A store of durable shard state that enforces fencing. Implement it to keep shard state in a
/// database of your own; the guide's persistence chapter states what an implementation must
/// guarantee, and [`Fence`] holds the rules so that every store decides alike.
///
/// The methods return boxed `'static` futures so the trait stays object-safe (the framework holds
/// an `Arc<dyn ShardStore>`) and a shard actor can await them without borrowing the store.
/// Calls for different shards may run concurrently (and a store may group them into one
/// transaction); for one shard, the caller makes one call at a time: it issues a shard's next
/// commit only once the previous one returned, and meanwhile merges the changes of the messages
/// that follow into the next [`Batch`] (pipelining without reordering).
pub trait ShardStore: Send + Sync + 'static {
    /// Raises the shard's fence to `epoch` and loads its state, in one atomic step, recording
    /// `owner` as the node that activated it. `scope` says what to load: every record
    /// ([`Scope::All`]) or only the whole-shard record ([`Scope::State`]; per-key records are
    /// then [`read`](Self::read) one by one).
    ///
    /// Refused with [`StoreError::Fenced`] if the fence is already above `epoch`, and with
    /// [`StoreError::EpochTaken`] if another node already activated the shard at `epoch`. An
    /// activation at the fence's epoch by the same node (a restart, or a reactivation after
    /// passivation) is allowed and loads the state again.
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>>;

    /// Reads the per-key record of `key` as last committed (`None`: there is none), for the
    /// activation of `epoch`: how state declared per key is loaded key by key, as messages
    /// need it, after an activation with [`Scope::State`]. Refused like a commit (fenced, not
    /// activated, released), so a deposed activation cannot read what a newer one wrote.
    fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> BoxFuture<'static, Result<Option<Bytes>, StoreError>>;

    /// Applies `batch` to the shard atomically, if the activation of `epoch` is still the
    /// current one: refused with [`StoreError::Fenced`] if the fence is above `epoch`,
    /// [`StoreError::NotActivated`] if no activation at `epoch` happened, and
    /// [`StoreError::Released`] if that activation released the shard. When it returns `Ok` the
    /// changes are durable; when it returns a refusal nothing changed.
    fn commit(
        &self,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Ends the activation of `epoch` for a planned move, after its last commit returned: later
    /// commits at `epoch` are refused, and the shard's records stay in the store for the next
    /// owner, whose [`Loaded::origin`] then says the shard was released. Releasing twice is not
    /// an error; releasing an activation that a newer one replaced is [`StoreError::Fenced`].
    fn release(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Whether the data is shared by all nodes or local to this node. A node started with a
    /// node-local store says at start-up that crash failover cannot carry shard state.
    fn locality(&self) -> Locality;

    /// The longest key this store keeps, if it has a limit: a shard refuses a message whose
    /// change has a longer key before it reaches the store, so one bad key never fails the
    /// commits of other messages grouped with it. Default: no limit.
    fn key_bytes_max(&self) -> Option<usize> {
        None
    }
}

impl<S: ShardStore + ?Sized> ShardStore for Arc<S> {
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        (**self).activate(shard, owner, epoch, scope)
    }

    fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> BoxFuture<'static, Result<Option<Bytes>, StoreError>> {
        (**self).read(shard, epoch, key)
    }

    fn commit(
        &self,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).commit(shard, epoch, batch)
    }

    fn release(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).release(shard, epoch)
    }

    fn locality(&self) -> Locality {
        (**self).locality()
    }

    fn key_bytes_max(&self) -> Option<usize> {
        (**self).key_bytes_max()
    }
}
