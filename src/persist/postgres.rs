//! [`PostgresShardStore`]: a [`ShardStore`] in PostgreSQL, shared by every node of a cluster (its
//! [`Locality`] is [`Shared`](Locality::Shared)), so a shard's state follows it to any new owner,
//! after a planned move and after a crash failover alike.
//!
//! # Tables
//!
//! [`PostgresShardStore::connect`] creates two tables on first use, in the connection's current
//! schema (the first schema of its `search_path`, `public` by default), their names starting
//! with [`PostgresOptions::table_prefix`] (`clusterfunk_` by default):
//!
//! ```sql
//! CREATE TABLE clusterfunk_shards (
//!     shard    bigint PRIMARY KEY, -- the shard id
//!     epoch    bigint NOT NULL,    -- the fence: the newest activation epoch
//!     owner    bigint NOT NULL,    -- the node of that activation
//!     released boolean NOT NULL,   -- whether that activation released the shard
//!     state    bytea               -- the whole-shard record, NULL when there is none
//! );
//! CREATE TABLE clusterfunk_records (
//!     shard bigint NOT NULL,       -- the shard id
//!     key   bytea NOT NULL,        -- the record's key
//!     value bytea NOT NULL,        -- the record's value, as the handler encoded it
//!     PRIMARY KEY (shard, key)
//! );
//! ```
//!
//! A shard has a row in `shards` from its first activation on (rows are never deleted), and a
//! row in `records` per per-key record. Epochs and node ids are `u64`s stored with their bits in
//! a `bigint`, so every value round-trips (values above 2^63 - 1 read negative in SQL); the
//! fencing rules compare them in Rust, never in SQL. The tables are created under a
//! transaction-scoped advisory lock, so nodes connecting at once do not race, and then checked:
//! a table of the same name with other columns is refused ([`StoreError::PostgresSchema`]).
//!
//! # Transactions
//!
//! Every call is one transaction (READ COMMITTED). A commit, a release and an activation first
//! lock the shard's row with `SELECT … FOR UPDATE`, decide with the [`Fence`] rules every store
//! shares, and write the batch and the fence in that same transaction, so a deposed owner's
//! write can never land after a newer activation. An activation reads the shard's records in
//! its transaction while it holds the row, which makes it an atomic load-and-raise. A
//! commit's batch (the changes of every message the shard grouped into it) is applied with a
//! few statements whatever its size: one `INSERT … SELECT … FROM UNNEST(…) ON CONFLICT … DO
//! UPDATE` for the puts and one `DELETE … WHERE key = ANY(…)` for the deletes (per 4096
//! records), pipelined on the connection. A read is one statement that joins the fence and the
//! record, so it sees both at one instant. Calls for different shards run in parallel on the
//! pool's connections; the calls of one shard come one at a time (the framework's rule).
//!
//! # Threads, and when the database is unreachable
//!
//! The store runs its own tokio runtime on one thread, `clusterfunk-postgres`, where the pool's
//! connections live; a call's future hands the work to it and waits for the answer, so the
//! store works from any runtime (an actix arbiter, a test's runtime) and no connection dies when
//! the runtime of a caller stops. Every call has a time limit
//! ([`PostgresOptions::call_timeout`]). When the server cannot be reached, a call fails with
//! [`StoreError::PostgresUnreachable`] (or [`StoreError::PostgresTimeout`]); the shard does not
//! guess: it answers its waiting messages `OutcomeUnknown` and stops serving until an activation
//! reloads it from the store, which succeeds once the server answers again. Connections broken
//! by a restart of the server are dropped by the pool and opened again on the next call.
//!
//! This module does not own the fencing rules ([`Fence`]), the encoding of values, nor TLS: it
//! connects without TLS (a URL with `sslmode=require` is refused), so keep the database on a
//! trusted network or a local socket.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Transaction,
};
use futures_util::future::{self, BoxFuture, FutureExt};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_postgres::config::Host;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tokio_util::task::TaskTracker;

use super::error::StoreError;
use super::fence::{Fence, Origin};
use super::{Batch, Change, Loaded, Locality, Scope, ShardStore};
use crate::shard_map::{Epoch, Key, NodeId, ShardId};
use crate::storage::{StorageError, Verb};

/// Name of the store's runtime thread, as shown by `top -H`, debuggers and panic messages.
const RUNTIME_THREAD_NAME: &str = "clusterfunk-postgres";

/// Records written by one statement at most.
const RECORDS_PER_STATEMENT_MAX: usize = 4096;

/// Bytes of keys and values one statement carries at most (a single larger record goes alone),
/// so that no message to the server nears PostgreSQL's limit of 1 GiB per message however large
/// a batch is: a large group commit was refused by the server as an invalid message length.
const BYTES_PER_STATEMENT_MAX: usize = 64 << 20;

