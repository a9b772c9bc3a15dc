//! The process-level test harness: a [`Cluster`] of real `kv serve` processes on 127.0.0.1, each
//! with its own data dir and log file in a temporary directory, driven through the `clusterfunk`
//! and `kv` command-line tools exactly as an operator would.
//!
//! Nodes are named by their node id, `1..=N`. The harness can start, kill -9, stop (SIGTERM),
//! pause (SIGSTOP), resume and restart them, and [`Cluster::wait_until`] polls for a condition;
//! when its deadline passes it fails the test with every node's last status and log tail.
//! Every command the harness runs is bounded in time, and dropping the [`Cluster`] kills every
//! node it started, so a failed test leaves no process behind.
//!
//! The process plumbing (ports, binaries, node processes, bounded runs, polling) comes from the
//! library's process harness, `clusterfunk::testing`, which the tools in `examples/` use too;
//! this module adds the operator's view (the `clusterfunk` and `kv` command lines) and the
//! failure reports. Environment: `CLUSTERFUNK_TEST_LOG` overrides the nodes' `RUST_LOG`
//! (default `warn`). It does not own the assertions: those live in [`checks`] and the test files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use clusterfunk::client::Client;
use clusterfunk::testing::{
    reserve_ports, run_bounded, serve_command, wait_until, Binaries, NodeProcess, PortReservation,
    Signal,
};
use clusterfunk::transport::Secret;
use serde_json::Value;
use tempfile::TempDir;
use tokio::runtime::Runtime;

pub mod checks;

/// Bound on any wait for the cluster to reach a state. Far above what a passing test needs
/// (elections take well under a second here), because CI is a busy 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Bound on one run of a command-line tool; a tool that runs longer counts as hung.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// The shard count the nodes bootstrap with (`kv serve`'s default).
pub const SHARD_COUNT: usize = 1024;

/// How often [`Cluster::wait_until`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Seconds the `clusterfunk` tool may spend on one `status`, `nodes` or `shards` probe; keeps a
/// probe of a paused node short.
const PROBE_TIMEOUT_SECONDS: &str = "2";

/// Lines of each node's log shown when a wait fails.
const LOG_TAIL_LINES: usize = 25;

pub use clusterfunk::testing::Outcome;

/// Where the `kv` nodes keep shard values: `kv serve --store memory|lmdb|postgres://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// In the node's memory: a planned move hands the values over, a restart loses them.
    Memory,
    /// In an LMDB store in the node's data dir: values also survive a restart in place.
    Lmdb,
    /// In PostgreSQL at this URL, shared by every node: values also survive a node's loss.
    Postgres(String),
}

impl Store {
    /// The value of `--store`.
    pub fn flag(&self) -> &str {
        match self {
            Store::Memory => "memory",
            Store::Lmdb => "lmdb",
            Store::Postgres(url) => url,
        }
    }

    /// A short name of the kind of store, for names and messages (never the URL).
    pub fn label(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Lmdb => "lmdb",
            Store::Postgres(_) => "postgres",
        }
    }
}

/// A cluster of `kv serve` processes on 127.0.0.1, in a temporary directory.
pub struct Cluster {
    /// The test's name, for ports, the secret and messages.
    name: String,
    /// Holds the data dirs and logs; kept on disk when the test fails.
    dir: Option<TempDir>,
    /// The cluster secret every process gets in `CLUSTERFUNK_SECRET`.
    secret: String,
    /// `RUST_LOG` of the nodes.
    log_filter: String,
    /// Nodes `1..=initial_members` bootstrap the cluster with `--init`; the others join later.
    initial_members: usize,
    /// The nodes, node id `i` at index `i - 1`.
    nodes: Vec<NodeProcess>,
    /// The nodes' ports, held until the cluster drops.
    _ports: PortReservation,
    /// The `kv` example binary.
    kv: PathBuf,
    /// The `clusterfunk` binary.
    clusterfunk: PathBuf,
    /// The metrics port of each node (`--metrics`), when enabled.
    metrics_ports: Option<PortReservation>,
    /// With TLS: the directory `clusterfunk certs` wrote (nodes get `node-ID`, `clusterfunk`
    /// gets `admin`, `kv` clients get `client`), and no process gets the secret.
    tls_dir: Option<PathBuf>,
    /// The `--store` every node gets; `None` leaves `kv serve`'s default.
    store: Option<Store>,
}

