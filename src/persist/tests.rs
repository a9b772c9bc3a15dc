//! The store contract ([`crate::testing::store_contract`]) on both stores and through an
//! `Arc<dyn ShardStore>`, then the LMDB store's own behaviour: restart in place, no stale local
//! state, group commit.

use std::future::Future;
use std::path::Path;

use futures_util::future::{join, join_all};
use tokio::sync::oneshot;

use super::lmdb::{Committer, Job};
use super::*;
use crate::storage::group_commit::GroupCommit;
use crate::storage::StoreOptions;
use crate::testing::{activate_ok, commit_ok, puts_batch, records_text, text_map};

/// Node ids and epochs used below: node A activates first, node B later at a newer epoch.
const NODE_A: NodeId = 1;
const NODE_B: NodeId = 2;
const EPOCH_A: Epoch = 5;
const EPOCH_B: Epoch = 7;

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(future)
}

fn open_lmdb(dir: &Path) -> LmdbShardStore {
    let options = StoreOptions {
        map_size_bytes: 16 << 20,
        // Durability across a crash of the machine is LMDB's fsync; the tests reopen within one
        // process, where a committed transaction is visible without it.
        sync: false,
    };
    LmdbShardStore::open(dir, options).expect("the shard store opens in a fresh temp dir")
}

// ---------------------------------------------------------------------------------------------
// The contract suite (crate::testing::store_contract): every store must pass it.

#[test]
fn memory_store_keeps_the_store_contract() {
    block_on(crate::testing::store_contract(&MemoryStore::new()));
}

#[test]
fn lmdb_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().expect("temp dir");
    block_on(crate::testing::store_contract(&open_lmdb(dir.path())));
}

#[test]
fn a_shared_arc_dyn_store_keeps_the_store_contract() {
    let store: Arc<dyn ShardStore> = Arc::new(MemoryStore::new());
    block_on(crate::testing::store_contract(&store));
}

// ---------------------------------------------------------------------------------------------
// The LMDB store's own behaviour.

/// Goal: a restart in place keeps every committed value. Method: commit to several shards, drop
/// the store (which closes the environment), reopen the dir, reactivate each shard with the same
/// node and epoch.
#[test]
fn lmdb_restart_in_place_keeps_every_committed_value() {
    let dir = tempfile::tempdir().expect("temp dir");
    block_on(async {
        let store = open_lmdb(dir.path());
        for shard in 0..8 {
            activate_ok(&store, shard, NODE_A, EPOCH_A, "activates").await;
            let mut batch = puts_batch(&[("k", "v1"), ("gone", "x")]);
            batch.put_state(format!("state-{shard}").into_bytes());
            store.commit(shard, EPOCH_A, batch).await.expect("commits");
            let mut second = puts_batch(&[("k", "v2")]);
            second.delete("gone");
            commit_ok(&store, shard, EPOCH_A, second, "commits again").await;
        }
        drop(store);

        let store = open_lmdb(dir.path());
        for shard in 0..8 {
            let loaded = activate_ok(&store, shard, NODE_A, EPOCH_A, "reactivates").await;
            assert!(loaded.origin.is_loaded(), "{:?}", loaded.origin);
            assert_eq!(records_text(&loaded), text_map(&[("k", "v2")]));
            assert_eq!(loaded.state, Some(Bytes::from(format!("state-{shard}"))));
        }
    });
}

/// Goal: node-local state is valid only for a restart in place: a shard activated by another
/// node, or by this node at a newer epoch (it may have been owned elsewhere in between), starts
/// empty and says why, and the stale records are gone for good (a later restart in place does
/// not bring them back). Method: A writes; B activates on the same dir; B writes; restart; then
/// A at a newer epoch.
#[test]
fn lmdb_a_different_node_activating_gets_no_stale_local_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    block_on(async {
        let store = open_lmdb(dir.path());
        activate_ok(&store, 0, NODE_A, EPOCH_A, "A activates").await;
        let mut from_a = puts_batch(&[("a-key", "a")]);
        from_a.put_state(b"a-state".to_vec());
        store.commit(0, EPOCH_A, from_a).await.expect("A commits");

        let loaded = activate_ok(&store, 0, NODE_B, EPOCH_B, "B activates").await;
        assert_eq!(
            loaded.origin,
            Origin::Stale {
                last_owner: NODE_A,
                last_epoch: EPOCH_A
            }
        );
        assert!(loaded.records.is_empty() && loaded.state.is_none());
        store
            .commit(0, EPOCH_B, puts_batch(&[("b-key", "b")]))
            .await
            .expect("B commits");
        drop(store);

        let store = open_lmdb(dir.path());
        let loaded = activate_ok(&store, 0, NODE_B, EPOCH_B, "B restarts in place").await;
        assert_eq!(records_text(&loaded), text_map(&[("b-key", "b")]));
        assert_eq!(loaded.state, None);

        // B again, but at a newer epoch: the shard may have been owned elsewhere in between.
        let loaded = activate_ok(&store, 0, NODE_B, 9, "B at a newer epoch").await;
        assert_eq!(
            loaded.origin,
            Origin::Stale {
                last_owner: NODE_B,
                last_epoch: EPOCH_B
            }
        );
        assert!(loaded.records.is_empty());
    });
}

