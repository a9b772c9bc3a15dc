//! What the measuring tools `raft_timing`, `failover_timing` and `bench` and the `demo` share
//! on top of the library's process harness (`clusterfunk::testing`, which the integration tests
//! use too): the node options and launch settings of the tools, a cluster of node processes in
//! a temporary directory, the tools' string errors over the harness's typed ones, series of
//! millisecond samples with their quantiles, summary table and JSON, and the plumbing of `main`
//! (runtime, JSON file, exit code).
//!
//! Each tool includes it with `#[path = "support/mod.rs"] mod support;`; cargo does not take
//! `examples/support/` for an example of its own, since it has no `main.rs`.

// Only the tools that talk to `kv` nodes use it.
#[allow(dead_code)]
pub mod kv_api;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clusterfunk::admin::{AdminClient, Credentials, StatusReport};
use clusterfunk::testing::{self, reserve_ports, Binaries, NodeProcess, PortReservation};
use clusterfunk::tls::TlsConfig;
use clusterfunk::transport::{Secret, SECRET_ENV_VAR};
use clusterfunk::NodeId;
use serde_json::{json, Value};

pub use clusterfunk::testing::{interrupted, watch_interrupt};

/// Lines of each node log printed when something times out or fails.
const LOG_TAIL_LINES: usize = 25;
/// How long one library status call may take before it counts as a failed poll.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Processes

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
    /// The measuring tool's name, for its messages and the node log directory.
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
    /// The nodes' `kv serve --store`, passed as `KV_STORE` so that a database password stays
    /// out of the process list; `None` leaves `kv serve`'s default (`memory`). The demo's
    /// durable chapter and the bench's `durable_failover` set it.
    pub store: Option<String>,
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
            store: None,
        })
    }

    /// Starts `kv serve` for `node` (with `--init` when given), appending its output to the
    /// node's log file.
    pub fn start(&self, node: &NodeProcess, init: Option<&str>) -> Result<(), String> {
        let mut command: Command = testing::serve_command(
            &self.bins.kv,
            node.id(),
            &node.addr().to_string(),
            node.data_dir(),
        );
        if let Some(init) = init {
            command.arg("--init").arg(init);
        }
        command.arg("--timing").arg(&self.timing);
        if let Some(dir) = &self.tls_dir {
            command
                .arg("--tls-dir")
                .arg(dir.join(format!("node-{}", node.id())))
                .env_remove(SECRET_ENV_VAR);
        } else if self.insecure {
            command.arg("--insecure").env_remove(SECRET_ENV_VAR);
        } else {
            command.env(SECRET_ENV_VAR, &self.secret);
        }
        if let Some(store) = &self.store {
            command.env("KV_STORE", store);
        }
        command.env("RUST_LOG", &self.rust_log).env("NO_COLOR", "1");
        // A wall-clock marker, to line the tool's output up with the node's log.
        node.mark(&format!(
            "{} {}: starting node {} on {}{}",
            self.program,
            utc_now(),
            node.id(),
            node.addr(),
            if init.is_some() { " with --init" } else { "" }
        ));
        node.start(command).map_err(|e| e.to_string())
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

/// The cluster under test. Dropping it kills every node process (each [`NodeProcess`] does on
/// drop) and removes the directory.
pub struct Harness {
    /// How nodes are started.
    pub launch: Launch,
    /// The initial members, node `i + 1` at index `i`.
    pub nodes: Vec<NodeProcess>,
    /// Nodes started later (for membership changes).
    pub extra: Vec<NodeProcess>,
    /// The ports of all nodes, held until the harness drops.
    ports: Vec<PortReservation>,
    /// The temporary directory (data dirs and logs); `None` once handed over.
    dir: Option<tempfile::TempDir>,
    /// Keep the directory on drop.
    keep_dir: bool,
}

impl Harness {
    /// Makes the directory and a slot for each of `nodes` initial members on free loopback
    /// ports (nothing starts).
    pub fn new(launch: Launch, nodes: usize, keep_dir: bool) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}.", launch.program))
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let mut harness = Harness {
            launch,
            nodes: Vec::new(),
            extra: Vec::new(),
            ports: Vec::new(),
            dir: Some(dir),
            keep_dir,
        };
        for (id, addr) in (1..).zip(harness.reserve_addrs(nodes)?) {
            let node = harness.slot(id, addr);
            harness.nodes.push(node);
        }
        Ok(harness)
    }

    /// `count` more free loopback addresses, held until the harness drops.
    pub fn reserve_addrs(&mut self, count: usize) -> Result<Vec<SocketAddr>, String> {
        let seed = format!("{}-{}", self.launch.secret, self.ports.len());
        let ports = reserve_ports(&seed, count).map_err(|e| e.to_string())?;
        let addrs = ports.loopback_addrs();
        self.ports.push(ports);
        Ok(addrs)
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("."), |d| d.path())
    }

    /// A new node slot listening on `addr`, with its data dir and log path.
    pub fn slot(&self, id: NodeId, addr: SocketAddr) -> NodeProcess {
        NodeProcess::new(id, addr, self.path())
    }

    /// The ids of the initial members.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(NodeProcess::id).collect()
    }

    /// The initial member with this id.
    pub fn node(&self, id: NodeId) -> &NodeProcess {
        &self.nodes[(id - 1) as usize]
    }

    /// `--init` for the initial members: `1=IP:PORT,2=IP:PORT,...`.
    fn init_list(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}={}", n.id(), n.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) initial member `id`, with `--init` when `init` is set (a node with
    /// a cluster on disk ignores it).
    pub fn start(&self, id: NodeId, init: bool) -> Result<(), String> {
        let init = init.then(|| self.init_list());
        self.launch.start(self.node(id), init.as_deref())
    }

    /// Starts every initial member with `--init`.
    pub fn start_all(&self) -> Result<(), String> {
        for id in self.ids() {
            self.start(id, true)?;
        }
        Ok(())
    }

    /// SIGKILLs initial member `id`, reaps it, marks it in its log and returns the moment
    /// right after the kill.
    pub fn kill(&self, id: NodeId) -> Result<Instant, String> {
        self.node(id).kill().map_err(|e| e.to_string())
    }

    /// A library admin client for initial member `id`, each call bounded by `timeout`.
    pub fn admin(&self, id: NodeId, timeout: Duration) -> Result<AdminClient, String> {
        self.launch.admin(self.node(id).addr(), timeout)
    }

    /// Library admin clients for every initial member, each call bounded by `timeout`.
    pub fn admin_clients(
        &self,
        timeout: Duration,
    ) -> Result<BTreeMap<NodeId, AdminClient>, String> {
        self.nodes
            .iter()
            .map(|n| Ok((n.id(), self.launch.admin(n.addr(), timeout)?)))
            .collect()
    }

    /// Prints the last lines of the logs of these nodes (all when `ids` is empty).
    pub fn print_log_tails(&self, ids: &[NodeId]) {
        for node in self.nodes.iter().chain(&self.extra) {
            if !ids.is_empty() && !ids.contains(&node.id()) {
                continue;
            }
            eprintln!(
                "---- node {} log ({}), last lines:",
                node.id(),
                node.log_path().display()
            );
            for line in node.log_tail(LOG_TAIL_LINES) {
                eprintln!("   {line}");
            }
        }
    }
}

/// The cleanup guard: runs on every way out of a tool's `run`, errors and Ctrl-C included.
impl Drop for Harness {
    /// Kills and reaps every node, then removes the directory (unless `--keep-dir`).
    fn drop(&mut self) {
        for node in self.nodes.iter().chain(&self.extra) {
            if node.pid().is_some() {
                let _ = node.kill();
            }
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
// Ctrl-C and waiting: the harness's waits with the tools' string errors

/// Fails once Ctrl-C was pressed (see [`watch_interrupt`]).
pub fn check_interrupt() -> Result<(), String> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// One node's status through the library ([`testing::status`]), the error as text.
pub async fn lib_status(client: &AdminClient) -> Result<StatusReport, String> {
    testing::status(client).await.map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Probing

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