/// What a set of nodes agrees on, from their `status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The leader every node names (one of the set).
    pub leader: u64,
    /// The term every node is in.
    pub term: u64,
    /// The shard map epoch every node holds.
    pub epoch: u64,
    /// The voters every node sees.
    pub voters: Vec<u64>,
    /// The learners every node sees.
    pub learners: Vec<u64>,
}

/// A shard map from `shards --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// Its epoch.
    pub epoch: u64,
    /// The owner of each shard, indexed by shard.
    pub owners: Vec<u64>,
}

impl ShardMap {
    /// Whether exactly `owners` own shards, each ⌊count/owners⌋ or ⌈count/owners⌉.
    pub fn is_balanced(&self, owners: &[u64]) -> bool {
        let low = SHARD_COUNT / owners.len();
        let high = SHARD_COUNT.div_ceil(owners.len());
        self.owners.len() == SHARD_COUNT
            && self.owners() == owners
            && owners
                .iter()
                .all(|&node| (low..=high).contains(&self.count(node)))
    }

    /// Parses `shards --json`, checking that it lists every shard exactly once, in order.
    pub fn from_json(json: &Value) -> ShardMap {
        let epoch = json["epoch"]
            .as_u64()
            .unwrap_or_else(|| panic!("`shards --json` without an epoch: {json}"));
        let shards = json["shards"]
            .as_array()
            .unwrap_or_else(|| panic!("`shards --json` without a shard list: {json}"));
        let owners = shards
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                assert_eq!(
                    entry["shard"].as_u64(),
                    Some(index as u64),
                    "`shards --json` must list each shard once, in order"
                );
                entry["node"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("shard {index} without an owner: {entry}"))
            })
            .collect();
        ShardMap { epoch, owners }
    }

    /// How many shards `node` owns.
    pub fn count(&self, node: u64) -> usize {
        self.owners.iter().filter(|&&owner| owner == node).count()
    }

    /// The distinct owners, ascending.
    pub fn owners(&self) -> Vec<u64> {
        let owners: BTreeSet<u64> = self.owners.iter().copied().collect();
        owners.into_iter().collect()
    }
}

impl Cluster {
    /// A cluster of `nodes` nodes (ids `1..=nodes`) that all bootstrap it together; nothing is
    /// started yet. `name` should be the test's name: it seeds the ports and the secret.
    pub fn new(name: &str, nodes: usize) -> Cluster {
        Cluster::with_initial_members(name, nodes, nodes)
    }

