//! `bench`: the load generator. Starts a cluster on loopback, runs closed-loop load through each
//! way a request can take, next to the floor that way cannot beat, and prints a table (and, with
//! `--json FILE`, writes it as JSON).
//!
//! ```text
//! cargo run --release --example bench -- [--nodes 3] [--concurrency 16] [--seconds 5]
//!     [--scenarios local,raw_actix,forwarded,client,raw_tcp,durable,raw_lmdb,failover,planned]
//!     [--json FILE]
//! cargo run --release --example bench -- --scenarios freeze,partition [--freeze-seconds 4]
//! cargo run --release --example bench -- --scenarios durable,raw_lmdb
//! cargo build --release --example bench --example kv
//! target/release/examples/bench --scenarios durable_postgres,raw_postgres,durable_failover
//!     [--postgres-fsync on|off] [--postgres-url postgres://USER@127.0.0.1:PORT/DB]
//! target/release/examples/bench --scenarios exactly_once [--postgres-url ...]
//! ```
//!
//! # How it runs
//!
//! **Every node is a process of its own**: this program re-executes itself as `bench serve --id N
//! --listen ADDR --data-dir DIR [--init LIST]` (the same command line as `kv serve`, so the
//! process harness of `support/mod.rs` starts, SIGKILLs and restarts it), one actix `System` per
//! process, with a trivial handler: `Echo { payload }` answers its payload. Processes rather than
//! threads, because `failover` needs a real `kill -9` and `freeze` a real SIGSTOP, and because
//! one set of nodes for every scenario keeps the scenarios comparable. The load generator itself
//! runs on one single-threaded tokio runtime in this process; each requester is a future that
//! sends one request, waits for its answer, and sends the next (closed loop), for `--seconds`
//! after a warm-up of `--warmup-seconds` that is not recorded. Each requester walks its own slice
//! of a key list holding one key per shard. The shard count is 1024.
//!
//! - `local`: node 1 runs the requesters itself, inside its actix `System`, with `node.send` on
//!   keys of the shards it owns (asked for over a line of JSON on a control port that node 1
//!   writes to `DATA_DIR/bench-control-port`). The other nodes idle meanwhile.
//! - `raw_actix`: the floor of `local`, in the same node process: the requesters
//!   `addr.send(..).await` the same payload to one plain actix actor that answers it.
//! - `forwarded`: external requests that enter at a node that does not own the key: the load
//!   generator sends each `Request::Shard` over the transport to the node after the owner (in id
//!   order), which forwards it to the owner. Two network round trips per request.
//! - `client`: an external `Client` (one, cloned by every requester, as an application would
//!   share it) sending straight to each key's owner. One network round trip per request.
//! - `raw_tcp`: the floor of `forwarded` and `client`: the same requesters and the same request
//!   frame size (the encoded `Request::Shard` plus the transport's request header and length
//!   prefix, measured, not guessed) over plain tokio `LengthDelimitedCodec` TCP to an echo server
//!   on a thread of this process with its own single-threaded runtime, with **one connection
//!   per requester** (the `Client` instead multiplexes every requester over one connection per
//!   node and batches writes; so the floor has the simpler, not the cheaper, connection scheme).
//! - `durable`: durable increments. **The one scenario whose node is not one of the cluster's
//!   processes**: a standalone node (`ClusterBuilder::standalone`: it owns every shard, no raft)
//!   on a thread of this process, in an actix `System` of its own that also runs the requesters
//!   (`node.send`, as in `local`), with an [`LmdbShardStore`] in the bench's temporary directory
//!   (`StoreOptions::default()`: fsync on). Its handler, [`Counters`], keeps a
//!   `DurableMap<u64>` counter per key; each requester sends `Increment` to the keys of the
//!   key list (one per shard) in turn, so the increments in flight are on distinct keys spread
//!   over the shards, and a reply comes only once the increment is committed to the store. Why
//!   not a node of the cluster: the echo nodes keep nothing, and giving them a store would put a
//!   durable handler under every other scenario; the request path of a durable shard (router,
//!   shard actor, the shard's commit task, the store's writer thread) does not involve raft, so
//!   a standalone node measures all of it; and in this process the node and its floor share the
//!   disk, the directory and the thread layout (requesters on one thread, the LMDB writer on
//!   another). Every shard is activated before the warm-up (a read each: an activation writes
//!   the shard's fence, which the measurement should not include). At the end every key is
//!   read back through the node, then again through a second standalone node on the reopened
//!   store (a restart in place, which loads what was committed), and each sum must equal the
//!   acknowledged increments, warm-up included (up to the failed increments, whose outcome is
//!   unknown): the scenario fails otherwise.
//! - `raw_lmdb`: the floor of `durable`, with no framework: the same requesters (on this
//!   process's runtime) increment the same keys in an LMDB environment of their own, opened with
//!   heed as the store opens its own (1 GiB map, fsync on), through one writer thread that takes
//!   every queued increment (at most 512, the store's bound per transaction) into one write
//!   transaction, commits it (fsync), then acknowledges each of them: committed before
//!   acknowledged, at the same concurrency. The same read-back check follows.
//!
//!   In these two scenarios and the two below, requester `r` of `C` increments the keys whose
//!   index is `r` modulo `C`, in turn, so no two increments of one key (one shard) are ever in
//!   flight together and no shard merges two increments into one commit.
//! - `durable_postgres` (opt-in, as the two below): `durable` with a [`PostgresShardStore`]
//!   instead: `PostgresOptions::default()` (a pool of 8 connections) with tables of its own
//!   (`bench_durable_…`, dropped afterwards), on the bench's PostgreSQL. That is a throwaway
//!   server the bench starts in a temporary directory (`testing::PostgresServer`, on 127.0.0.1),
//!   which with `--postgres-fsync on` (the default) flushes each commit to disk as a production
//!   server does and with `off` leaves commits their CPU cost alone; or the database of
//!   `--postgres-url` (loopback only). The store commits a shard's batch in one transaction:
//!   BEGIN; `SELECT … FOR UPDATE` of the shard's fence row; the fence checked in Rust
//!   (`Fence::check_commit`); one `INSERT … ON CONFLICT DO UPDATE` of the records; COMMIT:
//!   four round trips, on the store's own runtime thread. It groups nothing across shards, and
//!   with the key slices above each commit holds one increment. Besides `durable`'s figures and
//!   read-backs (the second through a node on a new store), the scenario reports the server's
//!   side: its writing transactions during the load (`txid_current()` before and after: one
//!   per increment), and the CPU time of its processes, which the CPU per request includes.
//! - `raw_postgres`: the floor of `durable_postgres`, with no framework: the same requesters (on
//!   this process's runtime, where the pool's connections live too) increment the same keys in
//!   tables of their own (`bench_raw_…`, made with the store's DDL, dropped afterwards) through
//!   a deadpool pool of tokio-postgres connections built as the store builds its own (8
//!   connections, opened before the load), each increment in a transaction of its own: BEGIN;
//!   `SELECT epoch, owner, released … FOR UPDATE` of the shard's fence row (written for every
//!   shard before the load, as an activation does), decided with `Fence::check_commit`; `INSERT
//!   … VALUES … ON CONFLICT DO UPDATE` of the key's record, holding the new count encoded as
//!   `DurableMap<u64>` encodes it; COMMIT; then the acknowledgement. Statements are prepared
//!   once per connection, as the store's are. No group commit, as in the store; with fsync on,
//!   the server flushes the WAL of concurrent commits together for both. The same read-back
//!   check follows.
//! - `failover`: the `client` load runs while a follower, then the leader (`--kills` each), is
//!   killed with SIGKILL. Every shard of the killed node is probed through a client seeded with
//!   the survivors every `--probe-ms`; a shard's unavailability is the time from the kill to its
//!   first successful answer, and `all_served_ms` is the kill → the last shard's answer. Failed
//!   requests are the load's requests that got an error. The node restarts and the cluster
//!   settles before the next kill.
//! - `freeze` (opt-in, not in the default list): a follower, then the leader (`--kills` each),
//!   is frozen with SIGSTOP for `--freeze-seconds` (longer if its shards are not all back by
//!   then), then thawed with SIGCONT, and the cluster settles before the next freeze: the
//!   process keeps its sockets open and answers nothing, as a stalled machine does. The load is
//!   the `client` load with half the requesters sending a non-idempotent `Echo` and half an
//!   `IdempotentEcho` (`#[idempotent]`, which the client may send again to a shard's next
//!   owner). Every shard of the frozen node is probed with `IdempotentEcho` through a client
//!   seeded with **every** node, the frozen one included (a real client that knows it): a
//!   shard's unavailability is the time from the freeze to the probe's first answer. Per freeze,
//!   from the freeze until the cluster settled after the thaw: the failed non-idempotent
//!   requests, split into outcome-unknown (`OutcomeUnknown` or `Timeout`: the client cannot know
//!   whether they took effect) and other failures; the non-idempotent requests outstanding to
//!   the frozen node at the freeze (sent before it, answered after it, on a shard it owned in
//!   the settled map); the failed idempotent requests; and the longest request in flight at
//!   some moment of that window.
//! - `partition` (opt-in): the same, with the node cut off instead of frozen: `bench serve`
//!   turns SIGUSR1 into `node.faults().isolate(true)` (its transport drops every frame it sends
//!   or receives, its server every request, liveness probes included; no socket closes) and
//!   SIGUSR2 into `isolate(false)`, and confirms each change in `DATA_DIR/bench-isolated`; the
//!   fault's instant is when the bench read the confirmation (polled every millisecond), since
//!   the node serves on until its runtime gets to the signal. The node's process keeps running,
//!   so it sees its lease lapse and stops serving on its own.
//! - `planned`: under the same load, a node joins (`AddNode` as a voter, then its share moves to
//!   it) and a follower is drained (`Drain`), each until the cluster settles. The worst pause is
//!   the longest latency of a load request that started in that window: a request to a moving
//!   shard waits for the handoff. The load reaches each shard every 1024 / throughput seconds
//!   (about 8 ms at 120 000 requests/s), so a pause can be underestimated by up to that much;
//!   `failover_timing` probes every moving shard instead.
//! - `durable_failover` (opt-in): a cluster of its own, of `--nodes` `kv serve --store
//!   postgres://…` processes (the `kv` example, built beside the bench) on a database of their
//!   own: `bench_failover` on the bench's server, or the database of `--postgres-url`, which
//!   must not hold the kv tables yet and whose kv tables are dropped afterwards. Under a load of
//!   `--concurrency` requesters through one `Client`, each alternately an `Incr` of a counter
//!   (one per shard, walked as `client` walks its keys) and a `Put` of a fresh key, a follower
//!   and then the leader are killed with SIGKILL; each is restarted once its shards are back,
//!   and the cluster settles before the next kill. Every shard of the killed node is probed
//!   every `--probe-ms` with an `Incr` of a probe counter of that shard, through a client seeded
//!   with the survivors: a shard's unavailability is the time from the kill to its first
//!   acknowledged probe, which its new owner answers once it loaded the shard from PostgreSQL.
//!   The load stops once the cluster settled after the last restart; then every counter (probe
//!   counters too) and every put is read back through a client of every node. A value is lost
//!   when a counter holds less than its acknowledged increments (or than the highest count an
//!   increment answered), or an acknowledged put's key does not hold its value; a counter may
//!   exceed its acknowledged increments only by its failed ones (their outcome is unknown), and
//!   a failed put's key holds nothing or its value. Per kill: the unavailability per shard
//!   (median and max) and the failed load requests, as `failover` counts them.
//! - `exactly_once` (opt-in): exactly-once effects (issue 19) under faults, in two phases on
//!   `kv serve` clusters of their own (`--nodes` each, started as `durable_failover` starts
//!   its), each after a measurement of the session record's cost. The load: `--concurrency`
//!   requesters sharing one `Client` (one session), each incrementing its slice of 1024
//!   counters (one key per shard, so that every node owns a share of them whatever the map;
//!   disjoint slices as in `durable`) in turn. Each increment is one request
//!   (`Client::request`) sent with `ClientRequest::send_with`, each send bounded by a deadline
//!   of 250 ms (`CallOptions::deadline`), until it is acknowledged: after an error whose outcome
//!   is unknown (`OutcomeUnknown`, `Timeout`) sent again at once under the same id; after a
//!   refusal or an unreachable cluster (`NotReady`, `Overloaded`, `ShuttingDown`, no node
//!   reachable: the request may have reached a node in an earlier attempt) again after 50 ms;
//!   for at most 60 s and 2000 sends. An increment not acknowledged by then, or one that meets
//!   an error final for its id (`RequestIdReused`, `RequestTooOld`, `SessionExpired`, a
//!   handler's error), is given up, which fails the run. Within one send the client itself
//!   already sends the request again under its id when an attempt's outcome is unknown (the
//!   owner died or froze, the shard moved); those retries never reach the requesters, so the
//!   bench counts them from the client's debug event (`outcome unknown; sending the request
//!   again under its id`, in a span of the load's, so that the probes' are not counted). The
//!   short deadline, shorter than a failover, is what makes the requesters send again too (with
//!   the client's 10 s every fault ends inside one send), and with it an earlier attempt of the
//!   id may still be queued at a node when the next arrives. The requesters record, per
//!   counter, the count each acknowledged increment answered.
//!   1. PostgreSQL: the nodes on a database of their own (`bench_exactly_once` on the bench's
//!      server, or `--postgres-url` as `durable_failover` takes it). Under the load, each once
//!      the cluster settled: a follower killed with SIGKILL and restarted once its shards are
//!      back; the leader the same; then the second follower frozen with SIGSTOP for
//!      `--freeze-seconds`, longer until its shards all answered elsewhere, then thawed with
//!      SIGCONT. Each fault is probed as `durable_failover` probes a kill (the freeze through a
//!      client seeded with every node, the frozen one too). A node frozen in the middle of a
//!      commit holds its shard's row lock in PostgreSQL until the server ends its idle
//!      transaction (`PostgresOptions::idle_in_transaction_timeout`, 5 s): that shard's new
//!      owner cannot load it before, so a freeze's maximum unavailability is often about 5 s
//!      while its median is a failover's.
//!   2. LMDB, restarted in place: the nodes with `--store lmdb` (node-local: a shard that fails
//!      over starts empty, so no single node is faulted). After 2 s of load every node is
//!      killed with SIGKILL, all are started again on their data dirs 500 ms later, and the
//!      load goes on until the cluster settled (it must come back with the map it had: a
//!      restart in place).
//!
//!   After the load stops (once the cluster settled after the last fault), every counter is
//!   read back through a client seeded with each node in turn. A counter must hold exactly its
//!   acknowledged increments: fewer is a loss (also below the highest count an increment
//!   answered), more a duplicate (beyond its given-up increments, which may have landed); two
//!   acknowledged increments of one counter that answered the same count, reads that differ
//!   between nodes, and unreadable counters are problems too, as are lost or phantom probe
//!   increments (checked as `durable_failover` checks its counters). Reported per phase:
//!   acknowledged increments, lost and duplicated ones (each must be 0), given-up ones (must
//!   be 0), the requests sent again after an unknown outcome (by the client within a send, and
//!   by the requesters) and after a refusal, the increments that needed more than one send,
//!   the sends that failed with an error not flagged outcome-unknown (`is_outcome_unknown()`
//!   false) although the client had sent the request again within that send after an unknown
//!   outcome (the request may have been applied: only a retry under its id tells);
//!   per fault, from the fault until the cluster settled, the client's retries, the
//!   requesters' failed sends (outcome unknown, refused, final) and how many counters the node
//!   owned, with the unavailability of its shards and `durable_failover`'s per-fault figures
//!   (`failed_requests` there are given-up increments; `outstanding_at_fault`, increments in
//!   flight on the node's shards at the fault).
//!
//!   The record's cost, measured in each phase before its faults on counters of its own (one
//!   per shard): the same load without faults in 3 pairs of slices of `--seconds` (each after
//!   `--warmup-seconds`), one with numbered requests and one with
//!   `CallOptions::numbered(false)` (no request id: the shard keeps no record, nothing is sent
//!   again), alternating which goes first; reported: each slice's increments/s and CPU per
//!   increment (this process, the nodes, and the PostgreSQL server's processes), the medians,
//!   and numbered over unnumbered (below 1: what the record costs). The slices run one after
//!   the other on a shared machine whose fsyncs vary: take the median of several runs. The
//!   table's row is the PostgreSQL phase's load (its errors are given-up increments). A failed
//!   check does not stop the bench: the figures are printed and written, then the run exits
//!   non-zero naming what failed (the JSON's `failed`).
//!
//! Scenarios run in the order above, whatever the order of `--scenarios`, so that the floors sit
//! next to what they bound and the membership changes come last (`durable_postgres` and
//! `raw_postgres` run after `raw_lmdb`, `freeze` and `partition` after `failover`). `failover` gets
//! the same per-kill split of its failures (its load is all non-idempotent `Echo`, as before).
//!
//! # What the figures mean
//!
//! Latencies are recorded for every successful request (`Instant` before the send, after the
//! answer; nothing is averaged) in a log-linear histogram with buckets 1/128 of a power of two
//! wide, and the percentiles are nearest-rank over it (within 0.4 %; the maximum is exact).
//! Throughput is successful requests over the time from the start until the last requester
//! finished. A scenario's floor ratio is its throughput over its floor's (`local` → `raw_actix`;
//! `forwarded` and `client` → `raw_tcp`; `durable` → `raw_lmdb`; `durable_postgres` →
//! `raw_postgres`) and its p50 over the floor's p50. The CPU per request is the user and system
//! time (`/proc/PID/stat`, 10 ms resolution) that every process taking part used during the
//! measurement, over the successful requests: this process and every node for `forwarded` and
//! `client`, node 1 alone for `local` and `raw_actix`, this process (the echo server's thread
//! included) for `raw_tcp`, this process (its node or its writer thread included) for `durable` and
//! `raw_lmdb`, this process and the PostgreSQL server's processes (its connections' backends and
//! its background processes) for `durable_postgres` and `raw_postgres`. `durable` and `raw_lmdb`
//! wait for fsyncs, so their throughput is the disk's as much as the code's: their ratio is what
//! the framework keeps of what LMDB can do with that disk. On a shared virtual disk an fsync can
//! take 0.2 ms one second and 4 ms the next, and the two scenarios run one after the other: take
//! the median ratio of several runs. With the temporary directory on tmpfs (`TMPDIR=/dev/shm`) the
//! fsyncs cost nothing and the ratio shows the CPU cost alone. The same holds for
//! `durable_postgres` and `raw_postgres` with the server's WAL flushes, which `--postgres-fsync=off`
//! turns off; either way the server's processes share the machine's cores with the bench. The
//! machine these numbers come from has 2 cores shared by the load generator, the echo server and
//! every node: compare scenarios within one run (the ratios), not absolute figures across runs; and
//! whether the processes wake each other across the two cores or take turns on one changes the
//! network ratios by up to 2 × (`taskset -c 0` pins the whole run to one core).
//!
//! Every loop is bounded by a count and a deadline; every child process and the temporary
//! directory are removed on exit, on error and on Ctrl-C.

