//! `kv`: a sharded key-value service, and the process-level test vehicle.
//!
//! ```text
//! kv serve --id N --listen IP:PORT --data-dir DIR [--init ID=IP:PORT[@ZONE],...] [--zone Z] [--shards S]
//!          [--metrics IP:PORT] [--timing default|fast] [--drain-timeout SECS]
//!          [--store memory|lmdb|postgres://USER@HOST:PORT/DB]
//! kv put   --node IP:PORT [--node IP:PORT ...] KEY VALUE
//! kv get   --node IP:PORT [--node IP:PORT ...] KEY   # prints the value; exit 3 when absent
//! kv owner --node IP:PORT [--node IP:PORT ...] KEY   # one JSON line {"key":..,"shard":S,"node":N,"epoch":E}
//! ```
//! `put`, `get` and `owner` take several `--node` seeds (repeated, or comma-separated): when
//! one is unreachable the client asks the next. Every command takes `--cluster-name`. The
//! cluster secret comes from `CLUSTERFUNK_SECRET` or `--secret-file`; `--insecure` runs without
//! one and is refused together with a secret. `--store` decides where the values live: in the
//! node's memory (`memory`, the default: a shard's values move with it on planned moves and are
//! lost when its node crashes), in an LMDB store in DATA_DIR/shards (`lmdb`: they also
//! survive a restart of the node in place; a shard that fails over after a crash starts empty on
//! its new owner) or in PostgreSQL (`postgres://…`: every node reaches the same tables, so a
//! shard that fails over after a crash loads every acknowledged value on its new owner). The
//! store can also come from `KV_STORE`, which keeps a database password out of the process list.
//!
//! Exit codes (also in `--help`): 0 success; 1 the command failed; 2 bad usage; 3 `get`: the key
//! is absent; 4 `serve`: stopped without handing every shard over. A closed stdout ends the
//! tool quietly with status 0.
//!
//! SIGTERM or Ctrl-C stops a node gracefully: it drains its shards to the other nodes (bounded by
//! `--drain-timeout`, default 30 s), hands over leadership if it leads, and exits 0 (4 when the
//! drain did not finish). Started again from the same data dir, it undrains itself once it has
//! rejoined. A node whose `--zone` differs from the zone the cluster's membership records for it
//! refuses to start, or stops serving with that reason (exit 1). `RUST_LOG` filters the log (default `info` with openraft's per-retry lines about unreachable peers off: `clusterfunk::QUIET_OPENRAFT_LOG`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use clusterfunk::admin::{resolve_credentials, Credentials};
use clusterfunk::client::{Client, ClientError};
use clusterfunk::persist::{
    DurableMap, DurableState, LmdbShardStore, MemoryStore, PostgresOptions, PostgresShardStore,
    ShardStore,
};
use clusterfunk::prelude::*;
use clusterfunk::storage::StoreOptions;
use clusterfunk::tool::{ToolError, EXIT_FAILED};
use clusterfunk::GracefulShutdown;
use clusterfunk::NodeInfo;

// The messages, shared with the tools that talk to kv nodes.
#[path = "support/kv_api.rs"]
mod kv_api;
use kv_api::{Get, Incr, Owner, Put, WhoOwns};

/// One shard's keys and values: durable, per key. With `--store lmdb` each change is committed
/// to the node's disk before its reply; with `--store memory` (the default) it lives in the
/// node's memory. Either way a planned move hands the values to the next owner.
#[derive(Default)]
struct Store {
    values: DurableMap<String>,
}

#[shard_handler]
impl Store {
    fn put(&mut self, key: Key, msg: Put, _ctx: &mut ShardContext) {
        self.values.insert(key, msg.value);
    }

    fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> Option<String> {
        self.values.get(&key).cloned()
    }

    fn incr(&mut self, key: Key, msg: Incr, _ctx: &mut ShardContext) -> Option<u64> {
        let now = match self.values.get(&key) {
            None => 0,
            Some(value) => value.parse::<u64>().ok()?,
        };
        let next = now.saturating_add(msg.by);
        self.values.insert(key, next.to_string());
        Some(next)
    }

