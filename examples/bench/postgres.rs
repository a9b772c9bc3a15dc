//! The bench's PostgreSQL scenarios: the server they share ([`Server`]), what `durable_postgres`
//! adds to `durable` ([`Observer`]: the server's processes and transactions), its floor
//! `raw_postgres`, and `durable_failover` on `kv serve --store postgres://…` processes, with the
//! `kv` cluster machinery `exactly_once` shares ([`start_kv`], [`KvCluster`]: clients, settle
//! waits, a timed fault with probes, the read-back). See the module docs of `bench.rs` for what
//! each measures. Does not own the closed loop, the figures or the table (the parent module
//! does).

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Mutex;

use clusterfunk::persist::Fence;
use clusterfunk::shard_map::shard_for;
use clusterfunk::testing::PostgresServer;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::NoTls;

use super::support::kv_api::{Get, Incr, Put};
use super::*;

/// The table prefix of `durable_postgres`'s store.
pub(super) const DURABLE_TABLE_PREFIX: &str = "bench_durable_";
/// The table prefix of `raw_postgres`'s tables.
const RAW_TABLE_PREFIX: &str = "bench_raw_";
/// The table prefix `kv serve --store postgres://…` uses (the store's default).
const KV_TABLE_PREFIX: &str = "clusterfunk_";
/// The database `durable_failover`'s nodes use on the bench's own server.
const FAILOVER_DATABASE: &str = "bench_failover";
/// How long connecting to PostgreSQL may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one statement of the bench's own (set-up, observation, read-back) may take.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The epoch (and owner) `raw_postgres` activates every shard at.
const RAW_EPOCH: u64 = 1;
/// Reads in flight when `durable_failover` or `exactly_once` reads every value back.
pub(super) const READS_IN_FLIGHT: usize = 16;
/// Attempts of one read-back (the cluster serves again by then, so none should fail).
const READ_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------------------------
// The server

/// The PostgreSQL server of the run: a throwaway one of the bench's own, or the database of
/// `--postgres-url`.
pub(super) enum Server {
    /// Started by the bench in a temporary directory; stopped and deleted when dropped.
    Own {
        server: PostgresServer,
        /// Whether it flushes each commit to disk.
        fsync: bool,
    },
    /// `--postgres-url`.
    Given(String),
}

impl Server {
    /// Starts the bench's own server, or checks `--postgres-url` (loopback only).
    pub(super) fn start(options: &Options) -> Result<Server, String> {
        if let Some(url) = &options.postgres_url {
            let config = tokio_postgres::Config::from_str(url)
                .map_err(|e| format!("--postgres-url does not parse: {e}"))?;
            let remote = config.get_hosts().iter().any(|host| match host {
                Host::Tcp(name) => {
                    name != "localhost"
                        && !name
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
                Host::Unix(_) => false,
            });
            if remote || config.get_hosts().is_empty() {
                return Err(
                    "--postgres-url must name a loopback host (127.0.0.1, ::1, localhost) or a Unix socket: the bench runs on this machine alone"
                        .into(),
                );
            }
            return Ok(Server::Given(url.clone()));
        }
        let fsync = options.postgres_fsync == "on";
        let server = match fsync {
            true => PostgresServer::start_fsynced(),
            false => PostgresServer::start(),
        }
        .map_err(|e| format!("cannot start a PostgreSQL server: {e}"))?;
        Ok(Server::Own { server, fsync })
    }

    /// The database the scenarios use.
    pub(super) fn url(&self) -> String {
        match self {
            Server::Own { server, .. } => server.url(),
            Server::Given(url) => url.clone(),
        }
    }

    /// The server in words (never a password).
    pub(super) fn describe(&self) -> String {
        match self {
            Server::Own { server, fsync } => format!(
                "a throwaway server of the bench on 127.0.0.1:{} (fsync {}, shared_buffers 16MB)",
                server.port(),
                if *fsync { "on" } else { "off" }
            ),
            Server::Given(url) => match tokio_postgres::Config::from_str(url) {
                Ok(config) => {
                    let hosts: Vec<String> = config
                        .get_hosts()
                        .iter()
                        .map(|host| match host {
                            Host::Tcp(name) => name.clone(),
                            Host::Unix(dir) => dir.display().to_string(),
                        })
                        .collect();
                    let ports: Vec<String> =
                        config.get_ports().iter().map(u16::to_string).collect();
                    format!(
                        "{}@{}:{}/{} (--postgres-url)",
                        config.get_user().unwrap_or("?"),
                        hosts.join(","),
                        match ports.is_empty() {
                            true => "5432".to_owned(),
                            false => ports.join(","),
                        },
                        config.get_dbname().or(config.get_user()).unwrap_or("?")
                    )
                }
                Err(_) => "--postgres-url".to_owned(),
            },
        }
    }

    /// A database for the `kv` nodes of `scenario`, whose store tables (`clusterfunk_…`) do
    /// not exist yet: a new database `name` on the bench's own server; the database of
    /// `--postgres-url` only if it has no such tables (a cluster's fences there would refuse the
    /// new cluster's activations, and its rows are not the bench's to drop).
    pub(super) async fn kv_database(&self, name: &str, scenario: &str) -> Result<String, String> {
        match self {
            Server::Own { server, .. } => server
                .create_database(name)
                .map_err(|e| format!("cannot create the database {name}: {e}")),
            Server::Given(url) => {
                let client = connect(url).await?;
                let row = bounded(client.query_one(
                    "SELECT to_regclass($1) IS NOT NULL OR to_regclass($2) IS NOT NULL",
                    &[
                        &format!("{KV_TABLE_PREFIX}shards"),
                        &format!("{KV_TABLE_PREFIX}records"),
                    ],
                ))
                .await?;
                let exists: bool = row.try_get(0).map_err(|e| e.to_string())?;
                if exists {
                    return Err(format!(
                        "the database of --postgres-url already has tables {KV_TABLE_PREFIX}shards or {KV_TABLE_PREFIX}records: give {scenario} a database without them"
                    ));
                }
                Ok(url.clone())
            }
        }
    }
}

/// Connects to `url` (no TLS: loopback only), the connection served by a task of the current
/// runtime.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| format!("PostgreSQL did not answer within {CONNECT_TIMEOUT:?}"))?;
    let (client, connection) =
        connected.map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("bench: a PostgreSQL connection of the bench failed: {error}");
        }
    });
    Ok(client)
}

