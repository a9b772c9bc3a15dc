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
//! Environment: `CLUSTERFUNK_TEST_LOG` overrides the nodes' `RUST_LOG` (default `warn`).
//! It does not own the assertions: those live in the test files.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tempfile::TempDir;

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

/// Nodes listen on ports from this range: below Linux's ephemeral range (32768–60999), so the
/// kernel never hands one of them to an outgoing connection. That matters because the nodes
/// and tools open many outgoing connections, and a restarted node must get its old port back:
/// with "bind port 0, then release" the port would be an ephemeral one, free for any connect()
/// on the machine to take while its node is down. Within the range a cluster starts at a spot
/// hashed from its name and the process id, so parallel tests and parallel test binaries start
/// far apart; each candidate is then probed by binding it and skipped when taken, and a process
/// never hands out one port twice (see [`PORTS_IN_USE`]).
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// Ports handed to live clusters of this process, released when a cluster drops.
static PORTS_IN_USE: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// What a command-line tool did: exit code (-1 when a signal ended it), stdout, stderr.
pub type Outcome = (i32, String, String);

/// One node of a [`Cluster`].
struct Node {
    /// Its node id.
    id: u64,
    /// Its port on 127.0.0.1.
    port: u16,
    /// Its process, while one is started and not yet reaped.
    child: Mutex<Option<Child>>,
    /// How often it was started, for the markers in its log.
    starts: Mutex<u32>,
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
    nodes: Vec<Node>,
    /// The `kv` example binary.
    kv: PathBuf,
    /// The `clusterfunk` binary.
    clusterfunk: PathBuf,
    /// The metrics port of each node (`--metrics`), when enabled.
    metrics_ports: Option<Vec<u16>>,
    /// With TLS: the directory `clusterfunk certs` wrote (nodes get `node-ID`, `clusterfunk`
    /// gets `admin`, `kv` clients get `client`), and no process gets the secret.
    tls_dir: Option<PathBuf>,
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
    // Not every test file that includes the harness uses it.
    #[allow(dead_code)]
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
        let (kv, clusterfunk) = binaries();
        let dir = tempfile::Builder::new()
            .prefix(&format!("clusterfunk-{name}-"))
            .tempdir()
            .expect("create the cluster's temporary directory");
        let nodes = allocate_ports(name, nodes)
            .into_iter()
            .zip(1..)
            .map(|(port, id)| Node {
                id,
                port,
                child: Mutex::new(None),
                starts: Mutex::new(0),
            })
            .collect();
        Cluster {
            name: name.to_string(),
            dir: Some(dir),
            // Distinct per cluster, so a node of another test could never talk to this one.
            secret: format!("clusterfunk-test-secret/{name}/{}", std::process::id()),
            log_filter: std::env::var("CLUSTERFUNK_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            initial_members,
            nodes,
            kv,
            clusterfunk,
            metrics_ports: None,
            tls_dir: None,
        }
    }

    /// Runs the cluster with TLS: `clusterfunk certs` writes certificates for the initial
    /// members into the cluster's directory (later nodes get theirs with
    /// [`Cluster::issue_certificate`]).
    #[allow(dead_code)] // only the TLS tests use it
    pub fn with_tls(mut self) -> Cluster {
        let dir = self.dir().join("certs");
        let mut command = Command::new(&self.clusterfunk);
        command
            .arg("certs")
            .arg("--dir")
            .arg(&dir)
            .args(["--nodes", &self.init_list()])
            .env_remove("CLUSTERFUNK_SECRET");
        let (code, _, stderr) =
            run_bounded(command, COMMAND_DEADLINE).expect("clusterfunk certs finishes");
        assert_eq!(code, 0, "clusterfunk certs failed: {stderr}");
        self.tls_dir = Some(dir);
        self
    }

