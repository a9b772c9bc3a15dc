//! The durable side of a shard actor: the commit pipeline that holds replies until the commit
//! holding their change returned ([`Commits`]), and the envelope in which a planned move carries
//! a durable shard's state to a node that cannot read this node's store ([`wrap`], [`unwrap`]).
//!
//! The pipeline is a task of its own beside the actor, fed through a channel: the actor handles
//! the next message while a commit is in flight, and everything queued meanwhile goes into the
//! next commit as one batch (group commit per shard, one store call at a time per shard, in
//! order). A failed commit fails its replies and every later one with
//! [`Error::OutcomeUnknown`] until the actor reloads the shard (a [`Commits::drain`] marks that
//! point), because their changes were made on state the store does not hold.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::codec::Handoff;
use crate::error::Error;
use crate::persist::{Batch, Change, Loaded, Origin, ShardStore, StoreError};
use crate::shard_map::{Epoch, Key, ShardId};

/// Sends one held reply: its value on `Ok`, the error otherwise.
pub(crate) type HeldReply = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// At most this many queued items are taken into one commit, so a shard under a flood still
/// acknowledges in bounded groups.
const GROUP_MAX: usize = 1024;

enum Work {
    Commit {
        epoch: Epoch,
        batch: Batch,
        replies: Vec<HeldReply>,
    },
    Barrier(oneshot::Sender<Option<StoreError>>),
}

/// A shard's commit pipeline (see the module docs). Dropping it ends the task once the items
/// already queued are committed.
pub(crate) struct Commits {
    shard: ShardId,
    work: mpsc::UnboundedSender<Work>,
    /// Commit items queued or in flight.
    outstanding: Arc<AtomicUsize>,
    /// Set when a commit failed, until a drain reports it.
    failed: Arc<AtomicBool>,
}

impl Commits {
    /// Starts the pipeline of `shard` on the current (actix) thread.
    pub(crate) fn start(shard: ShardId, store: Arc<dyn ShardStore>) -> Self {
        let (work, queue) = mpsc::unbounded_channel();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        actix_rt::spawn(run(
            shard,
            store,
            queue,
            outstanding.clone(),
            failed.clone(),
        ));
        Commits {
            shard,
            work,
            outstanding,
            failed,
        }
    }

    /// Sends `reply` once `batch` (the changes of the message it answers) and every change
    /// queued before it are committed at `epoch`: at once when there is nothing to wait for.
    pub(crate) fn hold(&self, epoch: Epoch, batch: Batch, reply: HeldReply) {
        if batch.is_empty() && self.outstanding.load(Ordering::Acquire) == 0 {
            // A commit failed while this message ran (an `async` handler): what it read may
            // include changes the store does not hold.
            match self.has_failed() {
                true => reply(Err(Error::OutcomeUnknown { shard: self.shard })),
                false => reply(Ok(())),
            }
            return;
        }
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let work = Work::Commit {
            epoch,
            batch,
            replies: vec![reply],
        };
        if let Err(mpsc::error::SendError(Work::Commit { replies, .. })) = self.work.send(work) {
            // The task ended (its runtime is shutting down): nothing will be committed.
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            fail(self.shard, replies);
        }
    }

    /// Whether a commit failed since the last drain: the shard must reload before it serves.
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Waits until everything queued before it is committed or failed, and returns the first
    /// failure since the last drain (clearing it: what is queued after a drain belongs to a new
    /// load of the shard).
    pub(crate) fn drain(&self) -> impl std::future::Future<Output = Option<StoreError>> + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.work.send(Work::Barrier(tx)).is_ok();
        async move {
            match sent {
                true => rx.await.unwrap_or(None),
                false => None,
            }
        }
    }
}

fn fail(shard: ShardId, replies: Vec<HeldReply>) {
    for reply in replies {
        reply(Err(Error::OutcomeUnknown { shard }));
    }
}

/// The changes and replies of consecutive items of one activation, committed as one batch.
struct Group {
    epoch: Epoch,
    batch: Batch,
    replies: Vec<HeldReply>,
    items: usize,
}