    fn owner(&mut self, key: Key, _msg: WhoOwns, ctx: &mut ShardContext) -> Owner {
        Owner {
            key: key.to_string(),
            shard: ctx.shard(),
            node: ctx.node_id(),
            epoch: ctx.epoch(),
        }
    }

    fn durable(&mut self) -> Option<&mut dyn DurableState> {
        Some(&mut self.values)
    }
}

/// `get`: the key is absent.
const EXIT_ABSENT: u8 = 3;
/// `serve`: the node stopped without handing every shard over (the drain did not finish).
const EXIT_NOT_DRAINED: u8 = 4;

/// The exit codes, as `--help` lists them (kept beside the constants above).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (serve: stopped after handing every shard over)
  1  the command failed: no node could be reached or it refused, or the node stopped serving
     (a full disk, a zone that differs from the one the cluster records for it)
  2  bad usage: an unknown, missing or invalid option (also --insecure together with a
     cluster secret)
  3  get: the key is absent
  4  serve: stopped without handing every shard over (the drain did not finish in time)
A closed stdout (`kv get ... | head -c1`) ends the tool quietly with status 0.";

#[derive(Parser)]
#[command(
    name = "kv",
    version,
    about = "A sharded key-value service on clusterfunk",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Auth {
    /// Use TLS with the certificates in this directory (`clusterfunk certs` writes them:
    /// D/node-ID for `serve`, D/client for put, get and owner). Excludes a secret and
    /// --insecure.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// File holding the cluster secret (default: CLUSTERFUNK_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Run or talk without a secret (local experiments only).
    #[arg(long)]
    insecure: bool,
    /// The cluster's name: nodes and clients of one cluster share it, and a data dir keeps
    /// the name it was first started with.
    #[arg(long, default_value = "clusterfunk")]
    cluster_name: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(Serve),
    /// Store VALUE under KEY.
    Put {
        #[command(flatten)]
        seeds: Seeds,
        key: String,
        value: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Print KEY's value; exit 3 when absent.
    Get {
        #[command(flatten)]
        seeds: Seeds,
        key: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Print which shard, node and epoch serve KEY, as one JSON line.
    Owner {
        #[command(flatten)]
        seeds: Seeds,
        key: String,
        #[command(flatten)]
        auth: Auth,
    },
}

/// The nodes a client command starts from.
#[derive(Args)]
struct Seeds {
    /// A node of the cluster, IP:PORT; repeat it (or separate with commas) to give several:
    /// when one is unreachable the next is tried.
    #[arg(
        long = "node",
        value_name = "IP:PORT",
        required = true,
        value_delimiter = ','
    )]
    nodes: Vec<SocketAddr>,
}

/// Prints one line to stdout; a closed stdout (a reader that went away) ends the program
/// quietly with status 0 instead of a panic, another write error with status 1.
fn print_line(line: &str) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write to stdout: {error}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| format!("info,{}", clusterfunk::QUIET_OPENRAFT_LOG).into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    run(cli).unwrap_or_else(ToolError::exit)
}

fn run(cli: Cli) -> Result<ExitCode, ToolError> {
    match cli.command {
        Command::Serve(settings) => serve(settings),
        Command::Put {
            seeds,
            key,
            value,
            auth,
        } => request(seeds, &auth, |c| async move {
            c.send(key, Put { value }).await.map(|()| ExitCode::SUCCESS)
        }),
        Command::Get { seeds, key, auth } => request(seeds, &auth, |c| async move {
            Ok(match c.send(key, Get).await? {
                Some(value) => print_line(&value),
                None => ExitCode::from(EXIT_ABSENT),
            })
        }),
        Command::Owner { seeds, key, auth } => request(seeds, &auth, |c| async move {
            let owner = c.send(key, WhoOwns).await?;
            Ok(print_line(
                &serde_json::json!({"key": owner.key, "shard": owner.shard, "node": owner.node, "epoch": owner.epoch})
                    .to_string(),
            ))
        }),
    }
}