#[path = "support/mod.rs"]
mod support;

// The PostgreSQL scenarios: `raw_postgres` and `durable_failover`, and what `durable_postgres`
// adds to `durable`.
#[path = "bench/postgres.rs"]
mod postgres;

// `exactly_once`: retrying clients through faults on `kv` nodes with a durable store.
#[path = "bench/exactly_once.rs"]
mod exactly_once;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::{Actor, Addr, Context, Handler, Message};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use clusterfunk::admin::{
    resolve_credentials, AdminClient, AdminRequest, AdminResponse, Credentials,
};
use clusterfunk::client::Client;
use clusterfunk::internals as codec;
use clusterfunk::internals::{Request, Response};
use clusterfunk::persist::{
    DurableMap, DurableState, LmdbShardStore, PostgresOptions, PostgresShardStore, ShardStore,
};
use clusterfunk::prelude::*;
use clusterfunk::storage::StoreOptions;
use clusterfunk::testing::{keys_per_shard, wait_for, wait_settled, Binaries, Settled};
use clusterfunk::tls::certs::{self, NodeSpec};
use clusterfunk::transport::{Transport, TransportConfig};
use clusterfunk::NodeInfo;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{
    check_interrupt, exit_code, fmt_ms, interrupted, lib_status, load_average, ms, probe_until_ok,
    round3, runtime, stopped_early, watch_interrupt, write_json, Harness, Launch, NodeOptions,
    Series, POLL_TIMEOUT,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// This program's name, in its messages and the node logs.
const PROGRAM: &str = "bench";
/// Shards of the cluster.
const SHARD_COUNT: u32 = 1024;
/// The cluster's name (the library's default).
const CLUSTER_NAME: &str = "clusterfunk";
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most requests one scenario makes (a bound far above what `--seconds 3600` reaches).
const REQUESTS_MAX: u64 = 1 << 36;
/// Most requests whose timeline (start, latency, outcome, shard, requester: 48 bytes each) a membership scenario
/// keeps; past it the latency histogram still counts every request.
const TIMELINE_MAX: usize = 4_000_000;
/// Most distinct error messages kept per scenario.
const ERROR_KINDS_MAX: usize = 20;
/// What the transport adds to a request payload in its frame: the 4-byte length prefix, the
/// header's variant tag (1 byte) and the request id (a varint: 5 bytes for ids from 65 536 to
/// 2³² − 1, where a connection spends most of a run).
const TRANSPORT_REQUEST_OVERHEAD_BYTES: usize = 4 + 1 + 5;
/// The file in a node's data dir that holds its control port.
const CONTROL_PORT_FILE: &str = "bench-control-port";
/// The file in a node's data dir where its fault hook confirms a change: `true` once it is
/// isolated, `false` once healed.
const ISOLATED_FILE: &str = "bench-isolated";
/// Most frames the echo server answers on one connection.
const ECHO_FRAMES_MAX: u64 = 1 << 40;
/// Most connections the echo server accepts.
const ECHO_CONNECTIONS_MAX: usize = 100_000;
/// Most fault signals (SIGUSR1, SIGUSR2) a bench node acts on.
const FAULT_SIGNALS_MAX: u64 = 1 << 32;
/// Most control connections a bench node accepts (one per in-node scenario is used).
const CONTROL_CONNECTIONS_MAX: usize = 100_000;
/// Longest a failover or planned scenario's load may run.
const MEMBERSHIP_LOAD_MAX: Duration = Duration::from_secs(600);
/// Load before a kill or a membership change, and after the last shard is back.
const MEMBERSHIP_MARGIN: Duration = Duration::from_millis(500);
/// How long an `AddNode` or a `Drain` may take.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Command line

/// The command line: the load generator, or (internal) one node.
#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    about = "Load generator: throughput and latency of local, forwarded and client requests next to their floors, and of failover and planned moves, on a loopback cluster",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Run one bench node (the load generator starts these itself).
    #[command(hide = true)]
    Serve(ServeArgs),
}

/// The node's command line: `kv serve`'s, so that `support::Launch` can start it.
#[derive(Args, Debug)]
struct ServeArgs {
    /// This node's id.
    #[arg(long)]
    id: NodeId,
    /// Address to listen on, IP:PORT.
    #[arg(long)]
    listen: SocketAddr,
    /// Directory of the node's raft storage; its control port is written there too.
    #[arg(long)]
    data_dir: PathBuf,
    /// Bootstrap a new cluster with these voters (ID=IP:PORT,...).
    #[arg(long)]
    init: Option<String>,
    /// Timing profile: `default` or `fast` (as `kv serve --timing`).
    #[arg(long, default_value = "default", value_parser = ["default", "fast"])]
    timing: String,
    /// Run without the cluster secret (as `kv serve --insecure`).
    #[arg(long)]
    insecure: bool,
    /// Run with TLS, this node's certificates in this directory (as `kv serve --tls-dir`).
    #[arg(long, conflicts_with = "insecure")]
    tls_dir: Option<PathBuf>,
}

/// The load generator's options.
#[derive(Args, Debug)]
struct Options {
    /// Nodes of the cluster (at least 3 for `failover`, 2 for `forwarded`).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Concurrent requesters, in every scenario.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of recorded load per throughput scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of unrecorded load before each throughput scenario (connections, maps, shards).
    #[arg(long, default_value_t = 0.5)]
    warmup_seconds: f64,
    /// The scenarios to run (they run in the order of the default list, `freeze` and
    /// `partition`, which are not in it, after `failover`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local,raw_actix,forwarded,client,raw_tcp,durable,raw_lmdb,failover,planned"
    )]
    scenarios: Vec<Scenario>,
    /// Write the results to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Bytes of the `Echo` message's payload (and of its answer).
    #[arg(long, default_value_t = 32)]
    payload_bytes: usize,
    /// Run the nodes and the load without the cluster secret (`kv serve --insecure`): frames
    /// go unauthenticated. For measuring what the secret mode costs; never in production.
    #[arg(long)]
    insecure: bool,
    /// Run the nodes and the load with TLS 1.3 and client certificates (made with
    /// `clusterfunk::tls::certs` in the bench's directory), to compare with the secret mode.
    #[arg(long, conflicts_with = "insecure")]
    tls: bool,
    /// Follower kills in `failover` (follower freezes in `freeze`, partitions in `partition`);
    /// as many leader kills (freezes, partitions) follow.
    #[arg(long, default_value_t = 1)]
    kills: usize,
    /// Seconds a node stays frozen (`freeze`) or cut off (`partition`), at least: the fault
    /// lasts until every shard of the node answered elsewhere, if that takes longer.
    #[arg(long, default_value_t = 4.0)]
    freeze_seconds: f64,
    /// Probe interval per shard of a killed node, in ms.
    #[arg(long, default_value_t = 5)]
    probe_ms: u64,
    /// Seconds a failover, a membership change or a wait for the cluster may take.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
    /// The PostgreSQL database of `durable_postgres`, `raw_postgres` and `durable_failover`
    /// (`postgres://USER[:PASSWORD]@127.0.0.1:PORT/DB`; or `BENCH_POSTGRES_URL`, which keeps a
    /// password out of the process list). Without it the bench starts a throwaway server of
    /// its own (`testing::PostgresServer`) in a temporary directory.
    #[arg(long, env = "BENCH_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// Whether the throwaway PostgreSQL server flushes each commit to disk: `on` (as a
    /// production server does, and as `durable`'s LMDB store does) or `off` (commits cost CPU
    /// alone, as `durable` on tmpfs). Ignored with `--postgres-url`.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    postgres_fsync: String,
    /// The node processes.
    #[command(flatten)]
    node: NodeOptions,
}

impl Options {
    fn check(&self) -> Result<(), String> {
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err("--concurrency must be between 1 and 10000".into());
        }
        if !(self.seconds > 0.0 && self.seconds <= 3600.0) {
            return Err("--seconds must be more than 0 and at most 3600".into());
        }
        if !(self.warmup_seconds >= 0.0 && self.warmup_seconds <= 600.0) {
            return Err("--warmup-seconds must be between 0 and 600".into());
        }
        if self.nodes == 0 || self.nodes > 9 {
            return Err("--nodes must be between 1 and 9".into());
        }
        if self.payload_bytes > 1 << 20 {
            return Err("--payload-bytes must be at most 1 MiB".into());
        }
        let wants = |s: Scenario| self.scenarios.contains(&s);
        let faulted = [
            Scenario::Failover,
            Scenario::Freeze,
            Scenario::Partition,
            Scenario::DurableFailover,
            Scenario::ExactlyOnce,
        ];
        if faulted.into_iter().any(wants) && self.nodes < 3 {
            return Err(
                "failover, freeze, partition, durable_failover and exactly_once need --nodes 3 or more (a majority must survive)"
                    .into(),
            );
        }
        if !(self.freeze_seconds > 0.0 && self.freeze_seconds <= 600.0) {
            return Err("--freeze-seconds must be more than 0 and at most 600".into());
        }
        if self.kills > 100 {
            return Err("--kills must be at most 100".into());
        }
        if (wants(Scenario::Forwarded) || wants(Scenario::Planned)) && self.nodes < 2 {
            return Err("forwarded and planned need --nodes 2 or more".into());
        }
        Ok(())
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_seconds)
    }

    fn freeze(&self) -> Duration {
        Duration::from_secs_f64(self.freeze_seconds)
    }
}

/// One way of sending requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Scenario {
    /// `node.send` inside the owning node.
    #[value(name = "local")]
    Local,
    /// Plain actix `addr.send` in the same node process: the floor of `local`.
    #[value(name = "raw_actix")]
    RawActix,
    /// External requests entering at a non-owner node.
    #[value(name = "forwarded")]
    Forwarded,
    /// An external `Client` sending to the owner.
    #[value(name = "client")]
    Client,
    /// Plain tokio TCP echo: the floor of `forwarded` and `client`.
    #[value(name = "raw_tcp")]
    RawTcp,
    /// Durable increments on a standalone node with an LMDB shard store.
    #[value(name = "durable")]
    Durable,
    /// Increments committed by hand with heed, one writer thread: the floor of `durable`.
    #[value(name = "raw_lmdb")]
    RawLmdb,
    /// Durable increments on a standalone node with a PostgreSQL shard store (opt-in).
    #[value(name = "durable_postgres")]
    DurablePostgres,
    /// Increments committed by hand with tokio-postgres, one transaction each: the floor of
    /// `durable_postgres` (opt-in).
    #[value(name = "raw_postgres")]
    RawPostgres,
    /// SIGKILL a follower, then the leader, under load.
    #[value(name = "failover")]
    Failover,
    /// SIGSTOP a follower, then the leader, for a few seconds under load (opt-in).
    #[value(name = "freeze")]
    Freeze,
    /// Cut a follower, then the leader, off without closing sockets, under load (opt-in).
    #[value(name = "partition")]
    Partition,
    /// Add a node and drain one under load.
    #[value(name = "planned")]
    Planned,
    /// SIGKILL a follower, then the leader, of `kv serve --store postgres://…` nodes under
    /// durable load; every acknowledged value read back (opt-in).
    #[value(name = "durable_failover")]
    DurableFailover,
    /// Increments from clients that retry each request under its id until acknowledged,
    /// through kills and a freeze on PostgreSQL and a whole-cluster kill on LMDB; the final
    /// counts must equal the acknowledged increments; and the session record's cost (opt-in).
    #[value(name = "exactly_once")]
    ExactlyOnce,
}

impl Scenario {
    const ALL: [Scenario; 15] = [
        Scenario::Local,
        Scenario::RawActix,
        Scenario::Forwarded,
        Scenario::Client,
        Scenario::RawTcp,
        Scenario::Durable,
        Scenario::RawLmdb,
        Scenario::DurablePostgres,
        Scenario::RawPostgres,
        Scenario::Failover,
        Scenario::Freeze,
        Scenario::Partition,
        Scenario::Planned,
        Scenario::DurableFailover,
        Scenario::ExactlyOnce,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Local => "local",
            Scenario::RawActix => "raw_actix",
            Scenario::Forwarded => "forwarded",
            Scenario::Client => "client",
            Scenario::RawTcp => "raw_tcp",
            Scenario::Durable => "durable",
            Scenario::RawLmdb => "raw_lmdb",
            Scenario::DurablePostgres => "durable_postgres",
            Scenario::RawPostgres => "raw_postgres",
            Scenario::Failover => "failover",
            Scenario::Freeze => "freeze",
            Scenario::Partition => "partition",
            Scenario::Planned => "planned",
            Scenario::DurableFailover => "durable_failover",
            Scenario::ExactlyOnce => "exactly_once",
        }
    }

    /// The scenario whose figures bound this one's.
    fn floor(self) -> Option<Scenario> {
        match self {
            Scenario::Local => Some(Scenario::RawActix),
            Scenario::Forwarded | Scenario::Client => Some(Scenario::RawTcp),
            Scenario::Durable => Some(Scenario::RawLmdb),
            Scenario::DurablePostgres => Some(Scenario::RawPostgres),
            _ => None,
        }
    }

    /// Whether the scenario runs on the cluster's node processes (the others run in this
    /// process alone, or on `kv` processes of their own).
    fn needs_cluster(self) -> bool {
        !matches!(
            self,
            Scenario::RawTcp
                | Scenario::Durable
                | Scenario::RawLmdb
                | Scenario::DurablePostgres
                | Scenario::RawPostgres
                | Scenario::DurableFailover
                | Scenario::ExactlyOnce
        )
    }

    /// Whether the scenario needs a PostgreSQL server.
    fn needs_postgres(self) -> bool {
        matches!(
            self,
            Scenario::DurablePostgres
                | Scenario::RawPostgres
                | Scenario::DurableFailover
                | Scenario::ExactlyOnce
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The node's handler, and the raw actix floor

/// The bench message: answers its payload.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Vec<u8>)]
#[tag = "bench.echo"]
struct Echo {
    payload: Vec<u8>,
}

/// `Echo` declared idempotent: the client sends it again to a shard's next owner when the
/// first attempt's fate is unknown (the idempotent half of the `freeze` and `partition` load,
/// and their probes).
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Vec<u8>)]
#[tag = "bench.echo_idempotent"]
#[idempotent]
struct IdempotentEcho {
    payload: Vec<u8>,
}

/// A shard of the bench service: it keeps nothing.
#[derive(Default)]
struct Echoes;

#[shard_handler]
impl Echoes {
    fn echo(&mut self, _key: Key, msg: Echo, _ctx: &mut ShardContext) -> Vec<u8> {
        msg.payload
    }

    fn echo_idempotent(
        &mut self,
        _key: Key,
        msg: IdempotentEcho,
        _ctx: &mut ShardContext,
    ) -> Vec<u8> {
        msg.payload
    }
}

/// The floor of `local`: one plain actix actor answering the payload.
struct RawEcho;

impl Actor for RawEcho {
    type Context = Context<Self>;
}

/// The raw actix message.
struct RawEchoMessage(Vec<u8>);

impl Message for RawEchoMessage {
    type Result = Vec<u8>;
}

impl Handler<RawEchoMessage> for RawEcho {
    type Result = Vec<u8>;

    fn handle(&mut self, msg: RawEchoMessage, _: &mut Self::Context) -> Vec<u8> {
        msg.0
    }
}

// ---------------------------------------------------------------------------------------------
// Closed-loop load

/// One requester: sends a request and waits for its answer.
trait Requester {
    /// Sends request number `iteration` of this requester and waits for the answer.
    async fn call(&mut self, iteration: u64) -> Result<(), String>;

    /// What the last [`call`](Self::call) was, for the timeline (nothing known by default).
    fn last_call(&self) -> CallFacts {
        CallFacts::default()
    }
}

/// What a timeline keeps about one request besides its timing.
#[derive(Debug, Clone, Copy, Default)]
struct CallFacts {
    /// The shard of its key.
    shard: u32,
    /// Whether the message was idempotent (the client may send it twice).
    idempotent: bool,
    /// Whether it failed with an unknown outcome (`OutcomeUnknown` or `Timeout`).
    outcome_unknown: bool,
    /// Which requester sent it (its index in the load).
    requester: u16,
}