async fn run(
    shard: ShardId,
    store: Arc<dyn ShardStore>,
    mut queue: mpsc::UnboundedReceiver<Work>,
    outstanding: Arc<AtomicUsize>,
    failed: Arc<AtomicBool>,
) {
    let mut poisoned: Option<StoreError> = None;
    let flush = |group: Option<Group>, poisoned: &mut Option<StoreError>| {
        let store = store.clone();
        let outstanding = outstanding.clone();
        let failed = failed.clone();
        let failing = poisoned.is_some();
        async move {
            let group = group?;
            let result = match (failing, group.batch.is_empty()) {
                (true, _) => Err(None),
                (false, true) => Ok(()),
                (false, false) => store
                    .commit(shard, group.epoch, group.batch)
                    .await
                    .map_err(Some),
            };
            let failure = match result {
                Ok(()) => {
                    for reply in group.replies {
                        reply(Ok(()));
                    }
                    None
                }
                Err(error) => {
                    if let Some(error) = &error {
                        tracing::error!(shard, %error, "shard commit failed: its replies report an unknown outcome and the shard reloads from the store");
                    }
                    failed.store(true, Ordering::Release);
                    fail(shard, group.replies);
                    error
                }
            };
            outstanding.fetch_sub(group.items, Ordering::AcqRel);
            failure
        }
    };
    while let Some(first) = queue.recv().await {
        let mut items = vec![first];
        while items.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let mut group: Option<Group> = None;
        for item in items {
            match item {
                Work::Commit {
                    epoch,
                    batch,
                    replies,
                } => match &mut group {
                    Some(open) if open.epoch == epoch => {
                        open.batch.merge(batch);
                        open.replies.extend(replies);
                        open.items += 1;
                    }
                    _ => {
                        let failure = flush(group.take(), &mut poisoned).await;
                        poisoned = poisoned.or(failure);
                        group = Some(Group {
                            epoch,
                            batch,
                            replies,
                            items: 1,
                        });
                    }
                },
                Work::Barrier(done) => {
                    let failure = flush(group.take(), &mut poisoned).await;
                    poisoned = poisoned.or(failure);
                    failed.store(false, Ordering::Release);
                    let _ = done.send(poisoned.take());
                }
            }
        }
        let failure = flush(group.take(), &mut poisoned).await;
        poisoned = poisoned.or(failure);
    }
}

/// Marks a handoff snapshot as a durable shard's envelope.
const ENVELOPE_MAGIC: &[u8] = b"clusterfunk:durable-handoff:1\0";

/// What a durable shard hands over in a planned move: the handler's own snapshot and, when the
/// next owner cannot read this node's store, the shard's whole durable state.
#[derive(Serialize, Deserialize)]
struct Envelope {
    user: Option<Bytes>,
    carried: Option<Carried>,
}

#[derive(Serialize, Deserialize)]
struct Carried {
    state: Option<Bytes>,
    records: Vec<(Bytes, Bytes)>,
}

/// Wraps a durable shard's handoff: the handler's snapshot and the exported state, if any.
pub(crate) fn wrap(user: Option<Handoff>, carried: Option<Batch>) -> Result<Handoff, Error> {
    let carried = carried.map(|batch| {
        let (state, records) = batch.into_parts();
        Carried {
            state: match state {
                Some(Change::Put(bytes)) => Some(bytes),
                _ => None,
            },
            records: records
                .into_iter()
                .filter_map(|(key, change)| match change {
                    Change::Put(bytes) => Some((Bytes::from(key.into_bytes()), bytes)),
                    Change::Delete => None,
                })
                .collect(),
        }
    });
    let envelope = Envelope {
        user: user.map(|handoff| Bytes::copy_from_slice(handoff.as_bytes())),
        carried,
    };
    let mut bytes = ENVELOPE_MAGIC.to_vec();
    bytes.extend(crate::codec::encode(&envelope)?);
    Ok(Handoff::from_bytes(bytes))
}

/// Splits a handoff into the handler's snapshot and the carried durable state. A snapshot that
/// is not an envelope (from a node whose handler kept no durable state) is the handler's own.
pub(crate) fn unwrap(handoff: Handoff) -> Result<(Option<Handoff>, Option<Batch>), Error> {
    let Some(body) = handoff.as_bytes().strip_prefix(ENVELOPE_MAGIC) else {
        return Ok((Some(handoff), None));
    };
    let envelope: Envelope = crate::codec::decode_snapshot(body)?;
    let user = envelope
        .user
        .map(|bytes| Handoff::from_bytes(bytes.to_vec()));
    let carried = envelope.carried.map(|carried| {
        let mut batch = Batch::new();
        if let Some(state) = carried.state {
            batch.put_state(state);
        }
        for (key, value) in carried.records {
            batch.put(Key::from(key.to_vec()), value);
        }
        batch
    });
    Ok((user, carried))
}

/// Everything a store loaded, as a batch of puts to carry in a handoff.
pub(crate) fn batch_of(loaded: Loaded) -> Batch {
    let mut batch = Batch::new();
    if let Some(state) = loaded.state {
        batch.put_state(state);
    }
    for (key, value) in loaded.records {
        batch.put(key, value);
    }
    batch
}

/// The state a carried batch (all puts) stands for, as if loaded from a store.
pub(crate) fn loaded_from(batch: &Batch, origin: Origin) -> Loaded {
    let mut loaded = Loaded::empty(origin);
    if let Some(Change::Put(state)) = batch.state() {
        loaded.state = Some(state.clone());
    }
    loaded.records = batch
        .records()
        .filter_map(|(key, change)| match change {
            Change::Put(bytes) => Some((key.clone(), bytes.clone())),
            Change::Delete => None,
        })
        .collect::<BTreeMap<_, _>>();
    loaded
}
