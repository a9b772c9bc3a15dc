//! [`StateMachineStore`]: openraft's `RaftStateMachine` and `RaftSnapshotBuilder`, generic over the
//! application's [`StateMachineApp`].
//!
//! The state lives in memory and is published through a `tokio::sync::watch` channel after every
//! change; only snapshots are written to disk. That is openraft's "persistent snapshot" design:
//! after a restart the state comes back from the newest snapshot, and openraft re-applies the
//! committed entries after it (the log store persists the committed log id for this). The module
//! does not decide when to snapshot (openraft's `SnapshotPolicy` does) and does not interpret
//! the application's commands (the app does).

use std::fmt::Debug;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, RaftTypeConfig, Snapshot, SnapshotMeta,
    StoredMembership,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::codec;
use super::error::{StorageError, Table};
use super::lmdb::{Lmdb, WriteOp, SNAPSHOT_KEY};

/// The application side of the replicated state machine: what the state is and how one command
/// changes it. The consensus module implements this for the cluster state (members, shard map).
pub trait StateMachineApp<C: RaftTypeConfig>: Send + Sync + 'static {
    /// The replicated state; serialised into snapshots. Cloned once per applied batch (readers
    /// keep the previous version), so keep large parts behind `Arc` if cloning gets expensive.
    type State: Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Applies one normal entry's payload (`C::D`) at `log_id` and returns its response.
    ///
    /// Must be deterministic: every node applies the same entries to the same state and must
    /// reach the same result, so no clocks, no randomness, no I/O, no reading of other state.
    fn apply(&self, state: &mut Self::State, log_id: &LogId<C::NodeId>, request: &C::D) -> C::R;

    /// The response for blank and membership entries.
    fn empty_response(&self) -> C::R;

    /// Applies a membership entry at `log_id` to the application state (e.g. to recompute
    /// what depends on the set of members). Deterministic, like [`apply`](Self::apply).
    /// Default: does nothing.
    fn apply_membership(
        &self,
        _state: &mut Self::State,
        _log_id: &LogId<C::NodeId>,
        _membership: &openraft::Membership<C::NodeId, C::Node>,
    ) {
    }

    /// Called after the state changed: after each applied batch, after a snapshot was installed,
    /// and once at open when the state was restored from a stored snapshot. Runs on the raft
    /// state machine's task: keep it short and non-blocking (e.g. send an event to the router).
    /// Default: does nothing.
    fn on_applied(&self, _state: &Self::State) {}

    /// Decodes the state stored in a snapshot (a record written by the storage codec). Override
    /// it to read states written by an older format version whose layout differed; the default
    /// reads every version whose layout is the current one.
    fn decode_state(&self, bytes: &[u8]) -> Result<Self::State, codec::CodecError> {
        codec::decode(bytes)
    }
}

/// The applied state as published to readers: the application state plus the raft bookkeeping
/// that belongs to it.
pub struct Applied<C: RaftTypeConfig, S> {
    /// Log id of the last entry applied to `state`; `None` before the first entry.
    pub last_applied: Option<LogId<C::NodeId>>,
    /// The last membership configuration applied.
    pub membership: StoredMembership<C::NodeId, C::Node>,
    /// The application state.
    pub state: S,
}

impl<C: RaftTypeConfig, S: Clone> Clone for Applied<C, S> {
    fn clone(&self) -> Self {
        Applied {
            last_applied: self.last_applied.clone(),
            membership: self.membership.clone(),
            state: self.state.clone(),
        }
    }
}

impl<C: RaftTypeConfig, S: Default> Default for Applied<C, S> {
    fn default() -> Self {
        Applied {
            last_applied: None,
            membership: StoredMembership::default(),
            state: S::default(),
        }
    }
}

impl<C: RaftTypeConfig, S: Debug> Debug for Applied<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applied")
            .field("last_applied", &self.last_applied)
            .field("membership", &self.membership)
            .field("state", &self.state)
            .finish()
    }
}

/// The snapshot record in the `snapshot` database: openraft's metadata (last applied log id,
/// last membership, snapshot id) and the encoded application state, which is also exactly the
/// data sent to followers.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct StoredSnapshot<C: RaftTypeConfig> {
    meta: SnapshotMeta<C::NodeId, C::Node>,
    data: Vec<u8>,
}

