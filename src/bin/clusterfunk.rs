//! `clusterfunk`: the operator's command-line tool for a running cluster.
//!
//! Every command talks to one node (`--node IP:PORT`); writes are forwarded to the leader.
//! `--json` prints one JSON object for scripts; otherwise an aligned table. Errors go to stderr
//! as one line and the exit code is non-zero (1: the command failed, 2: bad usage).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use clusterfunk::admin::{resolve_secret, AdminClient, AdminRequest, AdminResponse};

#[derive(Parser)]
#[command(name = "clusterfunk", version, about = "Operate a clusterfunk cluster")]
struct Cli {
    /// A node of the cluster, IP:PORT.
    #[arg(long, global = true)]
    node: Option<SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// File holding the cluster secret (default: the CLUSTERFUNK_SECRET environment variable).
    #[arg(long, global = true)]
    secret_file: Option<PathBuf>,
    /// Talk to a cluster that runs without a secret.
    #[arg(long, global = true)]
    insecure: bool,
    /// The cluster's name.
    #[arg(long, global = true, default_value = "clusterfunk")]
    cluster_name: String,
    /// Seconds to wait for the command.
    #[arg(long, global = true, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node's state: leader, term, map epoch, voters, learners, shards owned.
    Status,
    /// Every member with address, zone, role and shard count.
    Nodes,
    /// The shard map: each shard's owner.
    Shards,
    /// Add a node (learner first, promoted to voter once caught up, unless --learner).
    AddNode {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The address it listens on, IP:PORT.
        #[arg(long)]
        addr: SocketAddr,
        /// Its zone.
        #[arg(long)]
        zone: Option<String>,
        /// Keep it a non-voting learner (it still hosts shards).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster.
    RemoveNode {
        /// The node to remove.
        #[arg(long)]
        id: u64,
    },
    /// Hand leadership to another voter.
    StepDown,
    /// Move every shard off a node (it stays a member); returns when it owns none. For upgrades.
    Drain {
        /// The node to drain.
        #[arg(long)]
        id: u64,
    },
    /// Let a drained node own shards again.
    Undrain {
        /// The node.
        #[arg(long)]
        id: u64,
    },
    /// Offline: make a stopped survivor of a lost quorum form a new cluster from its own log
    /// (like etcd's --force-new-cluster). Run with --inspect on each survivor first and recover
    /// the one with the most advanced log; then start it and add fresh nodes.
    Recover {
        /// The stopped node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The node's id (required unless --inspect).
        #[arg(long, required_unless_present = "inspect")]
        id: Option<u64>,
        /// The new cluster's voters, ID=IP:PORT[@ZONE],...; normally only this node.
        #[arg(long, required_unless_present = "inspect")]
        members: Option<String>,
        /// Only print the node's raft state (last log entry, committed index, membership).
        #[arg(long)]
        inspect: bool,
        /// Confirm: entries only the lost nodes had may be lost, and they must never run again
        /// with their old data dirs. Without it the command prints what it would do.
        #[arg(long)]
        i_understand_this_may_lose_data: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    if let Command::Recover {
        data_dir,
        id,
        members,
        inspect,
        i_understand_this_may_lose_data,
    } = &cli.command
    {
        return recover::run(recover::Args {
            data_dir,
            id: *id,
            members: members.as_deref(),
            inspect: *inspect,
            confirmed: *i_understand_this_may_lose_data,
            json: cli.json,
        });
    }
    let node = cli.node.ok_or("--node IP:PORT is required")?;
    let secret = resolve_secret(cli.secret_file.as_deref(), cli.insecure)?;
    let request = match cli.command {
        Command::Status => AdminRequest::Status,
        Command::Nodes => AdminRequest::Nodes,
        Command::Shards => AdminRequest::Shards,
        Command::AddNode {
            id,
            addr,
            zone,
            learner,
        } => AdminRequest::AddNode {
            id,
            addr: addr.to_string(),
            zone,
            learner,
        },
        Command::RemoveNode { id } => AdminRequest::RemoveNode { id },
        Command::StepDown => AdminRequest::StepDown,
        Command::Drain { id } => AdminRequest::Drain { id },
        Command::Undrain { id } => AdminRequest::Undrain { id },
        Command::Recover { .. } => return Err("recover runs offline".into()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let response = runtime.block_on(async {
        let client = AdminClient::new(node, &cli.cluster_name, secret, timeout)
            .map_err(|e| e.to_string())?;
        client.request(request).await.map_err(|e| e.to_string())
    })?;
    print(&response, cli.json)
}

fn print(response: &AdminResponse, json: bool) -> Result<(), String> {
    let to_json =
        |value: &dyn erased::Json| value.json().map_err(|e| format!("cannot print JSON: {e}"));
    match response {
        AdminResponse::Status(status) if json => println!("{}", to_json(status)?),
        AdminResponse::Status(s) => {
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            let rows = [
                ("node_id", s.node_id.to_string()),
                (
                    "state",
                    format!("{:?}", s.state)
                        .to_lowercase()
                        .replace("notready", "not_ready"),
                ),
                ("reason", s.reason.clone().unwrap_or_else(|| "-".into())),
                ("leader", opt(s.leader)),
                ("raft_state", s.raft_state.clone()),
                ("term", s.term.to_string()),
                ("epoch", s.epoch.to_string()),
                ("voters", join(&s.voters)),
                ("learners", join(&s.learners)),
                ("failures_tolerated", s.failures_tolerated.to_string()),
                ("shards_owned", s.shards_owned.to_string()),
                ("shard_count", opt(s.shard_count.map(u64::from))),
                ("lease_remaining_ms", opt(s.lease_remaining_ms)),
                ("shards_moving", s.shards_moving.to_string()),
                ("down", join(&s.down)),
                ("draining", join(&s.draining)),
                ("last_log_index", opt(s.last_log_index)),
                ("last_applied_index", opt(s.last_applied_index)),
            ];
            table(
                &["FIELD", "VALUE"],
                rows.iter()
                    .map(|(k, v)| vec![k.to_string(), v.clone()])
                    .collect(),
            );
        }
        AdminResponse::Nodes(nodes) if json => println!("{}", to_json(nodes)?),
        AdminResponse::Nodes(nodes) => table(
            &["ID", "ADDR", "ZONE", "ROLE", "LEADER", "SHARDS", "STATE"],
            nodes
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.id.to_string(),
                        n.addr.clone(),
                        n.zone.clone().unwrap_or_else(|| "-".into()),
                        n.role.clone(),
                        if n.leader { "*".into() } else { String::new() },
                        n.shards.to_string(),
                        if n.down {
                            "down".into()
                        } else if n.draining {
                            "draining".into()
                        } else {
                            "up".into()
                        },
                    ]
                })
                .collect(),
        ),
        AdminResponse::Shards(shards) if json => println!("{}", to_json(shards)?),
        AdminResponse::Shards(shards) => {
            println!("epoch {}", shards.epoch);
            table(
                &["SHARD", "NODE"],
                shards
                    .shards
                    .iter()
                    .map(|s| vec![s.shard.to_string(), s.node.to_string()])
                    .collect(),
            );
        }
        AdminResponse::Changed(change) => {
            for warning in &change.warnings {
                eprintln!("warning: {warning}");
            }
            if json {
                println!("{}", to_json(change)?);
            } else {
                println!("{}", change.message);
                println!(
                    "voters: {}; learners: {}; tolerates {} failure(s); leader: {}",
                    join(&change.voters),
                    join(&change.learners),
                    change.failures_tolerated,
                    change.leader.map_or("-".to_string(), |l| l.to_string())
                );
            }
        }
        _ => {
            return Err(
                "the node answered with a response this tool does not know; upgrade it".into(),
            )
        }
    }
    Ok(())
}

fn join(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// `clusterfunk recover`: offline, on a survivor's data dir.
mod recover {
    use std::path::Path;

    use clusterfunk::consensus::NodeInfo;
    use clusterfunk::recover::{force_new_cluster, inspect, Inspection};

    /// What the subcommand was given.
    pub struct Args<'a> {
        pub data_dir: &'a Path,
        pub id: Option<u64>,
        pub members: Option<&'a str>,
        pub inspect: bool,
        pub confirmed: bool,
        pub json: bool,
    }

    /// Exit status when the confirmation flag is missing (nothing was written).
    pub const NOT_CONFIRMED: &str = "not confirmed: nothing was written";

    pub fn run(args: Args<'_>) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        let before = runtime
            .block_on(inspect(args.data_dir))
            .map_err(|e| e.to_string())?;
        if args.inspect {
            return show(&before, args.json);
        }
        let (Some(id), Some(members)) = (args.id, args.members) else {
            return Err("--id and --members are required to recover".into());
        };
        let members = NodeInfo::parse_members(members).map_err(|e| format!("--members: {e}"))?;
        if !members.contains_key(&id) {
            return Err(format!(
                "--members must include this node ({id}), the survivor being recovered"
            ));
        }
        let listed: Vec<String> = members
            .iter()
            .map(|(id, info)| format!("{id}={info}"))
            .collect();
        if !args.confirmed {
            eprintln!("This would make node {id} form a NEW cluster from its own log:");
            show(&before, false)?;
            eprintln!("  new voters: {}", listed.join(", "));
            eprintln!(
                "Entries that only the lost nodes held may be lost, and the lost nodes must never \
                 run again with their old data dirs (wipe them, then add them as new nodes)."
            );
            eprintln!("Re-run with --i-understand-this-may-lose-data to do it.");
            return Err(NOT_CONFIRMED.into());
        }
        let recovered = runtime
            .block_on(force_new_cluster(args.data_dir, id, members))
            .map_err(|e| e.to_string())?;
        if args.json {
            let json = serde_json::to_string(&recovered).map_err(|e| e.to_string())?;
            println!("{json}");
        } else {
            println!(
                "node {id} recovered: membership entry {} in term {} names voters {}",
                recovered.index,
                recovered.term,
                listed.join(", ")
            );
            println!(
                "next: start the node from {} (without --init); once it serves, add fresh nodes with `clusterfunk add-node`",
                args.data_dir.display()
            );
        }
        Ok(())
    }

    fn show(state: &Inspection, json: bool) -> Result<(), String> {
        if json {
            let json = serde_json::to_string(state).map_err(|e| e.to_string())?;
            println!("{json}");
            return Ok(());
        }
        let last = state.last_log.map_or("-".to_string(), |(term, index)| {
            format!("index {index}, term {term}")
        });
        let members: Vec<String> = state
            .members
            .iter()
            .map(|(id, info)| {
                let role = if state.voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                };
                format!("{id}={info} ({role})")
            })
            .collect();
        println!("  last log entry: {last}");
        println!(
            "  committed: {}",
            state.committed.map_or("-".to_string(), |c| c.to_string())
        );
        println!("  vote: term {}", state.vote_term);
        println!("  membership: {}", members.join(", "));
        Ok(())
    }
}

/// Serialises any report to JSON through one function.
mod erased {
    pub trait Json {
        fn json(&self) -> serde_json::Result<String>;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}
