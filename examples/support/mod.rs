//! What the measuring tools `raft_timing`, `failover_timing` and `bench` and the `demo` share:
//! finding the binaries next to the running program, a cluster of `kv serve` processes (or of
//! any program with the same `serve` command line) on 127.0.0.1 in a temporary directory (free
//! ports, start, SIGKILL, restart, clean-up on drop), Ctrl-C and SIGTERM handling, polling with a
//! deadline, waiting for the cluster to settle and probing a shard until it answers, series of
//! millisecond samples with their quantiles, summary table and JSON, and the plumbing of `main`
//! (runtime, JSON file, exit code).
//!
//! Each tool includes it with `#[path = "support/mod.rs"] mod support;`; cargo does not take
//! `examples/support/` for an example of its own, since it has no `main.rs`.

// Only the tools that talk to `kv` nodes use it.
#[allow(dead_code)]
pub mod kv_api;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clusterfunk::admin::{
    AdminClient, AdminRequest, AdminResponse, Credentials, NodeState, StatusReport,
};
use clusterfunk::shard_map::shard_for;
use clusterfunk::tls::TlsConfig;
use clusterfunk::transport::{Secret, SECRET_ENV_VAR};
use clusterfunk::NodeId;
use serde_json::{json, Value};

/// Lines of each node log printed when something times out or fails.
const LOG_TAIL_LINES: usize = 25;
/// How long one library status call may take before it counts as a failed poll.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(500);

/// Set by the Ctrl-C watcher; every wait loop checks it and unwinds, so the guard cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------------------------
// Processes

/// Nodes listen on ports from this range, below Linux's ephemeral range, so that no outgoing
/// connection can take a killed node's port before it restarts.
pub const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// `count` ports of [`PORT_RANGE`] that were free a moment ago, from a spot picked by `seed`.
// `raft_timing` lets the kernel pick its ports.
#[allow(dead_code)]
pub fn free_ports(count: usize, seed: &str) -> Result<Vec<u16>, String> {
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let mut offset = seed
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % u32::from(span);
    let mut ports = Vec::new();
    for _ in 0..span {
        let port = PORT_RANGE.start + offset as u16;
        offset = (offset + 1) % u32::from(span);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            if ports.len() == count {
                return Ok(ports);
            }
        }
    }
    Err(format!("no {count} free ports in {PORT_RANGE:?}"))
}

/// The programs the tools drive.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The node program, run as `NODE serve --id N --listen ADDR --data-dir DIR [--init LIST]`:
    /// `target/<profile>/examples/kv`, or the tool itself when it has such a `serve` mode.
    pub kv: PathBuf,
    /// `target/<profile>/clusterfunk` (present only when asked for).
    // `failover_timing` drives `kv` alone and never reads this.
    #[allow(dead_code)]
    pub cli: PathBuf,
}

impl Binaries {
    /// Runs `program` as the node program, without the command-line tool: for a tool that is
    /// its own node program (`bench serve ...`).
    // Only `bench` is its own node program.
    #[allow(dead_code)]
    pub fn node_program(program: PathBuf) -> Self {
        Binaries {
            kv: program,
            cli: PathBuf::new(),
        }
    }

    /// Finds `kv` next to this executable and, with `need_cli`, `clusterfunk` in the profile
    /// directory above it, or says how to build what is missing.
    // `bench` runs itself as the node program.
    #[allow(dead_code)]
    pub fn locate(need_cli: bool) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let examples = exe.parent().ok_or("this program has no parent directory")?;
        let profile = match examples.parent() {
            Some(profile) => profile,
            None if need_cli => {
                return Err("this program is not inside target/<profile>/examples".into())
            }
            None => examples,
        };
        let bins = Binaries {
            kv: examples.join("kv"),
            cli: profile.join("clusterfunk"),
        };
        let wanted: &[&PathBuf] = if need_cli {
            &[&bins.kv, &bins.cli]
        } else {
            &[&bins.kv]
        };
        let missing: Vec<String> = wanted
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            Ok(bins)
        } else {
            Err(format!(
                "missing {}: run `cargo build --release --examples --bins` first",
                missing.join(" and ")
            ))
        }
    }
}

