//! [`store_contract`]: the contract every [`ShardStore`] must keep, as a suite of checks that
//! runs against any store: the stores of this crate run it in their tests, and a store of your
//! own can run it in its. Each case opens with its goal and method. Does not own the stores'
//! own behaviour beyond the contract (restart in place, grouping), which their tests check.

use std::collections::BTreeMap;

use futures_util::future::join;

use crate::persist::{Batch, Loaded, Locality, Origin, Scope, ShardStore, StoreError};
use crate::shard_map::{Epoch, Key, NodeId, ShardId};

/// `store.activate(..)`, which must succeed (`what` names the step in the failure).
pub(crate) async fn activate_ok(
    store: &dyn ShardStore,
    shard: ShardId,
    owner: NodeId,
    epoch: Epoch,
    what: &str,
) -> Loaded {
    store
        .activate(shard, owner, epoch, Scope::All)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `store.commit(..)`, which must succeed.
pub(crate) async fn commit_ok(
    store: &dyn ShardStore,
    shard: ShardId,
    epoch: Epoch,
    batch: Batch,
    what: &str,
) {
    store
        .commit(shard, epoch, batch)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// `store.release(..)`, which must succeed.
async fn release_ok(store: &dyn ShardStore, shard: ShardId, epoch: Epoch, what: &str) {
    store
        .release(shard, epoch)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Node ids and epochs used below: node A activates first, node B later at a newer epoch.
const NODE_A: NodeId = 1;
const NODE_B: NodeId = 2;
const EPOCH_A: Epoch = 5;
const EPOCH_B: Epoch = 7;

/// A batch that puts each `(key, value)` of `puts` (as UTF-8 bytes).
pub fn puts_batch(puts: &[(&str, &str)]) -> Batch {
    let mut batch = Batch::new();
    for (key, value) in puts {
        batch.put(*key, value.as_bytes().to_vec());
    }
    batch
}

/// The per-key records of `loaded` as text, for readable assertions.
pub fn records_text(loaded: &Loaded) -> BTreeMap<String, String> {
    loaded
        .records
        .iter()
        .map(|(key, value)| {
            (
                String::from_utf8_lossy(key.as_bytes()).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect()
}

/// `pairs` as a map of text, to compare with [`records_text`].
pub fn text_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// Checks that `store` keeps the contract every [`ShardStore`] must keep (the guide's
/// persistence chapter states it): fencing in the store, atomic load-and-raise, a refused write
/// changes nothing, releases hand shards over, reads are fenced like commits, and a reload
/// returns exactly what was committed. The checks adapt to the store's [`Locality`].
///
/// Give it a fresh store: the cases use shards 1 to 9, and expect that no other caller uses
/// them meanwhile. It panics, with a message naming the broken rule, at the first case that
/// fails; run it from a test:
///
/// ```
/// # actix::System::new().block_on(async {
/// clusterfunk::testing::store_contract(&clusterfunk::persist::MemoryStore::new()).await;
/// # });
/// ```
pub async fn store_contract(store: &dyn ShardStore) {
    a_write_below_the_fence_is_refused_and_changes_nothing(store, 1).await;
    activation_raises_the_fence_and_loads_atomically(store, 2).await;
    an_old_owner_paused_past_its_lease_is_refused_and_the_new_owners_value_stands(store, 3).await;
    reactivation_at_an_equal_epoch_by_the_same_node_loads_again(store, 4).await;
    commit_then_reload_returns_every_committed_value(store, 5).await;
    a_release_ends_the_activation_and_hands_the_shard_over(store, 6).await;
    activation_below_the_fence_or_at_another_nodes_epoch_is_refused(store, 7).await;
    a_commit_without_its_activation_is_refused(store, 8).await;
    a_state_scope_activation_loads_the_whole_shard_record_and_keys_are_read_one_by_one(store, 9)
        .await;
}

async fn a_state_scope_activation_loads_the_whole_shard_record_and_keys_are_read_one_by_one(
    store: &dyn ShardStore,
    shard: ShardId,
) {
    activate_ok(store, shard, NODE_A, EPOCH_A, "A activates").await;
    let mut first = puts_batch(&[("k1", "one"), ("k2", "two")]);
    first.put_state(b"whole".to_vec());
    commit_ok(store, shard, EPOCH_A, first, "A commits").await;
    let loaded = store
        .activate(shard, NODE_A, EPOCH_A, Scope::State)
        .await
        .expect("A reactivates with the state only");
    assert_eq!(loaded.state.as_deref(), Some(&b"whole"[..]));
    assert!(loaded.records.is_empty(), "per-key records are not loaded");
    let read = |key: &str, epoch| store.read(shard, epoch, Key::from(key));
    assert_eq!(
        read("k2", EPOCH_A).await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(read("k3", EPOCH_A).await.unwrap(), None, "no record");
    // B takes the shard over: A's activation can no longer read.
    activate_ok(store, shard, NODE_B, EPOCH_B, "B activates").await;
    let deposed = read("k1", EPOCH_A).await;
    assert!(
        matches!(deposed, Err(StoreError::Fenced { fence: EPOCH_B, .. })),
        "a deposed activation reads: {deposed:?}"
    );
}

/// Goal: a commit with an epoch below the fence is refused with `Fenced` and none of its changes
/// land. Method: B activates above A, writes; A's commit (puts and a whole-shard record) is
/// refused; B's reload shows only B's write.
async fn a_write_below_the_fence_is_refused_and_changes_nothing(
    store: &dyn ShardStore,
    shard: ShardId,
) {
    activate_ok(store, shard, NODE_A, EPOCH_A, "A activates").await;
    activate_ok(store, shard, NODE_B, EPOCH_B, "B activates above A").await;
    store
        .commit(shard, EPOCH_B, puts_batch(&[("x", "b")]))
        .await
        .expect("B commits");
    let mut late = puts_batch(&[("x", "a"), ("y", "a")]);
    late.put_state(b"a-state".to_vec());
    let refused = store.commit(shard, EPOCH_A, late).await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { shard: s, epoch: EPOCH_A, fence: EPOCH_B }) if s == shard),
        "{refused:?}"
    );
    assert!(refused.expect_err("refused").is_refusal());
    let loaded = activate_ok(store, shard, NODE_B, EPOCH_B, "B reloads").await;
    assert_eq!(records_text(&loaded), text_map(&[("x", "b")]));
    assert_eq!(loaded.state, None);
}

/// Goal: activation raises the fence and loads in one step: a commit of the old activation that
/// races with it either lands before it (and is in what it loaded, for a shared store) or is
/// refused; it never lands after. Method: twenty races of A's commit against B's activation,
/// each on a fresh epoch pair, in both orders of submission.
async fn activation_raises_the_fence_and_loads_atomically(store: &dyn ShardStore, shard: ShardId) {
    for round in 0..20_u64 {
        let (old, new) = (100 + 2 * round, 101 + 2 * round);
        activate_ok(store, shard, NODE_A, old, "A activates").await;
        let key = format!("round-{round}");
        let commit = store.commit(shard, old, puts_batch(&[(&key, "a")]));
        let activate = store.activate(shard, NODE_B, new, Scope::All);
        let (committed, loaded) = if round % 2 == 0 {
            join(commit, activate).await
        } else {
            let (loaded, committed) = join(activate, commit).await;
            (committed, loaded)
        };
        let loaded = loaded.expect("B activates");
        let in_loaded = loaded.records.contains_key(&Key::from(key.as_str()));
        match (&committed, store.locality()) {
            (Ok(()), Locality::Shared) => assert!(
                in_loaded,
                "round {round}: an accepted commit is missing from the load"
            ),
            (Ok(()), _) => assert!(
                !in_loaded,
                "round {round}: a node-local store loaded another node's records"
            ),
            (Err(StoreError::Fenced { fence, .. }), _) => {
                assert_eq!(*fence, new);
                assert!(!in_loaded, "round {round}: a refused commit is in the load");
            }
            (Err(error), _) => panic!("round {round}: unexpected {error}"),
        }
        let reloaded = store
            .activate(shard, NODE_B, new, Scope::All)
            .await
            .expect("B reloads");
        assert_eq!(
            records_text(&reloaded),
            records_text(&loaded),
            "round {round}: something landed after the activation"
        );
        // Hand the shard back to A for the next round (epochs keep rising).
        store.release(shard, new).await.expect("B releases");
    }
}

/// Goal: the issue's fencing test: an old owner paused past its lease resumes and writes with its
/// old activation's epoch, also after it learned of newer maps; it is refused, and the new
/// owner's value stands. Method: A activates and writes; B takes over (no release: A is
/// "paused"); B writes; A's late writes at its activation epoch are refused; B reads its value.
async fn an_old_owner_paused_past_its_lease_is_refused_and_the_new_owners_value_stands(
    store: &dyn ShardStore,
    shard: ShardId,
) {
    activate_ok(store, shard, NODE_A, EPOCH_A, "A activates").await;
    store
        .commit(shard, EPOCH_A, puts_batch(&[("balance", "10")]))
        .await
        .expect("A commits before its pause");
    let loaded = activate_ok(store, shard, NODE_B, EPOCH_B, "B takes over").await;
    if store.locality() == Locality::Shared {
        assert_eq!(records_text(&loaded), text_map(&[("balance", "10")]));
        assert_eq!(
            loaded.origin,
            Origin::Stored {
                last_owner: NODE_A,
                last_epoch: EPOCH_A,
                released: false
            }
        );
    }
    store
        .commit(shard, EPOCH_B, puts_batch(&[("balance", "20")]))
        .await
        .expect("B commits");
    // A resumes: its activation's epoch is still EPOCH_A, even if it has since applied a map of
    // epoch 9; every write carries the activation's epoch.
    for _ in 0..2 {
        let late = store
            .commit(shard, EPOCH_A, puts_batch(&[("balance", "11")]))
            .await;
        assert!(
            matches!(late, Err(StoreError::Fenced { fence: EPOCH_B, .. })),
            "{late:?}"
        );
    }
    let late_release = store.release(shard, EPOCH_A).await;
    assert!(
        matches!(late_release, Err(StoreError::Fenced { .. })),
        "{late_release:?}"
    );
    let loaded = activate_ok(store, shard, NODE_B, EPOCH_B, "B reloads").await;
    assert_eq!(records_text(&loaded), text_map(&[("balance", "20")]));
}

/// Goal: an activation at the fence's epoch by the same node (restart, passivation) is allowed,
/// loads what that activation committed, and commits go on. Method: activate, commit, activate
/// again at the same epoch, commit again, reload.
async fn reactivation_at_an_equal_epoch_by_the_same_node_loads_again(
    store: &dyn ShardStore,
    shard: ShardId,
) {
    let first = activate_ok(store, shard, NODE_A, EPOCH_A, "activates").await;
    assert_eq!(first.origin, Origin::New);
    store
        .commit(shard, EPOCH_A, puts_batch(&[("k", "1")]))
        .await
        .expect("commits");
    let again = activate_ok(
        store,
        shard,
        NODE_A,
        EPOCH_A,
        "reactivates at the same epoch",
    )
    .await;
    assert_eq!(
        again.origin,
        Origin::Stored {
            last_owner: NODE_A,
            last_epoch: EPOCH_A,
            released: false
        }
    );
    assert_eq!(records_text(&again), text_map(&[("k", "1")]));
    store
        .commit(shard, EPOCH_A, puts_batch(&[("k", "2")]))
        .await
        .expect("commits after the reactivation");
    let last = activate_ok(store, shard, NODE_A, EPOCH_A, "reloads").await;
    assert_eq!(records_text(&last), text_map(&[("k", "2")]));
}

/// Goal: a reload returns exactly what was committed: puts, overwrites, deletes and the
/// whole-shard record, across several commits. Method: commit a sequence of batches (one of them
/// merged from two), reload at the same activation, compare with a model.
async fn commit_then_reload_returns_every_committed_value(store: &dyn ShardStore, shard: ShardId) {
    activate_ok(store, shard, NODE_A, EPOCH_A, "activates").await;
    let mut first = puts_batch(&[("a", "1"), ("b", "1"), ("c", "1")]);
    first.put_state(b"state-1".to_vec());
    commit_ok(store, shard, EPOCH_A, first, "first commit").await;
    let mut second = puts_batch(&[("b", "2")]);
    second.delete("c");
    let mut third = puts_batch(&[("d", "3"), ("c", "3")]);
    third.delete("d");
    // The merged batch: "c" is put again, "d" ends deleted.
    second.merge(third);
    assert_eq!(second.len(), 3);
    commit_ok(store, shard, EPOCH_A, second, "second commit").await;
    let mut binary = Batch::new();
    binary.put(vec![0_u8, 255, 1], vec![0_u8; 3]);
    commit_ok(store, shard, EPOCH_A, binary, "binary key commit").await;
    commit_ok(
        store,
        shard,
        EPOCH_A,
        Batch::new(),
        "an empty commit checks the fence",
    )
    .await;

    let loaded = activate_ok(store, shard, NODE_A, EPOCH_A, "reloads").await;
    assert_eq!(loaded.state.as_deref(), Some(&b"state-1"[..]));
    assert_eq!(loaded.records.len(), 4);
    assert_eq!(
        loaded
            .records
            .get(&Key::from(vec![0_u8, 255, 1]))
            .map(|v| v.to_vec()),
        Some(vec![0_u8; 3])
    );
    let mut text = records_text(&loaded);
    text.retain(|key, _| key.is_ascii());
    assert_eq!(text, text_map(&[("a", "1"), ("b", "2"), ("c", "3")]));

    let mut clear = Batch::new();
    clear.delete_state();
    commit_ok(store, shard, EPOCH_A, clear, "deletes the state").await;
    let loaded = activate_ok(store, shard, NODE_A, EPOCH_A, "reloads").await;
    assert_eq!(loaded.state, None);
}

/// Goal: a planned move hands over through the store: after the release the old activation
/// cannot commit, releasing again is harmless, and the next owner's activation says the shard
/// was released (and, for a shared store, loads what was flushed). Method: commit, release,
/// commit again (refused), activate on B.
async fn a_release_ends_the_activation_and_hands_the_shard_over(
    store: &dyn ShardStore,
    shard: ShardId,
) {
    activate_ok(store, shard, NODE_A, EPOCH_A, "A activates").await;
    store
        .commit(shard, EPOCH_A, puts_batch(&[("flushed", "yes")]))
        .await
        .expect("A flushes");
    store.release(shard, EPOCH_A).await.expect("A releases");
    release_ok(store, shard, EPOCH_A, "releasing twice is not an error").await;
    let after = store
        .commit(shard, EPOCH_A, puts_batch(&[("late", "yes")]))
        .await;
    assert!(
        matches!(after, Err(StoreError::Released { epoch: EPOCH_A, .. })),
        "{after:?}"
    );
    let loaded = activate_ok(store, shard, NODE_B, EPOCH_B, "B activates").await;
    match store.locality() {
        Locality::Shared => {
            assert_eq!(
                loaded.origin,
                Origin::Stored {
                    last_owner: NODE_A,
                    last_epoch: EPOCH_A,
                    released: true
                }
            );
            assert_eq!(records_text(&loaded), text_map(&[("flushed", "yes")]));
        }
        _ => {
            assert_eq!(
                loaded.origin,
                Origin::Stale {
                    last_owner: NODE_A,
                    last_epoch: EPOCH_A
                }
            );
            assert!(loaded.records.is_empty());
        }
    }
}

/// Goal: activation is refused below the fence (`Fenced`) and at the fence's epoch by another
/// node (`EpochTaken`), and neither refusal moves the fence. Method: activate at 7, try 5 and
/// (7, other node), then commit at 7.
async fn activation_below_the_fence_or_at_another_nodes_epoch_is_refused(
    store: &dyn ShardStore,
    shard: ShardId,
) {
    activate_ok(store, shard, NODE_B, EPOCH_B, "B activates").await;
    let below = store.activate(shard, NODE_A, EPOCH_A, Scope::All).await;
    assert!(
        matches!(
            below,
            Err(StoreError::Fenced {
                epoch: EPOCH_A,
                fence: EPOCH_B,
                ..
            })
        ),
        "{below:?}"
    );
    let taken = store.activate(shard, NODE_A, EPOCH_B, Scope::All).await;
    assert!(
        matches!(
            taken,
            Err(StoreError::EpochTaken {
                epoch: EPOCH_B,
                owner: NODE_B,
                ..
            })
        ),
        "{taken:?}"
    );
    store
        .commit(shard, EPOCH_B, puts_batch(&[("still", "B")]))
        .await
        .expect("B's activation is still the current one");
}

/// Goal: a commit or release needs its activation: never activated, or above the fence, it is
/// refused with `NotActivated`. Method: commit before any activation and above the fence.
async fn a_commit_without_its_activation_is_refused(store: &dyn ShardStore, shard: ShardId) {
    let never = store
        .commit(shard, EPOCH_A, puts_batch(&[("k", "v")]))
        .await;
    assert!(
        matches!(never, Err(StoreError::NotActivated { fence: None, .. })),
        "{never:?}"
    );
    let release = store.release(shard, EPOCH_A).await;
    assert!(
        matches!(release, Err(StoreError::NotActivated { .. })),
        "{release:?}"
    );
    activate_ok(store, shard, NODE_A, EPOCH_A, "activates").await;
    let above = store
        .commit(shard, EPOCH_B, puts_batch(&[("k", "v")]))
        .await;
    assert!(
        matches!(
            above,
            Err(StoreError::NotActivated {
                fence: Some(EPOCH_A),
                ..
            })
        ),
        "{above:?}"
    );
    let loaded = activate_ok(store, shard, NODE_A, EPOCH_A, "reloads").await;
    assert!(loaded.records.is_empty());
}