/// One request of a load that keeps its timeline (for the membership scenarios).
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    latency: Duration,
    ok: bool,
    call: CallFacts,
}

impl Sample {
    fn end(&self) -> Instant {
        self.start + self.latency
    }
}

/// Latencies in ns, counted in buckets 1/128 of a power of two wide (as HdrHistogram does with
/// two significant digits), so that every request is recorded in 60 KiB however many there
/// are, and a quantile is off by less than 0.4 % (the bucket's half width). Values below 128 ns
/// are exact; the maximum is kept exactly.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

/// Sub-buckets per power of two: 2^7.
const HISTOGRAM_SUB_BITS: u32 = 7;
const HISTOGRAM_SUB: usize = 1 << HISTOGRAM_SUB_BITS;
/// Enough buckets for every `u64`: 128 exact values, then 57 powers of two of 128 buckets.
const HISTOGRAM_BUCKETS: usize = HISTOGRAM_SUB * (64 - HISTOGRAM_SUB_BITS as usize + 1);

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; HISTOGRAM_BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn bucket(value: u64) -> usize {
        if value < HISTOGRAM_SUB as u64 {
            return value as usize;
        }
        let shift = (63 - value.leading_zeros()) - HISTOGRAM_SUB_BITS;
        let mantissa = (value >> shift) as usize - HISTOGRAM_SUB;
        (shift as usize + 1) * HISTOGRAM_SUB + mantissa
    }

    /// The middle of a bucket.
    fn value(bucket: usize) -> f64 {
        if bucket < HISTOGRAM_SUB {
            return bucket as f64;
        }
        let shift = bucket / HISTOGRAM_SUB - 1;
        let low = ((bucket % HISTOGRAM_SUB + HISTOGRAM_SUB) as u64) << shift;
        low as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::bucket(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The nearest-rank `p`-quantile: the bucket of the smallest value with at least a share
    /// `p` of all values at or below it (the exact maximum for `p = 1`).
    fn quantile(&self, p: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max as f64;
        }
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::value(bucket).min(self.max as f64);
            }
        }
        self.max as f64
    }
}

/// What a load recorded.
#[derive(Debug, Default)]
struct Recorded {
    /// Latency of every successful request.
    latencies: Histogram,
    errors: u64,
    /// Error messages (numbers masked), counted.
    error_kinds: BTreeMap<String, u64>,
    /// Every request, when asked for (at most [`TIMELINE_MAX`]).
    timeline: Vec<Sample>,
    /// Whether requests were left off the timeline.
    timeline_truncated: bool,
    /// From the start until the last requester finished.
    elapsed: Duration,
}

impl Recorded {
    fn merge(&mut self, other: Recorded) {
        self.latencies.merge(&other.latencies);
        self.errors += other.errors;
        for (kind, count) in other.error_kinds {
            add_error_kind(&mut self.error_kinds, kind, count);
        }
        self.timeline.extend(other.timeline);
        self.timeline_truncated |= other.timeline_truncated;
    }
}

fn add_error_kind(kinds: &mut BTreeMap<String, u64>, kind: String, count: u64) {
    if kinds.len() < ERROR_KINDS_MAX || kinds.contains_key(&kind) {
        *kinds.entry(kind).or_default() += count;
    } else {
        *kinds.entry("(other errors)".to_owned()).or_default() += count;
    }
}

