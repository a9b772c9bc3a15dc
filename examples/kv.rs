//! `kv`: a sharded in-memory key-value service, and the process-level test vehicle.
//!
//! ```text
//! kv serve --id N --listen IP:PORT --data-dir DIR [--init ID=IP:PORT[@ZONE],...] [--zone Z] [--shards S]
//!          [--metrics IP:PORT] [--timing default|fast] [--drain-timeout SECS]
//! kv put   --node IP:PORT KEY VALUE
//! kv get   --node IP:PORT KEY          # prints the value; exit 3 when the key is absent
//! kv owner --node IP:PORT KEY          # one JSON line {"key":..,"shard":S,"node":N,"epoch":E}
//! ```
//! The cluster secret comes from `CLUSTERFUNK_SECRET` or `--secret-file`; `--insecure` runs
//! without one. The values live in memory: a shard's data moves with it on planned moves and is
//! lost when its node crashes.
//!
//! SIGTERM or Ctrl-C stops a node gracefully: it drains its shards to the other nodes (bounded by
//! `--drain-timeout`, default 30 s), hands over leadership if it leads, and exits 0 (2 when the
//! drain did not finish). Started again from the same data dir, it undrains itself once it has
//! rejoined. `RUST_LOG` filters the log (default `info` with openraft's per-retry lines about unreachable peers off: `clusterfunk::QUIET_OPENRAFT_LOG`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use clusterfunk::admin::{resolve_credentials, Credentials};
use clusterfunk::client::{Client, ClientError};
use clusterfunk::prelude::*;
use clusterfunk::GracefulShutdown;
use clusterfunk::NodeInfo;

// The messages, shared with the tools that talk to kv nodes.
#[path = "support/kv_api.rs"]
mod kv_api;
use kv_api::{Get, Incr, Owner, Put, WhoOwns};

/// One shard's keys and values.
#[derive(Default)]
struct Store {
    values: HashMap<Key, String>,
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

    fn on_deactivate(&mut self, _ctx: &mut ShardContext) -> Option<Handoff> {
        let entries: Vec<(Vec<u8>, String)> = self
            .values
            .drain()
            .map(|(k, v)| (k.into_bytes(), v))
            .collect();
        Handoff::encode(&entries).ok()
    }

    fn on_restore(&mut self, handoff: Handoff, _ctx: &mut ShardContext) {
        if let Ok(entries) = handoff.decode::<Vec<(Vec<u8>, String)>>() {
            self.values
                .extend(entries.into_iter().map(|(k, v)| (Key::from(k), v)));
        }
    }
}

#[derive(Parser)]
#[command(
    name = "kv",
    about = "A sharded in-memory key-value service on clusterfunk"
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
        #[arg(long)]
        node: SocketAddr,
        key: String,
        value: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Print KEY's value; exit 3 when absent.
    Get {
        #[arg(long)]
        node: SocketAddr,
        key: String,
        #[command(flatten)]
        auth: Auth,
    },
    /// Print which shard, node and epoch serve KEY, as one JSON line.
    Owner {
        #[arg(long)]
        node: SocketAddr,
        key: String,
        #[command(flatten)]
        auth: Auth,
    },
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
    let result = match cli.command {
        Command::Serve(settings) => serve(settings),
        Command::Put {
            node,
            key,
            value,
            auth,
        } => request(node, &auth, |c| async move {
            c.send(key, Put { value }).await.map(|()| ExitCode::SUCCESS)
        }),
        Command::Get { node, key, auth } => request(node, &auth, |c| async move {
            Ok(match c.send(key, Get).await? {
                Some(value) => {
                    println!("{value}");
                    ExitCode::SUCCESS
                }
                None => ExitCode::from(3),
            })
        }),
        Command::Owner { node, key, auth } => request(node, &auth, |c| async move {
            let owner = c.send(key, WhoOwns).await?;
            println!(
                "{}",
                serde_json::json!({"key": owner.key, "shard": owner.shard, "node": owner.node, "epoch": owner.epoch})
            );
            Ok(ExitCode::SUCCESS)
        }),
    };
    result.unwrap_or_else(|message| {
        eprintln!("error: {message}");
        ExitCode::from(1)
    })
}

fn request<F, Fut>(node: SocketAddr, auth: &Auth, call: F) -> Result<ExitCode, String>
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
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = Client::with_credentials(
            [node],
            &credentials,
            &auth.cluster_name,
            Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
        call(client).await.map_err(|e| e.to_string())
    })
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
    /// This node's zone.
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
    #[command(flatten)]
    auth: Auth,
}

/// Runs a node until SIGTERM or Ctrl-C, then leaves gracefully: exit 0 when every shard was
/// handed over, 2 when the drain did not finish in time.
fn serve(settings: Serve) -> Result<ExitCode, String> {
    let credentials = resolve_credentials(
        settings.auth.tls_dir.as_deref(),
        settings.auth.secret_file.as_deref(),
        settings.auth.insecure,
    )?;
    let initial = settings
        .init
        .as_deref()
        .map(NodeInfo::parse_members)
        .transpose()?;
    actix::System::new().block_on(async move {
        let mut builder = Cluster::builder()
            .node_id(settings.id)
            .listen(settings.listen)
            .data_dir(settings.data_dir)
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
                _ => ExitCode::from(2),
            },
        )
    })
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