/// The command-line options of the node processes, the same in every tool (flattened into its
/// options, after the tool's own).
#[derive(clap::Args, Debug)]
pub struct NodeOptions {
    /// `RUST_LOG` of the nodes.
    #[arg(long, default_value = "warn")]
    pub rust_log: String,
    /// Keep the temporary directory (data dirs and node logs) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
    /// The nodes' timing profile (`kv serve --timing`): `default` (lease 500 ms, elections
    /// 150–300 ms) or `fast` (lease 300 ms, elections 100–200 ms, heartbeat 30 ms).
    #[arg(long, default_value = "default", value_parser = ["default", "fast"])]
    pub timing: String,
}

/// What every node process shares: the binaries, the secret and the log level.
pub struct Launch {
    /// The measuring tool's name, for its messages and the markers in the node logs.
    pub program: &'static str,
    /// The programs.
    pub bins: Binaries,
    /// The cluster secret, passed as `CLUSTERFUNK_SECRET`.
    pub secret: String,
    /// `RUST_LOG` of the nodes.
    pub rust_log: String,
    /// The nodes' timing profile, passed as `--timing`.
    pub timing: String,
    /// Nodes and clients run without the secret (`kv serve --insecure`; only the bench sets
    /// it, to measure what the secret mode costs).
    pub insecure: bool,
    /// Nodes and clients run with TLS: certificates from `clusterfunk certs` in this
    /// directory (`node-ID` for nodes, `client` for the library's clients, `admin` for admin
    /// calls). Only the bench sets it, to measure what TLS costs.
    pub tls_dir: Option<PathBuf>,
}

impl Launch {
    /// The launch of nodes of `program`, with a fresh secret.
    pub fn new(
        program: &'static str,
        bins: Binaries,
        options: &NodeOptions,
    ) -> Result<Self, String> {
        Ok(Launch {
            program,
            bins,
            secret: make_secret()?,
            rust_log: options.rust_log.clone(),
            timing: options.timing.clone(),
            insecure: false,
            tls_dir: None,
        })
    }