    /// Like [`Cluster::new`], but only nodes `1..=initial_members` bootstrap the cluster
    /// (`--init`); the others start empty and wait to be added with `add-node`.
    pub fn with_initial_members(name: &str, nodes: usize, initial_members: usize) -> Cluster {
        assert!(initial_members <= nodes, "more initial members than nodes");
        let Binaries { kv, clusterfunk } = binaries();
        let dir = tempfile::Builder::new()
            .prefix(&format!("clusterfunk-{name}-"))
            .tempdir()
            .expect("create the cluster's temporary directory");
        let ports = reserve_ports(name, nodes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let nodes = (1..)
            .zip(ports.loopback_addrs())
            .map(|(id, addr)| NodeProcess::new(id, addr, dir.path()))
            .collect();
        Cluster {
            name: name.to_string(),
            dir: Some(dir),
            // Distinct per cluster, so a node of another test could never talk to this one.
            secret: format!("clusterfunk-test-secret/{name}/{}", std::process::id()),
            log_filter: std::env::var("CLUSTERFUNK_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            initial_members,
            nodes,
            _ports: ports,
            kv,
            clusterfunk,
            metrics_ports: None,
            tls_dir: None,
            store: None,
        }
    }

    /// Starts every node with `kv serve --store STORE`.
    pub fn with_store(mut self, store: Store) -> Cluster {
        self.store = Some(store);
        self
    }

    /// Adds `directive` (such as `clusterfunk::cluster=warn`) to the nodes' `RUST_LOG`, for a
    /// test that reads a line of the log whatever `CLUSTERFUNK_TEST_LOG` says.
    pub fn with_log_directive(mut self, directive: &str) -> Cluster {
        self.log_filter = format!("{},{directive}", self.log_filter);
        self
    }

    /// Runs the cluster with TLS: `clusterfunk certs` writes certificates for the initial
    /// members into the cluster's directory (later nodes get theirs with
    /// [`Cluster::issue_certificate`]).
    pub fn with_tls(mut self) -> Cluster {
        let dir = self.dir().join("certs");
        let mut command = Command::new(&self.clusterfunk);
        command
            .arg("certs")
            .arg("--dir")
            .arg(&dir)
            .args(["--nodes", &self.init_list()])
            .env_remove("CLUSTERFUNK_SECRET");
        let (code, _, stderr) = run_bounded(command, COMMAND_DEADLINE)
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("clusterfunk certs finishes");
        assert_eq!(code, 0, "clusterfunk certs failed: {stderr}");
        self.tls_dir = Some(dir);
        self
    }

    /// With TLS: issues node `id`'s certificate (`clusterfunk certs --add-node`).
    pub fn issue_certificate(&self, id: u64) -> Outcome {
        let dir = self
            .tls_dir
            .as_ref()
            .expect("the cluster was built with_tls");
        let mut command = Command::new(&self.clusterfunk);
        command
            .arg("certs")
            .arg("--dir")
            .arg(dir)
            .args(["--add-node", &format!("{id}={}", self.addr(id))])
            .env_remove("CLUSTERFUNK_SECRET");
        self.run(command)
    }

    /// With TLS: runs `clusterfunk ARGS` with `holder`'s certificates (`admin`, `client`)
    /// instead of the admin ones.
    pub fn cf_as(&self, holder: &str, args: &[&str]) -> Outcome {
        let mut command = Command::new(&self.clusterfunk);
        command
            .args(args)
            .arg("--tls-dir")
            .arg(self.tls_dir(holder));
        self.client_environment(&mut command);
        self.run(command)
    }

    /// With TLS: the certificate directory of `holder` (`node-ID`, `admin`, `client`).
    pub fn tls_dir(&self, holder: &str) -> PathBuf {
        self.tls_dir
            .as_ref()
            .expect("the cluster was built with_tls")
            .join(holder)
    }

    /// Gives every node a Prometheus endpoint (`kv serve --metrics`) on a port of its own; see
    /// [`Cluster::metrics_addr`].
    pub fn with_metrics(mut self) -> Cluster {
        let name = format!("{}-metrics", self.name);
        let ports =
            reserve_ports(&name, self.nodes.len()).unwrap_or_else(|e| panic!("{name}: {e}"));
        self.metrics_ports = Some(ports);
        self
    }

    /// Where node `id` serves metrics (after [`Cluster::with_metrics`]).
    pub fn metrics_addr(&self, id: u64) -> String {
        let ports = self
            .metrics_ports
            .as_ref()
            .expect("the cluster was built with_metrics");
        format!("127.0.0.1:{}", ports.ports()[(id - 1) as usize])
    }

    /// The node ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(NodeProcess::id).collect()
    }

    /// Node `id`'s address, `127.0.0.1:PORT`.
    pub fn addr(&self, id: u64) -> String {
        self.node(id).addr().to_string()
    }

    /// The secret the cluster runs with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Starts every initial member with `--init`, then waits until each answers `status`
    /// (not until a leader is elected: see [`Cluster::wait_for_one_map`]).
    pub fn start_all_with_init(&self) {
        let members: Vec<u64> = (1..=self.initial_members as u64).collect();
        for &id in &members {
            self.spawn(id);
        }
        for &id in &members {
            self.wait_until_answering(id);
        }
    }

    /// Starts node `id` for the first time and waits until it answers `status`. An initial
    /// member gets `--init`; any other node starts empty, waiting to be added.
    pub fn start(&self, id: u64) {
        assert_eq!(
            self.node(id).starts(),
            0,
            "node {id} was started before: use restart"
        );
        self.spawn(id);
        self.wait_until_answering(id);
    }

    /// Starts node `id` again after [`Cluster::kill9`] or [`Cluster::stop`], on the same port
    /// and data dir and with exactly the arguments of its first start (an initial member gets
    /// `--init` again, which a node with a cluster on disk must ignore). Waits until it answers.
    pub fn restart(&self, id: u64) {
        assert!(
            self.node(id).starts() > 0,
            "node {id} was never started: use start"
        );
        self.spawn(id);
        self.wait_until_answering(id);
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill9(&self, id: u64) {
        if let Err(e) = self.node(id).kill() {
            panic!("kill9: {e}");
        }
    }

    /// Stops node `id` with SIGTERM and waits for it to exit; returns how it exited.
    pub fn stop(&self, id: u64) -> ExitStatus {
        self.signal(id, Signal::Term);
        self.wait_until(&format!("node {id} exits after SIGTERM"), DEADLINE, || {
            self.node(id).reap().unwrap_or_else(|e| panic!("{e}"))
        })
    }

    /// Freezes node `id` with SIGSTOP: it keeps its sockets but answers nothing.
    pub fn pause(&self, id: u64) {
        self.signal(id, Signal::Stop);
    }

    /// Thaws node `id` after [`Cluster::pause`] with SIGCONT.
    pub fn resume(&self, id: u64) {
        self.signal(id, Signal::Cont);
    }

    /// Node `id`'s `status --json`, or `None` when it does not answer.
    pub fn status(&self, id: u64) -> Option<Value> {
        self.probe(id, "status")
    }

    /// Node `id`'s `shards --json`, or `None` when it does not answer.
    pub fn shards(&self, id: u64) -> Option<Value> {
        self.probe(id, "shards")
    }

    /// Node `id`'s `nodes --json`, or `None` when it does not answer.
    pub fn nodes(&self, id: u64) -> Option<Value> {
        self.probe(id, "nodes")
    }

    /// Runs `clusterfunk ARGS` (the caller passes `--node`), bounded by [`COMMAND_DEADLINE`].
    pub fn cf(&self, args: &[&str]) -> Outcome {
        self.run(self.cf_command(args))
    }

    /// Runs `clusterfunk --node <node id's address> ARGS`.
    pub fn cf_at(&self, id: u64, args: &[&str]) -> Outcome {
        let addr = self.addr(id);
        let mut full = vec!["--node", addr.as_str()];
        full.extend_from_slice(args);
        self.cf(&full)
    }

    /// Runs `kv SUBCOMMAND --node <node id's address> REST..` for `args = [SUBCOMMAND, REST..]`,
    /// bounded by [`COMMAND_DEADLINE`].
    pub fn kv(&self, id: u64, args: &[&str]) -> Outcome {
        self.run(self.kv_command(id, args))
    }

    /// The `clusterfunk ARGS` command with the cluster's environment, to adjust before
    /// [`Cluster::run`] (for example to give it a wrong secret).
    pub fn cf_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.clusterfunk);
        command.args(args);
        if self.tls_dir.is_some() {
            command.arg("--tls-dir").arg(self.tls_dir("admin"));
        }
        self.client_environment(&mut command);
        command
    }