/// A statement of the bench's own, within [`STATEMENT_TIMEOUT`], its error as text.
async fn bounded<T>(
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, statement).await {
        Ok(result) => result.map_err(|e| postgres_error(&e)),
        Err(_) => Err(format!(
            "a statement took longer than {STATEMENT_TIMEOUT:?}"
        )),
    }
}

/// A PostgreSQL error with the server's message (tokio-postgres shows `db error` alone).
fn postgres_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}

/// Drops the tables `{prefix}shards` and `{prefix}records` if they exist.
pub(super) async fn drop_tables(url: &str, prefix: &str) -> Result<(), String> {
    let client = connect(url).await?;
    bounded(client.batch_execute(&format!(
        "DROP TABLE IF EXISTS {prefix}records; DROP TABLE IF EXISTS {prefix}shards;"
    )))
    .await
    .map_err(|e| format!("cannot drop the tables {prefix}*: {e}"))
}

// ---------------------------------------------------------------------------------------------
// What the server did during a measurement

/// Watches the server during a load: its processes (for their CPU time) and its transaction
/// counter.
pub(super) struct Observer {
    client: tokio_postgres::Client,
    /// The server's processes: the backends of every connection (the load's, which are open
    /// by then) and its background processes, but not this observer's backend nor autovacuum
    /// workers, which come and go.
    pub(super) pids: Vec<u32>,
    /// The transaction id the observer took before the load.
    xid_before: i64,
}

impl Observer {
    /// Connects and takes the server's processes and a transaction id.
    pub(super) async fn start(url: &str) -> Result<Observer, String> {
        let client = connect(url).await?;
        let rows = bounded(client.query(
            "SELECT pid FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type IS DISTINCT FROM 'autovacuum worker'",
            &[],
        ))
        .await?;
        let pids = rows
            .iter()
            .map(|row| row.try_get::<_, i32>(0).map(|pid| pid as u32))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|e| e.to_string())?;
        let xid_before = Self::xid(&client).await?;
        Ok(Observer {
            client,
            pids,
            xid_before,
        })
    }

    /// A new transaction id (each transaction that writes takes the next one).
    async fn xid(client: &tokio_postgres::Client) -> Result<i64, String> {
        let row = bounded(client.query_one("SELECT txid_current()", &[])).await?;
        row.try_get(0).map_err(|e| e.to_string())
    }

    /// After the load: the writing transactions since [`start`](Self::start) (the load's,
    /// and any other writer's: autovacuum's analyze, rarely), with the `acknowledged`
    /// increments that took them.
    pub(super) async fn finish(self, acknowledged: u64) -> Result<ServerFigures, String> {
        let xid_after = Self::xid(&self.client).await?;
        Ok(ServerFigures {
            processes: self.pids.len(),
            // The ids in between went to other transactions: this observer took both ends.
            transactions: (xid_after - self.xid_before - 1).max(0) as u64,
            acknowledged,
        })
    }
}

/// What the server did during a load.
pub(super) struct ServerFigures {
    /// Its processes whose CPU time was counted.
    processes: usize,
    /// Writing transactions committed (or aborted) during the load, warm-up included.
    transactions: u64,
    /// Increments acknowledged during the load, warm-up included.
    acknowledged: u64,
}