    /// Starts `kv serve` for `node` (with `--init` when given), appending its output to the
    /// node's log file.
    pub fn start(&self, node: &mut NodeProc, init: Option<&str>) -> Result<(), String> {
        if node.child.is_some() {
            return Err(format!("node {} is already running", node.id));
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("cannot open {}: {e}", node.log.display()))?;
        let _ = writeln!(
            log,
            "==== {} {}: starting node {} on {}{} ====",
            self.program,
            utc_now(),
            node.id,
            node.addr,
            if init.is_some() { " with --init" } else { "" }
        );
        let stderr = log
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", node.log.display()))?;
        let mut command = Command::new(&self.bins.kv);
        command
            .arg("serve")
            .arg("--id")
            .arg(node.id.to_string())
            .arg("--listen")
            .arg(node.addr.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir);
        if let Some(init) = init {
            command.arg("--init").arg(init);
        }
        command.arg("--timing").arg(&self.timing);
        if let Some(dir) = &self.tls_dir {
            command
                .arg("--tls-dir")
                .arg(dir.join(format!("node-{}", node.id)))
                .env_remove(SECRET_ENV_VAR);
        } else if self.insecure {
            command.arg("--insecure").env_remove(SECRET_ENV_VAR);
        } else {
            command.env(SECRET_ENV_VAR, &self.secret);
        }
        let child = command
            .env("RUST_LOG", &self.rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bins.kv.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// What the library's clients (`holder` "client") and admin calls ("admin") authenticate
    /// with: TLS, the secret, or nothing.
    pub fn credentials(&self, holder: &str) -> Result<Credentials, String> {
        if let Some(dir) = &self.tls_dir {
            return TlsConfig::from_dir(dir.join(holder))
                .map(Credentials::Tls)
                .map_err(|e| e.to_string());
        }
        Ok(match self.secret()? {
            Some(secret) => Credentials::Secret(secret),
            None => Credentials::Insecure,
        })
    }

    /// The cluster secret for the library's clients (`None` with `--insecure` or TLS).
    pub fn secret(&self) -> Result<Option<Secret>, String> {
        if self.insecure || self.tls_dir.is_some() {
            return Ok(None);
        }
        Secret::new(self.secret.clone())
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// A library admin client for the node at `addr`, each call bounded by `timeout`.
    pub fn admin(&self, addr: SocketAddr, timeout: Duration) -> Result<AdminClient, String> {
        AdminClient::with_credentials(addr, "clusterfunk", &self.credentials("admin")?, timeout)
            .map_err(|e| e.to_string())
    }
}

/// One `kv serve` slot: its identity, its files and, while it runs, its process.
pub struct NodeProc {
    /// The node id.
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its raft storage.
    pub data_dir: PathBuf,
    /// Its stdout and stderr, across restarts.
    pub log: PathBuf,
    /// The process, while running (or killed and not yet reaped).
    pub child: Option<Child>,
}

impl NodeProc {
    /// Kills the process, if any, and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The cluster under test. Dropping it kills every child process and removes the directory.
pub struct Harness {
    /// How nodes are started.
    pub launch: Launch,
    /// The temporary directory (data dirs and logs); `None` once handed over.
    dir: Option<tempfile::TempDir>,
    /// Keep the directory on drop.
    keep_dir: bool,
    /// The initial members, node `i + 1` at index `i`.
    pub nodes: Vec<NodeProc>,
    /// Nodes started later (for membership changes).
    pub extra: Vec<NodeProc>,
}

impl Harness {
    /// Makes the directory and a slot for node `i + 1` on each of `addrs` (nothing starts).
    pub fn new(launch: Launch, addrs: Vec<SocketAddr>, keep_dir: bool) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}.", launch.program))
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let mut harness = Harness {
            launch,
            dir: Some(dir),
            keep_dir,
            nodes: Vec::new(),
            extra: Vec::new(),
        };
        for (id, addr) in (1..).zip(addrs) {
            let node = harness.slot(id, addr);
            harness.nodes.push(node);
        }
        Ok(harness)
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("."), |d| d.path())
    }

    /// A new node slot listening on `addr`, with its data dir and log path.
    pub fn slot(&self, id: NodeId, addr: SocketAddr) -> NodeProc {
        NodeProc {
            id,
            addr,
            data_dir: self.path().join(format!("node-{id}")),
            log: self.path().join(format!("node-{id}.log")),
            child: None,
        }
    }

    /// The ids of the initial members.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The initial member with this id.
    pub fn node(&self, id: NodeId) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    /// The initial member with this id, to change.
    fn node_mut(&mut self, id: NodeId) -> &mut NodeProc {
        &mut self.nodes[(id - 1) as usize]
    }

    /// `--init` for the initial members: `1=IP:PORT,2=IP:PORT,...`.
    fn init_list(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) initial member `id`, with `--init` when `init` is set (a node with
    /// a cluster on disk ignores it).
    pub fn start(&mut self, id: NodeId, init: bool) -> Result<(), String> {
        let init = init.then(|| self.init_list());
        let index = (id - 1) as usize;
        self.launch.start(&mut self.nodes[index], init.as_deref())
    }

    /// Starts every initial member with `--init`.
    pub fn start_all(&mut self) -> Result<(), String> {
        for id in self.ids() {
            self.start(id, true)?;
        }
        Ok(())
    }

    /// SIGKILLs initial member `id`, marks it in its log and returns the moment right after
    /// the kill; the process is reaped by [`Self::reap`].
    pub fn kill(&mut self, id: NodeId) -> Result<Instant, String> {
        let child = self
            .node_mut(id)
            .child
            .as_mut()
            .ok_or(format!("node {id} is not running"))?;
        child
            .kill()
            .map_err(|e| format!("cannot kill node {id}: {e}"))?;
        let at = Instant::now();
        self.note(id, "killed with SIGKILL");
        Ok(at)
    }

    /// Waits for a killed member's process to exit and forgets it.
    pub fn reap(&mut self, id: NodeId) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = child.wait();
        }
    }

    /// Appends a marker line about initial member `id` to its log.
    pub fn note(&self, id: NodeId, text: &str) {
        let node = self.node(id);
        if let Ok(mut log) = OpenOptions::new().append(true).open(&node.log) {
            let _ = writeln!(
                log,
                "==== {} {}: node {id} {text} ====",
                self.launch.program,
                utc_now()
            );
        }
    }

    /// A library admin client for initial member `id`, each call bounded by `timeout`.
    pub fn admin(&self, id: NodeId, timeout: Duration) -> Result<AdminClient, String> {
        self.launch.admin(self.node(id).addr, timeout)
    }

    /// Library admin clients for every initial member, each call bounded by `timeout`.
    pub fn admin_clients(
        &self,
        timeout: Duration,
    ) -> Result<BTreeMap<NodeId, AdminClient>, String> {
        self.nodes
            .iter()
            .map(|n| Ok((n.id, self.launch.admin(n.addr, timeout)?)))
            .collect()
    }