/// A failure message without the numbers that differ from one request to the next.
fn error_kind(message: &str) -> String {
    let kind: String = message
        .split_whitespace()
        .map(|word| {
            if word.chars().any(|c| c.is_ascii_digit()) {
                "#"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    kind.chars().take(160).collect()
}

/// Runs every requester in a closed loop until `duration` has passed, `stop` is set, Ctrl-C,
/// or the requesters made [`REQUESTS_MAX`] requests together; requests in flight at the end
/// finish. All requesters run as futures of the calling task.
async fn closed_loop<R: Requester>(
    requesters: Vec<R>,
    duration: Duration,
    stop: &AtomicBool,
    keep_timeline: bool,
) -> Recorded {
    let started = Instant::now();
    let deadline = started + duration;
    let share = (REQUESTS_MAX / requesters.len().max(1) as u64).max(1);
    let timeline_share = TIMELINE_MAX / requesters.len().max(1);
    let mut running: FuturesUnordered<_> = requesters
        .into_iter()
        .map(|mut requester| async move {
            let mut recorded = Recorded::default();
            for iteration in 0..share {
                let start = Instant::now();
                if start >= deadline || stop.load(Ordering::Relaxed) || interrupted() {
                    break;
                }
                let result = requester.call(iteration).await;
                let latency = start.elapsed();
                let ok = result.is_ok();
                match result {
                    Ok(()) => recorded
                        .latencies
                        .record(latency.as_nanos().min(u128::from(u64::MAX)) as u64),
                    Err(message) => {
                        recorded.errors += 1;
                        add_error_kind(&mut recorded.error_kinds, error_kind(&message), 1);
                    }
                }
                if keep_timeline {
                    if recorded.timeline.len() < timeline_share {
                        let call = requester.last_call();
                        recorded.timeline.push(Sample {
                            start,
                            latency,
                            ok,
                            call,
                        });
                    } else {
                        recorded.timeline_truncated = true;
                    }
                }
            }
            recorded
        })
        .collect();
    let mut all = Recorded::default();
    while let Some(recorded) = running.next().await {
        all.merge(recorded);
    }
    all.elapsed = started.elapsed();
    all
}

/// Runs `make()`'s requesters for the warm-up (unrecorded), then again for the measurement;
/// returns the measurement's summary with the CPU time that processes `pids` used meanwhile.
async fn warm_then_measure<R, F>(
    make: F,
    duration: Duration,
    warmup: Duration,
    pids: &[u32],
) -> Result<Summary, String>
where
    R: Requester,
    F: AsyncFnMut() -> Result<Vec<R>, String>,
{
    let groups = [pids.to_vec()];
    Ok(warm_then_measure_split(make, duration, warmup, &groups)
        .await?
        .0)
}

/// [`warm_then_measure`] with the processes in groups: the summary's CPU time is every
/// group's, and each group's is returned too (`None` where a process could not be read).
async fn warm_then_measure_split<R, F>(
    mut make: F,
    duration: Duration,
    warmup: Duration,
    groups: &[Vec<u32>],
) -> Result<(Summary, Vec<Option<f64>>), String>
where
    R: Requester,
    F: AsyncFnMut() -> Result<Vec<R>, String>,
{
    let stop = AtomicBool::new(false);
    if !warmup.is_zero() {
        closed_loop(make().await?, warmup, &stop, false).await;
    }
    let requesters = make().await?;
    let before: Vec<Option<f64>> = groups.iter().map(|pids| cpu_ms(pids)).collect();
    let recorded = closed_loop(requesters, duration, &stop, false).await;
    let used: Vec<Option<f64>> = groups
        .iter()
        .zip(before)
        .map(|(pids, before)| {
            cpu_ms(pids)
                .zip(before)
                .map(|(after, before)| after - before)
        })
        .collect();
    let total = used
        .iter()
        .try_fold(0.0, |sum, cpu| cpu.map(|cpu| sum + cpu));
    Ok((Summary::of(&recorded).with_cpu(total), used))
}

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/PID/stat` (100 on every mainstream
/// architecture).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// The CPU time (user and system, every thread) processes `pids` have used so far, in ms, from
/// `/proc/PID/stat`; `None` when one cannot be read. Its resolution is 10 ms.
fn cpu_ms(pids: &[u32]) -> Option<f64> {
    let mut total = 0.0;
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces:
        // `utime` and `stime` are fields 14 and 15 of the line, the 12th and 13th of these.
        let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
        let user: u64 = fields.get(11)?.parse().ok()?;
        let system: u64 = fields.get(12)?.parse().ok()?;
        total += (user + system) as f64 * 1000.0 / CLOCK_TICKS_PER_SECOND;
    }
    Some(total)
}

/// Throughput and latency of a load.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Summary {
    /// Successful requests.
    requests: u64,
    /// Failed requests.
    errors: u64,
    elapsed_s: f64,
    /// Successful requests per second.
    throughput_rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    error_kinds: BTreeMap<String, u64>,
    /// CPU time (user and system) that the processes taking part used during the measurement,
    /// in ms: the load generator's and the nodes' (`local`, `raw_actix`: node 1's alone;
    /// `raw_tcp`: this process, echo server thread included). Not measured for `failover` and
    /// `planned`.
    #[serde(default)]
    cpu_ms: Option<f64>,
    /// `cpu_ms` per successful request, in µs: what a request costs the machine, which a busy
    /// machine changes much less than the throughput.
    #[serde(default)]
    cpu_us_per_request: Option<f64>,
}

impl Summary {
    fn of(recorded: &Recorded) -> Summary {
        let latencies = &recorded.latencies;
        let quantile = |p: f64| round3(latencies.quantile(p) / 1000.0);
        let elapsed_s = recorded.elapsed.as_secs_f64();
        Summary {
            requests: latencies.total,
            errors: recorded.errors,
            elapsed_s: round3(elapsed_s),
            throughput_rps: if elapsed_s > 0.0 {
                (latencies.total as f64 / elapsed_s).round()
            } else {
                0.0
            },
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            max_us: quantile(1.0),
            error_kinds: recorded.error_kinds.clone(),
            cpu_ms: None,
            cpu_us_per_request: None,
        }
    }

    /// Sets the CPU time of the measurement and the cost per request.
    fn with_cpu(mut self, cpu_ms: Option<f64>) -> Summary {
        self.cpu_ms = cpu_ms.map(round3);
        self.cpu_us_per_request = cpu_ms
            .filter(|_| self.requests > 0)
            .map(|cpu| round3(cpu * 1000.0 / self.requests as f64));
        self
    }

    /// The summary of the timeline's requests that started in `[from, to)`.
    fn of_window(timeline: &[Sample], from: Instant, to: Instant) -> Summary {
        let mut recorded = Recorded::default();
        let mut first: Option<Instant> = None;
        let mut last_end: Option<Instant> = None;
        for sample in timeline.iter().filter(|s| s.start >= from && s.start < to) {
            first = Some(first.map_or(sample.start, |f| f.min(sample.start)));
            let end = sample.start + sample.latency;
            last_end = Some(last_end.map_or(end, |l| l.max(end)));
            if sample.ok {
                recorded
                    .latencies
                    .record(sample.latency.as_nanos().min(u128::from(u64::MAX)) as u64);
            } else {
                recorded.errors += 1;
            }
        }
        recorded.elapsed = match (first, last_end) {
            (Some(first), Some(end)) => end - first,
            _ => Duration::ZERO,
        };
        Summary::of(&recorded)
    }

    fn to_json(&self) -> serde_json::Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requesters

/// `local`: `node.send` inside the owning node.
struct LocalRequester {
    node: Node<Echoes>,
    keys: Arc<Vec<Key>>,
    next: usize,
    payload: Vec<u8>,
}

impl Requester for LocalRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let key = &self.keys[self.next % self.keys.len()];
        self.next = self.next.wrapping_add(1);
        let payload = self.payload.clone();
        let reply = self
            .node
            .send(key, Echo { payload })
            .await
            .map_err(|e| e.to_string())?;
        check_echo(&reply, &self.payload)
    }
}

/// `raw_actix`: plain `addr.send` to one actor.
struct RawActixRequester {
    actor: Addr<RawEcho>,
    payload: Vec<u8>,
}

impl Requester for RawActixRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let reply = self
            .actor
            .send(RawEchoMessage(self.payload.clone()))
            .await
            .map_err(|e| e.to_string())?;
        check_echo(&reply, &self.payload)
    }
}

/// `client` (and the load of `failover`, `freeze`, `partition` and `planned`): an external
/// `Client`.
struct ClientRequester {
    client: Client,
    /// `keys[s]` hashes to shard `s`.
    keys: Arc<Vec<String>>,
    next: usize,
    payload: Vec<u8>,
    /// Sends `IdempotentEcho` instead of `Echo`.
    idempotent: bool,
    /// Its index in the load.
    index: u16,
    last: CallFacts,
}

impl Requester for ClientRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let shard = self.next % self.keys.len();
        let key = self.keys[shard].as_str();
        self.next = self.next.wrapping_add(1);
        self.last = CallFacts {
            shard: shard as u32,
            idempotent: self.idempotent,
            outcome_unknown: false,
            requester: self.index,
        };
        let payload = self.payload.clone();
        let reply = if self.idempotent {
            self.client.send(key, IdempotentEcho { payload }).await
        } else {
            self.client.send(key, Echo { payload }).await
        };
        let reply = reply.map_err(|e| {
            self.last.outcome_unknown = e.is_outcome_unknown();
            e.to_string()
        })?;
        check_echo(&reply, &self.payload)
    }

    fn last_call(&self) -> CallFacts {
        self.last
    }
}

/// `forwarded`: a `Request::Shard` sent to a node that does not own the key, which forwards it.
struct ForwardRequester {
    transport: Transport,
    /// Each key with the node it enters at.
    targets: Arc<Vec<(Vec<u8>, SocketAddr)>>,
    next: usize,
    payload: Vec<u8>,
}

impl Requester for ForwardRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let (key, entry) = &self.targets[self.next % self.targets.len()];
        self.next = self.next.wrapping_add(1);
        // The same work as `Client::send`: encode the message, then the request around it.
        let request = Request::Shard {
            key: key.clone(),
            tag: Echo::TAG.to_owned(),
            payload: codec::encode(&Echo {
                payload: self.payload.clone(),
            })
            .map_err(|e| e.to_string())?,
        };
        let bytes = codec::encode(&request).map_err(|e| e.to_string())?;
        let answer = self
            .transport
            .request(*entry, bytes, REQUEST_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        match codec::decode::<Response>(&answer).map_err(|e| e.to_string())? {
            Response::Shard(Ok(reply)) => {
                let reply: Vec<u8> = codec::decode(&reply).map_err(|e| e.to_string())?;
                check_echo(&reply, &self.payload)
            }
            Response::Shard(Err(error)) => Err(error.to_string()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }
}

/// `raw_tcp`: one frame out, the echoed frame back, on the requester's own connection.
struct RawTcpRequester {
    connection: Framed<tokio::net::TcpStream, LengthDelimitedCodec>,
    frame: Bytes,
}

impl Requester for RawTcpRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        self.connection
            .send(self.frame.clone())
            .await
            .map_err(|e| e.to_string())?;
        match self.connection.next().await {
            Some(Ok(echoed)) if echoed.len() == self.frame.len() => Ok(()),
            Some(Ok(echoed)) => Err(format!(
                "echoed {} bytes for {}",
                echoed.len(),
                self.frame.len()
            )),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the echo server closed the connection".into()),
        }
    }
}

fn check_echo(reply: &[u8], payload: &[u8]) -> Result<(), String> {
    if reply == payload {
        Ok(())
    } else {
        Err(format!(
            "wrong echo: {} bytes for {}",
            reply.len(),
            payload.len()
        ))
    }
}

/// The framing of `raw_tcp`: a 4-byte big-endian length, as the transport's.
fn raw_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(16 << 20)
        .new_codec()
}

// ---------------------------------------------------------------------------------------------
// The node process

/// What the load generator asks a node to run inside itself.
#[derive(Debug, Serialize, Deserialize)]
struct InNodeLoad {
    /// `local` or `raw_actix`.
    scenario: String,
    concurrency: usize,
    seconds: f64,
    warmup_seconds: f64,
    payload_bytes: usize,
    /// The keys to send to (owned by the node).
    keys: Vec<String>,
}

/// `bench serve`: one node, plus a control port for the in-node scenarios, plus the fault hook
/// of `partition` (SIGUSR1 isolates the node, SIGUSR2 heals it; see [`fault_signals`]).
fn serve(args: ServeArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let credentials = resolve_credentials(args.tls_dir.as_deref(), None, args.insecure)
        .map_err(|e| e.to_string())?;
    let initial = args
        .init
        .as_deref()
        .map(NodeInfo::parse_members)
        .transpose()
        .map_err(|e| format!("--init: {e}"))?;
    actix::System::new().block_on(async move {
        let mut builder = Cluster::builder()
            .node_id(args.id)
            .listen(args.listen)
            .data_dir(&args.data_dir)
            .shards(SHARD_COUNT)
            .handler::<Echoes>();
        if let Some(members) = initial {
            builder = builder.initial_members(members);
        }
        if args.timing == "fast" {
            builder = builder
                .lease(clusterfunk::LeaseConfig::fast())
                .consensus(clusterfunk::ConsensusConfig::fast());
        }
        builder = match credentials {
            Credentials::Tls(tls) => builder.tls(tls),
            Credentials::Secret(secret) => builder.secret(secret),
            Credentials::Insecure => builder.insecure(),
        };
        let node = builder.start().await.map_err(|e| e.to_string())?;
        if let Some(faults) = node.faults() {
            fault_signals(faults.clone(), args.data_dir.clone())?;
        }
        let control = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot open the control port: {e}"))?;
        let port = control.local_addr().map_err(|e| e.to_string())?.port();
        write_control_port(&args.data_dir, port)?;
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        // The load generator opens one control connection per in-node scenario.
        for _ in 0..CONTROL_CONNECTIONS_MAX {
            tokio::select! {
                _ = &mut stop => break,
                accepted = control.accept() => match accepted {
                    Ok((stream, _)) => {
                        actix::spawn(control_session(node.clone(), stream));
                    }
                    Err(error) => tracing::warn!(%error, "control accept failed"),
                },
            }
        }
        node.shutdown().await;
        Ok(())
    })
}

/// The test-only fault hook of a bench node: from now on SIGUSR1 cuts the node off
/// (`Faults::isolate(true)`: every frame its transport sends or receives and every request its
/// server receives is dropped, no socket closes) and SIGUSR2 heals it. Each change is then
/// confirmed in `DATA_DIR/bench-isolated` (`true` or `false`): the signal reaches the node's
/// runtime some time after `kill` returns, and requests it serves meanwhile must not count as
/// served by an isolated node. The handlers are installed before this returns, so a signal
/// sent once the node answers never takes the default action (ending the process).
fn fault_signals(faults: clusterfunk::transport::Faults, data_dir: PathBuf) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut isolate =
        signal(SignalKind::user_defined1()).map_err(|e| format!("cannot handle SIGUSR1: {e}"))?;
    let mut heal =
        signal(SignalKind::user_defined2()).map_err(|e| format!("cannot handle SIGUSR2: {e}"))?;
    actix::spawn(async move {
        for _ in 0..FAULT_SIGNALS_MAX {
            let isolated = tokio::select! {
                got = isolate.recv() => got.map(|()| true),
                got = heal.recv() => got.map(|()| false),
            };
            let Some(isolated) = isolated else { return };
            faults.isolate(isolated);
            tracing::warn!(isolated, "bench fault hook: isolation changed by signal");
            if let Err(error) = write_atomically(&data_dir, ISOLATED_FILE, &isolated.to_string()) {
                tracing::warn!(%error, "bench fault hook: cannot confirm the change");
            }
        }
    });
    Ok(())
}

/// Writes the control port where the load generator looks for it (atomically, by rename).
fn write_control_port(data_dir: &Path, port: u16) -> Result<(), String> {
    write_atomically(data_dir, CONTROL_PORT_FILE, &port.to_string())
}

/// Writes `text` to `DATA_DIR/name` by rename, so that a reader never sees half of it.
fn write_atomically(data_dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let path = data_dir.join(name);
    let temporary = data_dir.join(format!("{name}.tmp"));
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Answers one control request: runs the asked load here and writes its summary as one line.
async fn control_session(node: Node<Echoes>, stream: tokio::net::TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let answer = match BufReader::new(read).read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<InNodeLoad>(&line) {
            Ok(load) => run_in_node(node, load).await,
            Err(e) => Err(format!("bad control request: {e}")),
        },
        Err(e) => Err(format!("cannot read the control request: {e}")),
    };
    let mut text =
        serde_json::to_string(&answer).unwrap_or_else(|e| format!("{{\"Err\":\"{e}\"}}"));
    text.push('\n');
    if let Err(error) = write.write_all(text.as_bytes()).await {
        tracing::warn!(%error, "cannot answer the control request");
    }
}

async fn run_in_node(node: Node<Echoes>, load: InNodeLoad) -> Result<Summary, String> {
    let warmup = Duration::from_secs_f64(load.warmup_seconds);
    let duration = Duration::from_secs_f64(load.seconds);
    let payload = vec![7u8; load.payload_bytes];
    let this_process = [std::process::id()];
    match load.scenario.as_str() {
        "local" => {
            if load.keys.is_empty() {
                return Err("no keys to send to".into());
            }
            let keys: Arc<Vec<Key>> = Arc::new(load.keys.iter().map(Key::from).collect());
            let stride = (keys.len() / load.concurrency).max(1);
            let make = async || {
                Ok((0..load.concurrency)
                    .map(|r| LocalRequester {
                        node: node.clone(),
                        keys: keys.clone(),
                        next: r * stride,
                        payload: payload.clone(),
                    })
                    .collect::<Vec<_>>())
            };
            warm_then_measure(make, duration, warmup, &this_process).await
        }
        "raw_actix" => {
            let actor = RawEcho.start();
            let make = async || {
                Ok((0..load.concurrency)
                    .map(|_| RawActixRequester {
                        actor: actor.clone(),
                        payload: payload.clone(),
                    })
                    .collect::<Vec<_>>())
            };
            warm_then_measure(make, duration, warmup, &this_process).await
        }
        other => Err(format!("unknown in-node scenario `{other}`")),
    }
}

/// Asks node `id` to run an in-node scenario and waits for its summary.
async fn in_node(
    harness: &Harness,
    id: NodeId,
    scenario: Scenario,
    keys: Vec<String>,
    options: &Options,
) -> Result<Summary, String> {
    let path = harness.node(id).data_dir().join(CONTROL_PORT_FILE);
    let limit = Duration::from_secs(options.deadline_secs);
    let port: u16 = wait_for(
        &format!("node {id}'s control port"),
        Duration::from_millis(20),
        limit,
        || async {
            std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| text.trim().parse().map_err(|_| format!("`{text}`")))
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let load = InNodeLoad {
        scenario: scenario.name().to_owned(),
        concurrency: options.concurrency,
        seconds: options.seconds,
        warmup_seconds: options.warmup_seconds,
        payload_bytes: options.payload_bytes,
        keys,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("cannot reach node {id}'s control port: {e}"))?;
        let mut text = serde_json::to_string(&load).map_err(|e| e.to_string())?;
        text.push('\n');
        stream
            .write_all(text.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str::<Result<Summary, String>>(&line)
            .map_err(|e| format!("bad answer from node {id} ({e}): `{line}`"))?
    };
    let bound = options.duration() + options.warmup() + limit;
    tokio::time::timeout(bound, exchange)
        .await
        .map_err(|_| format!("node {id} did not answer within {bound:?}"))?
}

// ---------------------------------------------------------------------------------------------
// The raw TCP echo server

/// An echo server on a thread of its own (single-threaded runtime), stopped on drop.
struct EchoServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start() -> Result<Self, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot start the echo server: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let Ok(runtime) = runtime() else { return };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, echo_accept(listener, stopped));
            })
            .map_err(|e| format!("cannot start the echo thread: {e}"))?;
        Ok(EchoServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn echo_accept(
    listener: std::net::TcpListener,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    for _ in 0..ECHO_CONNECTIONS_MAX {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => if let Ok((stream, _)) = accepted {
                tokio::task::spawn_local(echo_connection(stream));
            },
        }
    }
}

/// Echoes every frame of one connection until it closes.
async fn echo_connection(stream: tokio::net::TcpStream) {
    // As the transport does: small frames, latency-bound.
    let _ = stream.set_nodelay(true);
    let mut connection = Framed::new(stream, raw_codec());
    for _ in 0..ECHO_FRAMES_MAX {
        match connection.next().await {
            Some(Ok(frame)) => {
                if connection.send(frame.freeze()).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The durable scenario and its LMDB floor

/// `durable`'s message: adds `by` to its key's counter and answers the new count.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
#[tag = "bench.increment"]
struct Increment {
    by: u64,
}

/// `durable`'s read-back: answers its key's count (0 when it has none).
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(u64)]
#[tag = "bench.count"]
struct Count;

/// A shard of `durable`'s node: a durable counter per key, committed to the node's store
/// before each `Increment` is answered.
#[derive(Default)]
struct Counters {
    counts: DurableMap<u64>,
}

#[shard_handler]
impl Counters {
    fn increment(&mut self, key: Key, msg: Increment, _ctx: &mut ShardContext) -> u64 {
        let count = self.counts.entry(key);
        *count += msg.by;
        *count
    }

    fn count(&mut self, key: Key, _msg: Count, _ctx: &mut ShardContext) -> u64 {
        self.counts.get(&key).copied().unwrap_or(0)
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.counts)
    }
}

/// Increments acknowledged and failed over a whole scenario, warm-up included: what a read-back
/// must find.
#[derive(Debug, Default)]
struct Tally {
    acknowledged: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn record(&self, acknowledged: bool) {
        let counter = match acknowledged {
            true => &self.acknowledged,
            false => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Checks a read-back sum: it holds every acknowledged increment, and of the failed ones
    /// (whose outcome is unknown) any number.
    fn check(&self, what: &str, sum: u64) -> Result<(), String> {
        let (acknowledged, failed) = (self.acknowledged(), self.failed());
        if sum >= acknowledged && sum - acknowledged <= failed {
            return Ok(());
        }
        Err(format!(
            "{what}: the counts sum to {sum}, but {acknowledged} increments were acknowledged \
             and {failed} failed"
        ))
    }
}

/// The keys one requester of `durable`, `raw_lmdb`, `durable_postgres` or `raw_postgres`
/// increments, in turn: those whose index is its own modulo the concurrency, so that no two
/// requesters ever increment one key (one shard) at once and no shard merges two increments
/// into one commit (with more requesters than keys, the extra ones share a key).
#[derive(Debug, Clone)]
struct KeySlice {
    /// Indexes into the key list.
    keys: Vec<usize>,
    next: usize,
}

impl KeySlice {
    /// The slice of requester `requester` of `concurrency`, over `keys` keys.
    fn of(requester: usize, concurrency: usize, keys: usize) -> KeySlice {
        let own: Vec<usize> = (requester..keys).step_by(concurrency.max(1)).collect();
        KeySlice {
            keys: match own.is_empty() {
                true => vec![requester % keys.max(1)],
                false => own,
            },
            next: 0,
        }
    }

    /// The index of the next key to increment.
    fn next(&mut self) -> usize {
        let key = self.keys[self.next % self.keys.len()];
        self.next = self.next.wrapping_add(1);
        key
    }
}

/// `durable`: `node.send(key, Increment)` inside the node's actix `System`.
struct DurableRequester {
    node: Node<Counters>,
    keys: Arc<Vec<Key>>,
    slice: KeySlice,
    tally: Arc<Tally>,
}

impl Requester for DurableRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let key = &self.keys[self.slice.next()];
        let result = self.node.send(key, Increment { by: 1 }).await;
        self.tally.record(result.is_ok());
        result.map(drop).map_err(|e| e.to_string())
    }
}

/// Where `durable`'s node keeps its counters.
enum DurableStore {
    /// An [`LmdbShardStore`] in this directory, opened with `StoreOptions::default()` (fsync
    /// on): `durable`.
    Lmdb(PathBuf),
    /// A [`PostgresShardStore`] on this database with these options: `durable_postgres`.
    Postgres {
        url: String,
        options: PostgresOptions,
    },
}

impl DurableStore {
    /// Opens the store (blocking: LMDB maps its file, PostgreSQL connects and checks the
    /// tables), on the scenario's own thread before anything else runs.
    fn open(&self) -> Result<Arc<dyn ShardStore>, String> {
        Ok(match self {
            DurableStore::Lmdb(dir) => Arc::new(
                LmdbShardStore::open(dir, StoreOptions::default()).map_err(|e| {
                    format!("cannot open the shard store in {}: {e}", dir.display())
                })?,
            ),
            DurableStore::Postgres { url, options } => Arc::new(
                PostgresShardStore::connect(url, options.clone())
                    .map_err(|e| format!("cannot connect the PostgreSQL shard store: {e}"))?,
            ),
        })
    }
}

/// What `durable` (or `durable_postgres`) runs with, handed to its thread.
struct DurableLoad {
    /// The scenario's name, in its messages.
    name: &'static str,
    /// Where the node keeps its counters.
    store: DurableStore,
    /// `keys[s]` hashes to shard `s`.
    keys: Arc<Vec<String>>,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    /// The node's log filter (`--rust-log`), for this thread.
    rust_log: String,
}

/// Runs `durable` or `durable_postgres` on the calling thread (see the module docs): a
/// standalone node of [`Counters`] with the load's store, in an actix `System` of its own,
/// under the load; every key read back; then a second node on the reopened store, and every
/// key read back again.
fn run_durable(load: DurableLoad) -> Result<Outcome, String> {
    // The node's warnings (a failed commit, for one) go to stderr, as a node process's would.
    let filter = tracing_subscriber::EnvFilter::try_new(&load.rust_log)
        .map_err(|e| format!("--rust-log: {e}"))?;
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .finish(),
    );
    let name = load.name;
    let tally = Arc::new(Tally::default());
    let keys: Arc<Vec<Key>> = Arc::new(load.keys.iter().map(Key::from).collect());
    let (summary, in_memory, server) = actix::System::new().block_on(async {
        let node = durable_node(&load.store).await?;
        // An activation writes to the store too (it raises the shard's fence): every shard
        // activates here, before the load, so that the measurement holds increments alone.
        let before = count_sum(&node, &keys).await?;
        if before != 0 {
            return Err(format!("the new store already holds {before} increments"));
        }
        // With PostgreSQL: its processes (the pool's connections are open now, after the
        // activations) and its transaction counter, before the load.
        let server = match &load.store {
            DurableStore::Postgres { url, .. } => Some(postgres::Observer::start(url).await?),
            DurableStore::Lmdb(_) => None,
        };
        let make = async || {
            Ok((0..load.concurrency)
                .map(|r| DurableRequester {
                    node: node.clone(),
                    keys: keys.clone(),
                    slice: KeySlice::of(r, load.concurrency, keys.len()),
                    tally: tally.clone(),
                })
                .collect::<Vec<_>>())
        };
        let this_process = vec![std::process::id()];
        let groups = match &server {
            Some(server) => vec![this_process, server.pids.clone()],
            None => vec![this_process],
        };
        let measured = warm_then_measure_split(make, load.duration, load.warmup, &groups).await;
        let server = match server {
            Some(server) => Some(server.finish(tally.acknowledged()).await?),
            None => None,
        };
        let in_memory = count_sum(&node, &keys).await;
        node.shutdown().await;
        let (summary, cpu) = measured?;
        Ok((summary, in_memory?, server.map(|server| (server, cpu))))
    })?;
    // That `System` is gone with everything on it, the store included (its last drop commits
    // what is queued and closes the environment or the connections): the store opens again
    // as after a restart in place, which loads what was committed.
    let stored = actix::System::new().block_on(async {
        let node = durable_node(&load.store).await?;
        let stored = count_sum(&node, &keys).await;
        node.shutdown().await;
        stored
    })?;
    tally.check(&format!("{name}: read back through the node"), in_memory)?;
    tally.check(
        &format!("{name}: read back after reopening the store"),
        stored,
    )?;
    let (acknowledged, failed) = (tally.acknowledged(), tally.failed());
    let mut extra = serde_json::Map::new();
    let mut notes = vec![format!(
        "{name}: {acknowledged} increments acknowledged, {failed} failed (warm-up included); \
         counts read back: {in_memory} through the node, {stored} from the reopened store"
    )];
    match &load.store {
        DurableStore::Lmdb(_) => {
            extra.insert(
                "node".into(),
                json!("standalone, in the bench process, with an LmdbShardStore (fsync on)"),
            );
        }
        DurableStore::Postgres { options, .. } => {
            extra.insert(
                "node".into(),
                json!(format!(
                    "standalone, in the bench process, with a PostgresShardStore ({} connections)",
                    options.connections_max
                )),
            );
        }
    }
    if let Some((server, cpu)) = server {
        server.report(name, &cpu, &mut extra, &mut notes);
    }
    extra.insert("keys".into(), json!(keys.len()));
    extra.insert("acknowledged_increments".into(), json!(acknowledged));
    extra.insert("failed_increments".into(), json!(failed));
    extra.insert("read_back_sum".into(), json!(in_memory));
    extra.insert("read_back_sum_after_reopen".into(), json!(stored));
    Ok(Outcome {
        summary,
        extra,
        notes,
    })
}

/// A standalone node of [`Counters`] keeping them in `store`.
async fn durable_node(store: &DurableStore) -> Result<Node<Counters>, String> {
    let store = store.open()?;
    Cluster::builder()
        .node_id(1)
        .shards(SHARD_COUNT)
        .standalone()
        .handler::<Counters>()
        .store(store)
        .start()
        .await
        .map_err(|e| format!("cannot start the durable node: {e}"))
}

/// The sum of every key's count, read through `node`, every key at once (a read activates its
/// shard if it is not active yet).
async fn count_sum(node: &Node<Counters>, keys: &[Key]) -> Result<u64, String> {
    let mut reads: FuturesUnordered<_> = keys.iter().map(|key| node.send(key, Count)).collect();
    let mut sum = 0u64;
    while let Some(count) = reads.next().await {
        sum += count.map_err(|e| format!("cannot read a count back: {e}"))?;
    }
    Ok(sum)
}

/// Most increments `raw_lmdb`'s writer takes into one transaction: the shard store's own bound
/// (`BATCH_JOBS_MAX` in `src/persist/lmdb.rs`), so that the two group alike at any concurrency.
const RAW_LMDB_GROUP_MAX: usize = 512;
/// `raw_lmdb`'s map size: the shard store's default.
const RAW_LMDB_MAP_BYTES: usize = 1 << 30;

/// One increment queued for `raw_lmdb`'s writer thread.
struct RawIncrement {
    /// The index of its key in the key list.
    key: usize,
    /// Where the new count goes once the increment is committed.
    acknowledge: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// `raw_lmdb`: queues one increment for the writer thread and waits for its acknowledgement.
struct RawLmdbRequester {
    queue: tokio::sync::mpsc::Sender<RawIncrement>,
    slice: KeySlice,
    tally: Arc<Tally>,
}

impl Requester for RawLmdbRequester {
    async fn call(&mut self, _iteration: u64) -> Result<(), String> {
        let key = self.slice.next();
        let (acknowledge, acknowledged) = tokio::sync::oneshot::channel();
        let result = async {
            self.queue
                .send(RawIncrement { key, acknowledge })
                .await
                .map_err(|_| "the raw_lmdb writer stopped".to_owned())?;
            acknowledged
                .await
                .map_err(|_| "the raw_lmdb writer dropped an increment".to_owned())?
        }
        .await;
        self.tally.record(result.is_ok());
        result.map(drop)
    }
}

/// `raw_lmdb`'s LMDB environment, opened with heed alone, and its one database: key → count.
#[derive(Clone)]
struct RawLmdb {
    env: heed::Env<heed::WithoutTls>,
    counts: heed::Database<heed::types::Bytes, heed::types::U64<heed::byteorder::BigEndian>>,
}

impl RawLmdb {
    /// Opens (creating) the environment in `dir` as the shard store opens its own: the same
    /// map size, read transactions without thread-local storage, and no `NO_SYNC`, so that
    /// every commit is fsynced before it returns.
    // The bench's one unsafe call: the floor opens LMDB itself, not through clusterfunk.
    #[allow(unsafe_code)]
    fn open(dir: &Path) -> Result<RawLmdb, String> {
        let failed = |what: &str, e: heed::Error| format!("raw_lmdb: cannot {what}: {e}");
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("raw_lmdb: cannot create {}: {e}", dir.display()))?;
        let mut options = heed::EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(RAW_LMDB_MAP_BYTES).max_dbs(1);
        // SAFETY: heed marks opening unsafe because LMDB memory-maps the data file, which must
        // change only through LMDB. This directory is new and this scenario's alone, opened
        // once (heed refuses a second open of a path in one process), on the local disk, and
        // written only through this environment's transactions; no flag weakens locking.
        let env = unsafe { options.open(dir) }.map_err(|e| failed("open the environment", e))?;
        let mut txn = env
            .write_txn()
            .map_err(|e| failed("begin a transaction", e))?;
        let counts = env
            .create_database(&mut txn, Some("counts"))
            .map_err(|e| failed("create the database", e))?;
        txn.commit().map_err(|e| failed("commit", e))?;
        Ok(RawLmdb { env, counts })
    }

    /// Applies `group` in one write transaction and commits it (fsync); returns each
    /// increment's new count.
    fn commit(&self, keys: &[String], group: &[RawIncrement]) -> heed::Result<Vec<u64>> {
        let mut txn = self.env.write_txn()?;
        let mut counts = Vec::with_capacity(group.len());
        for increment in group {
            let key = keys[increment.key].as_bytes();
            let count = self.counts.get(&txn, key)?.unwrap_or(0) + 1;
            self.counts.put(&mut txn, key, &count)?;
            counts.push(count);
        }
        txn.commit()?;
        Ok(counts)
    }

    /// The sum of every count.
    fn sum(&self) -> heed::Result<u64> {
        let txn = self.env.read_txn()?;
        let mut sum = 0;
        for entry in self.counts.iter(&txn)? {
            sum += entry?.1;
        }
        Ok(sum)
    }
}

/// `raw_lmdb`'s writer thread: takes every queued increment (at most [`RAW_LMDB_GROUP_MAX`])
/// into one transaction, commits it, then acknowledges each of them; ends once every requester
/// is gone and the queue is empty. Returns the transactions it committed.
fn raw_lmdb_writer(
    lmdb: RawLmdb,
    keys: Arc<Vec<String>>,
    mut queue: tokio::sync::mpsc::Receiver<RawIncrement>,
) -> u64 {
    let mut group = Vec::with_capacity(RAW_LMDB_GROUP_MAX);
    let mut transactions = 0;
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < RAW_LMDB_GROUP_MAX {
            match queue.try_recv() {
                Ok(increment) => group.push(increment),
                Err(_) => break,
            }
        }
        transactions += 1;
        match lmdb.commit(&keys, &group) {
            Ok(counts) => {
                for (increment, count) in group.drain(..).zip(counts) {
                    // A requester that stopped waiting needs no answer.
                    let _ = increment.acknowledge.send(Ok(count));
                }
            }
            Err(error) => {
                for increment in group.drain(..) {
                    let _ = increment
                        .acknowledge
                        .send(Err(format!("raw_lmdb: the commit failed: {error}")));
                }
            }
        }
    }
    transactions
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// What one scenario gave.
#[derive(Debug, Default)]
struct Outcome {
    summary: Summary,
    /// Scenario-specific figures for the JSON.
    extra: serde_json::Map<String, Value>,
    /// Lines printed under the table.
    notes: Vec<String>,
}

/// The cluster and what the scenarios share.
struct Bench<'a> {
    harness: &'a mut Harness,
    options: &'a Options,
    /// `keys[s]` hashes to shard `s`.
    keys: Arc<Vec<String>>,
    payload: Vec<u8>,
    /// The PostgreSQL server of the scenarios that need one.
    postgres: Option<postgres::Server>,
}

impl Bench<'_> {
    fn limit(&self) -> Duration {
        Duration::from_secs(self.options.deadline_secs)
    }

    fn duration(&self) -> Duration {
        self.options.duration()
    }

    fn warmup(&self) -> Duration {
        self.options.warmup()
    }

    /// This process and every running node's.
    fn pids(&self) -> Vec<u32> {
        let nodes = self.harness.nodes.iter().chain(&self.harness.extra);
        std::iter::once(std::process::id())
            .chain(nodes.filter_map(|n| n.pid()))
            .collect()
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.harness.nodes.iter().map(|n| n.addr()).collect()
    }

    fn client(&self, seeds: Vec<SocketAddr>) -> Result<Client, String> {
        Client::with_credentials(
            seeds,
            &self.harness.launch.credentials("client")?,
            CLUSTER_NAME,
            REQUEST_TIMEOUT,
        )
        .map_err(|e| e.to_string())
    }

    /// Admin clients for every running node, initial or added.
    fn admin_clients(&self) -> Result<BTreeMap<NodeId, AdminClient>, String> {
        let mut clients = self.harness.admin_clients(POLL_TIMEOUT)?;
        for node in self.harness.extra.iter().filter(|n| n.pid().is_some()) {
            clients.insert(
                node.id(),
                self.harness.launch.admin(node.addr(), POLL_TIMEOUT)?,
            );
        }
        Ok(clients)
    }

    async fn settled(&self, draining: Option<NodeId>) -> Result<Settled, String> {
        wait_settled(
            &self.admin_clients()?,
            SHARD_COUNT,
            draining,
            false,
            self.limit(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// The `client` load's requesters, all sending `Echo`, or with `mixed` every other one
    /// `IdempotentEcho`.
    fn client_requesters(&self, client: &Client, mixed: bool) -> Vec<ClientRequester> {
        let stride = (self.keys.len() / self.options.concurrency).max(1);
        (0..self.options.concurrency)
            .map(|r| ClientRequester {
                client: client.clone(),
                keys: self.keys.clone(),
                next: r * stride,
                payload: self.payload.clone(),
                idempotent: mixed && r % 2 == 1,
                index: r as u16,
                last: CallFacts::default(),
            })
            .collect()
    }

    /// The bytes of a `client` request frame on the wire (length prefix included), and of its
    /// answer's, for the longest key.
    fn frame_bytes(&self) -> Result<(usize, usize), String> {
        let mut request_max = 0;
        let mut response_max = 0;
        for key in self.keys.iter() {
            let message = codec::encode(&Echo {
                payload: self.payload.clone(),
            })
            .map_err(|e| e.to_string())?;
            let request = codec::encode(&Request::Shard {
                key: key.as_bytes().to_vec(),
                tag: Echo::TAG.to_owned(),
                payload: message,
            })
            .map_err(|e| e.to_string())?;
            let reply = codec::encode(&self.payload).map_err(|e| e.to_string())?;
            let response = codec::encode(&Response::Shard(Ok(reply))).map_err(|e| e.to_string())?;
            request_max = request_max.max(request.len());
            response_max = response_max.max(response.len());
        }
        Ok((
            request_max + TRANSPORT_REQUEST_OVERHEAD_BYTES,
            response_max + TRANSPORT_REQUEST_OVERHEAD_BYTES,
        ))
    }

    async fn in_node(&self, scenario: Scenario) -> Result<Outcome, String> {
        // Node 1 sends to the keys of the shards it owns.
        let settled = self.settled(None).await?;
        let id = 1;
        let keys: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(shard, _)| settled.owners[*shard] == id)
            .map(|(_, key)| key.clone())
            .collect();
        let owned = keys.len();
        let summary = in_node(self.harness, id, scenario, keys, self.options).await?;
        let mut extra = serde_json::Map::new();
        extra.insert("node".into(), json!(id));
        extra.insert("keys".into(), json!(owned));
        Ok(Outcome {
            summary,
            extra,
            notes: Vec::new(),
        })
    }

    async fn forwarded(&self) -> Result<Outcome, String> {
        let settled = self.settled(None).await?;
        let nodes: Vec<(NodeId, SocketAddr)> = self
            .harness
            .nodes
            .iter()
            .map(|n| (n.id(), n.addr()))
            .collect();
        // Each key enters at the node after its owner, in id order.
        let targets: Vec<(Vec<u8>, SocketAddr)> = self
            .keys
            .iter()
            .enumerate()
            .map(|(shard, key)| {
                let owner = settled.owners[shard];
                let at = nodes.iter().position(|(id, _)| *id == owner).unwrap_or(0);
                (key.as_bytes().to_vec(), nodes[(at + 1) % nodes.len()].1)
            })
            .collect();
        let targets = Arc::new(targets);
        let transport = Transport::new(TransportConfig {
            cluster_name: CLUSTER_NAME.to_owned(),
            node_id: None,
            secret: self.harness.launch.secret()?,
            tls: self.harness.launch.credentials("client")?.tls(),
            reconnect_backoff_max: Duration::from_millis(250),
            ..TransportConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let stride = (targets.len() / self.options.concurrency).max(1);
        let make = async || {
            Ok((0..self.options.concurrency)
                .map(|r| ForwardRequester {
                    transport: transport.clone(),
                    targets: targets.clone(),
                    next: r * stride,
                    payload: self.payload.clone(),
                })
                .collect::<Vec<_>>())
        };
        let summary = warm_then_measure(make, self.duration(), self.warmup(), &self.pids()).await?;
        Ok(Outcome {
            summary,
            ..Outcome::default()
        })
    }

    async fn client_scenario(&self) -> Result<Outcome, String> {
        self.settled(None).await?;
        let client = self.client(self.addrs())?;
        let make = async || Ok(self.client_requesters(&client, false));
        let summary = warm_then_measure(make, self.duration(), self.warmup(), &self.pids()).await?;
        let (request, response) = self.frame_bytes()?;
        let mut extra = serde_json::Map::new();
        extra.insert("request_frame_bytes".into(), json!(request));
        extra.insert("response_frame_bytes".into(), json!(response));
        extra.insert(
            "connections".into(),
            json!("one multiplexed connection per node, shared by every requester"),
        );
        Ok(Outcome {
            summary,
            extra,
            notes: Vec::new(),
        })
    }

    async fn raw_tcp(&self) -> Result<Outcome, String> {
        let (request, response) = self.frame_bytes()?;
        // The length prefix is the codec's; the body is the rest.
        let frame = Bytes::from(vec![7u8; request - 4]);
        let server = EchoServer::start()?;
        let addr = server.addr;
        let make = async || {
            let mut requesters = Vec::with_capacity(self.options.concurrency);
            for _ in 0..self.options.concurrency {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("cannot reach the echo server: {e}"))?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                requesters.push(RawTcpRequester {
                    connection: Framed::new(stream, raw_codec()),
                    frame: frame.clone(),
                });
            }
            Ok(requesters)
        };
        // The echo server is a thread of this process: its CPU counts with the generator's.
        let this_process = [std::process::id()];
        let summary =
            warm_then_measure(make, self.duration(), self.warmup(), &this_process).await?;
        drop(server);
        let mut extra = serde_json::Map::new();
        extra.insert("frame_bytes".into(), json!(request));
        extra.insert("client_response_frame_bytes".into(), json!(response));
        extra.insert("connections".into(), json!("one connection per requester"));
        Ok(Outcome {
            summary,
            extra,
            notes: vec![format!(
                "raw_tcp: {request}-byte frames both ways (the client's request frame; its answer frame is {response} bytes), one connection per requester"
            )],
        })
    }

    async fn durable(&self) -> Result<Outcome, String> {
        self.durable_with(
            "durable",
            DurableStore::Lmdb(self.harness.path().join("durable-store")),
        )
        .await
    }

    /// `durable_postgres`: `durable` with a [`PostgresShardStore`] (default options, tables of
    /// their own) on the bench's PostgreSQL, whose tables are dropped afterwards.
    async fn durable_postgres(&self) -> Result<Outcome, String> {
        let server = self.postgres()?;
        let options = PostgresOptions {
            table_prefix: postgres::DURABLE_TABLE_PREFIX.to_owned(),
            ..PostgresOptions::default()
        };
        // Tables an interrupted run left behind would hold its counts and fences.
        postgres::drop_tables(&server.url(), postgres::DURABLE_TABLE_PREFIX).await?;
        let outcome = self
            .durable_with(
                "durable_postgres",
                DurableStore::Postgres {
                    url: server.url(),
                    options,
                },
            )
            .await;
        let dropped = postgres::drop_tables(&server.url(), postgres::DURABLE_TABLE_PREFIX).await;
        let mut outcome = outcome?;
        dropped?;
        outcome
            .extra
            .insert("postgres".into(), json!(server.describe()));
        Ok(outcome)
    }

    /// Runs `durable` or `durable_postgres` on a thread of its own.
    async fn durable_with(
        &self,
        name: &'static str,
        store: DurableStore,
    ) -> Result<Outcome, String> {
        let load = DurableLoad {
            name,
            store,
            keys: self.keys.clone(),
            concurrency: self.options.concurrency,
            duration: self.duration(),
            warmup: self.warmup(),
            rust_log: self.options.node.rust_log.clone(),
        };
        // An actix `System` cannot start inside this runtime: the node gets a thread of its
        // own, whose outcome this runtime awaits.
        let (done, outcome) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-durable".into())
            .spawn(move || {
                let _ = done.send(run_durable(load));
            })
            .map_err(|e| format!("cannot start the durable node's thread: {e}"))?;
        let outcome = outcome
            .await
            .map_err(|_| "the durable node's thread panicked".to_owned());
        let _ = thread.join();
        outcome?
    }

    /// The bench's PostgreSQL (started before the first scenario that needs it).
    fn postgres(&self) -> Result<&postgres::Server, String> {
        self.postgres
            .as_ref()
            .ok_or_else(|| "no PostgreSQL server: this is a bug of the bench".to_owned())
    }

    async fn raw_lmdb(&self) -> Result<Outcome, String> {
        let lmdb = RawLmdb::open(&self.harness.path().join("raw-lmdb"))?;
        let (queue, queued) = tokio::sync::mpsc::channel(self.options.concurrency);
        let writer = {
            let (lmdb, keys) = (lmdb.clone(), self.keys.clone());
            std::thread::Builder::new()
                .name("bench-raw-lmdb".into())
                .spawn(move || raw_lmdb_writer(lmdb, keys, queued))
                .map_err(|e| format!("cannot start the raw_lmdb writer: {e}"))?
        };
        let tally = Arc::new(Tally::default());
        let make = async || {
            Ok((0..self.options.concurrency)
                .map(|r| RawLmdbRequester {
                    queue: queue.clone(),
                    slice: KeySlice::of(r, self.options.concurrency, self.keys.len()),
                    tally: tally.clone(),
                })
                .collect::<Vec<_>>())
        };
        // The writer is a thread of this process: its CPU counts with the requesters'.
        let this_process = [std::process::id()];
        let summary = warm_then_measure(make, self.duration(), self.warmup(), &this_process).await;
        // The requesters are gone; with the last sender the writer commits what is queued and
        // ends (at once: nothing is in flight).
        drop(queue);
        let transactions = writer
            .join()
            .map_err(|_| "the raw_lmdb writer panicked".to_owned())?;
        let summary = summary?;
        let sum = lmdb
            .sum()
            .map_err(|e| format!("raw_lmdb: cannot read the counts back: {e}"))?;
        tally.check("raw_lmdb: read back", sum)?;
        let (acknowledged, failed) = (tally.acknowledged(), tally.failed());
        let per_transaction = acknowledged as f64 / transactions.max(1) as f64;
        let mut extra = serde_json::Map::new();
        extra.insert("keys".into(), json!(self.keys.len()));
        extra.insert("acknowledged_increments".into(), json!(acknowledged));
        extra.insert("failed_increments".into(), json!(failed));
        extra.insert("read_back_sum".into(), json!(sum));
        extra.insert("transactions".into(), json!(transactions));
        extra.insert(
            "increments_per_transaction".into(),
            json!(round3(per_transaction)),
        );
        Ok(Outcome {
            summary,
            extra,
            notes: vec![format!(
                "raw_lmdb: {acknowledged} increments acknowledged, {failed} failed, in \
                 {transactions} fsynced transactions ({per_transaction:.1} per transaction; \
                 warm-up included); counts read back: {sum}"
            )],
        })
    }

    /// Brings `probe` to steady state: one answered probe to a shard of each of `ids`, so that
    /// it holds the map and a connection to each of them.
    async fn warm_up(
        &self,
        probe: &Client,
        settled: &Settled,
        ids: &[NodeId],
        idempotent: bool,
    ) -> Result<(), String> {
        for &id in ids {
            let shard = settled
                .owners
                .iter()
                .position(|&owner| owner == id)
                .ok_or(format!("node {id} owns no shard"))?;
            probe_send(probe, &self.keys[shard], self.payload.clone(), idempotent)
                .await
                .map_err(|e| format!("warming up the probe client: {e}"))?;
        }
        Ok(())
    }

    /// Probes each of `shards` every `--probe-ms` from `t0` until it answers or `deadline`
    /// passes: when each answered again (an error for one that did not), the failed probes,
    /// and when the last answer came.
    async fn probe_shards(
        &self,
        probe: &Client,
        shards: &[usize],
        idempotent: bool,
        t0: Instant,
        deadline: Instant,
    ) -> (Series, usize, Instant) {
        let every = Duration::from_millis(self.options.probe_ms.max(1));
        let probes: FuturesUnordered<_> = shards
            .iter()
            .map(|&s| {
                let (probe, key, payload) =
                    (probe.clone(), self.keys[s].clone(), self.payload.clone());
                let attempt = move || {
                    let (probe, key, payload) = (probe.clone(), key.clone(), payload.clone());
                    async move { probe_send(&probe, &key, payload, idempotent).await }
                };
                probe_until_ok(attempt, t0, every, deadline)
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
        (unavailable, probe_errors, t_back)
    }

    /// Kills one node (the leader or a follower) under load and times its shards' return;
    /// restarts it and waits for the cluster to settle.
    async fn kill_once(&mut self, leader_role: bool, number: usize) -> Result<Kill, String> {
        let settled = self.settled(None).await?;
        let ids = self.harness.ids();
        let node = pick_node(&settled, &ids, leader_role, number);
        let survivors: Vec<NodeId> = ids.iter().copied().filter(|&id| id != node).collect();
        let shards: Vec<usize> = (0..SHARD_COUNT as usize)
            .filter(|&s| settled.owners[s] == node)
            .collect();
        // A probe client in steady state: connected to the survivors, holding the map.
        let probe = self.client(
            survivors
                .iter()
                .map(|&id| self.harness.node(id).addr())
                .collect(),
        )?;
        self.warm_up(&probe, &settled, &survivors, false).await?;
        tokio::time::sleep(MEMBERSHIP_MARGIN).await;

        let t_kill = self.harness.kill(node)?;
        let deadline = t_kill + self.limit();
        let (unavailable, probe_errors, t_back) = self
            .probe_shards(&probe, &shards, false, t_kill, deadline)
            .await;
        tokio::time::sleep(MEMBERSHIP_MARGIN).await;
        check_interrupt()?;
        self.harness.start(node, true)?;
        let t_restart = Instant::now();
        let rejoined = self.settled(None).await;
        let t_settled = Instant::now();
        if rejoined.is_err() || !unavailable.failures.is_empty() {
            self.harness.print_log_tails(&[]);
        }
        rejoined?;
        if !unavailable.failures.is_empty() {
            return Err(format!(
                "{} of node {node}'s shards not back within {:?}",
                unavailable.failures.len(),
                self.limit()
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
            t_heal: t_restart,
            t_settled,
        })
    }

    async fn failover(&mut self) -> Result<Outcome, String> {
        self.settled(None).await?;
        let client = self.client(self.addrs())?;
        let requesters = self.client_requesters(&client, false);
        let stop = AtomicBool::new(false);
        let load = closed_loop(requesters, MEMBERSHIP_LOAD_MAX, &stop, true);
        let kills = self.options.kills;
        let orchestration = async {
            let result = async {
                let mut done = Vec::new();
                for leader in [false, true] {
                    for number in 0..kills {
                        done.push(self.kill_once(leader, number).await?);
                    }
                }
                Ok::<_, String>(done)
            }
            .await;
            stop.store(true, Ordering::SeqCst);
            result
        };
        let (recorded, done) = tokio::join!(load, orchestration);
        let done = done?;
        let mut summary = Summary::of(&recorded);
        let mut extra = serde_json::Map::new();
        let mut notes = Vec::new();
        let mut pooled = Series::default();
        let mut pooled_load = FaultLoad::default();
        for (leader, label) in [(false, "follower"), (true, "leader")] {
            let mut all = Series::default();
            let mut served_ms = Series::default();
            let mut failed = 0;
            // When the failed requests were sent, in ms from the kill (negative: before it).
            let mut sent = Series::default();
            // Kill → settled after the restart, as `freeze` and `partition` count.
            let mut load = FaultLoad::default();
            for kill in done.iter().filter(|k| k.leader == leader) {
                load.add(&FaultLoad::of(&recorded.timeline, kill));
                all.values.extend(&kill.unavailable.values);
                served_ms.push(Ok(ms(kill.t_back - kill.t_kill)));
                for sample in failed_between(&recorded.timeline, kill.t_kill, kill.t_back) {
                    failed += 1;
                    sent.push(Ok(match sample.start.checked_duration_since(kill.t_kill) {
                        Some(after) => ms(after),
                        None => -ms(kill.t_kill - sample.start),
                    }));
                }
            }
            pooled.values.extend(&all.values);
            let median = all.quantile(0.5).map(round3);
            let max = all.quantile(1.0).map(round3);
            let served = served_ms.quantile(1.0).map(round3);
            let probe_errors: usize = done
                .iter()
                .filter(|k| k.leader == leader)
                .map(|k| k.probe_errors)
                .sum();
            pooled_load.add(&load);
            let mut entry = json!({
                    "kills": done.iter().filter(|k| k.leader == leader).count(),
                    "nodes_killed": done.iter().filter(|k| k.leader == leader).map(|k| k.node).collect::<Vec<_>>(),
                    "shards": all.values.len(),
                    "unavailable_ms": all.to_json(false),
                    "unavailable_ms_median": median,
                    "unavailable_ms_max": max,
                    "all_served_ms": served,
                    "failed_requests_in_flight_kill_to_back": failed,
                    "failed_requests_sent_ms_from_kill": {
                        "min": sent.quantile(0.0).map(round3),
                        "max": sent.quantile(1.0).map(round3),
                    },
                    "probe_errors": probe_errors,
            });
            if let Value::Object(fields) = &mut entry {
                fields.extend(load.to_json(false));
            }
            extra.insert(label.into(), entry);
            notes.push(format!(
                "failover, {label} killed: shards unavailable median {} ms, max {} ms; every shard served {} ms after the kill; {failed} load request(s) failed meanwhile; kill to settled: {}",
                fmt_ms(median),
                fmt_ms(max),
                fmt_ms(served),
                load.describe(false)
            ));
        }
        extra.insert(
            "unavailable_ms_median".into(),
            json!(pooled.quantile(0.5).map(round3)),
        );
        extra.insert(
            "unavailable_ms_max".into(),
            json!(pooled.quantile(1.0).map(round3)),
        );
        // Kill → the last of its shards answered, the longest over every kill.
        let all_served = done
            .iter()
            .map(|k| ms(k.t_back - k.t_kill))
            .fold(None, |longest: Option<f64>, v| {
                Some(longest.map_or(v, |l| l.max(v)))
            });
        extra.insert("all_served_ms".into(), json!(all_served.map(round3)));
        extra.insert("failed_requests".into(), json!(summary.errors));
        // The kill-to-settled figures, pooled; `failed_requests` stays the whole run's.
        for (key, value) in pooled_load.to_json(false) {
            extra.entry(key).or_insert(value);
        }
        extra.insert(
            "every_fault_within_outstanding".into(),
            json!(pooled_load.within_outstanding()),
        );
        extra.insert(
            "timeline_truncated".into(),
            json!(recorded.timeline_truncated),
        );
        summary.error_kinds = recorded.error_kinds.clone();
        Ok(Outcome {
            summary,
            extra,
            notes,
        })
    }

    /// Freezes or cuts off one node (the leader or a follower) under load for at least
    /// `--freeze-seconds` and until every one of its shards answered through a client that
    /// knows it; then thaws or heals it and waits for the cluster to settle.
    async fn fault_once(
        &self,
        kind: FaultKind,
        leader_role: bool,
        number: usize,
    ) -> Result<Kill, String> {
        let settled = self.settled(None).await?;
        let ids = self.harness.ids();
        let node = pick_node(&settled, &ids, leader_role, number);
        let shards: Vec<usize> = (0..SHARD_COUNT as usize)
            .filter(|&s| settled.owners[s] == node)
            .collect();
        // A probe client in steady state, seeded with every node (the one to be faulted too,
        // as a real client would be), holding the map and a connection to every node.
        let probe = self.client(self.addrs())?;
        self.warm_up(&probe, &settled, &ids, true).await?;
        tokio::time::sleep(MEMBERSHIP_MARGIN).await;
        check_interrupt()?;

        let (begin, end) = kind.signals();
        let t_fault = self.fault_signal(kind, node, begin, true).await?;
        // From here on the node is healed before any error returns.
        let deadline = t_fault + self.limit();
        let answered = self.probe_shards(&probe, &shards, true, t_fault, deadline);
        // The node stays faulted for the whole freeze time, so that the cluster moves on
        // without it, and longer while some of its shards have not answered elsewhere.
        let hold = tokio::time::sleep_until((t_fault + self.options.freeze()).into());
        let ((unavailable, probe_errors, t_back), ()) = tokio::join!(answered, hold);
        let t_heal = self.fault_signal(kind, node, end, false).await?;
        let rejoined = self.settled(None).await;
        let t_settled = Instant::now();
        if rejoined.is_err() || !unavailable.failures.is_empty() {
            self.harness.print_log_tails(&[]);
        }
        rejoined?;
        if !unavailable.failures.is_empty() {
            return Err(format!(
                "{} of node {node}'s shards not back within {:?} ({}: {})",
                unavailable.failures.len(),
                self.limit(),
                kind.name(),
                unavailable.failures[0]
            ));
        }
        Ok(Kill {
            leader: leader_role,
            node,
            owned: settled.owners.iter().map(|&owner| owner == node).collect(),
            unavailable,
            probe_errors,
            t_kill: t_fault,
            t_back,
            t_heal,
            t_settled,
        })
    }

    /// Sends `signal` to start (`faulted`) or end a fault of `node` and returns when it took
    /// effect: at once for SIGSTOP and SIGCONT, which the kernel carries out; for a partition,
    /// once the node's fault hook confirmed the change (polled every millisecond).
    async fn fault_signal(
        &self,
        kind: FaultKind,
        node: NodeId,
        signal: &str,
        faulted: bool,
    ) -> Result<Instant, String> {
        let sent = signal_node(self.harness, node, signal).await?;
        if kind == FaultKind::Freeze {
            return Ok(sent);
        }
        let path = self.harness.node(node).data_dir().join(ISOLATED_FILE);
        let wanted = faulted.to_string();
        wait_for(
            &format!("node {node} to confirm SIG{signal}"),
            Duration::from_millis(1),
            self.limit(),
            || async {
                match std::fs::read_to_string(&path) {
                    Ok(text) if text == wanted => Ok(()),
                    Ok(text) => Err(format!("it says isolated: {text}")),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let confirmed = Instant::now();
        self.harness.node(node).mark(&format!(
            "confirmed {} {:.1} ms after SIG{signal}",
            if faulted { "isolated" } else { "healed" },
            ms(confirmed - sent)
        ));
        Ok(confirmed)
    }

    /// `freeze` and `partition`: the mixed load (half `Echo`, half `IdempotentEcho`) while a
    /// follower, then the leader (`--kills` each), is faulted.
    async fn faults(&mut self, kind: FaultKind) -> Result<Outcome, String> {
        self.settled(None).await?;
        let client = self.client(self.addrs())?;
        let requesters = self.client_requesters(&client, true);
        let stop = AtomicBool::new(false);
        let load = closed_loop(requesters, MEMBERSHIP_LOAD_MAX, &stop, true);
        let rounds = self.options.kills;
        let orchestration = async {
            let result = async {
                let mut done = Vec::new();
                for leader in [false, true] {
                    for number in 0..rounds {
                        done.push(self.fault_once(kind, leader, number).await?);
                    }
                }
                tokio::time::sleep(MEMBERSHIP_MARGIN).await;
                Ok::<_, String>(done)
            }
            .await;
            stop.store(true, Ordering::SeqCst);
            result
        };
        let (recorded, done) = tokio::join!(load, orchestration);
        let done = done?;
        let mut summary = Summary::of(&recorded);
        summary.error_kinds = recorded.error_kinds.clone();
        let mut extra = serde_json::Map::new();
        let mut notes = Vec::new();
        let mut pooled_unavailable = Series::default();
        let mut pooled = FaultLoad::default();
        let mut within = true;
        for (leader, label) in [(false, "follower"), (true, "leader")] {
            let mine: Vec<&Kill> = done.iter().filter(|k| k.leader == leader).collect();
            let mut unavailable = Series::default();
            let mut load = FaultLoad::default();
            let mut each = Vec::new();
            for fault in &mine {
                let seen = FaultLoad::of(&recorded.timeline, fault);
                within &= seen.within_outstanding();
                unavailable.values.extend(&fault.unavailable.values);
                load.add(&seen);
                let mut entry = seen.to_json(true);
                entry.insert("node".into(), json!(fault.node));
                entry.insert(
                    "unavailable_ms_median".into(),
                    json!(fault.unavailable.quantile(0.5).map(round3)),
                );
                entry.insert(
                    "unavailable_ms_max".into(),
                    json!(fault.unavailable.quantile(1.0).map(round3)),
                );
                entry.insert(
                    "all_served_ms".into(),
                    json!(round3(ms(fault.t_back - fault.t_kill))),
                );
                entry.insert(
                    "held_ms".into(),
                    json!(round3(ms(fault.t_heal - fault.t_kill))),
                );
                entry.insert(
                    "heal_to_settled_ms".into(),
                    json!(round3(ms(fault.t_settled - fault.t_heal))),
                );
                entry.insert("probe_errors".into(), json!(fault.probe_errors));
                each.push(Value::Object(entry));
                notes.push(format!(
                    "{}, {label} node {} {} for {:.1} s: its shards back median {} ms, max {} ms, all {:.1} ms after the fault; {}; settled {:.0} ms after the {}",
                    kind.name(),
                    fault.node,
                    kind.participle(),
                    (fault.t_heal - fault.t_kill).as_secs_f64(),
                    fmt_ms(fault.unavailable.quantile(0.5)),
                    fmt_ms(fault.unavailable.quantile(1.0)),
                    ms(fault.t_back - fault.t_kill),
                    seen.describe(true),
                    ms(fault.t_settled - fault.t_heal),
                    kind.heal_name(),
                ));
            }
            pooled_unavailable.values.extend(&unavailable.values);
            pooled.add(&load);
            let all_served = mine
                .iter()
                .map(|k| ms(k.t_back - k.t_kill))
                .reduce(f64::max)
                .map(round3);
            let mut entry = serde_json::Map::new();
            entry.insert("faults".into(), json!(mine.len()));
            entry.insert(
                "nodes".into(),
                json!(mine.iter().map(|k| k.node).collect::<Vec<_>>()),
            );
            entry.insert("shards".into(), json!(unavailable.values.len()));
            entry.insert("unavailable_ms".into(), unavailable.to_json(false));
            entry.insert(
                "unavailable_ms_median".into(),
                json!(unavailable.quantile(0.5).map(round3)),
            );
            entry.insert(
                "unavailable_ms_max".into(),
                json!(unavailable.quantile(1.0).map(round3)),
            );
            entry.insert("all_served_ms".into(), json!(all_served));
            entry.extend(load.to_json(true));
            entry.insert("each".into(), Value::Array(each));
            extra.insert(label.into(), Value::Object(entry));
        }
        extra.insert(
            "unavailable_ms_median".into(),
            json!(pooled_unavailable.quantile(0.5).map(round3)),
        );
        extra.insert(
            "unavailable_ms_max".into(),
            json!(pooled_unavailable.quantile(1.0).map(round3)),
        );
        let all_served = done
            .iter()
            .map(|k| ms(k.t_back - k.t_kill))
            .reduce(f64::max)
            .map(round3);
        extra.insert("all_served_ms".into(), json!(all_served));
        extra.extend(pooled.to_json(true));
        extra.insert("every_fault_within_outstanding".into(), json!(within));
        extra.insert("fault_seconds".into(), json!(self.options.freeze_seconds));
        extra.insert(
            "load".into(),
            json!("client load, half the requesters Echo (not idempotent), half IdempotentEcho"),
        );
        extra.insert(
            "timeline_truncated".into(),
            json!(recorded.timeline_truncated),
        );
        Ok(Outcome {
            summary,
            extra,
            notes,
        })
    }

    async fn planned(&mut self) -> Result<Outcome, String> {
        let settled = self.settled(None).await?;
        let client = self.client(self.addrs())?;
        let requesters = self.client_requesters(&client, false);
        let stop = AtomicBool::new(false);
        let load = closed_loop(requesters, MEMBERSHIP_LOAD_MAX, &stop, true);
        let drained = self
            .harness
            .ids()
            .into_iter()
            .find(|&id| id != settled.leader)
            .ok_or("no follower to drain")?;
        let orchestration = async {
            let result = async {
                tokio::time::sleep(MEMBERSHIP_MARGIN).await;
                let t_start = Instant::now();
                let (added, t_added) = add_node(self).await?;
                let admin = self.harness.admin(settled.leader, CHANGE_TIMEOUT)?;
                let t_drain = Instant::now();
                match admin.request(AdminRequest::Drain { id: drained }).await {
                    Ok(AdminResponse::Changed(_)) => {}
                    Ok(other) => return Err(format!("unexpected answer to Drain: {other:?}")),
                    Err(e) => return Err(format!("Drain of node {drained} failed: {e}")),
                }
                self.settled(Some(drained)).await?;
                let t_end = Instant::now();
                tokio::time::sleep(MEMBERSHIP_MARGIN).await;
                Ok::<_, String>((added, t_start, t_added, t_drain, t_end))
            }
            .await;
            stop.store(true, Ordering::SeqCst);
            result
        };
        let (recorded, times) = tokio::join!(load, orchestration);
        let (added, t_start, t_added, t_drain, t_end) = times?;
        let window = Summary::of_window(&recorded.timeline, t_start, t_end);
        let summary = Summary::of(&recorded);
        let worst_pause_ms = round3(window.max_us / 1000.0);
        let mut extra = serde_json::Map::new();
        extra.insert("failed_requests".into(), json!(window.errors));
        extra.insert(
            "timeline_truncated".into(),
            json!(recorded.timeline_truncated),
        );
        extra.insert("worst_pause_ms".into(), json!(worst_pause_ms));
        extra.insert("node_added".into(), json!(added));
        extra.insert("node_drained".into(), json!(drained));
        extra.insert(
            "add_to_settled_ms".into(),
            json!(round3(ms(t_added - t_start))),
        );
        extra.insert(
            "drain_to_settled_ms".into(),
            json!(round3(ms(t_end - t_drain))),
        );
        extra.insert("window".into(), Value::Object(window.to_json()));
        let notes = vec![format!(
            "planned: node {added} added (settled after {:.0} ms), node {drained} drained (settled after {:.0} ms); {} request(s) failed, worst pause {worst_pause_ms:.1} ms (the longest request in that window)",
            ms(t_added - t_start),
            ms(t_end - t_drain),
            window.errors
        )];
        Ok(Outcome {
            summary,
            extra,
            notes,
        })
    }
}

/// Starts a fresh node, adds it as a voter through the leader and waits until it owns its
/// share; returns its id and when the cluster settled.
async fn add_node(bench: &mut Bench<'_>) -> Result<(NodeId, Instant), String> {
    let id = (bench.harness.nodes.len() + bench.harness.extra.len() + 1) as NodeId;
    let addr = bench.harness.reserve_addrs(1)?[0];
    let node = bench.harness.slot(id, addr);
    let started = bench.harness.launch.start(&node, None);
    bench.harness.extra.push(node);
    started?;
    let fresh = bench.harness.launch.admin(addr, POLL_TIMEOUT)?;
    wait_for(
        &format!("new node {id} to answer"),
        Duration::from_millis(10),
        bench.limit(),
        || lib_status(&fresh),
    )
    .await
    .map_err(|e| e.to_string())?;
    let leader = {
        let clients = bench.harness.admin_clients(POLL_TIMEOUT)?;
        wait_settled(&clients, SHARD_COUNT, None, false, bench.limit())
            .await
            .map_err(|e| e.to_string())?
            .leader
    };
    let admin = bench.harness.admin(leader, CHANGE_TIMEOUT)?;
    match admin
        .request(AdminRequest::AddNode {
            id,
            addr: addr.to_string(),
            zone: None,
            learner: false,
        })
        .await
    {
        Ok(AdminResponse::Changed(_)) => {}
        Ok(other) => return Err(format!("unexpected answer to AddNode: {other:?}")),
        Err(e) => return Err(format!("AddNode {id} failed: {e}")),
    }
    bench.settled(None).await?;
    Ok((id, Instant::now()))
}

/// The timeline's failed requests that were in flight at some moment of `[from, to]`: those
/// sent before a kill and cut off by it count too.
fn failed_between(timeline: &[Sample], from: Instant, to: Instant) -> Vec<Sample> {
    timeline
        .iter()
        .filter(|s| !s.ok && s.start <= to && s.start + s.latency >= from)
        .copied()
        .collect()
}

/// One timed fault: a kill (`failover`), a freeze or a partition.
#[derive(Debug)]
struct Kill {
    /// Whether the node was the leader (else a follower).
    leader: bool,
    node: NodeId,
    /// `owned[s]`: whether the node owned shard `s` in the settled map before the fault.
    owned: Vec<bool>,
    /// Each of its shards: fault → first successful answer, ms.
    unavailable: Series,
    probe_errors: usize,
    /// When the node was killed, frozen or cut off.
    t_kill: Instant,
    /// When the last of its shards answered.
    t_back: Instant,
    /// When it was restarted, thawed or healed.
    t_heal: Instant,
    /// When the cluster had settled again after that.
    t_settled: Instant,
}

/// Sends one probe to the shard of `key`: idempotent (re-sent by the client across a failover)
/// or plain.
async fn probe_send(
    probe: &Client,
    key: &str,
    payload: Vec<u8>,
    idempotent: bool,
) -> Result<(), String> {
    let sent = if idempotent {
        probe.send(key, IdempotentEcho { payload }).await.map(drop)
    } else {
        probe.send(key, Echo { payload }).await.map(drop)
    };
    sent.map_err(|e| e.to_string())
}

/// The node to fault: the leader, or follower number `number` (in id order, round robin).
fn pick_node(settled: &Settled, ids: &[NodeId], leader_role: bool, number: usize) -> NodeId {
    if leader_role {
        return settled.leader;
    }
    let followers: Vec<NodeId> = ids
        .iter()
        .copied()
        .filter(|&id| id != settled.leader)
        .collect();
    followers[number % followers.len()]
}

/// How `freeze` and `partition` fault a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// SIGSTOP, then SIGCONT: the process stops, its sockets stay open.
    Freeze,
    /// SIGUSR1, then SIGUSR2: the node's fault hook isolates it, then heals it.
    Partition,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::Freeze => "freeze",
            FaultKind::Partition => "partition",
        }
    }

    /// The `kill(1)` signal names that start and end the fault.
    fn signals(self) -> (&'static str, &'static str) {
        match self {
            FaultKind::Freeze => ("STOP", "CONT"),
            FaultKind::Partition => ("USR1", "USR2"),
        }
    }

    /// What the faulted node is, in the notes.
    fn participle(self) -> &'static str {
        match self {
            FaultKind::Freeze => "frozen",
            FaultKind::Partition => "cut off",
        }
    }

    /// What ends the fault, in the notes.
    fn heal_name(self) -> &'static str {
        match self {
            FaultKind::Freeze => "thaw",
            FaultKind::Partition => "heal",
        }
    }
}

/// Sends signal `name` (`STOP`, `CONT`, `USR1`, ...) to initial member `id` with `kill(1)`,
/// marks it in the node's log and returns the moment right after `kill` exited (the signal
/// is delivered by then).
async fn signal_node(harness: &Harness, id: NodeId, name: &str) -> Result<Instant, String> {
    let pid = harness
        .node(id)
        .pid()
        .ok_or(format!("node {id} is not running"))?;
    let mut kill = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run kill(1): {e}"))?;
    // `kill` exits at once; its wait runs off the load's thread all the same.
    let status = tokio::task::spawn_blocking(move || kill.wait())
        .await
        .map_err(|e| format!("kill -{name} {pid}: {e}"))?
        .map_err(|e| format!("kill -{name} {pid}: {e}"))?;
    let at = Instant::now();
    if !status.success() {
        return Err(format!("kill -{name} {pid} (node {id}) failed: {status}"));
    }
    harness.node(id).mark(&format!("sent SIG{name}"));
    Ok(at)
}

/// What the load saw of one fault (or of several, added up): the requests in flight at some
/// moment from the fault until the cluster settled after it ended.
#[derive(Debug, Clone, Copy, Default)]
struct FaultLoad {
    /// Failed non-idempotent requests.
    failed_requests: u64,
    /// Those of them whose outcome is unknown (`OutcomeUnknown`, `Timeout`).
    outcome_unknown: u64,
    /// Those of them that failed otherwise.
    other_failures: u64,
    /// Those of them sent after the fault (to a node the client did not yet know was silent).
    failed_sent_after_fault: u64,
    /// Non-idempotent requests outstanding at the fault on a shard the node owned: sent
    /// before it, answered (or failed) after it.
    outstanding_at_fault: u64,
    /// The same for idempotent requests.
    idempotent_outstanding_at_fault: u64,
    /// Failed idempotent requests.
    idempotent_failed: u64,
    /// The most failed requests of one requester (each has one request outstanding at a
    /// time, so a fault should fail at most one per non-idempotent requester).
    failed_per_requester_max: u64,
    /// The longest request, ms, successful or not.
    longest_request_ms: f64,
    /// The longest request to a shard the faulted node did not own, ms: how long a leader
    /// change (or the fault's other effects) paused healthy shards.
    healthy_longest_request_ms: f64,
    /// When the first and the last failed non-idempotent request were sent, in ms from the
    /// fault (negative: before it).
    failed_sent_ms_from_fault: Option<(f64, f64)>,
    /// Faults added up.
    faults: u64,
    /// Faults with at most as many failed requests as outstanding at the fault, all of them
    /// outcome-unknown.
    faults_within_outstanding: u64,
}

impl FaultLoad {
    fn of(timeline: &[Sample], fault: &Kill) -> FaultLoad {
        let mut load = FaultLoad {
            faults: 1,
            ..FaultLoad::default()
        };
        let in_window = |s: &&Sample| s.start <= fault.t_settled && s.end() >= fault.t_kill;
        let mut failed_by_requester: BTreeMap<u16, u64> = BTreeMap::new();
        for sample in timeline.iter().filter(in_window) {
            load.longest_request_ms = load.longest_request_ms.max(ms(sample.latency));
            let owned = fault
                .owned
                .get(sample.call.shard as usize)
                .copied()
                .unwrap_or(false);
            if !owned {
                load.healthy_longest_request_ms =
                    load.healthy_longest_request_ms.max(ms(sample.latency));
            }
            let outstanding = owned && sample.start <= fault.t_kill;
            if sample.call.idempotent {
                load.idempotent_outstanding_at_fault += u64::from(outstanding);
                load.idempotent_failed += u64::from(!sample.ok);
                continue;
            }
            load.outstanding_at_fault += u64::from(outstanding);
            if !sample.ok {
                load.failed_requests += 1;
                *failed_by_requester
                    .entry(sample.call.requester)
                    .or_default() += 1;
                if sample.call.outcome_unknown {
                    load.outcome_unknown += 1;
                } else {
                    load.other_failures += 1;
                }
                load.failed_sent_after_fault += u64::from(sample.start > fault.t_kill);
                let sent = match sample.start.checked_duration_since(fault.t_kill) {
                    Some(after) => ms(after),
                    None => -ms(fault.t_kill - sample.start),
                };
                load.note_sent(Some((sent, sent)));
            }
        }
        load.failed_per_requester_max = failed_by_requester.values().copied().max().unwrap_or(0);
        load.faults_within_outstanding = u64::from(
            load.failed_requests <= load.outstanding_at_fault && load.other_failures == 0,
        );
        load
    }

    /// Whether every fault added up here kept its failures within the issue's bound.
    fn within_outstanding(&self) -> bool {
        self.faults_within_outstanding == self.faults
    }

    fn note_sent(&mut self, sent: Option<(f64, f64)>) {
        self.failed_sent_ms_from_fault = match (self.failed_sent_ms_from_fault, sent) {
            (Some((first, last)), Some((from, to))) => Some((first.min(from), last.max(to))),
            (mine, theirs) => mine.or(theirs),
        };
    }

    fn add(&mut self, other: &FaultLoad) {
        self.note_sent(other.failed_sent_ms_from_fault);
        self.failed_requests += other.failed_requests;
        self.outcome_unknown += other.outcome_unknown;
        self.other_failures += other.other_failures;
        self.failed_sent_after_fault += other.failed_sent_after_fault;
        self.outstanding_at_fault += other.outstanding_at_fault;
        self.idempotent_outstanding_at_fault += other.idempotent_outstanding_at_fault;
        self.idempotent_failed += other.idempotent_failed;
        self.failed_per_requester_max = self
            .failed_per_requester_max
            .max(other.failed_per_requester_max);
        self.longest_request_ms = self.longest_request_ms.max(other.longest_request_ms);
        self.healthy_longest_request_ms = self
            .healthy_longest_request_ms
            .max(other.healthy_longest_request_ms);
        self.faults += other.faults;
        self.faults_within_outstanding += other.faults_within_outstanding;
    }

    /// The JSON fields; the idempotent ones only for a load that had idempotent requests.
    fn to_json(self, idempotent_load: bool) -> serde_json::Map<String, Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("failed_requests".into(), json!(self.failed_requests));
        fields.insert("outcome_unknown".into(), json!(self.outcome_unknown));
        fields.insert("other_failures".into(), json!(self.other_failures));
        fields.insert(
            "failed_sent_after_fault".into(),
            json!(self.failed_sent_after_fault),
        );
        fields.insert(
            "failed_sent_ms_from_fault".into(),
            json!({
                "min": self.failed_sent_ms_from_fault.map(|(first, _)| round3(first)),
                "max": self.failed_sent_ms_from_fault.map(|(_, last)| round3(last)),
            }),
        );
        fields.insert(
            "failed_per_requester_max".into(),
            json!(self.failed_per_requester_max),
        );
        fields.insert(
            "outstanding_at_fault".into(),
            json!(self.outstanding_at_fault),
        );
        if idempotent_load {
            fields.insert(
                "idempotent_outstanding_at_fault".into(),
                json!(self.idempotent_outstanding_at_fault),
            );
            fields.insert("idempotent_failed".into(), json!(self.idempotent_failed));
        }
        fields.insert(
            "longest_request_ms".into(),
            json!(round3(self.longest_request_ms)),
        );
        fields.insert(
            "healthy_longest_request_ms".into(),
            json!(round3(self.healthy_longest_request_ms)),
        );
        fields
    }

    /// One clause for a note; the idempotent figure only for a load that had such requests.
    fn describe(&self, idempotent_load: bool) -> String {
        let idempotent = if idempotent_load {
            format!(", {} idempotent failed", self.idempotent_failed)
        } else {
            String::new()
        };
        format!(
            "{} request(s) failed ({} outcome-unknown, {} other; {} sent after the fault, up to {} ms after; at most {} per requester) with {} outstanding at the fault{idempotent}, longest request {:.0} ms (on shards the node did not own: {:.0} ms)",
            self.failed_requests,
            self.outcome_unknown,
            self.other_failures,
            self.failed_sent_after_fault,
            fmt_ms(self.failed_sent_ms_from_fault.map(|(_, last)| last)),
            self.failed_per_requester_max,
            self.outstanding_at_fault,
            self.longest_request_ms,
            self.healthy_longest_request_ms
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Running and reporting

/// Every scenario's outcome, in run order.
type Results = Vec<(Scenario, Outcome)>;

async fn measure(
    harness: &mut Harness,
    options: &Options,
    results: &mut Results,
) -> Result<(), String> {
    let wanted: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| options.scenarios.contains(s))
        .collect();
    let mut bench = Bench {
        harness,
        options,
        keys: Arc::new(keys_per_shard("key", SHARD_COUNT).ok_or("no key found for some shard")?),
        payload: vec![7u8; options.payload_bytes],
        postgres: None,
    };
    if wanted.iter().any(|s| s.needs_postgres()) {
        let server = postgres::Server::start(options)?;
        println!("PostgreSQL: {}", server.describe());
        bench.postgres = Some(server);
    }
    if wanted.iter().any(|s| s.needs_cluster()) {
        let what = format!("{} nodes", options.nodes);
        start_settled(bench.harness, bench.limit() * 2, &what).await?;
    }
    for scenario in wanted {
        check_interrupt()?;
        println!("running {} ...", scenario.name());
        let outcome = match scenario {
            Scenario::Local | Scenario::RawActix => bench.in_node(scenario).await,
            Scenario::Forwarded => bench.forwarded().await,
            Scenario::Client => bench.client_scenario().await,
            Scenario::RawTcp => bench.raw_tcp().await,
            Scenario::Durable => bench.durable().await,
            Scenario::RawLmdb => bench.raw_lmdb().await,
            Scenario::DurablePostgres => bench.durable_postgres().await,
            Scenario::RawPostgres => postgres::raw_postgres(&bench).await,
            Scenario::Failover => bench.failover().await,
            Scenario::Freeze => bench.faults(FaultKind::Freeze).await,
            Scenario::Partition => bench.faults(FaultKind::Partition).await,
            Scenario::Planned => bench.planned().await,
            Scenario::DurableFailover => postgres::durable_failover(&bench).await,
            Scenario::ExactlyOnce => exactly_once::exactly_once(&bench).await,
        }
        .map_err(|e| format!("{}: {e}", scenario.name()))?;
        results.push((scenario, outcome));
    }
    Ok(())
}

/// Starts every initial member of `harness` and waits (up to `limit`) until the cluster
/// settled, printing the nodes' log tails if it does not; says how long it took, `what`
/// naming the nodes.
async fn start_settled(harness: &Harness, limit: Duration, what: &str) -> Result<(), String> {
    let started = Instant::now();
    harness.start_all()?;
    wait_settled(
        &harness.admin_clients(POLL_TIMEOUT)?,
        SHARD_COUNT,
        None,
        false,
        limit,
    )
    .await
    .map_err(|e| e.to_string())
    .inspect_err(|_| harness.print_log_tails(&[]))?;
    println!("{what} up and settled in {:.0} ms", ms(started.elapsed()));
    Ok(())
}

fn find(results: &Results, scenario: Scenario) -> Option<&Outcome> {
    results.iter().find(|(s, _)| *s == scenario).map(|(_, o)| o)
}

/// Throughput ratio and p50 ratio of `scenario` to its floor, when both ran.
fn floor_ratios(results: &Results, scenario: Scenario) -> Option<(f64, f64)> {
    let floor = find(results, scenario.floor()?)?;
    let this = find(results, scenario)?;
    let throughput = if floor.summary.throughput_rps > 0.0 {
        this.summary.throughput_rps / floor.summary.throughput_rps
    } else {
        0.0
    };
    let p50 = if floor.summary.p50_us > 0.0 {
        this.summary.p50_us / floor.summary.p50_us
    } else {
        0.0
    };
    Some((throughput, p50))
}

/// CPU per request of `scenario` over its floor's, when both were measured.
fn cpu_ratio(results: &Results, scenario: Scenario) -> Option<f64> {
    let floor = find(results, scenario.floor()?)?
        .summary
        .cpu_us_per_request?;
    let this = find(results, scenario)?.summary.cpu_us_per_request?;
    (floor > 0.0).then(|| this / floor)
}

/// The targets of the issue, each with what was measured.
fn targets(results: &Results) -> Vec<(String, Option<bool>, String)> {
    let mut checks = Vec::new();
    if let Some((throughput, p50)) = floor_ratios(results, Scenario::Client) {
        checks.push((
            "client throughput ≥ 50 % of raw_tcp".to_owned(),
            Some(throughput >= 0.5),
            format!("{:.0} %", throughput * 100.0),
        ));
        checks.push((
            "client p50 ≤ 2 × raw_tcp p50".to_owned(),
            Some(p50 <= 2.0),
            format!("{p50:.2} ×"),
        ));
    }
    if let (Some(forwarded), Some(client)) = (
        find(results, Scenario::Forwarded),
        find(results, Scenario::Client),
    ) {
        let ratio = forwarded.summary.p50_us / client.summary.p50_us.max(f64::MIN_POSITIVE);
        checks.push((
            "forwarded p50 ≤ 2 × client p50 (one extra hop)".to_owned(),
            Some(ratio <= 2.0),
            format!("{ratio:.2} ×"),
        ));
    }
    if let Some((throughput, p50)) = floor_ratios(results, Scenario::Local) {
        checks.push((
            "local vs raw_actix (no target)".to_owned(),
            None,
            format!("{:.0} % throughput, {p50:.2} × p50", throughput * 100.0),
        ));
    }
    if let Some((throughput, _)) = floor_ratios(results, Scenario::Durable) {
        checks.push((
            "durable increments/s ≥ 50 % of raw_lmdb".to_owned(),
            Some(throughput >= 0.5),
            format!("{:.0} %", throughput * 100.0),
        ));
    }
    if let Some((throughput, _)) = floor_ratios(results, Scenario::DurablePostgres) {
        checks.push((
            "durable_postgres increments/s ≥ 50 % of raw_postgres".to_owned(),
            Some(throughput >= 0.5),
            format!("{:.0} %", throughput * 100.0),
        ));
    }
    if let Some(failover) = find(results, Scenario::DurableFailover) {
        let number = |field: &str| failover.extra.get(field).and_then(Value::as_u64);
        let lost = number("values_lost");
        checks.push((
            "durable_failover: acknowledged values lost = 0".to_owned(),
            lost.map(|l| l == 0),
            lost.map_or("-".into(), |l| l.to_string()),
        ));
        let too_high = number("counters_too_high");
        checks.push((
            "durable_failover: counters ≤ acknowledged + failed".to_owned(),
            too_high.map(|t| t == 0),
            too_high.map_or("-".into(), |t| format!("{t} above")),
        ));
        for label in ["follower", "leader"] {
            let figure = |field: &str| {
                failover
                    .extra
                    .get(label)
                    .and_then(|v| v.get(field))
                    .and_then(Value::as_f64)
            };
            checks.push((
                format!("durable_failover: {label}'s shards back (no target)"),
                None,
                format!(
                    "{} / {} ms (median / max)",
                    fmt_ms(figure("unavailable_ms_median")),
                    fmt_ms(figure("unavailable_ms_max"))
                ),
            ));
        }
    }
    if let Some(once) = find(results, Scenario::ExactlyOnce) {
        let number = |field: &str| once.extra.get(field).and_then(Value::as_u64);
        let equal = once
            .extra
            .get("final_counts_equal_acknowledged")
            .and_then(Value::as_bool);
        checks.push((
            "exactly_once: final counts = acknowledged increments".to_owned(),
            equal,
            match (number("lost_increments"), number("duplicated_increments")) {
                (Some(lost), Some(duplicated)) => format!("{lost} lost, {duplicated} duplicated"),
                _ => "-".into(),
            },
        ));
        checks.push(must_be_zero(
            "exactly_once: increments given up = 0",
            number("increments_given_up"),
        ));
        checks.push((
            "exactly_once: retries after an unknown outcome (no target)".to_owned(),
            None,
            number("retries_after_unknown").map_or("-".into(), |r| r.to_string()),
        ));
        let ratio = |store: &str| {
            once.extra
                .get(&format!("record_cost_ratio_{store}"))
                .and_then(Value::as_f64)
                .map_or("-".into(), |r| format!("{r:.2}"))
        };
        checks.push((
            "exactly_once: numbered / unnumbered increments/s (no target)".to_owned(),
            None,
            format!("pg {} ×, lmdb {} ×", ratio("postgres"), ratio("lmdb")),
        ));
    }
    if let Some(failover) = find(results, Scenario::Failover) {
        for (label, bound) in [("follower", 350.0), ("leader", 500.0)] {
            let median = failover
                .extra
                .get(label)
                .and_then(|v| v.get("unavailable_ms_median"))
                .and_then(Value::as_f64);
            checks.push((
                format!("failover: {label}'s shards back ≤ {bound:.0} ms (median)"),
                median.map(|m| m <= bound),
                format!("{} ms", fmt_ms(median)),
            ));
        }
        checks.push((
            "failover: zero failed requests".to_owned(),
            Some(failover.summary.errors == 0),
            failover.summary.errors.to_string(),
        ));
    }
    if let Some(failover) = find(results, Scenario::Failover) {
        checks.push(failures_within_outstanding("failover", failover));
        checks.push(failures_per_requester("failover", failover));
    }
    for scenario in [Scenario::Freeze, Scenario::Partition] {
        let Some(outcome) = find(results, scenario) else {
            continue;
        };
        let name = scenario.name();
        let role = |label: &str, field: &str| {
            outcome
                .extra
                .get(label)
                .and_then(|v| v.get(field))
                .and_then(Value::as_f64)
        };
        // The issue's bounds are for a freeze with the default timing; a partition is shown
        // next to them without a target.
        let bounds = match scenario {
            Scenario::Freeze => [("follower", Some(1000.0)), ("leader", Some(1500.0))],
            _ => [("follower", None), ("leader", None)],
        };
        for (label, bound) in bounds {
            let median = role(label, "unavailable_ms_median");
            let what = match bound {
                Some(bound) => format!("{name}: {label}'s keys back ≤ {bound:.0} ms (median)"),
                None => format!("{name}: {label}'s keys back (median, no target)"),
            };
            checks.push((
                what,
                bound.and_then(|b| median.map(|m| m <= b)),
                format!("{} ms", fmt_ms(median)),
            ));
        }
        let longest = role("follower", "longest_request_ms");
        checks.push((
            match scenario {
                Scenario::Freeze => format!("{name}: follower: no request waits > 3000 ms"),
                _ => format!("{name}: follower: longest request (no target)"),
            },
            longest
                .filter(|_| scenario == Scenario::Freeze)
                .map(|l| l <= 3000.0),
            format!("{} ms", fmt_ms(longest)),
        ));
        checks.push(failures_within_outstanding(name, outcome));
        checks.push(failures_per_requester(name, outcome));
        let idempotent_failed = outcome
            .extra
            .get("idempotent_failed")
            .and_then(Value::as_u64);
        checks.push((
            format!("{name}: idempotent requests: zero failed"),
            idempotent_failed.map(|f| f == 0),
            idempotent_failed.map_or("-".into(), |f| f.to_string()),
        ));
    }
    if let Some(planned) = find(results, Scenario::Planned) {
        let failed = planned.extra.get("failed_requests").and_then(Value::as_u64);
        let pause = planned.extra.get("worst_pause_ms").and_then(Value::as_f64);
        checks.push(must_be_zero("planned: zero failed requests", failed));
        checks.push((
            "planned: worst pause < 50 ms".to_owned(),
            pause.map(|p| p < 50.0),
            format!("{} ms", fmt_ms(pause)),
        ));
    }
    checks
}

/// A target that a count (`None`: not measured) be zero.
fn must_be_zero(what: &str, count: Option<u64>) -> (String, Option<bool>, String) {
    (
        what.to_owned(),
        count.map(|c| c == 0),
        count.map_or("-".into(), |c| c.to_string()),
    )
}

/// The issue's bound on failed requests per fault: at most those outstanding to the faulted
/// node at the fault, every one of them outcome-unknown.
fn failures_within_outstanding(name: &str, outcome: &Outcome) -> (String, Option<bool>, String) {
    let number = |field: &str| outcome.extra.get(field).and_then(Value::as_u64);
    let within = outcome
        .extra
        .get("every_fault_within_outstanding")
        .and_then(Value::as_bool);
    let measured = match (
        number("outcome_unknown"),
        number("other_failures"),
        number("outstanding_at_fault"),
    ) {
        (Some(unknown), Some(other), Some(outstanding)) => {
            format!("{unknown}+{other} of {outstanding}")
        }
        _ => "-".into(),
    };
    (
        format!("{name}: failed ≤ outstanding per fault, all outcome-unknown"),
        within,
        measured,
    )
}

/// The most failed requests of one requester in one fault, next to the issue's bound (each
/// requester has one request outstanding at a time).
fn failures_per_requester(name: &str, outcome: &Outcome) -> (String, Option<bool>, String) {
    let most = outcome
        .extra
        .get("failed_per_requester_max")
        .and_then(Value::as_u64);
    (
        format!("{name}: most failures of one requester per fault (no target)"),
        None,
        most.map_or("-".into(), |m| m.to_string()),
    )
}

fn print_table(results: &Results, options: &Options) {
    println!();
    println!(
        "{} nodes on loopback, {} requesters, {} s per scenario, {}-byte payload; {} cpus, load average {}",
        options.nodes,
        options.concurrency,
        options.seconds,
        options.payload_bytes,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average().as_deref().unwrap_or("?")
    );
    println!(
        "{:<16} {:>9} {:>10} {:>9} {:>9} {:>9} {:>7} {:>10} {:>12} {:>8} {:>7} {:>7}",
        "scenario",
        "requests",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "errors",
        "cpu µs/req",
        "floor",
        "req/s ×",
        "p50 ×",
        "cpu ×"
    );
    for (scenario, outcome) in results {
        let s = &outcome.summary;
        let (floor, throughput, p50) = match floor_ratios(results, *scenario) {
            Some((throughput, p50)) => (
                scenario.floor().map_or("", Scenario::name),
                format!("{throughput:.2}"),
                format!("{p50:.2}"),
            ),
            None => ("-", "-".into(), "-".into()),
        };
        let cpu = cpu_ratio(results, *scenario).map_or("-".into(), |r| format!("{r:.2}"));
        println!(
            "{:<16} {:>9} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>10} {:>12} {:>8} {:>7} {:>7}",
            scenario.name(),
            s.requests,
            s.throughput_rps,
            s.p50_us,
            s.p99_us,
            s.p999_us,
            s.errors,
            s.cpu_us_per_request
                .map_or("-".into(), |c| format!("{c:.1}")),
            floor,
            throughput,
            p50,
            cpu
        );
    }
    for (_, outcome) in results {
        for note in &outcome.notes {
            println!("  {note}");
        }
        for (kind, count) in &outcome.summary.error_kinds {
            println!("    {count:>6} × {kind}");
        }
    }
    let checks = targets(results);
    if !checks.is_empty() {
        println!();
        println!("targets (ratios within this run):");
        for (what, met, value) in checks {
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            println!("  {what:<56} {value:>22}  {verdict}");
        }
    }
}

fn to_json(results: &Results, options: &Options, load_before: Option<String>) -> Value {
    let setup = json!({
        "nodes": options.nodes,
        "concurrency": options.concurrency,
        "seconds": options.seconds,
        "warmup_seconds": options.warmup_seconds,
        "payload_bytes": options.payload_bytes,
        "shard_count": SHARD_COUNT,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "percentiles": "nearest rank over every successful request",
    });
    let mut document = serde_json::Map::new();
    let checks = targets(results);
    for (scenario, outcome) in results {
        let mut entry = outcome.summary.to_json();
        if let Some((throughput, p50)) = floor_ratios(results, *scenario) {
            entry.insert("floor".into(), json!(scenario.floor().map(Scenario::name)));
            entry.insert("floor_ratio".into(), json!(round3(throughput)));
            entry.insert("floor_p50_ratio".into(), json!(round3(p50)));
            if let Some(cpu) = cpu_ratio(results, *scenario) {
                entry.insert("floor_cpu_ratio".into(), json!(round3(cpu)));
            }
        }
        for (key, value) in &outcome.extra {
            entry.insert(key.clone(), value.clone());
        }
        // A target belongs to the scenario its first word names (`durable` is not
        // `durable_postgres`).
        let mine: Vec<Value> = checks
            .iter()
            .filter(|(what, _, _)| {
                what.split_whitespace()
                    .next()
                    .map(|word| word.trim_end_matches(':'))
                    == Some(scenario.name())
            })
            .map(|(what, met, value)| json!({"target": what, "met": met, "measured": value}))
            .collect();
        if !mine.is_empty() {
            entry.insert("targets".into(), Value::Array(mine));
        }
        entry.insert("setup".into(), setup.clone());
        document.insert(scenario.name().into(), Value::Object(entry));
    }
    Value::Object(document)
}

fn run(options: Options) -> Result<(), String> {
    options.check()?;
    watch_interrupt(PROGRAM);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut launch = Launch::new(PROGRAM, Binaries::node_program(exe), &options.node)?;
    launch.insecure = options.insecure;
    let mut harness = Harness::new(launch, options.nodes, options.node.keep_dir)?;
    if options.tls {
        let dir = harness.path().join("certs");
        let nodes: Vec<NodeSpec> = harness
            .nodes
            .iter()
            .map(|node| NodeSpec {
                id: node.id(),
                addr: node.addr(),
            })
            .collect();
        certs::write_cluster(&dir, CLUSTER_NAME, &nodes).map_err(|e| e.to_string())?;
        harness.launch.tls_dir = Some(dir);
    }
    let load_before = load_average();
    println!(
        "bench: {} nodes ({} shards) as processes, {}, nodes in {} (RUST_LOG={}); load average {}",
        options.nodes,
        SHARD_COUNT,
        if options.tls {
            "TLS 1.3 with client certificates"
        } else if options.insecure {
            "insecure (frames unauthenticated)"
        } else {
            "secret mode (frames authenticated)"
        },
        harness.path().display(),
        options.node.rust_log,
        load_before.as_deref().unwrap_or("?")
    );
    let mut results = Results::new();
    let outcome = runtime()?.block_on(measure(&mut harness, &options, &mut results));
    stopped_early(PROGRAM, &outcome);
    print_table(&results, &options);
    if let Some(path) = &options.json {
        write_json(path, &to_json(&results, &options, load_before))?;
    }
    drop(harness);
    outcome?;
    // A scenario whose checks failed said why in its figures, which are printed by now.
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(scenario, outcome)| {
            let reason = outcome.extra.get(exactly_once::FAILED_FIELD)?.as_str()?;
            Some(format!("{}: {reason}", scenario.name()))
        })
        .collect();
    match failed.is_empty() {
        true => Ok(()),
        false => Err(failed.join("; ")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.mode {
        Some(Mode::Serve(args)) => exit_code(PROGRAM, serve(args)),
        None => exit_code(PROGRAM, run(cli.options)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_half_a_bucket_of_the_exact_ones() {
        let mut histogram = Histogram::default();
        for value in 1..=100_000u64 {
            histogram.record(value * 10);
        }
        for p in [0.5, 0.9, 0.99, 0.999] {
            let exact = (p * 100_000.0f64).ceil() * 10.0;
            let measured = histogram.quantile(p);
            assert!(
                (measured - exact).abs() / exact < 0.004,
                "p{p}: {measured} for {exact}"
            );
        }
        assert_eq!(histogram.quantile(1.0), 1_000_000.0);
    }

    #[test]
    fn read_back_holds_every_acknowledged_increment_and_at_most_the_failed_ones() {
        // Goal: a read-back passes with the acknowledged increments plus any number of the
        // failed ones (their outcome is unknown), and fails with one increment lost or one too
        // many. Method: a tally of 10 acknowledged and 2 failed, checked against sums around it.
        let tally = Tally::default();
        for _ in 0..10 {
            tally.record(true);
        }
        tally.record(false);
        tally.record(false);
        for sum in [10, 11, 12] {
            assert!(tally.check("test", sum).is_ok(), "{sum}");
        }
        for sum in [0, 9, 13] {
            assert!(tally.check("test", sum).is_err(), "{sum}");
        }
    }

    #[test]
    fn histogram_buckets_grow_with_the_value_and_cover_every_u64() {
        let mut last = 0;
        for value in (0..20_000u64).chain([1 << 40, u64::MAX / 2, u64::MAX]) {
            let bucket = Histogram::bucket(value);
            assert!(bucket >= last && bucket < HISTOGRAM_BUCKETS, "{value}");
            let middle = Histogram::value(bucket);
            assert!(
                (middle - value as f64).abs() <= value as f64 / 256.0 + 0.5,
                "{value}"
            );
            last = bucket;
        }
    }
}