impl ServerFigures {
    /// Adds the figures to a scenario's JSON and notes; `cpu` is the CPU time of the bench
    /// process and of the server's processes during the measurement.
    pub(super) fn report(
        &self,
        name: &str,
        cpu: &[Option<f64>],
        extra: &mut serde_json::Map<String, Value>,
        notes: &mut Vec<String>,
    ) {
        let per_transaction = self.acknowledged as f64 / self.transactions.max(1) as f64;
        let bench_cpu = cpu.first().copied().flatten();
        let server_cpu = cpu.get(1).copied().flatten();
        extra.insert("postgres_transactions".into(), json!(self.transactions));
        extra.insert(
            "increments_per_transaction".into(),
            json!(round3(per_transaction)),
        );
        extra.insert("cpu_ms_bench_process".into(), json!(bench_cpu.map(round3)));
        extra.insert("cpu_ms_postgres".into(), json!(server_cpu.map(round3)));
        extra.insert("postgres_processes".into(), json!(self.processes));
        notes.push(format!(
            "{name}: {} increments in {} PostgreSQL transactions ({per_transaction:.2} per \
             transaction; warm-up included); CPU during the measurement: {} ms in the bench \
             process, {} ms in {} PostgreSQL processes",
            self.acknowledged,
            self.transactions,
            fmt_ms(bench_cpu),
            fmt_ms(server_cpu),
            self.processes
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// raw_postgres: the floor of durable_postgres

/// `raw_postgres`'s statements: the store's own for a commit of one record (see the module
/// docs of `src/persist/postgres.rs`), on tables of their own.
struct RawStatements {
    /// Locks a shard's row and reads its fence (the store's `lock`).
    lock: String,
    /// Writes one record (the store's `put_records`, for one record).
    upsert: String,
    /// Reads every record back.
    values: String,
}

impl RawStatements {
    fn new(prefix: &str) -> Self {
        RawStatements {
            lock: format!(
                "SELECT epoch, owner, released FROM {prefix}shards WHERE shard = $1 FOR UPDATE"
            ),
            upsert: format!(
                "INSERT INTO {prefix}records (shard, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (shard, key) DO UPDATE SET value = EXCLUDED.value"
            ),
            values: format!("SELECT value FROM {prefix}records"),
        }
    }
}

/// Creates `raw_postgres`'s tables as the store creates its own, and activates every shard: a
/// fence row at [`RAW_EPOCH`] each, as a store's activation writes.
async fn create_raw_tables(url: &str, prefix: &str, shards: usize) -> Result<(), String> {
    let client = connect(url).await?;
    bounded(client.batch_execute(&format!(
        "DROP TABLE IF EXISTS {prefix}records;
         DROP TABLE IF EXISTS {prefix}shards;
         CREATE TABLE {prefix}shards (
             shard bigint PRIMARY KEY,
             epoch bigint NOT NULL,
             owner bigint NOT NULL,
             released boolean NOT NULL,
             state bytea
         );
         CREATE TABLE {prefix}records (
             shard bigint NOT NULL,
             key bytea NOT NULL,
             value bytea NOT NULL,
             PRIMARY KEY (shard, key)
         );"
    )))
    .await?;
    let epoch = RAW_EPOCH as i64;
    bounded(client.execute(
        &format!(
            "INSERT INTO {prefix}shards (shard, epoch, owner, released) \
             SELECT s, $2, $2, false FROM generate_series(0, $1::bigint - 1) AS s"
        ),
        &[&(shards as i64), &epoch],
    ))
    .await
    .map(drop)
}

/// A pool as the store builds its own: `connections` at most, fast recycling, no TLS.
fn raw_pool(url: &str, connections: usize) -> Result<Pool, String> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("bench-raw-postgres");
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(connections)
        .create_timeout(Some(CONNECT_TIMEOUT))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| format!("cannot build the raw_postgres pool: {e}"))
}

/// `raw_postgres`: one increment of the key of shard `next`, in a transaction of its own, on a
/// connection of the pool.
struct RawPostgresRequester {
    pool: Pool,
    sql: Arc<RawStatements>,
    /// `keys[s]` hashes to shard `s`.
    keys: Arc<Vec<String>>,
    /// Each shard's committed count, locked while its increment commits: one commit per shard
    /// at a time, the state in memory, as a shard actor keeps them.
    counts: Arc<Vec<tokio::sync::Mutex<u64>>>,
    slice: KeySlice,
    tally: Arc<Tally>,
}

impl Requester for RawPostgresRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let shard = self.slice.next();
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, self.increment(shard)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no commit within {REQUEST_TIMEOUT:?}")),
        };
        self.tally.record(result.is_ok());
        result
    }
}

impl RawPostgresRequester {
    /// BEGIN; lock the shard's fence row and check it (`Fence::check_commit`, as the store
    /// decides); upsert the key's record with the new count (encoded as `DurableMap<u64>`
    /// encodes it); COMMIT. The count in memory changes only once the commit returned.
    async fn increment(&self, shard: usize) -> Result<(), String> {
        let mut count = self.counts[shard].lock().await;
        let next = *count + 1;
        let value = codec::encode(&next).map_err(|e| e.to_string())?;
        let id = shard as i64;
        let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
        let failed = |e: tokio_postgres::Error| postgres_error(&e);
        let txn = client.transaction().await.map_err(failed)?;
        let lock = txn.prepare_cached(&self.sql.lock).await.map_err(failed)?;
        let row = txn.query_opt(&lock, &[&id]).await.map_err(failed)?;
        let fence = match row {
            Some(row) => Some(Fence {
                epoch: row.try_get::<_, i64>("epoch").map_err(failed)? as u64,
                owner: row.try_get::<_, i64>("owner").map_err(failed)? as u64,
                released: row.try_get("released").map_err(failed)?,
            }),
            None => None,
        };
        // A refused commit rolls back as the transaction drops.
        Fence::check_commit(fence, shard as ShardId, RAW_EPOCH).map_err(|e| e.to_string())?;
        let upsert = txn.prepare_cached(&self.sql.upsert).await.map_err(failed)?;
        txn.execute(&upsert, &[&id, &self.keys[shard].as_bytes(), &value])
            .await
            .map_err(failed)?;
        txn.commit().await.map_err(failed)?;
        *count = next;
        Ok(())
    }
}

/// `raw_postgres` (see the module docs of `bench.rs`); its tables are dropped afterwards.
pub(super) async fn raw_postgres(bench: &Bench<'_>) -> Result<Outcome, String> {
    let server = bench.postgres()?;
    let url = server.url();
    let outcome = raw_postgres_on(bench, &url).await;
    let dropped = drop_tables(&url, RAW_TABLE_PREFIX).await;
    let mut outcome = outcome?;
    dropped?;
    outcome
        .extra
        .insert("postgres".into(), json!(server.describe()));
    Ok(outcome)
}