/// Goal: commits to many shards issued at once all land, each exactly as committed, and refused
/// ones among them change nothing. Method: 64 shards, three rounds of concurrent commits (every
/// eighth shard also gets a late commit at an old epoch), then a restart and a reload of each.
#[test]
fn lmdb_concurrent_commits_to_many_shards_all_land() {
    let dir = tempfile::tempdir().expect("temp dir");
    block_on(async {
        let store = open_lmdb(dir.path());
        let shards: Vec<ShardId> = (0..64).collect();
        let activations = join_all(
            shards
                .iter()
                .map(|&shard| store.activate(shard, NODE_A, EPOCH_A, Scope::All)),
        )
        .await;
        assert!(activations.iter().all(Result::is_ok));
        for round in 0..3 {
            let commits = shards.iter().map(|&shard| {
                store.commit(
                    shard,
                    EPOCH_A,
                    puts_batch(&[(&format!("round-{round}"), &format!("{shard}"))]),
                )
            });
            let late = shards
                .iter()
                .step_by(8)
                .map(|&shard| store.commit(shard, EPOCH_A - 1, puts_batch(&[("late", "x")])));
            let (accepted, refused) = join(join_all(commits), join_all(late)).await;
            assert!(accepted.iter().all(Result::is_ok), "{accepted:?}");
            assert!(
                refused
                    .iter()
                    .all(|r| matches!(r, Err(StoreError::Fenced { .. }))),
                "{refused:?}"
            );
        }
        drop(store);

        let store = open_lmdb(dir.path());
        for shard in shards {
            let loaded = activate_ok(&store, shard, NODE_A, EPOCH_A, "reloads").await;
            let value = shard.to_string();
            assert_eq!(
                records_text(&loaded),
                text_map(&[
                    ("round-0", &value),
                    ("round-1", &value),
                    ("round-2", &value)
                ])
            );
        }
    });
}