    /// With TLS: issues node `id`'s certificate (`clusterfunk certs --add-node`).
    #[allow(dead_code)] // only the TLS tests use it
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
    #[allow(dead_code)] // only the TLS tests use it
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
        let ports = allocate_ports(&format!("{}-metrics", self.name), self.nodes.len());
        self.metrics_ports = Some(ports);
        self
    }

    /// Where node `id` serves metrics (after [`Cluster::with_metrics`]).
    pub fn metrics_addr(&self, id: u64) -> String {
        let ports = self
            .metrics_ports
            .as_ref()
            .expect("the cluster was built with_metrics");
        format!("127.0.0.1:{}", ports[(id - 1) as usize])
    }

    /// The node ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|node| node.id).collect()
    }

    /// Node `id`'s address, `127.0.0.1:PORT`.
    pub fn addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.node(id).port)
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
            *lock(&self.node(id).starts),
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
            *lock(&self.node(id).starts) > 0,
            "node {id} was never started: use start"
        );
        self.spawn(id);
        self.wait_until_answering(id);
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill9(&self, id: u64) {
        let mut child = lock(&self.node(id).child)
            .take()
            .unwrap_or_else(|| panic!("kill9: node {id} is not running"));
        child.kill().expect("SIGKILL a node");
        child.wait().expect("reap a killed node");
    }

    /// Stops node `id` with SIGTERM and waits for it to exit; returns how it exited.
    pub fn stop(&self, id: u64) -> ExitStatus {
        let pid = self.pid(id);
        signal(pid, "-TERM");
        self.wait_until(&format!("node {id} exits after SIGTERM"), DEADLINE, || {
            let mut slot = lock(&self.node(id).child);
            let status = slot.as_mut()?.try_wait().expect("poll a node process")?;
            slot.take();
            Some(status)
        })
    }

    /// Freezes node `id` with SIGSTOP: it keeps its sockets but answers nothing.
    pub fn pause(&self, id: u64) {
        signal(self.pid(id), "-STOP");
    }

    /// Thaws node `id` after [`Cluster::pause`] with SIGCONT.
    pub fn resume(&self, id: u64) {
        signal(self.pid(id), "-CONT");
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
        run_bounded(command, COMMAND_DEADLINE).unwrap_or_else(|| {
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
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe() {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting until {description}\n{}",
                    self.name,
                    self.report()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
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
            let process = match lock(&node.child).as_mut() {
                None => "not running".to_string(),
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => format!("exited by itself ({status})"),
                    Ok(None) => format!("running, pid {}", child.id()),
                    Err(e) => format!("unknown ({e})"),
                },
            };
            let status = match self.status(node.id) {
                Some(status) => status.to_string(),
                None => "no answer".into(),
            };
            let log = self.log_path(node.id);
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n    ");
            report.push_str(&format!(
                "--- node {} at {}: {process}\n  status: {status}\n  log {}:\n    {tail}\n",
                node.id,
                self.addr(node.id),
                log.display()
            ));
        }
        report
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.dir().join(format!("node-{id}.log"))
    }

    fn pid(&self, id: u64) -> u32 {
        lock(&self.node(id).child)
            .as_ref()
            .unwrap_or_else(|| panic!("node {id} is not running"))
            .id()
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
        let mut slot = lock(&node.child);
        assert!(slot.is_none(), "node {id} is already running");
        let mut starts = lock(&node.starts);
        *starts += 1;
        let data_dir = self.dir().join(format!("node-{id}"));
        let mut command = Command::new(&self.kv);
        command
            .args(["serve", "--id", &id.to_string(), "--listen", &self.addr(id)])
            .arg("--data-dir")
            .arg(&data_dir);
        if self.metrics_ports.is_some() {
            command.args(["--metrics", &self.metrics_addr(id)]);
        }
        if id as usize <= self.initial_members {
            command.args(["--init", &self.init_list()]);
        }
        if self.tls_dir.is_some() {
            command
                .arg("--tls-dir")
                .arg(self.tls_dir(&format!("node-{id}")));
        }
        let mut log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("open the node's log");
        writeln!(
            log,
            "=== harness: start #{} of node {id}: {command:?}",
            *starts
        )
        .expect("write the node's log");
        if self.tls_dir.is_none() {
            command.env("CLUSTERFUNK_SECRET", &self.secret);
        } else {
            command.env_remove("CLUSTERFUNK_SECRET");
        }
        command
            .env("RUST_LOG", &self.log_filter)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share the log file"))
            .stderr(log);
        *slot = Some(command.spawn().expect("spawn a kv node"));
    }

    /// Waits until node `id` answers `status`; fails at once when its process exits.
    fn wait_until_answering(&self, id: u64) {
        self.wait_until(&format!("node {id} answers status"), DEADLINE, || {
            let exited = match lock(&self.node(id).child).as_mut() {
                Some(child) => child.try_wait().expect("poll a node process"),
                None => None,
            };
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
        let (code, stdout, _) = run_bounded(command, COMMAND_DEADLINE)?;
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
#[allow(dead_code)]
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
        self.node(id);
        self.dir().join(format!("node-{id}"))
    }

    /// Whether node `id`'s process runs (started, not killed, stopped or exited by itself).
    pub fn is_running(&self, id: u64) -> bool {
        lock(&self.node(id).child)
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Appends `=== harness: TEXT` to every node's log, so the log tails of a failure show when
    /// the test did what.
    pub fn mark(&self, text: &str) {
        for node in &self.nodes {
            if let Ok(mut log) = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path(node.id))
            {
                let _ = writeln!(log, "=== harness: {text}");
            }
        }
    }

    /// A `kv serve --id ID --listen ADDR --data-dir DIR EXTRA..` command with the cluster's
    /// secret, outside the harness's bookkeeping: for tests of what a node refuses to start on
    /// (run it with [`Cluster::run_within`]); output is piped, not logged.
    pub fn serve_command(&self, id: u64, listen: &str, data_dir: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(&self.kv);
        command
            .args(["serve", "--id", &id.to_string(), "--listen", listen])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra);
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
        run_bounded(command, limit)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(mut child) = lock(&node.child).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let mut ports = lock(&PORTS_IN_USE);
        for node in &self.nodes {
            ports.remove(&node.port);
        }
        for port in self.metrics_ports.iter().flatten() {
            ports.remove(port);
        }
        drop(ports);
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

/// Locks `mutex`, ignoring poisoning: a panicking test must still clean up in `Drop`.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends a signal (`-TERM`, `-STOP`, `-CONT`) with `kill(1)`. Only to children not yet reaped:
/// until the harness waits for a child, its pid cannot be reused by another process.
fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill {which} {pid} failed: {status}");
}

/// Runs `command` with piped output; `None` when it runs longer than `limit` (it is killed).
fn run_bounded(mut command: Command, limit: Duration) -> Option<Outcome> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    // Drain both pipes on their own threads so a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll a command") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    status.map(|status| (status.code().unwrap_or(-1), stdout, stderr))
}

/// Hands out `count` free ports for the cluster `name` (see [`PORT_RANGE`] for the scheme).
fn allocate_ports(name: &str, count: usize) -> Vec<u16> {
    let mut hasher = DefaultHasher::new();
    (name, std::process::id()).hash(&mut hasher);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let mut offset = (hasher.finish() % u64::from(span)) as u16;
    let mut in_use = lock(&PORTS_IN_USE);
    let mut ports = Vec::with_capacity(count);
    for _ in 0..span {
        if ports.len() == count {
            break;
        }
        let port = PORT_RANGE.start + offset;
        offset = (offset + 1) % span;
        // The probe listener closes at once; only this process's table keeps the port.
        if !in_use.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            in_use.insert(port);
            ports.push(port);
        }
    }
    assert_eq!(
        ports.len(),
        count,
        "no {count} free ports in {PORT_RANGE:?}"
    );
    ports
}