async fn raw_postgres_on(bench: &Bench<'_>, url: &str) -> Result<Outcome, String> {
    let keys = bench.keys.clone();
    // The store's pool size: the same number of connections as `durable_postgres`.
    let connections = PostgresOptions::default().connections_max;
    create_raw_tables(url, RAW_TABLE_PREFIX, keys.len()).await?;
    let pool = raw_pool(url, connections)?;
    // Every connection opens before the load, as the store's open during the activations.
    let held = futures_util::future::try_join_all((0..connections).map(|_| pool.get()))
        .await
        .map_err(|e| format!("cannot open the raw_postgres connections: {e}"))?;
    drop(held);
    let sql = Arc::new(RawStatements::new(RAW_TABLE_PREFIX));
    let counts: Arc<Vec<tokio::sync::Mutex<u64>>> = Arc::new(
        (0..keys.len())
            .map(|_| tokio::sync::Mutex::new(0))
            .collect(),
    );
    let tally = Arc::new(Tally::default());
    let make = async || {
        Ok((0..bench.options.concurrency)
            .map(|r| RawPostgresRequester {
                pool: pool.clone(),
                sql: sql.clone(),
                keys: keys.clone(),
                counts: counts.clone(),
                slice: KeySlice::of(r, bench.options.concurrency, keys.len()),
                tally: tally.clone(),
            })
            .collect::<Vec<_>>())
    };
    let observer = Observer::start(url).await?;
    let groups = [vec![std::process::id()], observer.pids.clone()];
    let measured = warm_then_measure_split(make, bench.duration(), bench.warmup(), &groups).await;
    let figures = observer.finish(tally.acknowledged()).await?;
    let (summary, cpu) = measured?;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let rows = bounded(client.query(&sql.values, &[])).await?;
    let mut sum = 0u64;
    for row in rows {
        let value: Vec<u8> = row.try_get(0).map_err(|e| e.to_string())?;
        sum += codec::decode::<u64>(&value).map_err(|e| format!("a stored count: {e}"))?;
    }
    drop(client);
    pool.close();
    tally.check("raw_postgres: read back", sum)?;
    let (acknowledged, failed) = (tally.acknowledged(), tally.failed());
    let mut extra = serde_json::Map::new();
    let mut notes = vec![format!(
        "raw_postgres: {acknowledged} increments acknowledged, {failed} failed, each in a \
         transaction of its own on a pool of {connections} connections (warm-up included); \
         counts read back: {sum}"
    )];
    figures.report("raw_postgres", &cpu, &mut extra, &mut notes);
    extra.insert("connections".into(), json!(connections));
    extra.insert("keys".into(), json!(keys.len()));
    extra.insert("acknowledged_increments".into(), json!(acknowledged));
    extra.insert("failed_increments".into(), json!(failed));
    extra.insert("read_back_sum".into(), json!(sum));
    Ok(Outcome {
        summary,
        extra,
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// durable_failover

/// What the clients of `durable_failover` saw, to check the read-back against.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Per counter key: its increments.
    counters: BTreeMap<String, CounterLog>,
    /// Every put: key, value, and whether it was acknowledged.
    puts: Vec<(String, String, bool)>,
    /// Increments answered `None` (the counter did not hold a number): none expected.
    not_numbers: u64,
}

/// The increments of one counter.
#[derive(Debug, Default, Clone, Copy)]
struct CounterLog {
    acknowledged: u64,
    /// Failed increments: they may or may not have landed.
    failed: u64,
    /// The highest count an acknowledgement answered.
    highest: u64,
}

impl Ledger {
    /// Records the outcome of an increment of `key`; the error as text.
    fn increment(
        &mut self,
        key: &str,
        result: Result<Option<u64>, clusterfunk::client::ClientError>,
    ) -> Result<(), (String, bool)> {
        let log = self.counters.entry(key.to_owned()).or_default();
        match result {
            Ok(Some(count)) => {
                log.acknowledged += 1;
                log.highest = log.highest.max(count);
                Ok(())
            }
            Ok(None) => {
                self.not_numbers += 1;
                Err((format!("{key} does not hold a number"), false))
            }
            Err(error) => {
                log.failed += 1;
                Err((error.to_string(), error.is_outcome_unknown()))
            }
        }
    }
}

/// What the read-back found against the ledger.
#[derive(Debug, Default)]
pub(super) struct Losses {
    /// Acknowledged increments missing from their counters.
    pub(super) increments_lost: u64,
    /// Acknowledged puts whose key does not hold their value.
    puts_lost: u64,
    /// Counters above their acknowledged plus failed increments (a phantom increment).
    pub(super) counters_too_high: u64,
    /// Failed puts whose key holds something else than nothing or their value.
    failed_puts_wrong: u64,
    /// Keys that could not be read.
    pub(super) unreadable: u64,
    /// Increments answered `None` (their counter held no number).
    not_numbers: u64,
    /// Counters and puts checked.
    pub(super) counters_checked: usize,
    puts_checked: usize,
    /// The first problems, in words.
    pub(super) examples: Vec<String>,
}

impl Losses {
    fn lost(&self) -> u64 {
        self.increments_lost + self.puts_lost
    }

    pub(super) fn problems(&self) -> u64 {
        self.lost()
            + self.counters_too_high
            + self.failed_puts_wrong
            + self.unreadable
            + self.not_numbers
    }

    fn note(&mut self, problem: String) {
        if self.examples.len() < 10 {
            self.examples.push(problem);
        }
    }
}

/// A `kv` cluster of `durable_failover` or `exactly_once`, with the probes of its faults.
pub(super) struct KvCluster<'a> {
    pub(super) harness: &'a Harness,
    pub(super) options: &'a Options,
    /// `probes[s]` hashes to shard `s`: the counters the probes increment.
    pub(super) probes: Arc<Vec<String>>,
    /// The probes' increments (and `durable_failover`'s load).
    pub(super) ledger: Arc<Mutex<Ledger>>,
}

/// A fault [`KvCluster::fault_once`] strikes a node with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KvFault {
    /// SIGKILL the leader (`true`) or the first follower; restart it once its shards are back.
    Kill { leader: bool },
    /// SIGSTOP the second follower (the first when there is one); SIGCONT it after
    /// `--freeze-seconds`, or later once its shards are all back.
    Freeze,
}

/// `durable_failover`'s load: alternately an increment of a counter (walking the counters, one
/// per shard) and a put of a fresh key.
struct KvRequester {
    client: Client,
    counters: Arc<Vec<String>>,
    next: usize,
    index: u16,
    ledger: Arc<Mutex<Ledger>>,
    last: CallFacts,
}

