//! The PostgreSQL shard store against a real server (issue 18): the store contract every store
//! keeps ([`store_contract`]), then what is PostgreSQL's own: commits to many shards from two
//! nodes at once, a refused or failed batch that changes nothing, the server stopped and
//! started again under the store, a call past its time limit, the schema's set-up by nodes connecting at once, the key
//! limit, a corrupt row, and callers on runtimes that come and go.
//!
//! Each test starts a throwaway server of its own ([`PostgresServer`]: `initdb` and `pg_ctl` in
//! a temporary directory, on a free port of 127.0.0.1), so the tests run in parallel and share
//! nothing; the server stops when the test ends. A machine without PostgreSQL fails these tests
//! with a message that says how to install it: none is skipped. Every wait polls for an event
//! with a deadline; no test asserts how long anything takes.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfunk::persist::{
    Batch, Locality, Origin, PostgresOptions, PostgresShardStore, Scope, ShardStore, StoreError,
};
use clusterfunk::shard_map::Epoch;
use clusterfunk::testing::{
    puts_batch, records_text, reserve_ports, store_contract, text_map, PostgresServer,
};
use clusterfunk::{Key, NodeId, ShardId};
use futures_util::future::join_all;

/// Bound on waits for the server (a restart, the pool reconnecting): far above what a passing
/// test needs, because CI is a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

const NODE_A: NodeId = 1;
const NODE_B: NodeId = 2;
const EPOCH_A: Epoch = 5;
const EPOCH_B: Epoch = 7;

/// Starts a server of the test's own, failing the test (with how to install PostgreSQL) when
/// it cannot.
fn server() -> PostgresServer {
    PostgresServer::start().unwrap_or_else(|e| panic!("start a test PostgreSQL server: {e}"))
}

/// Connects a store to `server`'s database with tables prefixed `prefix`.
fn connect(server: &PostgresServer, prefix: &str) -> PostgresShardStore {
    let options = PostgresOptions {
        table_prefix: prefix.to_owned(),
        ..Default::default()
    };
    PostgresShardStore::connect(&server.url(), options)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.url()))
}

/// Goal: the PostgreSQL store keeps the contract every store keeps, and two table prefixes in
/// one database are two stores that do not see each other. Method: the contract suite, on two
/// stores of different prefixes at once (the suite uses the same shards in both).
#[tokio::test]
async fn postgres_store_keeps_the_store_contract() {
    let server = server();
    let (first, second) = (
        connect(&server, "contract_a_"),
        connect(&server, "contract_b_"),
    );
    assert_eq!(first.locality(), Locality::Shared);
    futures_util::future::join(store_contract(&first), store_contract(&second)).await;
}

/// Goal: commits to many shards, issued at once by two nodes (two stores, two pools), all land
/// exactly as committed, late commits at an old epoch among them are refused, and everything
/// is there for a store that connects afterwards (a restarted node). Method: 64 shards split
/// between the nodes; three rounds of concurrent commits, every eighth shard also getting a
/// late commit at an old epoch; then a new store reloads every shard.
#[tokio::test]
async fn concurrent_commits_to_many_shards_from_two_nodes_all_land() {
    let server = server();
    let nodes = [connect(&server, "many_"), connect(&server, "many_")];
    let shards: Vec<ShardId> = (0..64).collect();
    let node_of = |shard: ShardId| &nodes[shard as usize % 2];
    let activations = join_all(shards.iter().map(|&shard| {
        node_of(shard).activate(shard, NodeId::from(shard % 2 + 1), EPOCH_A, Scope::All)
    }))
    .await;
    assert!(activations.iter().all(Result::is_ok), "{activations:?}");
    for round in 0..3 {
        let commits = shards.iter().map(|&shard| {
            let mut batch = puts_batch(&[(&format!("round-{round}"), &shard.to_string())]);
            batch.put_state(format!("state-{shard}-{round}").into_bytes());
            node_of(shard).commit(shard, EPOCH_A, batch)
        });
        let late = shards
            .iter()
            .step_by(8)
            .map(|&shard| node_of(shard).commit(shard, EPOCH_A - 1, puts_batch(&[("late", "x")])));
        let (accepted, refused) =
            futures_util::future::join(join_all(commits), join_all(late)).await;
        assert!(accepted.iter().all(Result::is_ok), "{accepted:?}");
        assert!(
            refused
                .iter()
                .all(|r| matches!(r, Err(StoreError::Fenced { fence: EPOCH_A, .. }))),
            "{refused:?}"
        );
    }
    drop(nodes);

    let restarted = connect(&server, "many_");
    for shard in shards {
        let owner = NodeId::from(shard % 2 + 1);
        let loaded = restarted
            .activate(shard, owner, EPOCH_A, Scope::All)
            .await
            .expect("reloads");
        let value = shard.to_string();
        assert_eq!(
            records_text(&loaded),
            text_map(&[
                ("round-0", &value),
                ("round-1", &value),
                ("round-2", &value)
            ]),
            "shard {shard}"
        );
        assert_eq!(
            loaded.state.as_deref(),
            Some(format!("state-{shard}-2").as_bytes())
        );
        assert_eq!(
            loaded.origin,
            Origin::Stored {
                last_owner: owner,
                last_epoch: EPOCH_A,
                released: false
            }
        );
    }
}