/// Goal: in one grouped transaction, each job is decided against the fences as the jobs before
/// it left them, a refused job writes nothing, and the accepted ones all commit. Method: hand
/// the writer's committer one group of our making (so the grouping is certain, not a matter of
/// timing) and check every answer, then reload in a second group.
#[test]
fn lmdb_a_group_commits_its_accepted_jobs_and_nothing_of_its_refused_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut committer = Committer::open_for_tests(dir.path()).expect("opens");
    let (activate_a, activated_a) = activate_job(10, NODE_A, EPOCH_A);
    let (commit_a, committed_a) = commit_job(10, EPOCH_A, puts_batch(&[("k", "a")]));
    let (activate_b, activated_b) = activate_job(10, NODE_B, EPOCH_B);
    let (late_a, refused_a) = commit_job(10, EPOCH_A, puts_batch(&[("k", "late")]));
    let (commit_b, committed_b) = commit_job(10, EPOCH_B, puts_batch(&[("k", "b")]));
    let (orphan, refused_orphan) = commit_job(11, EPOCH_A, puts_batch(&[("k", "orphan")]));
    let (activate_c, activated_c) = activate_job(12, NODE_A, EPOCH_A);
    let (commit_c, committed_c) = commit_job(12, EPOCH_A, puts_batch(&[("k", "c")]));
    committer.commit(vec![
        activate_a, commit_a, activate_b, late_a, commit_b, orphan, activate_c, commit_c,
    ]);
    let answer = |receiver: oneshot::Receiver<Result<(), StoreError>>| {
        receiver.blocking_recv().expect("every job is answered")
    };
    assert_eq!(
        activated_a
            .blocking_recv()
            .expect("answered")
            .expect("A activates")
            .origin,
        Origin::New
    );
    answer(committed_a).expect("A's commit, before B's activation, is accepted");
    let loaded_b = activated_b
        .blocking_recv()
        .expect("answered")
        .expect("B activates");
    // Node-local: A's records are stale for B and were dropped in the same transaction.
    assert!(matches!(
        loaded_b.origin,
        Origin::Stale {
            last_owner: NODE_A,
            ..
        }
    ));
    assert!(matches!(
        answer(refused_a),
        Err(StoreError::Fenced { fence: EPOCH_B, .. })
    ));
    answer(committed_b).expect("B's commit is accepted");
    assert!(matches!(
        answer(refused_orphan),
        Err(StoreError::NotActivated { .. })
    ));
    activated_c
        .blocking_recv()
        .expect("answered")
        .expect("C activates");
    answer(committed_c).expect("another shard's commit in the group is accepted");

    let (reload_b, reloaded_b) = activate_job(10, NODE_B, EPOCH_B);
    let (reload_c, reloaded_c) = activate_job(12, NODE_A, EPOCH_A);
    let (probe, probed) = activate_job(11, NODE_A, EPOCH_A);
    committer.commit(vec![reload_b, reload_c, probe]);
    let loaded = |receiver: oneshot::Receiver<Result<Loaded, StoreError>>| {
        records_text(
            &receiver
                .blocking_recv()
                .expect("answered")
                .expect("reloads"),
        )
    };
    assert_eq!(loaded(reloaded_b), text_map(&[("k", "b")]));
    assert_eq!(loaded(reloaded_c), text_map(&[("k", "c")]));
    assert_eq!(loaded(probed), text_map(&[]));
}

fn activate_job(
    shard: ShardId,
    owner: NodeId,
    epoch: Epoch,
) -> (Job, oneshot::Receiver<Result<Loaded, StoreError>>) {
    let (reply, answer) = oneshot::channel();
    (
        Job::Activate {
            shard,
            owner,
            epoch,
            scope: Scope::All,
            reply,
        },
        answer,
    )
}

fn commit_job(
    shard: ShardId,
    epoch: Epoch,
    batch: Batch,
) -> (Job, oneshot::Receiver<Result<(), StoreError>>) {
    let (reply, answer) = oneshot::channel();
    (
        Job::Commit {
            shard,
            epoch,
            batch,
            reply,
        },
        answer,
    )
}

/// Goal: a key LMDB cannot store is refused before it is queued, so it cannot fail the other
/// commits of its group. Method: commit a key one byte over the limit, then one at the limit.
#[test]
fn lmdb_a_key_over_the_limit_is_refused_and_the_limit_itself_is_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    block_on(async {
        let store = open_lmdb(dir.path());
        store
            .activate(0, NODE_A, EPOCH_A, Scope::All)
            .await
            .expect("activates");
        let mut long = Batch::new();
        long.put(vec![7_u8; LmdbShardStore::KEY_BYTES_MAX + 1], b"v".to_vec());
        let refused = store.commit(0, EPOCH_A, long).await;
        assert!(
            matches!(refused, Err(StoreError::KeyTooLong { .. })),
            "{refused:?}"
        );
        let mut longest = Batch::new();
        longest.put(vec![7_u8; LmdbShardStore::KEY_BYTES_MAX], b"v".to_vec());
        commit_ok(&store, 0, EPOCH_A, longest, "a key at the limit is stored").await;
        let loaded = store
            .activate(0, NODE_A, EPOCH_A, Scope::All)
            .await
            .expect("reloads");
        assert_eq!(loaded.records.len(), 1);
    });
}

/// Goal: opening a directory this process already has open is a typed error that says what to
/// do, not a second environment over the same file. Method: open twice.
#[test]
fn lmdb_opening_an_open_dir_again_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _store = open_lmdb(dir.path());
    let again = LmdbShardStore::open(dir.path(), StoreOptions::default());
    let error = again.expect_err("a second open is refused");
    assert!(matches!(error, StoreError::AlreadyOpen { .. }), "{error}");
    assert!(
        error.to_string().contains("directory of its own"),
        "{error}"
    );
}