impl Requester for KvRequester {
    async fn call(&mut self, iteration: u64) -> Result<(), String> {
        let outcome = if iteration.is_multiple_of(2) {
            let shard = self.next % self.counters.len();
            self.next = self.next.wrapping_add(1);
            let key = &self.counters[shard];
            self.last = CallFacts {
                shard: shard as u32,
                idempotent: false,
                outcome_unknown: false,
                requester: self.index,
            };
            let result = self.client.send(key.as_str(), Incr { by: 1 }).await;
            lock(&self.ledger).increment(key, result)
        } else {
            let key = format!("put-{}-{iteration}", self.index);
            let value = format!("value-{}-{iteration}", self.index);
            self.last = CallFacts {
                shard: shard_for(key.as_bytes(), SHARD_COUNT),
                idempotent: true,
                outcome_unknown: false,
                requester: self.index,
            };
            let result = self
                .client
                .send(
                    key.as_str(),
                    Put {
                        value: value.clone(),
                    },
                )
                .await;
            lock(&self.ledger).puts.push((key, value, result.is_ok()));
            result.map_err(|e| (e.to_string(), e.is_outcome_unknown()))
        };
        outcome.map_err(|(error, unknown)| {
            self.last.outcome_unknown = unknown;
            error
        })
    }

    fn last_call(&self) -> CallFacts {
        self.last
    }
}