/// Splits `puts` into runs of at most [`RECORDS_PER_STATEMENT_MAX`] records and
/// [`BYTES_PER_STATEMENT_MAX`] bytes (a record larger than that forms a run alone).
fn statement_runs(puts: &[(Key, Bytes)]) -> Vec<&[(Key, Bytes)]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (index, (key, value)) in puts.iter().enumerate() {
        let size = key.as_bytes().len() + value.len();
        let full = index - start >= RECORDS_PER_STATEMENT_MAX
            || (index > start && bytes + size > BYTES_PER_STATEMENT_MAX);
        if full {
            runs.push(&puts[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < puts.len() {
        runs.push(&puts[start..]);
    }
    runs
}

/// Times an activation looks for the shard's row: a second look is needed only when another
/// activation inserted the row between this one's look and its insert.
const ACTIVATE_ATTEMPTS_MAX: usize = 3;

/// The longest table prefix: PostgreSQL truncates identifiers at 63 bytes, and the longest
/// table name adds `records`.
const TABLE_PREFIX_BYTES_MAX: usize = 63 - "records".len();

/// Connections the pool opens at most, whatever the options say.
const CONNECTIONS_MAX: usize = 1024;

/// The options of a [`PostgresShardStore`]. Build it with `..Default::default()`; every field
/// has a sane default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The prefix of the store's table names (`PREFIX` + `shards` and `records`), so several
    /// stores (clusters, or tests) can share a database. Lower-case ASCII letters, digits and
    /// `_`, not starting with a digit, at most 56 bytes. Default: `clusterfunk_`.
    pub table_prefix: String,
    /// The schema of the store's tables. Every statement names it, so the tables do not depend
    /// on the connection's search path (a schema named after the role, created later by an
    /// administrator, would otherwise hide the tables from nodes restarted after it). The same
    /// rules as `table_prefix`, at most 63 bytes. Default: `public`.
    pub schema: String,
    /// The cluster the tables belong to (a cluster's name). When set, the first store to
    /// connect records it in the table `PREFIX` + `cluster`, and a store of another cluster is
    /// refused at connect with [`StoreError::PostgresOtherCluster`], so two clusters pointed at
    /// one database by mistake cannot overwrite each other's values. Default: not checked.
    pub cluster: Option<String>,
    /// Connections the pool opens at most: how many calls (for different shards) run at once;
    /// further calls wait for a free connection. 1 to 1024. Default: 8.
    pub connections_max: usize,
    /// How long opening one connection may take. Default: 5 s.
    pub connect_timeout: Duration,
    /// How long one call may take in all: waiting for a connection, opening it, and its whole
    /// transaction. A call past it fails with [`StoreError::PostgresTimeout`]; a commit's
    /// outcome is then unknown. Also how long dropping the store waits for calls in flight.
    /// Default: 30 s.
    pub call_timeout: Duration,
    /// How long a statement of this store waits for a row lock before it fails (PostgreSQL's
    /// `lock_timeout` on the store's connections). A new owner activating a shard whose old
    /// owner froze in a transaction waits at most this long per attempt, and its connection is
    /// free again afterwards; keep it below `call_timeout`, or a call that times out leaves its
    /// statement waiting on a connection that goes back to the pool. Default: 10 s.
    pub lock_timeout: Duration,
    /// How long the server lets a connection of this store sit idle inside an open transaction
    /// before it ends the session and rolls the transaction back (PostgreSQL's
    /// `idle_in_transaction_session_timeout`): a node frozen (SIGSTOP, a paused VM) or cut off in
    /// the middle of a commit then releases its shard's row lock after this long instead of
    /// holding it until TCP notices, so the shard's new owner can load it. A commit that sits
    /// that long was never acknowledged. Default: 5 s.
    pub idle_in_transaction_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            table_prefix: "clusterfunk_".to_owned(),
            schema: "public".to_owned(),
            cluster: None,
            connections_max: 8,
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresOptions {
    /// The server settings every connection of the store starts with (PostgreSQL's `options`
    /// connection parameter, after any the URL gives): `lock_timeout`,
    /// `idle_in_transaction_session_timeout` and `statement_timeout` (a second above the call
    /// timeout: the call gives up first, and a statement it left behind ends soon after).
    pub fn session_settings(&self) -> String {
        format!(
            "-c lock_timeout={} -c idle_in_transaction_session_timeout={} -c statement_timeout={}",
            self.lock_timeout.as_millis(),
            self.idle_in_transaction_timeout.as_millis(),
            self.call_timeout.as_millis() + 1000,
        )
    }

    /// Checks the options; the error says which one is wrong and how to fix it.
    pub fn validate(&self) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidOptions {
            source: StorageError::InvalidOptions { reason },
        };
        let prefix = &self.table_prefix;
        let well_formed = prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !prefix.starts_with(|c: char| c.is_ascii_digit());
        if !well_formed || prefix.len() > TABLE_PREFIX_BYTES_MAX {
            return Err(invalid(format!(
                "table_prefix {prefix:?} is not a plain SQL name: use lower-case ASCII letters, digits and `_`, not starting with a digit, at most {TABLE_PREFIX_BYTES_MAX} bytes (default clusterfunk_)"
            )));
        }
        let schema = &self.schema;
        let plain = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        };
        if !plain(schema) || schema.len() > 63 {
            return Err(invalid(format!(
                "schema {schema:?} is not a plain SQL name: use lower-case ASCII letters, digits and `_`, not starting with a digit, at most 63 bytes (default public)"
            )));
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections_max) {
            return Err(invalid(format!(
                "connections_max is {}: use 1 to {CONNECTIONS_MAX} (default 8)",
                self.connections_max
            )));
        }
        if self.connect_timeout.is_zero() || self.call_timeout.is_zero() {
            return Err(invalid(
                "connect_timeout and call_timeout must be above zero (defaults 5 s and 30 s)"
                    .to_owned(),
            ));
        }
        if self.lock_timeout.as_millis() < 1 || self.idle_in_transaction_timeout.as_millis() < 1 {
            return Err(invalid(format!(
                "lock_timeout ({:?}) and idle_in_transaction_timeout ({:?}) must be at least 1 ms (defaults 10 s and 5 s)",
                self.lock_timeout, self.idle_in_transaction_timeout
            )));
        }
        Ok(())
    }
}

/// A [`ShardStore`] in PostgreSQL, shared by every node that connects to the same database with
/// the same table prefix (its [`Locality`] is [`Shared`](Locality::Shared)). See the module
/// docs for its tables and transactions. Cheap to clone: clones share the pool and the runtime
/// thread. Dropping the last clone waits for the calls in flight (each within
/// [`PostgresOptions::call_timeout`]), then stops the thread and closes the connections.
#[derive(Clone)]
pub struct PostgresShardStore {
    inner: Arc<Inner>,
}

/// The owner of the runtime thread: dropping it stops the thread.
struct Inner {
    /// What every call needs.
    shared: Arc<Shared>,
    /// The runtime the calls run on.
    runtime: Handle,
    /// The calls in flight, which a drop of the store waits for.
    calls: TaskTracker,
    /// Tells the runtime thread to stop (taken by the drop).
    stop: Option<oneshot::Sender<()>>,
    /// The runtime thread (taken by the drop, which joins it).
    thread: Option<thread::JoinHandle<()>>,
}

/// What a call needs, shared by the calls in flight.
struct Shared {
    /// The connections.
    pool: Pool,
    /// The server as `USER@HOST:PORT/DATABASE`, for error messages.
    server: String,
    /// The time limit of one call.
    call_timeout: Duration,
    /// The time limit of opening one connection.
    connect_timeout: Duration,
    /// The tables' names.
    tables: Tables,
    /// The statements, with the tables' names filled in.
    sql: Statements,
}

/// The store's table names, with its prefix.
struct Tables {
    /// The schema both tables live in.
    schema: String,
    /// Each shard's fence and whole-shard record.
    shards: String,
    /// The per-key records.
    records: String,
}

impl Tables {
    /// The two tables' names qualified with their schema, as the SQL uses them (never through
    /// the search path, which a role's own schema would change under a running cluster).
    fn qualified(&self) -> (String, String) {
        let Tables {
            schema,
            shards,
            records,
        } = self;
        (format!("{schema}.{shards}"), format!("{schema}.{records}"))
    }
}

/// Which of the store's tables an error is about.
#[derive(Clone, Copy)]
enum Table {
    /// The `shards` table.
    Shards,
    /// The `records` table.
    Records,
}

/// The SQL of every call, built once with the table names.
struct Statements {
    /// Locks a shard's row and reads its fence and whole-shard record.
    lock_with_state: String,
    /// Locks a shard's row and reads its fence.
    lock: String,
    /// Reads a shard's fence.
    fence: String,
    /// Inserts a shard's row at its first activation, unless another activation just did.
    insert_shard: String,
    /// Writes a shard's fence.
    update_fence: String,
    /// Writes (or, with NULL, deletes) a shard's whole-shard record.
    update_state: String,
    /// Reads every per-key record of a shard.
    load_records: String,
    /// Writes per-key records.
    put_records: String,
    /// Deletes per-key records.
    delete_records: String,
    /// Reads a shard's fence and one per-key record.
    read_record: String,
}

impl Statements {
    fn new(tables: &Tables) -> Self {
        let (shards, records) = tables.qualified();
        Statements {
            lock_with_state: format!(
                "SELECT epoch, owner, released, state FROM {shards} WHERE shard = $1 FOR UPDATE"
            ),
            lock: format!(
                "SELECT epoch, owner, released FROM {shards} WHERE shard = $1 FOR UPDATE"
            ),
            fence: format!("SELECT epoch, owner, released FROM {shards} WHERE shard = $1"),
            insert_shard: format!(
                "INSERT INTO {shards} (shard, epoch, owner, released) VALUES ($1, $2, $3, false) \
                 ON CONFLICT (shard) DO NOTHING"
            ),
            update_fence: format!(
                "UPDATE {shards} SET epoch = $2, owner = $3, released = $4 WHERE shard = $1"
            ),
            update_state: format!("UPDATE {shards} SET state = $2 WHERE shard = $1"),
            load_records: format!("SELECT key, value FROM {records} WHERE shard = $1"),
            put_records: format!(
                "INSERT INTO {records} (shard, key, value) \
                 SELECT $1, k, v FROM UNNEST($2::bytea[], $3::bytea[]) AS t(k, v) \
                 ON CONFLICT (shard, key) DO UPDATE SET value = EXCLUDED.value"
            ),
            delete_records: format!(
                "DELETE FROM {records} WHERE shard = $1 AND key = ANY($2::bytea[])"
            ),
            read_record: format!(
                "SELECT s.epoch, s.owner, s.released, r.value FROM {shards} s \
                 LEFT JOIN {records} r ON r.shard = s.shard AND r.key = $2 WHERE s.shard = $1"
            ),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The runtime thread lets the calls in flight finish (each within its time limit), then
        // drops the runtime, which closes the connections.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The calls hold `Shared`, never `Inner`, so the last store cannot be dropped on the
            // runtime thread itself; the check keeps a future change from deadlocking here.
            if thread.thread().id() != thread::current().id() && thread.join().is_err() {
                tracing::error!("the PostgreSQL shard store's runtime thread panicked");
            }
        }
    }
}

impl fmt::Debug for PostgresShardStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresShardStore")
            .field("server", &self.inner.shared.server)
            .field("shards_table", &self.inner.shared.tables.shards)
            .finish()
    }
}