    /// The `kv SUBCOMMAND --node ADDR REST..` command with the cluster's environment.
    pub fn kv_command(&self, id: u64, args: &[&str]) -> Command {
        let (subcommand, rest) = args.split_first().expect("kv needs a subcommand");
        let mut command = Command::new(&self.kv);
        command
            .arg(subcommand)
            .args(["--node", &self.addr(id)])
            .args(rest);
        if self.tls_dir.is_some() {
            command.arg("--tls-dir").arg(self.tls_dir("client"));
        }
        self.client_environment(&mut command);
        command
    }

    /// Runs `command` to its end and returns its outcome; fails the test when it runs longer
    /// than [`COMMAND_DEADLINE`] (it is killed first).
    pub fn run(&self, command: Command) -> Outcome {
        let line = format!("{command:?}");
        run_bounded(command, COMMAND_DEADLINE)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| {
                panic!(
                    "{line} did not finish within {COMMAND_DEADLINE:?}\n{}",
                    self.report()
                )
            })
    }

    /// Polls `probe` every ~20 ms until it returns `Some`, and returns that. When `timeout`
    /// passes first, fails the test with `description`, every node's status and log tail.
    pub fn wait_until<T>(
        &self,
        description: &str,
        timeout: Duration,
        probe: impl FnMut() -> Option<T>,
    ) -> T {
        wait_until(timeout, POLL_INTERVAL, probe).unwrap_or_else(|| {
            panic!(
                "{}: timed out after {timeout:?} waiting until {description}\n{}",
                self.name,
                self.report()
            )
        })
    }

    /// One look at whether nodes `ids` agree: every one serving, naming the same leader (one
    /// of `ids`, and it says it leads), in the same term, with the same epoch and membership.
    pub fn agreement(&self, ids: &[u64]) -> Option<Agreement> {
        let statuses: Vec<Value> = ids
            .iter()
            .map(|&id| self.status(id))
            .collect::<Option<_>>()?;
        let view = |status: &Value| -> Option<Agreement> {
            if status["state"] != "serving" {
                return None;
            }
            Some(Agreement {
                leader: status["leader"].as_u64()?,
                term: status["term"].as_u64()?,
                epoch: status["epoch"].as_u64()?,
                voters: id_list(&status["voters"]),
                learners: id_list(&status["learners"]),
            })
        };
        let first = view(&statuses[0])?;
        for status in &statuses[1..] {
            if view(status)? != first {
                return None;
            }
        }
        let leader_index = ids.iter().position(|&id| id == first.leader)?;
        (statuses[leader_index]["raft_state"] == "leader").then_some(first)
    }

    /// Waits until nodes `ids` agree and all answer `shards --json` with the agreed epoch, and
    /// returns the agreement and the map. Two nodes holding different maps under one epoch
    /// fail the test at once: that breaks the map's core invariant.
    pub fn wait_for_one_map(&self, ids: &[u64]) -> (Agreement, ShardMap) {
        self.wait_for_one_map_where(ids, "", |_, _| true)
    }

    /// Like [`Cluster::wait_for_one_map`], but also waits until `condition` holds for the
    /// agreement and the map; `description` says what the condition means.
    pub fn wait_for_one_map_where(
        &self,
        ids: &[u64],
        description: &str,
        condition: impl Fn(&Agreement, &ShardMap) -> bool,
    ) -> (Agreement, ShardMap) {
        self.wait_until(
            format!("nodes {ids:?} agree and hold one shard map {description}").trim_end(),
            DEADLINE,
            || {
                let agreement = self.agreement(ids)?;
                let mut maps: Vec<(u64, ShardMap)> = ids
                    .iter()
                    .map(|&id| Some((id, ShardMap::from_json(&self.shards(id)?))))
                    .collect::<Option<_>>()?;
                for (id, map) in &maps[1..] {
                    let (first_id, first) = &maps[0];
                    if map.epoch == first.epoch && map != first {
                        let shard = (0..map.owners.len().max(first.owners.len()))
                            .find(|&s| map.owners.get(s) != first.owners.get(s));
                        panic!(
                            "nodes {first_id} and {id} hold different maps under epoch {}; \
                             first difference at shard {shard:?}\n{}",
                            map.epoch,
                            self.report()
                        );
                    }
                }
                if maps.iter().any(|(_, map)| map.epoch != agreement.epoch) {
                    return None;
                }
                let map = maps.swap_remove(0).1;
                condition(&agreement, &map).then_some((agreement, map))
            },
        )
    }

    /// Every node's process state, last status and log tail, for failure messages.
    pub fn report(&self) -> String {
        let mut report = String::new();
        for node in &self.nodes {
            let process = node.describe_process();
            let status = match self.status(node.id()) {
                Some(status) => status.to_string(),
                None => "no answer".into(),
            };
            let tail = node.log_tail(LOG_TAIL_LINES).join("\n    ");
            report.push_str(&format!(
                "--- node {} at {}: {process}\n  status: {status}\n  log {}:\n    {tail}\n",
                node.id(),
                node.addr(),
                node.log_path().display()
            ));
        }
        report
    }

    fn node(&self, id: u64) -> &NodeProcess {
        self.nodes
            .iter()
            .find(|node| node.id() == id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    fn pid(&self, id: u64) -> u32 {
        self.node(id)
            .pid()
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// Sends `signal` to node `id`, which must be running.
    fn signal(&self, id: u64, signal: Signal) {
        if let Err(e) = self.node(id).signal(signal) {
            panic!("{e}");
        }
    }

    /// The `--init` list of the initial members.
    fn init_list(&self) -> String {
        (1..=self.initial_members as u64)
            .map(|id| format!("{id}={}", self.addr(id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id`'s process, its output appended to its log file.
    fn spawn(&self, id: u64) {
        let node = self.node(id);
        let mut command = serve_command(&self.kv, id, &self.addr(id), node.data_dir());
        if self.metrics_ports.is_some() {
            command.args(["--metrics", &self.metrics_addr(id)]);
        }
        if let Some(store) = &self.store {
            command.args(["--store", store.flag()]);
        }
        if id as usize <= self.initial_members {
            command.args(["--init", &self.init_list()]);
        }
        if self.tls_dir.is_some() {
            command
                .arg("--tls-dir")
                .arg(self.tls_dir(&format!("node-{id}")));
        }
        if self.tls_dir.is_none() {
            command.env("CLUSTERFUNK_SECRET", &self.secret);
        } else {
            command.env_remove("CLUSTERFUNK_SECRET");
        }
        command
            .env("RUST_LOG", &self.log_filter)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1");
        if let Err(e) = node.start(command) {
            panic!("{}: {e}", self.name);
        }
    }

    /// Waits until node `id` answers `status`; fails at once when its process exits.
    fn wait_until_answering(&self, id: u64) {
        self.wait_until(&format!("node {id} answers status"), DEADLINE, || {
            let exited = self
                .node(id)
                .exit_status()
                .unwrap_or_else(|e| panic!("{e}"));
            if let Some(status) = exited {
                panic!(
                    "node {id} exited ({status}) while starting\n{}",
                    self.report()
                );
            }
            self.status(id)
        });
    }

    /// Runs `clusterfunk --node ADDR WHAT --json` and parses its answer.
    fn probe(&self, id: u64, what: &str) -> Option<Value> {
        let addr = self.addr(id);
        let command = self.cf_command(&[
            "--node",
            &addr,
            "--timeout",
            PROBE_TIMEOUT_SECONDS,
            what,
            "--json",
        ]);
        let (code, stdout, _) = run_bounded(command, COMMAND_DEADLINE).ok()??;
        if code != 0 {
            return None;
        }
        serde_json::from_str(stdout.trim()).ok()
    }

    fn client_environment(&self, command: &mut Command) {
        if self.tls_dir.is_none() {
            command.env("CLUSTERFUNK_SECRET", &self.secret);
        } else {
            command.env_remove("CLUSTERFUNK_SECRET");
        }
        command
            // The tools' own logs would clutter the stderr the tests look at.
            .env("RUST_LOG", "error")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
    }
}

/// Helpers of the failover tests (`tests/failover.rs`); other test files need not use them.
impl Cluster {
    /// Node `id`'s shard map from `shards --json`, or `None` when it does not answer or holds
    /// no map yet.
    pub fn shard_map(&self, id: u64) -> Option<ShardMap> {
        let json = self.shards(id)?;
        if json["epoch"].as_u64().unwrap_or(0) == 0 {
            return None;
        }
        Some(ShardMap::from_json(&json))
    }

    /// Node `id`'s data dir.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.node(id).data_dir().to_path_buf()
    }

    /// Node `id`'s whole log, every start of it (empty when it has none yet).
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.node(id).log_path()).unwrap_or_default()
    }

    /// Whether node `id`'s process runs (started, not killed, stopped or exited by itself).
    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).is_running()
    }

    /// Appends `=== harness: TEXT` to every node's log, so the log tails of a failure show when
    /// the test did what.
    pub fn mark(&self, text: &str) {
        for node in &self.nodes {
            node.mark(text);
        }
    }

    /// A `kv serve --id ID --listen ADDR --data-dir DIR EXTRA..` command with the cluster's
    /// secret, outside the harness's bookkeeping: for tests of what a node refuses to start on
    /// (run it with [`Cluster::run_within`]); output is piped, not logged.
    pub fn serve_command(&self, id: u64, listen: &str, data_dir: &Path, extra: &[&str]) -> Command {
        let mut command = serve_command(&self.kv, id, listen, data_dir);
        command.args(extra);
        self.client_environment(&mut command);
        command
    }

    /// Node `id`'s process id (it must be running).
    pub fn process_id(&self, id: u64) -> u32 {
        self.pid(id)
    }

    /// The `--init` list of the initial members, `1=ADDR,2=ADDR,..`.
    pub fn initial_member_list(&self) -> String {
        self.init_list()
    }

    /// Runs `command` to its end like [`Cluster::run`], but bounded by `limit`: `None` when it
    /// ran longer (it is killed). For tests whose point is that a command does not hang.
    pub fn run_within(&self, command: Command, limit: Duration) -> Option<Outcome> {
        run_bounded(command, limit).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Helpers of the tests that load the cluster through an in-process [`Client`]
/// (`tests/durable_restart.rs`, `tests/operations.rs`, `tests/exactly_once_faults.rs`).
impl Cluster {
    /// A client of the cluster (without TLS) seeded with the addresses of `nodes`, with the
    /// cluster's secret; `timeout` is the default deadline of a call.
    pub fn client(&self, nodes: &[u64], timeout: Duration) -> Client {
        assert!(
            self.tls_dir.is_none(),
            "Cluster::client authenticates with the secret: not for a cluster with TLS"
        );
        let seeds = nodes.iter().map(|&id| {
            self.addr(id)
                .parse()
                .expect("the harness gives IP:PORT addresses")
        });
        let secret = Secret::new(self.secret.as_bytes().to_vec())
            .expect("the harness's secret is long enough");
        Client::with_config(seeds, Some(secret), "clusterfunk", timeout)
            .expect("a client with seeds and a secret is valid")
    }
}

/// A runtime for a test's writers and readers (two workers), beside the test thread that drives
/// the cluster.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start a tokio runtime")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill the nodes before their directory goes; the ports are released afterwards,
        // when the reservations drop with the other fields.
        for node in &self.nodes {
            if node.pid().is_some() {
                let _ = node.kill();
            }
        }
        if thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "{}: kept the data dirs and logs in {}",
                    self.name,
                    dir.keep().display()
                );
            }
        }
    }
}

/// The node ids in a JSON array.
pub fn id_list(json: &Value) -> Vec<u64> {
    json.as_array()
        .map(|ids| ids.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// The `kv` and `clusterfunk` binaries, checked once per process (see
/// [`Binaries::build_for_tests`]: the harness builds the `kv` program itself).
fn binaries() -> Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES
        .get_or_init(|| {
            Binaries::build_for_tests(
                Path::new(env!("CARGO")),
                Path::new(env!("CARGO_MANIFEST_DIR")),
                Path::new(env!("CARGO_BIN_EXE_clusterfunk")),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .clone()
}