/// The raft state machine store. Cheap to clone; clones share everything (openraft's snapshot
/// builder is a clone).
///
/// Made by [`LmdbStore::state_machine`](super::LmdbStore::state_machine) (snapshots on disk) or
/// by [`memory::in_memory_for_tests`](super::memory::in_memory_for_tests).
pub struct StateMachineStore<C: RaftTypeConfig, A: StateMachineApp<C>> {
    inner: Arc<Inner<C, A>>,
}

struct Inner<C: RaftTypeConfig, A: StateMachineApp<C>> {
    app: A,
    applied: watch::Sender<Arc<Applied<C, A::State>>>,
    /// The current snapshot, also kept in memory so `get_current_snapshot` needs no disk read.
    /// The async mutex serialises snapshot replacement (a build finishing after an install must
    /// not overwrite the newer installed snapshot) and is held across the disk write.
    current_snapshot: tokio::sync::Mutex<Option<Arc<StoredSnapshot<C>>>>,
    /// Where snapshots are persisted; `None` for the in-memory store.
    lmdb: Option<Arc<Lmdb>>,
    /// Makes snapshot ids unique within this process.
    snapshots_built: AtomicU64,
}

impl<C: RaftTypeConfig, A: StateMachineApp<C>> Clone for StateMachineStore<C, A> {
    fn clone(&self) -> Self {
        StateMachineStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: RaftTypeConfig, A: StateMachineApp<C>> StateMachineStore<C, A> {
    /// Opens the state machine on `lmdb`, restoring the stored snapshot if there is one.
    /// Blocking (one LMDB read and a decode).
    pub(crate) fn open(app: A, lmdb: Arc<Lmdb>) -> Result<Self, StorageError> {
        let stored: Option<StoredSnapshot<C>> = lmdb.read_snapshot()?;
        let applied = match &stored {
            Some(stored) => {
                let state = app
                    .decode_state(&stored.data)
                    .map_err(|e| StorageError::corrupt(Table::Snapshot, SNAPSHOT_KEY, e))?;
                tracing::info!(snapshot = %stored.meta, "restored the state machine from the stored snapshot");
                Some(Applied {
                    last_applied: stored.meta.last_log_id.clone(),
                    membership: stored.meta.last_membership.clone(),
                    state,
                })
            }
            None => None,
        };
        let store = Self::new(
            app,
            Some(lmdb),
            stored.map(Arc::new),
            applied.clone().unwrap_or_default(),
        );
        if let Some(applied) = applied {
            store.inner.app.on_applied(&applied.state);
        }
        Ok(store)
    }

    /// A state machine whose snapshots live only in memory (tests only).
    pub(crate) fn in_memory(app: A) -> Self {
        Self::new(app, None, None, Applied::default())
    }

    fn new(
        app: A,
        lmdb: Option<Arc<Lmdb>>,
        current_snapshot: Option<Arc<StoredSnapshot<C>>>,
        applied: Applied<C, A::State>,
    ) -> Self {
        let (applied, _) = watch::channel(Arc::new(applied));
        StateMachineStore {
            inner: Arc::new(Inner {
                app,
                applied,
                current_snapshot: tokio::sync::Mutex::new(current_snapshot),
                lmdb,
                snapshots_built: AtomicU64::new(0),
            }),
        }
    }

    /// Subscribes to the applied state: the receiver sees a new value after every applied batch
    /// and every installed snapshot. Values are shared (`Arc`), never mutated after publishing.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied<C, A::State>>> {
        self.inner.applied.subscribe()
    }

    /// The current applied state (a cheap `Arc` clone).
    pub fn applied(&self) -> Arc<Applied<C, A::State>> {
        Arc::clone(&self.inner.applied.borrow())
    }

    /// The application this state machine applies entries with.
    pub fn app(&self) -> &A {
        &self.inner.app
    }

    fn publish(&self, applied: Applied<C, A::State>) {
        let applied = Arc::new(applied);
        // `send_replace` also works while nobody subscribes, unlike `send`.
        self.inner.applied.send_replace(Arc::clone(&applied));
        self.inner.app.on_applied(&applied.state);
    }

    /// Makes `snapshot` the current one, on disk first. With `keep_newer`, a snapshot older than
    /// the current one is dropped instead (returns false).
    async fn store_snapshot(
        &self,
        snapshot: StoredSnapshot<C>,
        keep_newer: bool,
    ) -> Result<bool, StorageError> {
        let mut current = self.inner.current_snapshot.lock().await;
        if keep_newer
            && current
                .as_ref()
                .is_some_and(|current| current.meta.last_log_id > snapshot.meta.last_log_id)
        {
            return Ok(false);
        }
        if let Some(lmdb) = &self.inner.lmdb {
            let value =
                codec::encode(&snapshot).map_err(|e| StorageError::encode(Table::Snapshot, e))?;
            lmdb.write(vec![WriteOp::PutSnapshot { value }]).await?;
        }
        *current = Some(Arc::new(snapshot));
        Ok(true)
    }
}

impl<C, A> RaftSnapshotBuilder<C> for StateMachineStore<C, A>
where
    C: RaftTypeConfig<SnapshotData = Cursor<Vec<u8>>>,
    A: StateMachineApp<C>,
{
    /// Encodes the current applied state, stores it as the current snapshot (unless a newer one
    /// was installed meanwhile) and returns it.
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, openraft::StorageError<C::NodeId>> {
        let applied = self.applied();
        let data =
            codec::encode(&applied.state).map_err(|e| StorageError::encode(Table::Snapshot, e))?;
        let number = self.inner.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match &applied.last_applied {
            Some(log_id) => format!("{log_id}-{number}"),
            None => format!("empty-{number}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied.clone(),
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let stored = self
            .store_snapshot(
                StoredSnapshot {
                    meta: meta.clone(),
                    data: data.clone(),
                },
                true,
            )
            .await?;
        if stored {
            tracing::debug!(snapshot = %meta, bytes = data.len(), "built and stored a snapshot");
        } else {
            tracing::debug!(snapshot = %meta, "built a snapshot older than the current one; not stored");
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<C, A> RaftStateMachine<C> for StateMachineStore<C, A>
where
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    A: StateMachineApp<C>,
{
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<C::NodeId>>,
            StoredMembership<C::NodeId, C::Node>,
        ),
        openraft::StorageError<C::NodeId>,
    > {
        let applied = self.applied();
        Ok((applied.last_applied.clone(), applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<C::R>, openraft::StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() {
            return Ok(Vec::new());
        }
        // Work on a copy: readers holding the published `Arc` keep a consistent old version.
        let mut next = Applied::clone(&self.applied());
        let app = &self.inner.app;
        let mut responses = Vec::new();
        for entry in entries {
            next.last_applied = Some(entry.log_id.clone());
            let response = match entry.payload {
                EntryPayload::Blank => app.empty_response(),
                EntryPayload::Normal(request) => {
                    app.apply(&mut next.state, &entry.log_id, &request)
                }
                EntryPayload::Membership(membership) => {
                    app.apply_membership(&mut next.state, &entry.log_id, &membership);
                    next.membership = StoredMembership::new(Some(entry.log_id), membership);
                    app.empty_response()
                }
            };
            responses.push(response);
        }
        self.publish(next);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, openraft::StorageError<C::NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Decodes the received state (a snapshot that does not decode is refused before anything
    /// changes), stores the snapshot on disk, then replaces the in-memory state.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), openraft::StorageError<C::NodeId>> {
        let data = snapshot.into_inner();
        let state: A::State =
            self.inner
                .app
                .decode_state(&data)
                .map_err(|e| StorageError::BadSnapshot {
                    snapshot_id: meta.snapshot_id.clone(),
                    source: Arc::new(e),
                })?;
        self.store_snapshot(
            StoredSnapshot {
                meta: meta.clone(),
                data,
            },
            false,
        )
        .await?;
        tracing::info!(snapshot = %meta, "installed a snapshot from the leader");
        self.publish(Applied {
            last_applied: meta.last_log_id.clone(),
            membership: meta.last_membership.clone(),
            state,
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<C>>, openraft::StorageError<C::NodeId>> {
        let current = self.inner.current_snapshot.lock().await.clone();
        Ok(current.map(|stored| Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(Cursor::new(stored.data.clone())),
        }))
    }
}