    /// Prints the last lines of the logs of these nodes (all when `ids` is empty).
    pub fn print_log_tails(&self, ids: &[NodeId]) {
        for node in self.nodes.iter().chain(&self.extra) {
            if !ids.is_empty() && !ids.contains(&node.id) {
                continue;
            }
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "---- node {} log ({}), last lines:",
                node.id,
                node.log.display()
            );
            for line in &lines[from..] {
                eprintln!("   {line}");
            }
        }
    }
}

/// The cleanup guard: runs on every way out of a tool's `run`, errors and Ctrl-C included.
impl Drop for Harness {
    /// Kills and reaps every node, then removes the directory (unless `--keep-dir`).
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().chain(self.extra.iter_mut()) {
            node.stop();
        }
        if let Some(dir) = self.dir.take() {
            if self.keep_dir {
                eprintln!("{}: kept {}", self.launch.program, dir.keep().display());
            }
        }
    }
}

/// A fresh random cluster secret (hex of 24 bytes from /dev/urandom).
fn make_secret() -> Result<String, String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C and waiting

/// Starts a thread that notes Ctrl-C or SIGTERM (see [`interrupted`]) and says so as `program`.
/// Either would otherwise end the program at once, leaving its node processes running.
pub fn watch_interrupt(program: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let signalled = match signal(SignalKind::terminate()) {
                Ok(mut term) => tokio::select! {
                    _ = term.recv() => true,
                    answer = tokio::signal::ctrl_c() => answer.is_ok(),
                },
                Err(_) => tokio::signal::ctrl_c().await.is_ok(),
            };
            if signalled {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("{program}: interrupted; stopping the nodes");
            }
        });
    });
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once Ctrl-C was pressed.
pub fn check_interrupt() -> Result<(), String> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Calls `probe` every `every` until it succeeds, at most for `limit` (and as many attempts as
/// fit); the error names `what` and the last reason.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    every: Duration,
    limit: Duration,
    mut probe: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    let attempts = limit.as_millis() / every.as_millis().max(1) + 1;
    let mut last = "no attempt".to_string();
    for _ in 0..attempts {
        check_interrupt()?;
        match probe().await {
            Ok(value) => return Ok(value),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(every).await;
    }
    Err(format!(
        "timed out after {limit:?} waiting for {what}: {last}"
    ))
}

/// One node's status through the library.
pub async fn lib_status(client: &AdminClient) -> Result<StatusReport, String> {
    match client.request(AdminRequest::Status).await {
        Ok(AdminResponse::Status(status)) => Ok(status),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Every client's node status, asked all at once, in the order of the node ids.
pub async fn lib_statuses(
    clients: &BTreeMap<NodeId, AdminClient>,
) -> Vec<(NodeId, Result<StatusReport, String>)> {
    futures_util::future::join_all(
        clients
            .iter()
            .map(|(id, c)| async move { (*id, lib_status(c).await) }),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Shards

/// One key per shard: `keys[s]` (`key-<number>`) hashes to shard `s` of `shard_count`.
// `raft_timing` sends no shard messages.
#[allow(dead_code)]
pub fn key_per_shard(shard_count: u32) -> Result<Vec<String>, String> {
    let mut keys: Vec<Option<String>> = vec![None; shard_count as usize];
    let mut missing = shard_count as usize;
    // About shard_count · ln(shard_count) candidates fill every slot; 64 times the shard count
    // bounds the search far above that.
    for i in 0..u64::from(shard_count) * 64 {
        if missing == 0 {
            break;
        }
        let key = format!("key-{i}");
        let slot = &mut keys[shard_for(key.as_bytes(), shard_count) as usize];
        if slot.is_none() {
            *slot = Some(key);
            missing -= 1;
        }
    }
    if missing > 0 {
        return Err(format!(
            "no key found for {missing} of {shard_count} shards"
        ));
    }
    Ok(keys.into_iter().flatten().collect())
}

/// Every shard's owner, from one node's `Shards`.
// `raft_timing` does not look at shards.
#[allow(dead_code)]
pub async fn shard_owners(client: &AdminClient, shard_count: u32) -> Result<Vec<NodeId>, String> {
    match client.request(AdminRequest::Shards).await {
        Ok(AdminResponse::Shards(report)) if report.shards.len() == shard_count as usize => {
            Ok(report.shards.iter().map(|s| s.node).collect())
        }
        Ok(other) => Err(format!("unexpected answer to Shards: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The cluster at rest, as [`wait_settled`] found it.
// `raft_timing` has its own notion of settled (logs applied) and does not read this.
#[allow(dead_code)]
pub struct Settled {
    /// The leader every node names.
    pub leader: NodeId,
    /// The leader's term.
    pub term: u64,
    /// The map epoch every node holds.
    pub epoch: u64,
    /// Every shard's owner.
    pub owners: Vec<NodeId>,
}

/// Waits until every node of `clients` serves, names one leader (which says it leads), holds
/// one map epoch, marks nobody down, moves no shard, and `draining` (if any) is the only node
/// drained and owns nothing while the others own balanced shares of `shard_count`. With
/// `polled_are_voters`, also that the voters are exactly the polled nodes.
// `raft_timing` has its own notion of settled.
#[allow(dead_code)]
pub async fn wait_settled(
    clients: &BTreeMap<NodeId, AdminClient>,
    shard_count: u32,
    draining: Option<NodeId>,
    polled_are_voters: bool,
    limit: Duration,
) -> Result<Settled, String> {
    let what = match draining {
        Some(id) => format!("the cluster to settle with node {id} drained"),
        None => "the cluster to settle with balanced shares".to_string(),
    };
    let owners_of = |count: usize| {
        let low = shard_count / count as u32;
        low..=shard_count.div_ceil(count as u32)
    };
    let nodes = clients.len();
    let (leader, term, epoch) = wait_for(&what, Duration::from_millis(10), limit, || async move {
        let answers = lib_statuses(clients).await;
        let mut statuses = BTreeMap::new();
        for (id, answer) in answers {
            let s = answer.map_err(|e| format!("node {id}: {e}"))?;
            if s.state != NodeState::Serving {
                return Err(format!("node {id}: {:?} {:?}", s.state, s.reason));
            }
            statuses.insert(id, s);
        }
        let first = statuses.values().next().ok_or("no nodes")?;
        let leader = first.leader.ok_or("no leader")?;
        let (term, epoch) = (first.term, first.epoch);
        let active = if draining.is_some() { nodes - 1 } else { nodes };
        for (id, s) in &statuses {
            if s.leader != Some(leader) || s.term != term || s.epoch != epoch {
                return Err(format!(
                    "node {id} names leader {:?} in term {} at epoch {}, node {} names {leader} in {term} at {epoch}",
                    s.leader, s.term, s.epoch, first.node_id
                ));
            }
            if polled_are_voters && !s.voters.iter().eq(statuses.keys()) {
                return Err(format!("node {id}: voters {:?}", s.voters));
            }
            if !s.down.is_empty() || s.shards_moving != 0 {
                return Err(format!(
                    "node {id}: down {:?}, {} shard(s) moving",
                    s.down, s.shards_moving
                ));
            }
            if s.draining != draining.into_iter().collect::<Vec<_>>() {
                return Err(format!("node {id}: draining {:?}", s.draining));
            }
            let fair = if Some(*id) == draining {
                s.shards_owned == 0
            } else {
                owners_of(active).contains(&s.shards_owned)
            };
            if !fair {
                return Err(format!("node {id} owns {} shards", s.shards_owned));
            }
        }
        match statuses.get(&leader) {
            Some(s) if s.raft_state == "leader" => Ok((leader, term, epoch)),
            _ => Err(format!("node {leader} does not say it leads")),
        }
    })
    .await?;
    let client = clients
        .get(&leader)
        .ok_or(format!("the leader {leader} is not among the polled nodes"))?;
    let owners = shard_owners(client, shard_count).await?;
    Ok(Settled {
        leader,
        term,
        epoch,
        owners,
    })
}

/// Calls `probe` until it succeeds, every `every`, giving up at `deadline` (or on Ctrl-C);
/// returns the milliseconds from `since` to the success (`None` if none), the failed attempts
/// and the last failure.
// `raft_timing` probes no shards.
#[allow(dead_code)]
pub async fn probe_until_ok<F, Fut>(
    mut probe: F,
    since: Instant,
    every: Duration,
    deadline: Instant,
) -> (Option<f64>, usize, Option<String>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut errors = 0;
    let mut last = None;
    // One attempt per interval until the deadline, plus the first.
    let attempts = deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        / every.as_millis().max(1)
        + 1;
    for _ in 0..attempts {
        match probe().await {
            Ok(()) => return (Some(ms(since.elapsed())), errors, last),
            Err(e) => {
                errors += 1;
                last = Some(e);
            }
        }
        if Instant::now() >= deadline || interrupted() {
            break;
        }
        tokio::time::sleep(every).await;
    }
    (None, errors, last)
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Samples of one figure, in ms, with the failures that gave none.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Milliseconds.
    pub values: Vec<f64>,
    /// Why some attempts gave no sample.
    pub failures: Vec<String>,
}

impl Series {
    /// Adds a sample or a failure.
    pub fn push(&mut self, sample: Result<f64, String>) {
        match sample {
            Ok(v) => self.values.push(v),
            Err(e) => self.failures.push(e),
        }
    }

    /// Adds a sample, or a failure without a reason for `None`.
    // `raft_timing` always has a reason and uses `push`.
    #[allow(dead_code)]
    pub fn push_option(&mut self, sample: Option<f64>) {
        self.push(sample.ok_or_else(|| "no sample".to_string()));
    }

    /// The `p`-quantile (0..=1), interpolated linearly between closest ranks.
    pub fn quantile(&self, p: f64) -> Option<f64> {
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        let last = sorted.len().checked_sub(1)?;
        let rank = p.clamp(0.0, 1.0) * last as f64;
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
    }

    /// `{"median","p90","max","min"[,"mean"],"samples","failures"}`, in ms (null without
    /// samples); `"mean"` only `with_mean`.
    pub fn to_json(&self, with_mean: bool) -> Value {
        let mut figures = serde_json::Map::new();
        for (key, p) in [("median", 0.5), ("p90", 0.9), ("max", 1.0), ("min", 0.0)] {
            figures.insert(key.into(), json!(self.quantile(p).map(round3)));
        }
        if with_mean {
            let mean = (!self.values.is_empty())
                .then(|| self.values.iter().sum::<f64>() / self.values.len() as f64);
            figures.insert("mean".into(), json!(mean.map(round3)));
        }
        figures.insert("samples".into(), json!(self.values.len()));
        figures.insert("failures".into(), json!(self.failures.len()));
        Value::Object(figures)
    }
}

/// The layout of a summary table: a figure's name, its samples and failures, then its median,
/// p90, max and min in ms.
// `bench` prints a table of its own.
#[allow(dead_code)]
pub struct SummaryTable {
    /// Width of the name column (left-aligned).
    pub name_width: usize,
    /// Width of each of the four figure columns (right-aligned).
    pub figure_width: usize,
    /// What separates two columns.
    pub gap: &'static str,
}

#[allow(dead_code)]
impl SummaryTable {
    /// Prints one line of cells, the first left-aligned and the others right-aligned.
    fn line(&self, name: &str, cells: [&str; 6]) {
        let fw = self.figure_width;
        let mut text = format!("{name:<width$}", width = self.name_width);
        for (cell, width) in cells.into_iter().zip([7, 8, fw, fw, fw, fw]) {
            text.push_str(self.gap);
            text.push_str(&format!("{cell:>width$}"));
        }
        println!("{text}");
    }

    /// Prints the header line, `first` over the names.
    pub fn header(&self, first: &str) {
        self.line(
            first,
            ["samples", "failures", "median", "p90", "max", "min"],
        );
    }

    /// Prints the row of `series`, unless it holds neither samples nor failures.
    pub fn row(&self, name: &str, series: &Series) {
        if series.values.is_empty() && series.failures.is_empty() {
            return;
        }
        let [median, p90, max, min] = [0.5, 0.9, 1.0, 0.0].map(|p| fmt_ms(series.quantile(p)));
        self.line(
            name,
            [
                &series.values.len().to_string(),
                &series.failures.len().to_string(),
                &median,
                &p90,
                &max,
                &min,
            ],
        );
    }
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Rounds to three decimals (µs) for JSON.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Formats an optional millisecond figure.
pub fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.1}"))
}

/// The current UTC time as RFC 3339 with microseconds, like the node logs.
pub fn utc_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// Year, month and day of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The 1, 5 and 15 minute load averages, when the system tells.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

// ---------------------------------------------------------------------------------------------
// Running

/// The single-threaded runtime the measurements run on.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Says, as `program`, why the measurements stopped early, and returns that reason.
pub fn stopped_early(program: &str, outcome: &Result<(), String>) -> Option<String> {
    let error = outcome.as_ref().err()?;
    eprintln!("{program}: stopped early: {error}");
    Some(error.clone())
}

/// Writes `document` pretty-printed to `path` and says so.
pub fn write_json(path: &Path, document: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(document).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The exit code of a tool's run: 1 on an error, printed as `program: error: ...`.
pub fn exit_code(program: &str, outcome: Result<(), String>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{program}: error: {message}");
            ExitCode::FAILURE
        }
    }
}