/// Locks a ledger (one thread uses it; a panic elsewhere leaves it usable).
pub(super) fn lock<T>(ledger: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl KvCluster<'_> {
    /// A cluster of `harness`'s nodes with a fresh probe ledger.
    pub(super) fn new<'a>(
        harness: &'a Harness,
        options: &'a Options,
    ) -> Result<KvCluster<'a>, String> {
        Ok(KvCluster {
            harness,
            options,
            probes: Arc::new(
                keys_per_shard("probe", SHARD_COUNT).ok_or("no probe key for some shard")?,
            ),
            ledger: Arc::new(Mutex::new(Ledger::default())),
        })
    }

    pub(super) fn limit(&self) -> Duration {
        Duration::from_secs(self.options.deadline_secs)
    }

    pub(super) fn client(&self, seeds: Vec<SocketAddr>) -> Result<Client, String> {
        Client::with_credentials(
            seeds,
            &self.harness.launch.credentials("client")?,
            CLUSTER_NAME,
            REQUEST_TIMEOUT,
        )
        .map_err(|e| e.to_string())
    }

    /// A client seeded with every node.
    pub(super) fn client_of_all(&self) -> Result<Client, String> {
        self.client(self.harness.nodes.iter().map(|n| n.addr()).collect())
    }

    pub(super) async fn settled(&self) -> Result<Settled, String> {
        wait_settled(
            &self.harness.admin_clients(POLL_TIMEOUT)?,
            SHARD_COUNT,
            None,
            false,
            self.limit(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// One probe: an increment of the probe counter of `shard`, recorded in the ledger.
    async fn probe(&self, client: &Client, shard: usize) -> Result<(), String> {
        let key = &self.probes[shard];
        let result = client.send(key.as_str(), Incr { by: 1 }).await;
        lock(&self.ledger)
            .increment(key, result)
            .map_err(|(error, _)| error)
    }

    /// Strikes one node with `fault` under the load and times its shards' return with probes
    /// (an increment of a probe counter of each shard every `--probe-ms`, through a client
    /// seeded with the survivors for a kill, with every node for a freeze, as a client that
    /// knows the frozen node); then restarts or thaws it and waits for the cluster to settle.
    pub(super) async fn fault_once(&self, fault: KvFault) -> Result<Kill, String> {
        let settled = self.settled().await?;
        let ids = self.harness.ids();
        let (leader_role, number) = match fault {
            KvFault::Kill { leader } => (leader, 0),
            KvFault::Freeze => (false, 1),
        };
        let node = pick_node(&settled, &ids, leader_role, number);
        let survivors: Vec<NodeId> = ids.iter().copied().filter(|&id| id != node).collect();
        let shards: Vec<usize> = (0..SHARD_COUNT as usize)
            .filter(|&s| settled.owners[s] == node)
            .collect();
        let seeds = match fault {
            KvFault::Kill { .. } => &survivors,
            KvFault::Freeze => &ids,
        };
        // A probe client in steady state: connected to its seeds, holding the map.
        let probe = self.client(
            seeds
                .iter()
                .map(|&id| self.harness.node(id).addr())
                .collect(),
        )?;
        for &id in seeds {
            let shard = settled
                .owners
                .iter()
                .position(|&owner| owner == id)
                .ok_or(format!("node {id} owns no shard"))?;
            self.probe(&probe, shard)
                .await
                .map_err(|e| format!("warming up the probe client: {e}"))?;
        }
        tokio::time::sleep(MEMBERSHIP_MARGIN).await;
        check_interrupt()?;

        let t_kill = match fault {
            KvFault::Kill { .. } => self.harness.kill(node)?,
            KvFault::Freeze => signal_node(self.harness, node, "STOP").await?,
        };
        // From here on a frozen node is thawed before any error returns.
        let deadline = t_kill + self.limit();
        let every = Duration::from_millis(self.options.probe_ms.max(1));
        let probes: FuturesUnordered<_> = shards
            .iter()
            .map(|&shard| {
                let probe = &probe;
                probe_until_ok(move || self.probe(probe, shard), t_kill, every, deadline)
            })
            .collect();
        let answers: Vec<_> = probes.collect().await;
        let t_back = Instant::now();
        let mut unavailable = Series::default();
        let mut probe_errors = 0;
        for (back, errors, last) in answers {
            probe_errors += errors;
            unavailable.push(back.ok_or(last.unwrap_or_else(|| "no answer".into())));
        }
        let t_heal = match fault {
            KvFault::Kill { .. } => {
                tokio::time::sleep(MEMBERSHIP_MARGIN).await;
                check_interrupt()?;
                self.harness.start(node, true)?;
                Instant::now()
            }
            KvFault::Freeze => {
                // Frozen for the whole freeze time, so that the cluster moves on without it.
                tokio::time::sleep_until((t_kill + self.options.freeze()).into()).await;
                signal_node(self.harness, node, "CONT").await?
            }
        };
        let rejoined = self.settled().await;
        let t_settled = Instant::now();
        if rejoined.is_err() || !unavailable.failures.is_empty() {
            self.harness.print_log_tails(&[]);
        }
        rejoined?;
        if !unavailable.failures.is_empty() {
            return Err(format!(
                "{} of node {node}'s shards not back within {:?}: {}",
                unavailable.failures.len(),
                self.limit(),
                unavailable.failures[0]
            ));
        }
        Ok(Kill {
            leader: leader_role,
            node,
            owned: settled.owners.iter().map(|&owner| owner == node).collect(),
            unavailable,
            probe_errors,
            t_kill,
            t_back,
            t_heal,
            t_settled,
        })
    }

    /// Reads every counter and every put of the ledger back through `client` and compares
    /// them with the ledger.
    pub(super) async fn check(&self, client: &Client) -> Losses {
        let keys: Vec<String> = {
            let ledger = lock(&self.ledger);
            ledger
                .counters
                .keys()
                .cloned()
                .chain(ledger.puts.iter().map(|(key, _, _)| key.clone()))
                .collect()
        };
        let reads = read_all(client, keys).await;
        compare(&lock(&self.ledger), &reads)
    }
}

/// Every value read back: key → value (`None`: absent), or why it could not be read.
pub(super) type Reads = BTreeMap<String, Result<Option<String>, String>>;

/// Reads `keys` through `client`, [`READS_IN_FLIGHT`] at a time.
pub(super) async fn read_all(client: &Client, keys: Vec<String>) -> Reads {
    futures_util::stream::iter(keys)
        .map(|key| async move {
            let value = read(client, &key).await;
            (key, value)
        })
        .buffer_unordered(READS_IN_FLIGHT)
        .collect()
        .await
}

/// The number counter `key` holds by the read-back (absent: 0), or what is wrong with it.
pub(super) fn counter_value(reads: &Reads, key: &str) -> Result<u64, String> {
    match reads.get(key) {
        Some(Ok(None)) => Ok(0),
        Some(Ok(Some(text))) => text
            .parse::<u64>()
            .map_err(|_| format!("{key} holds {text:?}, not a number")),
        Some(Err(error)) => Err(format!("{key} is unreadable: {error}")),
        None => Err(format!("{key} was not read back")),
    }
}

/// What the read-back `reads` (key → value) says of the values the ledger recorded.
fn compare(ledger: &Ledger, reads: &Reads) -> Losses {
    let mut losses = Losses {
        counters_checked: ledger.counters.len(),
        puts_checked: ledger.puts.len(),
        ..Losses::default()
    };
    losses.not_numbers = ledger.not_numbers;
    if ledger.not_numbers > 0 {
        losses.note(format!(
            "{} increments found no number in their counter",
            ledger.not_numbers
        ));
    }
    for (key, log) in &ledger.counters {
        let value = match counter_value(reads, key) {
            Ok(value) => value,
            Err(problem) => {
                losses.unreadable += 1;
                losses.note(problem);
                continue;
            }
        };
        let floor = log.acknowledged.max(log.highest);
        if value < floor {
            losses.increments_lost += floor - value;
            losses.note(format!(
                "{key} holds {value}, but {} increments were acknowledged (the highest \
                 answered {})",
                log.acknowledged, log.highest
            ));
        } else if value > log.acknowledged + log.failed {
            losses.counters_too_high += 1;
            losses.note(format!(
                "{key} holds {value}, above its {} acknowledged and {} failed increments",
                log.acknowledged, log.failed
            ));
        }
    }
    for (key, value, acknowledged) in &ledger.puts {
        match (reads.get(key), acknowledged) {
            (Some(Ok(Some(found))), _) if found == value => {}
            (Some(Ok(None)), false) => {}
            (Some(Err(error)), _) => {
                losses.unreadable += 1;
                losses.note(format!("{key} is unreadable: {error}"));
            }
            (found, true) => {
                losses.puts_lost += 1;
                losses.note(format!(
                    "acknowledged {key} holds {found:?}, expected {value:?}"
                ));
            }
            (found, false) => {
                losses.failed_puts_wrong += 1;
                losses.note(format!(
                    "failed {key} holds {found:?}, expected nothing or {value:?}"
                ));
            }
        }
    }
    losses
}

/// Reads `key`, trying [`READ_ATTEMPTS`] times.
async fn read(client: &Client, key: &str) -> Result<Option<String>, String> {
    let mut last = String::new();
    for _ in 0..READ_ATTEMPTS {
        match client.send(key, Get).await {
            Ok(value) => return Ok(value),
            Err(error) => last = error.to_string(),
        }
    }
    Err(last)
}

impl Server {
    /// Runs `run` on a database for the `kv` nodes of `scenario` ([`kv_database`](Self::kv_database)
    /// `name`), and drops their tables afterwards on the database of `--postgres-url` (the
    /// bench's own server goes as a whole).
    pub(super) async fn with_kv_database<T>(
        &self,
        name: &str,
        scenario: &str,
        run: impl AsyncFnOnce(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        let url = self.kv_database(name, scenario).await?;
        let outcome = run(&url).await;
        // The nodes are gone: their tables can go too.
        let dropped = match self {
            Server::Given(_) => drop_tables(&url, KV_TABLE_PREFIX).await,
            Server::Own { .. } => Ok(()),
        };
        let outcome = outcome?;
        dropped?;
        Ok(outcome)
    }
}

/// `durable_failover` (see the module docs of `bench.rs`).
pub(super) async fn durable_failover(bench: &Bench<'_>) -> Result<Outcome, String> {
    let server = bench.postgres()?;
    let mut outcome = server
        .with_kv_database(FAILOVER_DATABASE, "durable_failover", async |url| {
            durable_failover_on(bench.options, url).await
        })
        .await?;
    outcome
        .extra
        .insert("postgres".into(), json!(server.describe()));
    Ok(outcome)
}

/// One fault of a `kv` scenario for the JSON and the notes (`what` starts the note): its
/// shards' unavailability (the fault → the first acknowledged probe on the new owner) and what
/// the load (in `timeline`) saw from the fault until the cluster settled after it.
pub(super) fn fault_report(
    kill: &Kill,
    timeline: &[Sample],
    fault: KvFault,
    what: &str,
) -> (serde_json::Map<String, Value>, String) {
    let (noun, participle, heal) = match fault {
        KvFault::Kill { .. } => ("kill", "killed", "restart"),
        KvFault::Freeze => ("freeze", "frozen", "thaw"),
    };
    let load = FaultLoad::of(timeline, kill);
    let median = kill.unavailable.quantile(0.5).map(round3);
    let max = kill.unavailable.quantile(1.0).map(round3);
    let served = ms(kill.t_back - kill.t_kill);
    let mut entry = serde_json::Map::new();
    entry.insert(format!("node_{participle}"), json!(kill.node));
    entry.insert("shards".into(), json!(kill.unavailable.values.len()));
    entry.insert("unavailable_ms".into(), kill.unavailable.to_json(false));
    entry.insert("unavailable_ms_median".into(), json!(median));
    entry.insert("unavailable_ms_max".into(), json!(max));
    entry.insert("all_served_ms".into(), json!(round3(served)));
    entry.insert("probe_errors".into(), json!(kill.probe_errors));
    entry.insert(
        format!("{heal}_to_settled_ms"),
        json!(round3(ms(kill.t_settled - kill.t_heal))),
    );
    entry.extend(load.to_json(true));
    let note = format!(
        "{what} (node {}) {participle}: its {} shards unavailable median {} ms, max {} ms ({noun} → first acknowledged increment on the new owner); {noun} to settled: {}",
        kill.node,
        kill.unavailable.values.len(),
        fmt_ms(median),
        fmt_ms(max),
        load.describe(true)
    );
    (entry, note)
}

/// Starts `--nodes` `kv serve` processes (the `kv` example beside this program) with the
/// store `store` (passed as `KV_STORE`: `lmdb` or a `postgres://` URL) and waits until they
/// settle; `what` names them in the message.
pub(super) async fn start_kv(
    options: &Options,
    store: &str,
    what: &str,
) -> Result<Harness, String> {
    let bins = Binaries::beside_current_exe(false)
        .map_err(|e| format!("{e} (build it with `cargo build --release --example kv`)"))?;
    let mut launch = Launch::new(PROGRAM, bins, &options.node)?;
    launch.store = Some(store.to_owned());
    let harness = Harness::new(launch, options.nodes, options.node.keep_dir)?;
    let limit = Duration::from_secs(options.deadline_secs) * 2;
    start_settled(
        &harness,
        limit,
        &format!("{what}: {} kv nodes", options.nodes),
    )
    .await?;
    Ok(harness)
}

async fn durable_failover_on(options: &Options, url: &str) -> Result<Outcome, String> {
    let harness = start_kv(options, url, "durable_failover (PostgreSQL)").await?;
    let cluster = KvCluster::new(&harness, options)?;
    let counters =
        Arc::new(keys_per_shard("counter", SHARD_COUNT).ok_or("no counter key for some shard")?);

    let client = cluster.client_of_all()?;
    let stride = (SHARD_COUNT as usize / options.concurrency).max(1);
    let requesters: Vec<KvRequester> = (0..options.concurrency)
        .map(|r| KvRequester {
            client: client.clone(),
            counters: counters.clone(),
            next: r * stride,
            index: r as u16,
            ledger: cluster.ledger.clone(),
            last: CallFacts::default(),
        })
        .collect();
    let stop = AtomicBool::new(false);
    let load = closed_loop(requesters, MEMBERSHIP_LOAD_MAX, &stop, true);
    let orchestration = async {
        let result = async {
            let mut done = Vec::new();
            for leader in [false, true] {
                done.push(cluster.fault_once(KvFault::Kill { leader }).await?);
            }
            // Load on the settled cluster after the last restart too.
            tokio::time::sleep(MEMBERSHIP_MARGIN).await;
            Ok::<_, String>(done)
        }
        .await;
        stop.store(true, Ordering::SeqCst);
        result
    };
    let (recorded, done) = tokio::join!(load, orchestration);
    let done = done?;

    // Every acknowledged value, read back through a client of every node.
    cluster.settled().await?;
    let reader = cluster.client_of_all()?;
    let losses = cluster.check(&reader).await;

    let mut summary = Summary::of(&recorded);
    summary.error_kinds = recorded.error_kinds.clone();
    let mut extra = serde_json::Map::new();
    let mut notes = Vec::new();
    for (leader, label) in [(false, "follower"), (true, "leader")] {
        let Some(kill) = done.iter().find(|k| k.leader == leader) else {
            continue;
        };
        let (entry, note) = fault_report(
            kill,
            &recorded.timeline,
            KvFault::Kill { leader },
            &format!("durable_failover, {label}"),
        );
        extra.insert(label.into(), Value::Object(entry));
        notes.push(note);
    }
    let (increments, failed_increments, probes) = {
        let ledger = lock(&cluster.ledger);
        let load_counters = ledger
            .counters
            .iter()
            .filter(|(key, _)| !cluster.probes.contains(key));
        let acknowledged: u64 = load_counters.clone().map(|(_, l)| l.acknowledged).sum();
        let failed: u64 = load_counters.map(|(_, l)| l.failed).sum();
        let probes: u64 = ledger
            .counters
            .iter()
            .filter(|(key, _)| cluster.probes.contains(key))
            .map(|(_, l)| l.acknowledged)
            .sum();
        (acknowledged, failed, probes)
    };
    let (puts, failed_puts) = {
        let ledger = lock(&cluster.ledger);
        let acknowledged = ledger.puts.iter().filter(|(_, _, ok)| *ok).count();
        (acknowledged, ledger.puts.len() - acknowledged)
    };
    extra.insert("values_lost".into(), json!(losses.lost()));
    extra.insert("increments_lost".into(), json!(losses.increments_lost));
    extra.insert("puts_lost".into(), json!(losses.puts_lost));
    extra.insert("counters_too_high".into(), json!(losses.counters_too_high));
    extra.insert("failed_puts_wrong".into(), json!(losses.failed_puts_wrong));
    extra.insert("unreadable".into(), json!(losses.unreadable));
    extra.insert("counters_checked".into(), json!(losses.counters_checked));
    extra.insert("puts_checked".into(), json!(losses.puts_checked));
    extra.insert("acknowledged_increments".into(), json!(increments));
    extra.insert("failed_increments".into(), json!(failed_increments));
    extra.insert("acknowledged_puts".into(), json!(puts));
    extra.insert("failed_puts".into(), json!(failed_puts));
    extra.insert("acknowledged_probe_increments".into(), json!(probes));
    extra.insert("problems".into(), json!(losses.examples));
    extra.insert(
        "timeline_truncated".into(),
        json!(recorded.timeline_truncated),
    );
    notes.push(format!(
        "durable_failover: {increments} increments and {puts} puts acknowledged, \
         {failed_increments} increments and {failed_puts} puts failed (and {probes} probe \
         increments acknowledged); read back: {} counters and {} puts, {} values lost, {} \
         counters above acknowledged + failed, {} failed puts holding another value, {} \
         unreadable",
        losses.counters_checked,
        losses.puts_checked,
        losses.lost(),
        losses.counters_too_high,
        losses.failed_puts_wrong,
        losses.unreadable
    ));
    for problem in &losses.examples {
        notes.push(format!("durable_failover: {problem}"));
    }
    if losses.problems() > 0 {
        harness.print_log_tails(&[]);
    }
    Ok(Outcome {
        summary,
        extra,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slices_are_disjoint_and_cover_every_key() {
        // Goal: no two requesters of a durable scenario ever increment one key, and together
        // they increment every key. Method: the slices of 16 and of 10 requesters over 1024
        // keys (10 does not divide it), and of more requesters than keys.
        for concurrency in [16, 10, 1] {
            let mut seen = vec![0; 1024];
            for r in 0..concurrency {
                let mut slice = KeySlice::of(r, concurrency, 1024);
                for _ in 0..slice.keys.len() {
                    seen[slice.next()] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "concurrency {concurrency}");
        }
        assert_eq!(
            KeySlice::of(5, 8, 4).keys,
            vec![1],
            "the extra requesters share a key"
        );
    }

    #[test]
    fn the_read_back_counts_lost_values_and_allows_failed_increments() {
        // Goal: a counter may hold its acknowledged increments plus any of its failed ones, no
        // fewer and no more; an acknowledged put must hold its value, a failed one its value or
        // nothing. Method: a ledger and read-backs around those bounds.
        let mut ledger = Ledger::default();
        let counter = |acknowledged, failed, highest| CounterLog {
            acknowledged,
            failed,
            highest,
        };
        ledger.counters.insert("exact".into(), counter(3, 0, 3));
        ledger
            .counters
            .insert("with-failed".into(), counter(3, 2, 3));
        ledger.counters.insert("lost".into(), counter(3, 0, 3));
        ledger.counters.insert("highest".into(), counter(2, 1, 3));
        ledger.counters.insert("too-high".into(), counter(3, 1, 3));
        ledger.puts.push(("put-ok".into(), "a".into(), true));
        ledger.puts.push(("put-lost".into(), "b".into(), true));
        ledger
            .puts
            .push(("failed-absent".into(), "c".into(), false));
        ledger
            .puts
            .push(("failed-landed".into(), "d".into(), false));
        ledger.puts.push(("failed-wrong".into(), "e".into(), false));
        let value = |v: &str| Ok(Some(v.to_owned()));
        let reads: Reads = [
            ("exact", value("3")),
            ("with-failed", value("5")),
            ("lost", value("1")),
            ("highest", value("2")),
            ("too-high", value("5")),
            ("put-ok", value("a")),
            ("put-lost", Ok(None)),
            ("failed-absent", Ok(None)),
            ("failed-landed", value("d")),
            ("failed-wrong", value("x")),
        ]
        .into_iter()
        .map(|(key, read)| (key.to_owned(), read))
        .collect();
        let losses = compare(&ledger, &reads);
        // `lost` misses 2 increments, `highest` 1 (an acknowledgement answered 3).
        assert_eq!(losses.increments_lost, 3);
        assert_eq!(losses.puts_lost, 1);
        assert_eq!(losses.counters_too_high, 1);
        assert_eq!(losses.failed_puts_wrong, 1);
        assert_eq!(losses.unreadable, 0);
        assert_eq!(losses.lost(), 4);
    }
}