impl PostgresShardStore {
    /// The longest key a [`Batch`] may hold for this store; longer ones are refused with
    /// [`StoreError::KeyTooLong`]. PostgreSQL's B-tree index entries hold at most 2704 bytes
    /// (with 8 kB pages), of which the primary key's shard id and headers use 20: this leaves a
    /// margin below the 2684 that fit.
    pub const KEY_BYTES_MAX: usize = 2560;

    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`,
    /// or the key-value form `host=… user=… dbname=…`), starts the store's runtime thread,
    /// creates the store's tables if they are missing and checks them.
    ///
    /// Blocking (it waits for the server): call it at start-up or from a blocking context. It
    /// fails with [`StoreError::PostgresUnreachable`] when the server cannot be reached, with
    /// [`StoreError::Postgres`] when the server refuses (login, missing database, privileges),
    /// and with [`StoreError::PostgresSchema`] when a table of the store's name has other
    /// columns.
    pub fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        options.validate()?;
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|source| StoreError::PostgresUrl {
                source: Arc::new(source),
            })?;
        // Server-side limits, so that a frozen or cut-off node cannot hold a shard's row lock
        // (or a connection of another node's pool) for longer than these: the server ends a
        // session idle inside a transaction, and a statement waiting for a lock fails.
        let limits = options.session_settings();
        let server_options = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {limits}"),
            _ => limits,
        };
        config
            .connect_timeout(options.connect_timeout)
            .application_name("clusterfunk")
            .options(server_options)
            // A server that vanished without a reset (a partition) is noticed in seconds.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        if config.get_ssl_mode() == SslMode::Require {
            return Err(StoreError::InvalidOptions {
                source: StorageError::InvalidOptions {
                    reason: "the PostgreSQL URL asks for TLS (sslmode=require), which this store does not support yet: connect over a trusted network or a local socket, without sslmode=require".to_owned(),
                },
            });
        }
        let server = describe(&config);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A connection the server closed (a restart) is dropped, not handed out.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.connections_max)
            .create_timeout(Some(options.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime and no hooks builds");
        let tables = Tables {
            schema: options.schema.clone(),
            shards: format!("{}shards", options.table_prefix),
            records: format!("{}records", options.table_prefix),
        };
        let shared = Arc::new(Shared {
            pool,
            server,
            call_timeout: options.call_timeout,
            connect_timeout: options.connect_timeout,
            sql: Statements::new(&tables),
            tables,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StoreError::SpawnThread {
                source: Arc::new(source),
            })?;
        let handle = runtime.handle().clone();
        let calls = TaskTracker::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let drain = (calls.clone(), options.call_timeout);
        let thread = thread::Builder::new()
            .name(RUNTIME_THREAD_NAME.to_owned())
            .spawn(move || {
                let (calls, call_timeout) = drain;
                runtime.block_on(async move {
                    // A dropped sender means the same as a sent stop.
                    let _ = stopped.await;
                    calls.close();
                    // Each call ends within its time limit; the rest is for its rollback.
                    let drain_timeout = call_timeout + Duration::from_secs(1);
                    if tokio::time::timeout(drain_timeout, calls.wait())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            "the PostgreSQL shard store closed with calls still in flight"
                        );
                    }
                });
            })
            .map_err(|source| StoreError::SpawnThread {
                source: Arc::new(source),
            })?;
        let store = PostgresShardStore {
            inner: Arc::new(Inner {
                shared,
                runtime: handle,
                calls,
                stop: Some(stop),
                thread: Some(thread),
            }),
        };
        // Wait on this thread for the set-up that runs on the store's thread; a std channel,
        // since this may be called from inside another runtime.
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let prefix = options.table_prefix.clone();
        let cluster = options.cluster.clone();
        store.inner.calls.spawn_on(
            {
                let shared = store.inner.shared.clone();
                async move {
                    let outcome =
                        shared.call(|client, shared| set_up(client, shared, prefix, cluster));
                    let _ = sender.send(outcome.await);
                }
            },
            &store.inner.runtime,
        );
        receiver.recv().map_err(|_| StoreError::Closed)??;
        let (shards, records) = store.inner.shared.tables.qualified();
        tracing::info!(
            server = %store.inner.shared.server,
            %shards,
            %records,
            "connected the PostgreSQL shard store"
        );
        Ok(store)
    }

    /// The server, as `USER@HOST:PORT/DATABASE` (never the password).
    pub fn server(&self) -> &str {
        &self.inner.shared.server
    }

    /// The shard's fence, if it was ever activated: for operators and tests that check what the
    /// store recorded. Reads without a lock.
    pub fn fence(&self, shard: ShardId) -> BoxFuture<'static, Result<Option<Fence>, StoreError>> {
        self.run(move |client, shared| async move { shared.fence(&client, shard).await })
    }

    /// Runs `work` with a pooled connection on the store's runtime, and hands its result to
    /// whoever awaits the returned future, on whatever runtime.
    fn run<T, F, Fut>(&self, work: F) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(Object, Arc<Shared>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let shared = self.inner.shared.clone();
        let runtime = self.inner.runtime.clone();
        let calls = self.inner.calls.clone();
        async move {
            let call = calls.spawn_on(shared.call(work), &runtime);
            // The task is gone only if the runtime stopped (the store was dropped) or it
            // panicked (a bug): either way the outcome is unknown.
            call.await.map_err(|_| StoreError::Closed)?
        }
        .boxed()
    }
}

impl Shared {
    /// Takes a connection from the pool and runs `work` with it, all within the call's time
    /// limit.
    async fn call<T, F, Fut>(self: Arc<Self>, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(Object, Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let timed_out = |waiting_for| StoreError::PostgresTimeout {
            server: self.server.clone(),
            waiting_for,
            timeout: self.call_timeout,
        };
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(self.pool_error(error)),
            Err(_) => return Err(timed_out("a connection of the pool")),
        };
        tokio::time::timeout_at(deadline, work(client, self.clone()))
            .await
            .unwrap_or_else(|_| Err(timed_out("an answer")))
    }

    /// The error of a failed `pool.get()`.
    fn pool_error(&self, error: PoolError) -> StoreError {
        match error {
            PoolError::Backend(source) => {
                self.error_on("a connection".to_owned(), Verb::Open, source)
            }
            PoolError::Timeout(_) => StoreError::PostgresTimeout {
                server: self.server.clone(),
                waiting_for: "a new connection",
                timeout: self.connect_timeout,
            },
            // The pool is never closed while a call runs, and has a runtime and no hooks.
            PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                StoreError::Closed
            }
        }
    }

    /// The error of a failed statement on `table`.
    fn error(&self, table: Table, verb: Verb, source: tokio_postgres::Error) -> StoreError {
        let name = match table {
            Table::Shards => &self.tables.shards,
            Table::Records => &self.tables.records,
        };
        self.error_on(format!("table {name}"), verb, source)
    }

    /// The error of a failed statement on `target`: unreachable when the connection could not
    /// be opened or broke, else the server's answer with a hint.
    fn error_on(&self, target: String, verb: Verb, source: tokio_postgres::Error) -> StoreError {
        let unreachable = match source.code() {
            Some(code) => is_connection_failure(code),
            None => is_network_failure(&source),
        };
        if unreachable {
            return StoreError::PostgresUnreachable {
                server: self.server.clone(),
                reason: reason(&source),
                source: Arc::new(source),
            };
        }
        StoreError::Postgres {
            server: self.server.clone(),
            target,
            verb,
            reason: reason(&source),
            hint: hint_for(source.code()),
            source: Arc::new(source),
        }
    }

    /// A corrupt row of `shard` in `table`.
    fn corrupt(&self, table: Table, shard: ShardId, source: tokio_postgres::Error) -> StoreError {
        StoreError::PostgresCorruptRow {
            shard,
            table: match table {
                Table::Shards => self.tables.shards.clone(),
                Table::Records => self.tables.records.clone(),
            },
            source: Arc::new(source),
        }
    }

    /// The fence in the first three columns of a `shards` row.
    fn decode_fence(&self, row: &Row, shard: ShardId) -> Result<Fence, StoreError> {
        let corrupt = |e| self.corrupt(Table::Shards, shard, e);
        Ok(Fence {
            epoch: from_stored(row.try_get("epoch").map_err(corrupt)?),
            owner: from_stored(row.try_get("owner").map_err(corrupt)?),
            released: row.try_get("released").map_err(corrupt)?,
        })
    }
}

/// Whether a SQLSTATE says the connection failed rather than the statement: connection
/// exceptions (class 08), the server shutting down or starting (57P01–57P03), and too many
/// connections (53300).
fn is_connection_failure(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
}

/// An error in words: tokio-postgres shows a server's error as `db error` alone, so its message
/// and SQLSTATE are taken from the error the server sent.
fn reason(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "{} {}: {}{}",
            db.severity(),
            db.code().code(),
            db.message(),
            db.detail()
                .map(|detail| format!(" ({detail})"))
                .unwrap_or_default()
        ),
        None => error.to_string(),
    }
}

/// Whether an error without SQLSTATE is the network's: the connection closed, an I/O error
/// (refused, reset, unreachable host), or tokio-postgres's own connect timeout. Other errors
/// without SQLSTATE (a login the client cannot make, a value that does not convert) are not.
fn is_network_failure(error: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    error.is_closed()
        || error
            .source()
            .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
        // The connect timeout's kind is private; its message is the one public trace of it.
        || error.to_string().starts_with("timeout waiting for server")
}

/// What the operator should check, from the server's SQLSTATE.
fn hint_for(code: Option<&SqlState>) -> &'static str {
    let Some(code) = code else {
        return "see the server's log; the shard reloads from the store before it serves again";
    };
    if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        "check the user and password in the store's URL and the server's pg_hba.conf"
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        "the database does not exist: create it (createdb NAME) or fix its name in the store's URL"
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        "grant the store's user CREATE on the schema and SELECT, INSERT, UPDATE and DELETE on the store's tables"
    } else if *code == SqlState::UNDEFINED_TABLE {
        "the store's tables are missing (dropped after the store connected?): connect the store again, which creates them"
    } else if code.code().starts_with("53") {
        "the server is out of resources (disk, memory or connections): free some, or lower connections_max"
    } else if *code == SqlState::QUERY_CANCELED {
        "a statement timeout or an operator cancelled the call: raise the server's statement_timeout for the store's user"
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        "the server is a read-only standby: point the store's URL at the primary"
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
    {
        "another transaction conflicted with this one: the shard reloads and goes on"
    } else {
        "see the server's log; the shard reloads from the store before it serves again"
    }
}

/// `USER@HOST:PORT/DATABASE` of a connection config, without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config
                .get_ports()
                .get(i)
                .or(config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("?"),
        match hosts.is_empty() {
            true => "localhost:5432".to_owned(),
            false => hosts.join(","),
        },
        config.get_dbname().or(config.get_user()).unwrap_or("?")
    )
}

/// A `u64` (epoch, node id) as the `bigint` that stores its bits.
fn to_stored(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

/// The `u64` whose bits a `bigint` stores.
fn from_stored(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

/// The columns the store's tables must have: name, type (as `information_schema` spells it)
/// and whether it may be NULL.
const SHARDS_COLUMNS: [(&str, &str, bool); 5] = [
    ("shard", "bigint", false),
    ("epoch", "bigint", false),
    ("owner", "bigint", false),
    ("released", "boolean", false),
    ("state", "bytea", true),
];

/// See [`SHARDS_COLUMNS`].
const RECORDS_COLUMNS: [(&str, &str, bool); 3] = [
    ("shard", "bigint", false),
    ("key", "bytea", false),
    ("value", "bytea", false),
];

/// Records `cluster` as the owner of the store's tables in `PREFIX` + `cluster` (created when
/// missing) or checks that it is the one recorded, inside the set-up's transaction.
async fn claim(
    txn: &tokio_postgres::Transaction<'_>,
    shared: &Shared,
    schema: &str,
    prefix: &str,
    cluster: &str,
) -> Result<(), StoreError> {
    let name = format!("{prefix}cluster");
    let table = format!("{schema}.{name}");
    let target = format!("table {table}");
    let failed = |verb| {
        let target = target.clone();
        move |e| shared.error_on(target, verb, e)
    };
    let exists = txn
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .and_then(|row| row.try_get::<_, bool>(0))
        .map_err(failed(Verb::Read))?;
    if !exists {
        txn.batch_execute(&format!("CREATE TABLE {table} (name text NOT NULL)"))
            .await
            .map_err(failed(Verb::Open))?;
    }
    let rows = txn
        .query(&format!("SELECT name FROM {table}"), &[])
        .await
        .map_err(failed(Verb::Read))?;
    match rows.first() {
        None => {
            txn.execute(
                &format!("INSERT INTO {table} (name) VALUES ($1)"),
                &[&cluster],
            )
            .await
            .map_err(failed(Verb::Write))?;
            Ok(())
        }
        Some(row) => {
            let found: String = row.try_get(0).map_err(failed(Verb::Read))?;
            match found == cluster {
                true => Ok(()),
                false => Err(StoreError::PostgresOtherCluster {
                    table,
                    found,
                    expected: cluster.to_owned(),
                }),
            }
        }
    }
}

/// Creates the store's tables if they are missing, under an advisory lock held until the
/// transaction ends (so nodes connecting at once do not race on the catalog), then checks their
/// columns.
async fn set_up(
    mut client: Object,
    shared: Arc<Shared>,
    prefix: String,
    cluster: Option<String>,
) -> Result<(), StoreError> {
    let failed = |verb| {
        let shared = &shared;
        move |e| shared.error_on("the store's tables".to_owned(), verb, e)
    };
    let Tables {
        schema,
        shards: shards_name,
        records: records_name,
    } = &shared.tables;
    let (shards, records) = shared.tables.qualified();
    let txn = client.transaction().await.map_err(failed(Verb::Begin))?;
    // One lock per prefix: stores of other prefixes set up independently.
    let lock = to_stored(xxhash_rust::xxh3::xxh3_64(
        format!("clusterfunk shard store {prefix}").as_bytes(),
    ));
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .map_err(failed(Verb::Open))?;
    let columns = "SELECT table_name::text, column_name::text, data_type::text, \
                   is_nullable::text = 'YES' FROM information_schema.columns \
                   WHERE table_schema = $2 AND table_name::text = ANY($1)";
    let names = vec![shards_name.as_str(), records_name.as_str()];
    let mut rows = txn
        .query(columns, &[&names, schema])
        .await
        .map_err(failed(Verb::Read))?;
    let has = |rows: &[tokio_postgres::Row], table: &str| {
        rows.iter()
            .any(|row| row.try_get::<_, String>(0).is_ok_and(|name| name == table))
    };
    // Created only when missing, so that a role without CREATE on the schema can use tables
    // that an administrator created beforehand (the guide gives the SQL).
    if !(has(&rows, shards_name) && has(&rows, records_name)) {
        txn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {shards} (
             shard bigint PRIMARY KEY,
             epoch bigint NOT NULL,
             owner bigint NOT NULL,
             released boolean NOT NULL,
             state bytea
         );
         CREATE TABLE IF NOT EXISTS {records} (
             shard bigint NOT NULL,
             key bytea NOT NULL,
             value bytea NOT NULL,
             PRIMARY KEY (shard, key)
         );"
        ))
        .await
        .map_err(failed(Verb::Open))?;
        rows = txn
            .query(columns, &[&names, schema])
            .await
            .map_err(failed(Verb::Read))?;
    }
    if let Some(cluster) = &cluster {
        claim(&txn, &shared, schema, &prefix, cluster).await?;
    }
    txn.commit().await.map_err(failed(Verb::Commit))?;
    let mut found: BTreeMap<(String, String), (String, bool)> = BTreeMap::new();
    for row in rows {
        let column = (|| -> Result<_, tokio_postgres::Error> {
            Ok((
                (row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?),
                (row.try_get::<_, String>(2)?, row.try_get::<_, bool>(3)?),
            ))
        })()
        .map_err(failed(Verb::Read))?;
        found.insert(column.0, column.1);
    }
    for (table, columns) in [
        (shards_name, &SHARDS_COLUMNS[..]),
        (records_name, &RECORDS_COLUMNS[..]),
    ] {
        for &(name, kind, nullable) in columns {
            let problem = match found.get(&(table.clone(), name.to_owned())) {
                None => format!("it has no column {name}"),
                Some((found_kind, _)) if found_kind != kind => {
                    format!("its column {name} is of type {found_kind}, not {kind}")
                }
                Some((_, found_nullable)) if *found_nullable && !nullable => {
                    format!("its column {name} may be NULL")
                }
                Some(_) => continue,
            };
            return Err(StoreError::PostgresSchema {
                table: table.clone(),
                problem,
            });
        }
    }
    Ok(())
}

/// Runs `sql` on the transaction as a statement prepared once per connection (a cached
/// statement saves a round trip per call).
async fn query_opt(
    txn: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = txn.prepare_cached(sql).await?;
    txn.query_opt(&statement, params).await
}

/// See [`query_opt`].
async fn execute(
    txn: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = txn.prepare_cached(sql).await?;
    txn.execute(&statement, params).await
}

/// The first statement of a call that runs outside a transaction: prepared once per connection.
async fn query_opt_outside(
    client: &Object,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.query_opt(&statement, params).await
}

impl Shared {
    /// Starts a call's transaction.
    async fn begin<'a>(&self, client: &'a mut Object) -> Result<Transaction<'a>, StoreError> {
        client
            .transaction()
            .await
            .map_err(|e| self.error(Table::Shards, Verb::Begin, e))
    }

    /// Commits a call's transaction.
    async fn commit(&self, txn: Transaction<'_>) -> Result<(), StoreError> {
        txn.commit()
            .await
            .map_err(|e| self.error(Table::Shards, Verb::Commit, e))
    }

    /// Rolls back a call's transaction after the fence refused the call, so the connection
    /// goes back to the pool clean, and returns the refusal.
    async fn refuse<T>(&self, txn: Transaction<'_>, refusal: StoreError) -> Result<T, StoreError> {
        txn.rollback()
            .await
            .map_err(|e| self.error(Table::Shards, Verb::Commit, e))?;
        Err(refusal)
    }

    /// Locks the shard's row and reads its fence (`None`: never activated).
    async fn lock_fence(
        &self,
        txn: &Transaction<'_>,
        shard: ShardId,
    ) -> Result<Option<Fence>, StoreError> {
        query_opt(txn, &self.sql.lock, &[&i64::from(shard)])
            .await
            .map_err(|e| self.error(Table::Shards, Verb::Read, e))?
            .map(|row| self.decode_fence(&row, shard))
            .transpose()
    }

    /// Writes the shard's fence (its row exists).
    async fn write_fence(
        &self,
        txn: &Transaction<'_>,
        shard: ShardId,
        fence: Fence,
    ) -> Result<(), StoreError> {
        execute(
            txn,
            &self.sql.update_fence,
            &[
                &i64::from(shard),
                &to_stored(fence.epoch),
                &to_stored(fence.owner),
                &fence.released,
            ],
        )
        .await
        .map(drop)
        .map_err(|e| self.error(Table::Shards, Verb::Write, e))
    }

    /// [`ShardStore::activate`], in one transaction.
    async fn activate(
        &self,
        mut client: Object,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> Result<Loaded, StoreError> {
        let txn = self.begin(&mut client).await?;
        let id = i64::from(shard);
        let mut found = None;
        for _ in 0..ACTIVATE_ATTEMPTS_MAX {
            let row = query_opt(&txn, &self.sql.lock_with_state, &[&id])
                .await
                .map_err(|e| self.error(Table::Shards, Verb::Read, e))?;
            if row.is_some() {
                found = row;
                break;
            }
            // Never activated: the rules accept any first activation.
            let fence = Fence::activate(None, shard, owner, epoch)?;
            let inserted = execute(
                &txn,
                &self.sql.insert_shard,
                &[&id, &to_stored(fence.epoch), &to_stored(fence.owner)],
            )
            .await
            .map_err(|e| self.error(Table::Shards, Verb::Write, e))?;
            if inserted == 1 {
                self.commit(txn).await?;
                return Ok(Loaded::empty(Origin::New));
            }
            // Another activation inserted the row since the look above and committed (the
            // insert waited for it): look again, which locks that row.
        }
        let Some(row) = found else {
            // Rows are never deleted, so the second look finds the row another activation
            // inserted.
            return Err(StoreError::backend(std::io::Error::other(format!(
                "the row of shard {shard} in {} vanished while the shard activated: another program deletes the store's rows; stop it",
                self.tables.shards
            ))));
        };
        let previous = self.decode_fence(&row, shard)?;
        let state: Option<Vec<u8>> = row
            .try_get("state")
            .map_err(|e| self.corrupt(Table::Shards, shard, e))?;
        let fence = match Fence::activate(Some(previous), shard, owner, epoch) {
            Ok(fence) => fence,
            Err(refusal) => return self.refuse(txn, refusal).await,
        };
        let mut loaded = Loaded::empty(Origin::shared(Some(previous)));
        loaded.state = state.map(Bytes::from);
        if scope == Scope::All {
            let statement = txn
                .prepare_cached(&self.sql.load_records)
                .await
                .map_err(|e| self.error(Table::Records, Verb::Read, e))?;
            let rows = txn
                .query(&statement, &[&id])
                .await
                .map_err(|e| self.error(Table::Records, Verb::Read, e))?;
            let corrupt = |e| self.corrupt(Table::Records, shard, e);
            for row in rows {
                let key: Vec<u8> = row.try_get("key").map_err(corrupt)?;
                let value: Vec<u8> = row.try_get("value").map_err(corrupt)?;
                loaded.records.insert(Key::from(key), Bytes::from(value));
            }
        }
        self.write_fence(&txn, shard, fence).await?;
        self.commit(txn).await?;
        Ok(loaded)
    }

    /// [`ShardStore::read`], in one statement: the fence and the record as of one instant.
    async fn read(
        &self,
        client: Object,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> Result<Option<Bytes>, StoreError> {
        let row = query_opt_outside(
            &client,
            &self.sql.read_record,
            &[&i64::from(shard), &key.as_bytes()],
        )
        .await
        .map_err(|e| self.error(Table::Records, Verb::Read, e))?;
        let fence = row
            .as_ref()
            .map(|row| self.decode_fence(row, shard))
            .transpose()?;
        Fence::check_commit(fence, shard, epoch)?;
        let value: Option<Vec<u8>> = match &row {
            Some(row) => row
                .try_get("value")
                .map_err(|e| self.corrupt(Table::Records, shard, e))?,
            None => None,
        };
        Ok(value.map(Bytes::from))
    }

    /// [`ShardStore::commit`], in one transaction: lock the fence, decide, write the batch.
    async fn commit_batch(
        &self,
        mut client: Object,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> Result<(), StoreError> {
        let id = i64::from(shard);
        if batch.is_empty() {
            // Nothing to write: a look at the fence answers whether the activation is current.
            let fence = self.fence(&client, shard).await?;
            return Fence::check_commit(fence, shard, epoch);
        }
        let txn = self.begin(&mut client).await?;
        let fence = self.lock_fence(&txn, shard).await?;
        if let Err(refusal) = Fence::check_commit(fence, shard, epoch) {
            return self.refuse(txn, refusal).await;
        }
        let (state, records) = batch.into_parts();
        let mut puts: Vec<(Key, Bytes)> = Vec::new();
        let mut deletes: Vec<Key> = Vec::new();
        for (key, change) in records {
            match change {
                Change::Put(value) => puts.push((key, value)),
                Change::Delete => deletes.push(key),
            }
        }
        // Each statement below touches rows no other one does, so their order does not matter:
        // they are sent at once (pipelined on the connection) and the commit waits for all.
        let state_write = async {
            let value: Option<&[u8]> = match &state {
                Some(Change::Put(value)) => Some(value),
                Some(Change::Delete) => None,
                None => return Ok(()),
            };
            execute(&txn, &self.sql.update_state, &[&id, &value])
                .await
                .map(drop)
                .map_err(|e| self.error(Table::Shards, Verb::Write, e))
        };
        let put_writes = statement_runs(&puts).into_iter().map(|chunk| {
            let keys: Vec<&[u8]> = chunk.iter().map(|(key, _)| key.as_bytes()).collect();
            let values: Vec<&[u8]> = chunk.iter().map(|(_, value)| &value[..]).collect();
            let txn = &txn;
            async move {
                execute(txn, &self.sql.put_records, &[&id, &keys, &values])
                    .await
                    .map(drop)
                    .map_err(|e| self.error(Table::Records, Verb::Write, e))
            }
        });
        let delete_writes = deletes.chunks(RECORDS_PER_STATEMENT_MAX).map(|chunk| {
            let keys: Vec<&[u8]> = chunk.iter().map(Key::as_bytes).collect();
            let txn = &txn;
            async move {
                execute(txn, &self.sql.delete_records, &[&id, &keys])
                    .await
                    .map(drop)
                    .map_err(|e| self.error(Table::Records, Verb::Delete, e))
            }
        });
        future::try_join3(
            state_write,
            future::try_join_all(put_writes),
            future::try_join_all(delete_writes),
        )
        .await?;
        self.commit(txn).await
    }

    /// [`ShardStore::release`], in one transaction.
    async fn release(
        &self,
        mut client: Object,
        shard: ShardId,
        epoch: Epoch,
    ) -> Result<(), StoreError> {
        let txn = self.begin(&mut client).await?;
        let previous = self.lock_fence(&txn, shard).await?;
        let fence = match Fence::release(previous, shard, epoch) {
            Ok(fence) => fence,
            Err(refusal) => return self.refuse(txn, refusal).await,
        };
        self.write_fence(&txn, shard, fence).await?;
        self.commit(txn).await
    }

    /// The shard's fence, without a lock.
    async fn fence(&self, client: &Object, shard: ShardId) -> Result<Option<Fence>, StoreError> {
        query_opt_outside(client, &self.sql.fence, &[&i64::from(shard)])
            .await
            .map_err(|e| self.error(Table::Shards, Verb::Read, e))?
            .map(|row| self.decode_fence(&row, shard))
            .transpose()
    }
}

impl ShardStore for PostgresShardStore {
    fn activate(
        &self,
        shard: ShardId,
        owner: NodeId,
        epoch: Epoch,
        scope: Scope,
    ) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        self.run(move |client, shared| async move {
            shared.activate(client, shard, owner, epoch, scope).await
        })
    }

    fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        key: Key,
    ) -> BoxFuture<'static, Result<Option<Bytes>, StoreError>> {
        self.run(move |client, shared| async move { shared.read(client, shard, epoch, key).await })
    }

    fn commit(
        &self,
        shard: ShardId,
        epoch: Epoch,
        batch: Batch,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        // Checked before the call: PostgreSQL would fail the statement, and a refusal is clearer.
        if let Some((key, _)) = batch
            .records()
            .find(|(key, _)| key.as_bytes().len() > Self::KEY_BYTES_MAX)
        {
            return future::ready(Err(StoreError::KeyTooLong {
                shard,
                key_bytes: key.as_bytes().len(),
                key_bytes_max: Self::KEY_BYTES_MAX,
            }))
            .boxed();
        }
        self.run(move |client, shared| async move {
            shared.commit_batch(client, shard, epoch, batch).await
        })
    }

    fn release(&self, shard: ShardId, epoch: Epoch) -> BoxFuture<'static, Result<(), StoreError>> {
        self.run(move |client, shared| async move { shared.release(client, shard, epoch).await })
    }

    fn locality(&self) -> Locality {
        Locality::Shared
    }

    fn key_bytes_max(&self) -> Option<usize> {
        Some(Self::KEY_BYTES_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_and_node_ids_round_trip_through_their_stored_bits() {
        for value in [0, 1, 7, u64::from(u32::MAX), i64::MAX as u64, u64::MAX] {
            assert_eq!(from_stored(to_stored(value)), value);
        }
        assert_eq!(to_stored(42), 42, "small values read as themselves in SQL");
    }

    #[test]
    fn puts_are_split_by_count_and_by_bytes() {
        let record = |size: usize| (Key::from("k"), Bytes::from(vec![0u8; size]));
        let lengths = |puts: &[(Key, Bytes)]| -> Vec<usize> {
            statement_runs(puts).iter().map(|run| run.len()).collect()
        };
        assert!(statement_runs(&[]).is_empty());
        let many: Vec<_> = (0..RECORDS_PER_STATEMENT_MAX + 1)
            .map(|_| record(1))
            .collect();
        assert_eq!(lengths(&many), [RECORDS_PER_STATEMENT_MAX, 1]);
        let half = BYTES_PER_STATEMENT_MAX / 2;
        let large = vec![record(half), record(half), record(half)];
        assert_eq!(
            lengths(&large),
            [1, 1, 1],
            "two halves plus keys exceed the bound"
        );
        let huge = vec![record(1), record(BYTES_PER_STATEMENT_MAX * 2), record(1)];
        assert_eq!(
            lengths(&huge),
            [1, 1, 1],
            "a record above the bound goes alone"
        );
        let small = vec![record(10), record(10)];
        assert_eq!(lengths(&small), [2]);
    }

    #[test]
    fn options_are_checked_and_say_what_to_fix() {
        assert!(PostgresOptions::default().validate().is_ok());
        for prefix in ["Bad", "1abc", "a-b", "a b", &"x".repeat(57)] {
            let options = PostgresOptions {
                table_prefix: prefix.to_owned(),
                ..Default::default()
            };
            let error = options.validate().expect_err(prefix);
            assert!(error.to_string().contains("table_prefix"), "{error}");
        }
        let no_wait = PostgresOptions {
            idle_in_transaction_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(no_wait.validate().is_err());
        for (connections_max, call_timeout) in [(0, 1), (CONNECTIONS_MAX + 1, 1), (8, 0)] {
            let options = PostgresOptions {
                connections_max,
                call_timeout: Duration::from_secs(call_timeout),
                ..Default::default()
            };
            assert!(options.validate().is_err(), "{options:?}");
        }
        let longest = PostgresOptions {
            table_prefix: "x".repeat(TABLE_PREFIX_BYTES_MAX),
            ..Default::default()
        };
        assert!(longest.validate().is_ok());
    }

    #[test]
    fn a_url_that_does_not_parse_is_a_typed_error_that_shows_the_form() {
        let error = PostgresShardStore::connect("postgres://[bad", PostgresOptions::default())
            .expect_err("does not parse");
        assert!(matches!(error, StoreError::PostgresUrl { .. }), "{error}");
        assert!(error.to_string().contains("postgres://USER"), "{error}");
    }

    #[test]
    fn the_server_is_described_without_its_password() {
        let config =
            tokio_postgres::Config::from_str("postgres://app:secret@db.example:6543/shards")
                .expect("parses");
        assert_eq!(describe(&config), "app@db.example:6543/shards");
        let config = tokio_postgres::Config::from_str("host=/run/pg user=app").expect("parses");
        assert_eq!(describe(&config), "app@/run/pg:5432/app");
    }

    #[test]
    fn connection_failures_are_told_apart_from_refused_statements() {
        assert!(is_connection_failure(&SqlState::CONNECTION_FAILURE));
        assert!(is_connection_failure(&SqlState::ADMIN_SHUTDOWN));
        assert!(!is_connection_failure(&SqlState::UNDEFINED_TABLE));
        assert!(hint_for(Some(&SqlState::INVALID_CATALOG_NAME)).contains("createdb"));
        assert!(hint_for(Some(&SqlState::DISK_FULL)).contains("out of resources"));
    }
}