/// Goal: in a group of commits in flight at once, a refused batch changes nothing (neither its
/// records, nor its whole-shard record, however large it is) while the others land whole.
/// Method: shard 1 is taken over by node B; node A's late batch of 10 000 records (more than
/// one statement's worth) and a whole-shard record is sent together with B's and another
/// shard's batches; then every shard is reloaded.
#[tokio::test]
async fn a_refused_batch_in_a_commit_group_changes_nothing() {
    let server = server();
    let store = connect(&server, "group_");
    for (shard, owner, epoch) in [
        (1, NODE_A, EPOCH_A),
        (1, NODE_B, EPOCH_B),
        (2, NODE_A, EPOCH_A),
    ] {
        store
            .activate(shard, owner, epoch, Scope::All)
            .await
            .expect("activates");
    }
    let mut late = Batch::new();
    for i in 0..10_000 {
        late.put(format!("late-{i}"), b"a".to_vec());
    }
    late.put_state(b"a-state".to_vec());
    let mut from_b = Batch::new();
    for i in 0..5_000 {
        from_b.put(format!("b-{i}"), b"b".to_vec());
    }
    from_b.put_state(b"b-state".to_vec());
    let outcomes = join_all([
        store.commit(1, EPOCH_A, late),
        store.commit(1, EPOCH_B, from_b),
        store.commit(2, EPOCH_A, puts_batch(&[("other", "a")])),
    ])
    .await;
    assert!(
        matches!(
            outcomes[0],
            Err(StoreError::Fenced {
                epoch: EPOCH_A,
                fence: EPOCH_B,
                ..
            })
        ),
        "{:?}",
        outcomes[0]
    );
    assert!(outcomes[1].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    let shard_1 = store
        .activate(1, NODE_B, EPOCH_B, Scope::All)
        .await
        .expect("B reloads");
    assert_eq!(shard_1.records.len(), 5_000);
    assert!(shard_1
        .records
        .keys()
        .all(|key| key.as_bytes().starts_with(b"b-")));
    assert_eq!(shard_1.state.as_deref(), Some(&b"b-state"[..]));
    let shard_2 = store
        .activate(2, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("reloads");
    assert_eq!(records_text(&shard_2), text_map(&[("other", "a")]));
}

/// Goal: a batch that the database fails part-way through lands nothing, not even the parts
/// before the failure, and the shard goes on. Method: a trigger (created by the test) makes
/// the server fail any insert of the key `poison`; a batch of 9 000 records with a whole-shard
/// record and a delete, `poison` among them, fails with the server's error (not a refusal);
/// the reload shows the state from before; a batch without it commits.
#[tokio::test]
async fn a_batch_that_fails_part_way_lands_nothing() {
    let server = server();
    let store = connect(&server, "failing_");
    store
        .activate(3, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    let mut before = puts_batch(&[("kept", "1"), ("deleted-later", "1")]);
    before.put_state(b"before".to_vec());
    store.commit(3, EPOCH_A, before).await.expect("commits");

    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .expect("the test connects");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
             BEGIN
               IF NEW.key = 'poison'::bytea THEN RAISE EXCEPTION 'the test refuses key poison'; END IF;
               RETURN NEW;
             END $$ LANGUAGE plpgsql;
             CREATE TRIGGER refuse_poison BEFORE INSERT ON failing_records
               FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
        )
        .await
        .expect("the trigger is created");

    let mut failing = Batch::new();
    for i in 0..9_000 {
        failing.put(format!("new-{i:05}"), b"x".to_vec());
    }
    failing.put("poison", b"x".to_vec());
    failing.delete("deleted-later");
    failing.put_state(b"after".to_vec());
    let failed = store.commit(3, EPOCH_A, failing).await;
    let error = failed.expect_err("the server fails the batch");
    assert!(matches!(error, StoreError::Postgres { .. }), "{error}");
    assert!(!error.is_refusal(), "a failure is not a refusal: {error}");
    assert!(error.to_string().contains("poison"), "{error}");

    let loaded = store
        .activate(3, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("reloads");
    assert_eq!(
        records_text(&loaded),
        text_map(&[("deleted-later", "1"), ("kept", "1")])
    );
    assert_eq!(loaded.state.as_deref(), Some(&b"before"[..]));
    let mut next = puts_batch(&[("after", "1")]);
    next.delete("deleted-later");
    store
        .commit(3, EPOCH_A, next)
        .await
        .expect("a batch without the poison commits");
    let loaded = store
        .activate(3, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("reloads");
    assert_eq!(
        records_text(&loaded),
        text_map(&[("after", "1"), ("kept", "1")])
    );
    drop(client);
    let _ = connection.await;
}

/// Goal: when the database is unreachable, every call fails at once with the typed error that
/// says what to check (the store does not guess, and does not wait for its time limit), and the
/// store recovers by itself once the server is back: what was committed before is there, and
/// nothing of the failed calls landed. Method: commit, stop the server as a crash would
/// (`pg_ctl stop -m immediate`, which breaks the pool's connections), try a commit, a read and
/// an activation, start the server again, wait until an activation succeeds, check the values.
#[tokio::test]
async fn an_unreachable_database_gives_the_typed_error_and_the_store_recovers() {
    let server = server();
    let store = PostgresShardStore::connect(
        &server.url(),
        PostgresOptions {
            table_prefix: "outage_".to_owned(),
            // Far longer than the test: an answer must come from the failure, not the limit.
            call_timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .expect("connects");
    store
        .activate(4, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    store
        .commit(4, EPOCH_A, puts_batch(&[("k", "before")]))
        .await
        .expect("commits");

    server.stop().expect("the server stops");
    let unreachable = |what: &str, outcome: Result<(), StoreError>| {
        let error = outcome.expect_err(what);
        assert!(
            matches!(error, StoreError::PostgresUnreachable { .. }),
            "{what}: {error:?}"
        );
        assert!(!error.is_refusal(), "{what}: {error}");
        let message = error.to_string();
        assert!(
            message.contains("check the store's URL and that the server runs"),
            "{what}: {message}"
        );
        assert!(
            message.contains(&format!("127.0.0.1:{}", server.port())),
            "{what}: {message}"
        );
    };
    unreachable(
        "a commit while the server is down",
        store.commit(4, EPOCH_A, puts_batch(&[("k", "lost")])).await,
    );
    unreachable(
        "a read while the server is down",
        store.read(4, EPOCH_A, Key::from("k")).await.map(drop),
    );
    unreachable(
        "an activation while the server is down",
        store
            .activate(4, NODE_A, EPOCH_A, Scope::All)
            .await
            .map(drop),
    );

    server.start_again().expect("the server starts again");
    let deadline = Instant::now() + DEADLINE;
    let loaded = loop {
        match store.activate(4, NODE_A, EPOCH_A, Scope::All).await {
            Ok(loaded) => break loaded,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "the store did not recover within {DEADLINE:?}: {error}\n{}",
                    server.log_tail()
                );
                // Retry pacing, not synchronisation: the next attempt checks the condition.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(records_text(&loaded), text_map(&[("k", "before")]));
    store
        .commit(4, EPOCH_A, puts_batch(&[("k", "after")]))
        .await
        .expect("commits after the outage");
    assert_eq!(
        store
            .read(4, EPOCH_A, Key::from("k"))
            .await
            .expect("reads")
            .as_deref(),
        Some(&b"after"[..])
    );
}

/// Goal: a call that cannot finish within its time limit fails with the typed timeout (not a
/// refusal), lands nothing, and leaves the store usable. Method: the test holds shard 10's row
/// locked from a connection of its own, so a commit waits on the lock past its 1 s limit; after
/// the timeout the test releases the lock; a reload shows the value from before, and the next
/// commit lands.
#[tokio::test]
async fn a_call_past_its_time_limit_is_a_typed_timeout_and_lands_nothing() {
    let server = server();
    let store = PostgresShardStore::connect(
        &server.url(),
        PostgresOptions {
            table_prefix: "slow_".to_owned(),
            // The lock below holds the call for as long as the test wants: any limit runs out.
            call_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .expect("connects");
    store
        .activate(10, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    store
        .commit(10, EPOCH_A, puts_batch(&[("k", "before")]))
        .await
        .expect("commits");

    let (mut client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .expect("the test connects");
    let connection = tokio::spawn(connection);
    let holder = client.transaction().await.expect("begins");
    holder
        .execute("SELECT 1 FROM slow_shards WHERE shard = 10 FOR UPDATE", &[])
        .await
        .expect("the test locks the shard's row");
    let error = store
        .commit(10, EPOCH_A, puts_batch(&[("k", "late")]))
        .await
        .expect_err("the commit waits on the lock past its limit");
    assert!(
        matches!(
            error,
            StoreError::PostgresTimeout {
                waiting_for: "an answer",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_refusal(), "{error}");
    assert!(error.to_string().contains("call_timeout"), "{error}");
    holder.rollback().await.expect("the test releases the lock");

    let loaded = store
        .activate(10, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("reloads");
    assert_eq!(records_text(&loaded), text_map(&[("k", "before")]));
    store
        .commit(10, EPOCH_A, puts_batch(&[("k", "after")]))
        .await
        .expect("the next commit lands");
    let read = store
        .read(10, EPOCH_A, Key::from("k"))
        .await
        .expect("reads");
    assert_eq!(read.as_deref(), Some(&b"after"[..]));
    drop(client);
    let _ = connection.await;
}

/// Goal (regression, attack review of issue 18): an owner frozen (SIGSTOP, a paused VM) in the
/// middle of a commit holds its shard's row lock; the shard's new owner must still be able to
/// activate it, and no connection of the new owner's pool may stay stuck behind the lock. Before,
/// the lock stayed until TCP noticed (hours): every activation of the shard timed out after 30 s,
/// each left a connection waiting on the lock, and after a few minutes the new owner's pool was
/// used up and its healthy shards stopped answering too.
/// Method: a connection opened with the store's own session settings
/// (`PostgresOptions::session_settings`, what every connection of the store starts with) stands
/// in for the frozen owner: it locks shard 12's row inside a transaction and then does nothing.
/// Store B (the new owner, with a 1 s idle-in-transaction limit) activates shard 12 at a newer
/// epoch: the server must end the idle session, and the activation must succeed and see the old
/// owner's last committed value, not its uncommitted one; the frozen owner's transaction must
/// have been rolled back (its connection is gone).
#[tokio::test]
async fn an_owner_frozen_inside_a_commit_releases_the_shard_for_its_new_owner() {
    let server = server();
    let options = PostgresOptions {
        table_prefix: "frozen_".to_owned(),
        idle_in_transaction_timeout: Duration::from_secs(1),
        lock_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let old_owner = PostgresShardStore::connect(&server.url(), options.clone()).expect("connects");
    old_owner
        .activate(12, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    old_owner
        .commit(12, EPOCH_A, puts_batch(&[("k", "committed")]))
        .await
        .expect("commits");

    let mut frozen = tokio_postgres::Config::from_str(&server.url()).expect("the URL parses");
    frozen.options(options.session_settings());
    let (mut client, connection) = frozen
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the frozen owner connects");
    let connection = tokio::spawn(connection);
    let holder = client.transaction().await.expect("begins");
    holder
        .execute(
            "SELECT 1 FROM frozen_shards WHERE shard = 12 FOR UPDATE",
            &[],
        )
        .await
        .expect("the frozen owner locks the shard's row");
    holder
        .execute(
            "UPDATE frozen_records SET value = 'uncommitted' WHERE shard = 12",
            &[],
        )
        .await
        .expect("the frozen owner writes inside its transaction");

    let new_owner = PostgresShardStore::connect(&server.url(), options).expect("connects");
    let started = Instant::now();
    let loaded = loop {
        match new_owner.activate(12, NODE_B, EPOCH_B, Scope::All).await {
            Ok(loaded) => break loaded,
            Err(error) => {
                assert!(
                    started.elapsed() < DEADLINE,
                    "the new owner still cannot activate the frozen owner's shard: {error}"
                );
            }
        }
    };
    assert_eq!(records_text(&loaded), text_map(&[("k", "committed")]));
    assert!(
        holder.commit().await.is_err(),
        "the frozen owner's transaction outlived the idle-in-transaction limit"
    );
    let _ = connection.await;
}

/// Goal (regression, attack review of issue 18): two clusters pointed at one database by
/// mistake must not share the store's tables (their node ids and epochs collide, so the fence
/// cannot tell them apart: one overwrote the other's values). Method: a store of cluster
/// `alpha` connects and commits; a store of cluster `beta` with the same tables is refused at
/// connect with the typed error naming both; another store of `alpha` connects and reads the
/// value.
#[tokio::test]
async fn a_store_of_another_cluster_is_refused_at_connect() {
    let server = server();
    let of = |cluster: &str| PostgresOptions {
        table_prefix: "shared_".to_owned(),
        cluster: Some(cluster.to_owned()),
        ..Default::default()
    };
    let alpha = PostgresShardStore::connect(&server.url(), of("alpha")).expect("alpha connects");
    alpha
        .activate(3, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    alpha
        .commit(3, EPOCH_A, puts_batch(&[("account-42", "alpha's")]))
        .await
        .expect("commits");
    let error = PostgresShardStore::connect(&server.url(), of("beta"))
        .expect_err("beta must not use alpha's tables");
    assert!(
        matches!(&error, StoreError::PostgresOtherCluster { found, expected, .. }
            if found == "alpha" && expected == "beta"),
        "{error:?}"
    );
    assert!(error.to_string().contains("table_prefix"), "{error}");
    let again = PostgresShardStore::connect(&server.url(), of("alpha")).expect("alpha again");
    let read = again
        .read(3, EPOCH_A, Key::from("account-42"))
        .await
        .expect("reads");
    assert_eq!(read.as_deref(), Some(&b"alpha's"[..]));
}

/// Goal (regression, attack review of issue 18): a least-privilege role (no CREATE on the
/// schema, only SELECT/INSERT/UPDATE/DELETE on tables an administrator created) can run the
/// store, and a schema named after that role (PostgreSQL's default search path puts it first)
/// does not hide the tables. Before, connect always ran CREATE TABLE (refused without CREATE on
/// the schema), and with a role's own schema a restarted node silently created new, empty
/// tables there. Method: the superuser's store creates the tables and commits a value; a role
/// `app` with its own schema and only DML grants connects, reads the value, commits another;
/// no table was created in the role's schema, and the superuser's older activation is fenced.
#[tokio::test]
async fn a_role_without_create_and_with_its_own_schema_uses_the_existing_tables() {
    let server = server();
    let options = PostgresOptions {
        table_prefix: "app_".to_owned(),
        ..Default::default()
    };
    let admin = PostgresShardStore::connect(&server.url(), options.clone()).expect("connects");
    admin
        .activate(4, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    admin
        .commit(4, EPOCH_A, puts_batch(&[("k", "before")]))
        .await
        .expect("commits");
    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .expect("the test connects");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE ROLE app LOGIN;
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             GRANT USAGE ON SCHEMA public TO app;
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.app_shards, public.app_records TO app;
             CREATE SCHEMA app AUTHORIZATION app;",
        )
        .await
        .expect("the test sets up the role");
    let app_url = format!("postgres://app@127.0.0.1:{}/clusterfunk", server.port());
    let app = PostgresShardStore::connect(&app_url, options).expect("the role connects");
    app.activate(4, NODE_B, EPOCH_B, Scope::All)
        .await
        .map(|loaded| assert_eq!(records_text(&loaded), text_map(&[("k", "before")])))
        .expect("the role activates on the existing tables");
    app.commit(4, EPOCH_B, puts_batch(&[("k", "after")]))
        .await
        .expect("the role commits");
    let tables_in_app_schema: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'app'",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .expect("the test counts tables");
    assert_eq!(
        tables_in_app_schema, 0,
        "the role's store created tables of its own"
    );
    drop(client);
    let _ = connection.await;
    let error = admin
        .read(4, EPOCH_A, Key::from("k"))
        .await
        .expect_err("the admin's activation was fenced by the role's");
    assert!(error.is_refusal(), "{error}");
}

/// Goal: connecting to an address where no server runs fails with the typed error that names
/// the server and what to check, and a URL with a password is accepted and never shown.
/// Method: connect to a free loopback port nobody listens on.
#[test]
fn connecting_where_no_server_runs_is_a_typed_error() {
    let reservation = reserve_ports("postgres-nobody", 1).expect("a free port");
    let url = format!(
        "postgres://app:secret-password@127.0.0.1:{}/shards",
        reservation.ports()[0]
    );
    let error = PostgresShardStore::connect(&url, PostgresOptions::default())
        .expect_err("nobody listens there");
    assert!(
        matches!(error, StoreError::PostgresUnreachable { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("app@127.0.0.1:{}/shards", reservation.ports()[0])),
        "{message}"
    );
    assert!(!message.contains("secret-password"), "{message}");
}

/// Goal: nodes that connect at once to a database without the store's tables all succeed (the
/// tables are created once, under the advisory lock), and a table of the store's name with
/// other columns is refused with the typed error. Method: eight threads connect at once with a
/// new prefix, then one store commits and another reads; a table `odd_shards` made by the test
/// with other columns makes a connect with the prefix `odd_` fail.
#[test]
fn nodes_connecting_at_once_create_the_tables_once_and_a_foreign_table_is_refused() {
    let server = server();
    let stores: Vec<PostgresShardStore> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| PostgresShardStore::connect(&server.url(), prefixed("race_"))))
            .collect();
        threads
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .expect("the thread ran")
                    .unwrap_or_else(|e| panic!("a concurrent connect failed: {e}"))
            })
            .collect()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        stores[0]
            .activate(5, NODE_A, EPOCH_A, Scope::All)
            .await
            .expect("activates");
        stores[1]
            .commit(5, EPOCH_A, puts_batch(&[("k", "v")]))
            .await
            .expect("another node's store commits");
        let read = stores[7].read(5, EPOCH_A, Key::from("k")).await;
        assert_eq!(read.expect("reads").as_deref(), Some(&b"v"[..]));
    });

    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .expect("the test connects");
        let connection = tokio::spawn(connection);
        client
            .batch_execute("CREATE TABLE odd_shards (shard integer PRIMARY KEY)")
            .await
            .expect("the test creates a table of its own");
        drop(client);
        let _ = connection.await;
    });
    let error = PostgresShardStore::connect(&server.url(), prefixed("odd_"))
        .expect_err("a foreign table is refused");
    assert!(
        matches!(&error, StoreError::PostgresSchema { table, .. } if table == "odd_shards"),
        "{error:?}"
    );
    assert!(error.to_string().contains("table_prefix"), "{error}");
}

/// Goal: the store's key limit is real: a key at [`PostgresShardStore::KEY_BYTES_MAX`] bytes
/// (random, so PostgreSQL cannot compress it) is stored and read back, one byte more is refused
/// before it reaches the server. Method: commit both, reload.
#[tokio::test]
async fn a_key_at_the_limit_is_stored_and_one_byte_more_is_refused() {
    let server = server();
    let store = connect(&server, "keys_");
    assert_eq!(
        store.key_bytes_max(),
        Some(PostgresShardStore::KEY_BYTES_MAX)
    );
    store
        .activate(6, NODE_A, EPOCH_A, Scope::All)
        .await
        .expect("activates");
    // A xorshift sequence: incompressible bytes, the same on every run.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let longest: Vec<u8> = (0..PostgresShardStore::KEY_BYTES_MAX)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    let mut over = longest.clone();
    over.push(0);
    let mut refused = Batch::new();
    refused.put(over, b"v".to_vec());
    let error = store
        .commit(6, EPOCH_A, refused)
        .await
        .expect_err("one byte over the limit");
    assert!(
        matches!(error, StoreError::KeyTooLong { key_bytes_max, .. } if key_bytes_max == PostgresShardStore::KEY_BYTES_MAX),
        "{error:?}"
    );
    let mut stored = Batch::new();
    stored.put(longest.clone(), b"v".to_vec());
    store
        .commit(6, EPOCH_A, stored)
        .await
        .expect("a key at the limit is stored");
    let read = store
        .read(6, EPOCH_A, Key::from(longest))
        .await
        .expect("reads");
    assert_eq!(read.as_deref(), Some(&b"v"[..]));
}

/// Goal: a row that does not decode is a typed error for its shard alone. Method: the test lets
/// the `owner` column hold NULL and sets it so for shard 7; activating shard 7 fails with
/// `PostgresCorruptRow` naming the shard and the table, while shard 8 activates.
#[tokio::test]
async fn a_corrupt_row_is_a_typed_error_for_its_shard_alone() {
    let server = server();
    let store = connect(&server, "corrupt_");
    for shard in [7, 8] {
        store
            .activate(shard, NODE_A, EPOCH_A, Scope::All)
            .await
            .expect("activates");
    }
    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .expect("the test connects");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "ALTER TABLE corrupt_shards ALTER COLUMN owner DROP NOT NULL;
             UPDATE corrupt_shards SET owner = NULL WHERE shard = 7;",
        )
        .await
        .expect("the test damages the row");
    let error = store
        .activate(7, NODE_B, EPOCH_B, Scope::All)
        .await
        .expect_err("the damaged row does not decode");
    assert!(
        matches!(&error, StoreError::PostgresCorruptRow { shard: 7, table, .. } if table == "corrupt_shards"),
        "{error:?}"
    );
    store
        .activate(8, NODE_B, EPOCH_B, Scope::All)
        .await
        .expect("another shard activates");
    drop(client);
    let _ = connection.await;
}

/// Goal: the store serves callers on any runtime, and a caller's runtime ending does not break
/// it (its connections live on the store's own thread). Method: activate and commit from a
/// current-thread runtime on another thread, which then ends; commit and read from an actix
/// system, then from this test's runtime.
#[test]
fn the_store_serves_callers_on_any_runtime_and_outlives_them() {
    let server = server();
    let store = Arc::new(connect(&server, "runtimes_"));
    let first = store.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            first
                .activate(9, NODE_A, EPOCH_A, Scope::All)
                .await
                .expect("activates");
            first
                .commit(9, EPOCH_A, puts_batch(&[("from", "tokio")]))
                .await
                .expect("commits");
        });
        // The runtime, and every task it had, ends here.
    })
    .join()
    .expect("the first caller's thread ran");
    let second = store.clone();
    std::thread::spawn(move || {
        actix::System::new().block_on(async {
            second
                .commit(9, EPOCH_A, puts_batch(&[("from", "actix")]))
                .await
                .expect("commits from an actix system");
        });
    })
    .join()
    .expect("the actix caller's thread ran");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let read = runtime.block_on(store.read(9, EPOCH_A, Key::from("from")));
    assert_eq!(read.expect("reads").as_deref(), Some(&b"actix"[..]));
}

/// Options with the table prefix `prefix`.
fn prefixed(prefix: &str) -> PostgresOptions {
    PostgresOptions {
        table_prefix: prefix.to_owned(),
        ..Default::default()
    }
}