/// The `kv` and `clusterfunk` binaries, checked once per process. `cargo test` builds the `kv`
/// example as a test harness (its unit tests), not as the program these tests start, so the
/// harness builds the program itself, with the cargo and profile that built this test (a no-op
/// when it is up to date; cargo's own lock orders it with any other build).
fn binaries() -> (PathBuf, PathBuf) {
    static BINARIES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINARIES
        .get_or_init(|| {
            let clusterfunk = PathBuf::from(env!("CARGO_BIN_EXE_clusterfunk"));
            let profile_dir = clusterfunk
                .parent()
                .expect("the binary lives in a directory");
            let kv = profile_dir.join("examples").join("kv");
            let mut build = Command::new(env!("CARGO"));
            build
                .args(["build", "--quiet", "--example", "kv", "--manifest-path"])
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
            if profile_dir.file_name().is_some_and(|name| name == "release") {
                build.arg("--release");
            }
            let status = build
                .status()
                .unwrap_or_else(|e| panic!("cannot run cargo to build the kv example: {e}"));
            assert!(
                status.success(),
                "`cargo build --example kv` failed ({status}): fix the build, then run the tests again"
            );
            assert!(
                kv.is_file(),
                "{} is missing after `cargo build --example kv`",
                kv.display()
            );
            if let Some(source) = stale_source(&kv) {
                panic!(
                    "{} is older than its source {}: run `cargo build --examples`",
                    kv.display(),
                    source.display()
                );
            }
            (kv, clusterfunk)
        })
        .clone()
}

/// A source of the `kv` binary (from cargo's dep-info file beside it) changed after the binary
/// was built, so it would test old code. A change counts only if this test executable was built
/// after it (a file saved while the tests run is not this build's business), except for
/// `examples/kv.rs` itself, which the test executable does not depend on.
fn stale_source(kv: &Path) -> Option<PathBuf> {
    let modified = |path: &Path| -> Option<SystemTime> { fs::metadata(path).ok()?.modified().ok() };
    let built = modified(kv)?;
    let this_build = modified(&std::env::current_exe().ok()?)?;
    let kv_source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kv.rs");
    let dep_info = fs::read_to_string(kv.with_extension("d")).ok()?;
    let (_, sources) = dep_info.lines().next()?.split_once(": ")?;
    // Dep-info separates paths with spaces and escapes spaces inside paths with a backslash.
    let sources = sources.replace("\\ ", "\u{0}");
    sources
        .split_whitespace()
        .map(|source| PathBuf::from(source.replace('\u{0}', " ")))
        .find(|source| {
            modified(source).is_some_and(|changed| {
                changed > built && (changed <= this_build || *source == kv_source)
            })
        })
}