fn request<F, Fut>(seeds: Seeds, auth: &Auth, call: F) -> Result<ExitCode, ToolError>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, ClientError>>,
{
    let credentials = resolve_credentials(
        auth.tls_dir.as_deref(),
        auth.secret_file.as_deref(),
        auth.insecure,
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = runtime.block_on(async {
        let client = Client::with_credentials(
            seeds.nodes,
            &credentials,
            &auth.cluster_name,
            Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
        call(client).await.map_err(|e| e.to_string())
    });
    Ok(result?)
}

/// The settings of `kv serve`.
#[derive(Args)]
struct Serve {
    /// This node's id.
    #[arg(long)]
    id: NodeId,
    /// Address to listen on, IP:PORT.
    #[arg(long)]
    listen: SocketAddr,
    /// Directory of the node's durable raft storage.
    #[arg(long)]
    data_dir: PathBuf,
    /// Bootstrap a new cluster with these voters (ID=IP:PORT[@ZONE],...); ignored when the
    /// data dir already holds a cluster.
    #[arg(long)]
    init: Option<String>,
    /// This node's zone (failure domain). It must match the zone the cluster's membership
    /// records for this node (`--init ID=IP:PORT@ZONE` or `clusterfunk add-node --zone`): the
    /// node refuses to start, or stops serving, when they differ.
    #[arg(long)]
    zone: Option<String>,
    /// Shard count of a new cluster.
    #[arg(long, default_value_t = 1024)]
    shards: u32,
    /// Most connections (peers, clients, tools) the node holds at once; more wait until one
    /// closes, while open ones keep being served.
    #[arg(long, default_value_t = 1024)]
    connections_max: usize,
    /// Serve Prometheus metrics at http://IP:PORT/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Timing profile: `default` (lease 500 ms, elections 150–300 ms) or `fast` (lease
    /// 300 ms, elections 100–200 ms, heartbeat 30 ms). Use the same on every node.
    #[arg(long, default_value = "default", value_parser = ["default", "fast"])]
    timing: String,
    /// On SIGTERM or Ctrl-C, how many seconds the node may spend handing its shards to the
    /// others (and leadership, if it leads) before it stops anyway.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Where shards keep their values: `memory` (this process's memory: a planned move hands
    /// them over, a crash or restart loses them), `lmdb` (this node's disk, in DATA_DIR/shards:
    /// they also survive a restart of this node in place, but not its loss) or a PostgreSQL URL
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DB` that every node of the cluster is given (a
    /// crashed node's shards load every acknowledged value on their new owners; the tables are
    /// created on first use). Put a URL with a password in `KV_STORE` rather than on the
    /// command line.
    // Checked by `parse_store` in `serve`, not by clap, whose error would echo the value (and a
    // password in it).
    #[arg(
        long,
        env = "KV_STORE",
        default_value = "memory",
        hide_env_values = true
    )]
    store: String,
    #[command(flatten)]
    auth: Auth,
}

/// The value of `serve --store`.
#[derive(Clone, PartialEq, Eq)]
enum StoreArg {
    /// `memory`: node-local, in this process.
    Memory,
    /// `lmdb`: node-local, in DATA_DIR/shards.
    Lmdb,
    /// A PostgreSQL URL, shared by the cluster.
    Postgres(String),
}

impl std::fmt::Debug for StoreArg {
    // A URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreArg::Memory => f.write_str("memory"),
            StoreArg::Lmdb => f.write_str("lmdb"),
            StoreArg::Postgres(_) => f.write_str("postgres"),
        }
    }
}

/// Parses `--store`: `memory`, `lmdb`, or a `postgres://` / `postgresql://` URL.
fn parse_store(value: &str) -> Result<StoreArg, String> {
    match value {
        "memory" => Ok(StoreArg::Memory),
        "lmdb" => Ok(StoreArg::Lmdb),
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(StoreArg::Postgres(url.to_owned()))
        }
        // The value is not shown: a mistyped URL may hold a password.
        _ => Err(
            "--store (or KV_STORE) is not a store: use memory, lmdb or postgres://USER@HOST:PORT/DB (the value is not shown: it may hold a password)"
                .to_owned(),
        ),
    }
}

/// Runs a node until SIGTERM or Ctrl-C, then leaves gracefully: exit 0 when every shard was
/// handed over, 4 when the drain did not finish in time.
fn serve(settings: Serve) -> Result<ExitCode, ToolError> {
    let credentials = resolve_credentials(
        settings.auth.tls_dir.as_deref(),
        settings.auth.secret_file.as_deref(),
        settings.auth.insecure,
    )?;
    let initial = settings
        .init
        .as_deref()
        .map(NodeInfo::parse_members)
        .transpose()
        .map_err(|e| ToolError::usage(format!("--init: {e}")))?;
    let store = parse_store(&settings.store).map_err(ToolError::usage)?;
    let store: Arc<dyn ShardStore> = match &store {
        StoreArg::Lmdb => Arc::new(
            LmdbShardStore::open(&settings.data_dir.join("shards"), StoreOptions::default())
                .map_err(|e| format!("cannot open the shard store: {e}"))?,
        ),
        StoreArg::Postgres(url) => Arc::new(
            PostgresShardStore::connect(
                url,
                PostgresOptions {
                    // Another cluster's nodes pointed at the same tables are refused.
                    cluster: Some(settings.auth.cluster_name.clone()),
                    ..PostgresOptions::default()
                },
            )
            .map_err(|e| format!("cannot open the PostgreSQL shard store: {e}"))?,
        ),
        StoreArg::Memory => Arc::new(MemoryStore::node_local()),
    };
    let result = actix::System::new().block_on(async move {
        let mut builder = Cluster::builder()
            .node_id(settings.id)
            .listen(settings.listen)
            .data_dir(settings.data_dir)
            .store(store)
            .cluster_name(settings.auth.cluster_name.clone())
            .connections_max(settings.connections_max)
            .shards(settings.shards)
            .handler::<Store>();
        if let Some(zone) = settings.zone {
            builder = builder.zone(zone);
        }
        if let Some(members) = initial {
            builder = builder.initial_members(members);
        }
        if let Some(addr) = settings.metrics {
            builder = builder.metrics(addr);
        }
        if settings.timing == "fast" {
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
        tokio::select! {
            () = wait_for_signal() => {}
            // Raft could not write its log (a full disk): the node already serves nothing;
            // exit so that a supervisor notices, with the reason.
            reason = node.stopped() => {
                node.shutdown().await;
                return Err(reason);
            }
        }
        tracing::info!("stopping: handing shards over first");
        Ok(
            match node
                .shutdown_gracefully(Duration::from_secs(settings.drain_timeout))
                .await
            {
                GracefulShutdown::Drained => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_NOT_DRAINED),
            },
        )
    });
    Ok(result?)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;
    use clusterfunk::tool::EXIT_USAGE;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kv").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_commands_take_several_node_seeds_and_a_cluster_name() {
        let cli = parse(&[
            "get",
            "--node",
            "127.0.0.1:7101",
            "--node",
            "127.0.0.1:7102,127.0.0.1:7103",
            "--cluster-name",
            "prod",
            "some-key",
        ])
        .expect("parses");
        let Command::Get { seeds, key, auth } = cli.command else {
            panic!("not get")
        };
        let ports: Vec<u16> = seeds.nodes.iter().map(SocketAddr::port).collect();
        assert_eq!(ports, [7101, 7102, 7103]);
        assert_eq!(key, "some-key");
        assert_eq!(auth.cluster_name, "prod");
        for command in ["put", "owner"] {
            let mut args = vec![command, "--node", "127.0.0.1:1", "--node", "127.0.0.1:2"];
            args.extend(["k", "v"].iter().take(if command == "put" { 2 } else { 1 }));
            assert!(parse(&args).is_ok(), "{command}");
        }
    }

    #[test]
    fn missing_node_is_a_usage_error_exit_2() {
        for args in [
            &["get", "k"][..],
            &["put", "k", "v"][..],
            &["owner", "k"][..],
        ] {
            let refused = parse(args).err().expect("no --node");
            assert_eq!(
                (refused.kind(), refused.exit_code()),
                (ErrorKind::MissingRequiredArgument, i32::from(EXIT_USAGE)),
                "{args:?}"
            );
        }
        let bad = parse(&["get", "--node", "nowhere", "k"])
            .err()
            .expect("not IP:PORT");
        assert_eq!(bad.exit_code(), i32::from(EXIT_USAGE));
    }

    #[test]
    fn insecure_with_a_secret_is_a_usage_error_exit_2() {
        for args in [
            &["get", "--node", "127.0.0.1:1", "k"][..],
            &[
                "serve",
                "--id",
                "1",
                "--listen",
                "127.0.0.1:1",
                "--data-dir",
                "d",
            ][..],
        ] {
            let mut args = args.to_vec();
            args.extend(["--insecure", "--secret-file", "/nonexistent/secret"]);
            let refused = run(parse(&args).expect("parses")).expect_err("contradictory");
            assert_eq!(refused.code, EXIT_USAGE, "{args:?}: {}", refused.message);
            assert!(
                refused.message.contains("--insecure cannot be combined"),
                "{}",
                refused.message
            );
        }
    }

    #[test]
    fn a_bad_init_list_is_a_usage_error_exit_2() {
        let args = [
            "serve",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            "d",
            "--insecure",
            "--init",
            "1=127.0.0.1:1@",
        ];
        let refused = run(parse(&args).expect("parses")).expect_err("an empty zone");
        assert_eq!(refused.code, EXIT_USAGE, "{}", refused.message);
        assert!(
            refused.message.starts_with("--init: "),
            "{}",
            refused.message
        );
    }

    #[test]
    fn version_prints_the_package_version() {
        let shown = parse(&["--version"])
            .err()
            .expect("clap prints the version");
        assert_eq!(shown.kind(), ErrorKind::DisplayVersion);
        assert!(
            shown.to_string().contains(env!("CARGO_PKG_VERSION")),
            "{shown}"
        );
    }

    #[test]
    fn help_lists_every_exit_code() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        for code in [0, EXIT_FAILED, EXIT_USAGE, EXIT_ABSENT, EXIT_NOT_DRAINED] {
            assert!(
                help.contains(&format!("\n  {code}  ")),
                "exit {code}:\n{help}"
            );
        }
        // Distinct codes: a drain that did not finish is not bad usage (it used to be 2).
        let mut codes = [EXIT_FAILED, EXIT_USAGE, EXIT_ABSENT, EXIT_NOT_DRAINED];
        codes.sort_unstable();
        codes.windows(2).for_each(|w| assert_ne!(w[0], w[1]));
    }

    #[test]
    fn serve_help_offers_every_store_with_memory_the_default() {
        let mut cli = Cli::command();
        let serve = cli
            .find_subcommand_mut("serve")
            .expect("kv has a serve command");
        let help = serve.render_long_help().to_string();
        assert!(help.contains("--store <STORE>"), "{help}");
        assert!(help.contains("[default: memory]"), "{help}");
        assert!(
            help.contains("postgres://USER[:PASSWORD]@HOST:PORT/DB"),
            "{help}"
        );
        let serve_with = |store: &'static str| {
            parse(&[
                "serve",
                "--id",
                "1",
                "--listen",
                "127.0.0.1:1",
                "--data-dir",
                "d",
                "--store",
                store,
            ])
        };
        let Command::Serve(settings) = serve_with("lmdb").expect("parses").command else {
            panic!("not serve")
        };
        assert_eq!(parse_store(&settings.store), Ok(StoreArg::Lmdb));
        let url = "postgres://kv:secret@127.0.0.1:5432/kv";
        let Command::Serve(settings) = serve_with(url).expect("parses").command else {
            panic!("not serve")
        };
        let parsed = parse_store(&settings.store);
        assert_eq!(parsed, Ok(StoreArg::Postgres(url.to_owned())));
        assert!(!format!("{parsed:?}").contains("secret"));
        // Regression (attack review of issue 18): a mistyped URL was echoed with its password.
        for wrong in [
            "disk",
            "postgress://kv:secret@127.0.0.1/kv",
            "host=h password=secret",
            "",
        ] {
            let refused = parse_store(wrong).expect_err("an unknown store");
            assert!(!refused.contains("secret"), "{refused}");
        }
    }
}
