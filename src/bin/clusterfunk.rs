//! `clusterfunk`: the operator's command-line tool for a running cluster.
//!
//! Every command talks to one node (`--node IP:PORT`, or the `CLUSTERFUNK_NODE` environment
//! variable); writes are forwarded to the leader. `--json` prints one JSON object for scripts;
//! otherwise an aligned table. Errors go to stderr as one line and the exit code is non-zero
//! (1: the command failed, 2: bad usage, as `--help` lists). A closed stdout (`| head -1`)
//! ends the tool quietly with status 0, as other Unix tools do.
//!
//! `plan` judges a layout of voters over zones (`--zones a=2,b=2,c=1`, or a running cluster's
//! with `--from-cluster IP:PORT`): which single-node, single-zone and two-zone failures it
//! survives, its warnings, and the nearest better layout (see `clusterfunk::plan`). It exits 0
//! when the layout survives any single node failure and any single zone failure, and 3 when it
//! does not, so scripts can gate on it; 1 and 2 keep their meaning. `add-node` and `remove-node`
//! print the same verdict for the layout they leave (under `plan` in `--json`); their exit code
//! does not depend on it.
//!
//! `certs`, `new-secret`, `plan --zones` and `recover` work offline, without a node or the
//! secret. `certs` writes the cluster's TLS certificates (see `clusterfunk::tls::certs`): a new
//! CA with certificates for every node, the operator tools and the clients (`--nodes`), or one
//! more node's with the existing CA (`--add-node`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};
use clusterfunk::admin::{
    resolve_credentials, AdminClient, AdminRequest, AdminResponse, ChangeReport, NodesReport,
};
use clusterfunk::plan::{Failure, Layout, Plan, Role};
use clusterfunk::tls;
use clusterfunk::tls::certs::{self, CertsError, NodeSpec, CA_DIR};
use clusterfunk::tool::{ToolError, EXIT_FAILED};
use serde::Serialize;

/// `plan`: the layout does not survive some single node or single zone failure.
const EXIT_LAYOUT_AT_RISK: u8 = 3;

/// The environment variable that names the node when `--node` is not given.
const NODE_ENV_VAR: &str = "CLUSTERFUNK_NODE";

/// The exit codes, as `--help` lists them (kept beside the constants above).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (plan: the layout survives any single node and any single zone failure)
  1  the command failed: the node refused it, could not be reached, or a file could not be read
  2  bad usage: an unknown, missing or invalid option (also a missing --node, or --insecure
     together with a cluster secret)
  3  plan: the layout does not survive some single node or single zone failure
A closed stdout (`clusterfunk ... | head -1`) ends the tool quietly with status 0.";

/// Prints one line to stdout like `println!`, except that a closed stdout (`clusterfunk ... |
/// head -1`) ends the tool quietly with status 0 instead of panicking, and another write error
/// ends it with a message and status 1.
macro_rules! out {
    () => {
        $crate::write_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

#[cfg(not(test))]
fn write_stdout(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        drop(stdout);
        std::process::exit(i32::from(stdout_failed(&error)));
    }
}

/// Unit tests print through the test harness, which captures `println!` (not `io::stdout()`).
#[cfg(test)]
fn write_stdout(line: std::fmt::Arguments<'_>) {
    println!("{line}");
}

/// The exit status after stdout failed: 0 when the reader went away (a broken pipe), quietly;
/// otherwise 1, with a message.
fn stdout_failed(error: &std::io::Error) -> u8 {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        return 0;
    }
    eprintln!("error: cannot write to stdout: {error}");
    EXIT_FAILED
}

#[derive(Parser)]
#[command(
    name = "clusterfunk",
    version,
    about = "Operate a clusterfunk cluster",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// A node of the cluster, IP:PORT (required by status, nodes, shards, add-node,
    /// remove-node, step-down, drain and undrain).
    #[arg(long, global = true, env = NODE_ENV_VAR)]
    node: Option<SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Talk TLS with the certificates in this directory (D/admin from `clusterfunk certs`;
    /// D/client may only read status, nodes and shards). Excludes a secret and --insecure.
    #[arg(long, global = true)]
    tls_dir: Option<PathBuf>,
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
    /// Print a fresh cluster secret (32 random bytes as 64 hex digits), e.g.
    /// `clusterfunk new-secret > secret && chmod 600 secret`, then `--secret-file secret` on
    /// every node and tool. For networks you own; across networks you do not, use TLS.
    NewSecret,
    /// Which failures a layout survives (any node, any zone, any two zones), its warnings and
    /// the nearest better layout. Exit 0: it survives any single node and any single zone
    /// failure; 3: it does not.
    #[command(group(ArgGroup::new("source").required(true).multiple(false)))]
    Plan {
        /// Voters per zone, ZONE=COUNT,... e.g. a=2,b=2,c=1 (`-`: nodes without a zone).
        #[arg(long, value_name = "SPEC", group = "source")]
        zones: Option<Layout>,
        /// Learners (non-voting nodes that host shards) per zone, same syntax, with --zones.
        #[arg(
            long,
            value_name = "SPEC",
            requires = "zones",
            conflicts_with = "from_cluster"
        )]
        learners: Option<String>,
        /// Read the members, their zones and roles from a node of a running cluster.
        #[arg(long, value_name = "IP:PORT", group = "source")]
        from_cluster: Option<SocketAddr>,
    },
    /// Write the cluster's TLS certificates (offline): with --nodes a new CA and certificates
    /// for every node, the operator tools (admin) and application clients; with --add-node one
    /// more node's, signed by the CA already in DIR/ca. Keep DIR/ca/ca.key off the nodes.
    #[command(group(ArgGroup::new("issue").required(true).multiple(false)))]
    Certs {
        /// The directory to write (created if needed): DIR/ca, DIR/node-ID, DIR/admin,
        /// DIR/client.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Every node as ID=IP:PORT,...: the address the others dial it at, whose IP goes
        /// into its certificate.
        #[arg(long, value_name = "ID=IP:PORT,...", group = "issue")]
        nodes: Option<NodeList>,
        /// One more node, ID=IP:PORT, with the existing CA in DIR/ca.
        #[arg(long, value_name = "ID=IP:PORT", group = "issue")]
        add_node: Option<NodeSpec>,
    },
}

/// `certs --nodes`: the nodes as clap reads them, checked as a whole (ids and addresses once).
#[derive(Clone, Debug)]
struct NodeList(Vec<NodeSpec>);

impl FromStr for NodeList {
    type Err = CertsError;

    fn from_str(list: &str) -> Result<NodeList, CertsError> {
        NodeSpec::parse_list(list).map(NodeList)
    }
}

/// Why the tool stops with a non-zero exit code.
fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    run(cli).unwrap_or_else(ToolError::exit)
}

fn run(cli: Cli) -> Result<ExitCode, ToolError> {
    if let Command::Recover {
        data_dir,
        id,
        members,
        inspect,
        i_understand_this_may_lose_data,
    } = &cli.command
    {
        recover::run(recover::Args {
            data_dir,
            id: *id,
            members: members.as_deref(),
            inspect: *inspect,
            confirmed: *i_understand_this_may_lose_data,
            json: cli.json,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::NewSecret = &cli.command {
        let secret = clusterfunk::transport::Secret::generate_hex()
            .map_err(|e| format!("cannot make a secret: {e}"))?;
        out!("{secret}");
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Certs {
        dir,
        nodes,
        add_node,
    } = &cli.command
    {
        return write_certificates(
            dir,
            &cli.cluster_name,
            nodes.as_ref(),
            add_node.as_ref(),
            cli.json,
        );
    }
    if let Command::Plan {
        zones,
        learners,
        from_cluster,
    } = &cli.command
    {
        return plan(&cli, zones.as_ref(), learners.as_deref(), *from_cluster);
    }
    let node = cli.node.ok_or_else(|| {
        ToolError::usage(format!(
            "--node IP:PORT is required: name a node of the cluster with --node or the {NODE_ENV_VAR} environment variable"
        ))
    })?;
    let credentials = resolve_credentials(
        cli.tls_dir.as_deref(),
        cli.secret_file.as_deref(),
        cli.insecure,
    )?;
    // add-node and remove-node also print the verdict on the layout they leave; add-node's
    // zone is remembered in case the node answering `nodes` has not seen the new member yet.
    let (membership_change, added) = match &cli.command {
        Command::AddNode { id, zone, .. } => (true, Some((*id, zone.clone()))),
        Command::RemoveNode { .. } => (true, None),
        _ => (false, None),
    };
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
        Command::Plan { .. } => return Err("plan is handled above".into()),
        Command::NewSecret => return Err("new-secret is handled above".into()),
        Command::Certs { .. } => return Err("certs is handled above".into()),
    };
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let (response, verdict) = runtime()?.block_on(async {
        let client = AdminClient::with_credentials(node, &cli.cluster_name, &credentials, timeout)
            .map_err(|e| e.to_string())?;
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let verdict = match &response {
            AdminResponse::Changed(change) if membership_change => {
                Some(plan_after_change(&client, change, added).await)
            }
            _ => None,
        };
        Ok::<_, String>((response, verdict))
    })?;
    let verdict = match verdict {
        Some(Err(reason)) => {
            // The change itself succeeded: say why there is no verdict, but do not fail.
            eprintln!("note: no verdict on the new layout: {reason}");
            None
        }
        Some(Ok(plan)) => Some(plan),
        None => None,
    };
    print(&response, verdict.as_ref(), cli.json)?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// `certs`: writes the certificates and prints each directory written with what it is for.
fn write_certificates(
    dir: &Path,
    cluster: &str,
    nodes: Option<&NodeList>,
    added: Option<&NodeSpec>,
    as_json: bool,
) -> Result<ExitCode, ToolError> {
    let node_line = |node: &NodeSpec| {
        (
            certs::holder_dir(dir, tls::Role::Node(node.id)),
            format!("node {} at {}: copy it to that node", node.id, node.addr),
        )
    };
    let written: Vec<(PathBuf, String)> = match (nodes, added) {
        (Some(NodeList(nodes)), None) => {
            certs::write_cluster(dir, cluster, nodes).map_err(|e| e.to_string())?;
            std::iter::once((
                dir.join(CA_DIR),
                format!("the CA of cluster {cluster}: keep ca.key private, off the nodes"),
            ))
            .chain(nodes.iter().map(node_line))
            .chain([
                (
                    certs::holder_dir(dir, tls::Role::Admin),
                    "admin: for clusterfunk and other operator tools".to_owned(),
                ),
                (
                    certs::holder_dir(dir, tls::Role::Client),
                    "client: for application clients".to_owned(),
                ),
            ])
            .collect()
        }
        (None, Some(node)) => {
            certs::add_node(dir, cluster, node).map_err(|e| e.to_string())?;
            vec![node_line(node)]
        }
        _ => {
            return Err(ToolError::usage(
                "give either --nodes ID=IP:PORT,... or --add-node ID=IP:PORT",
            ))
        }
    };
    if as_json {
        #[derive(Serialize)]
        struct Written {
            dir: String,
            written: Vec<String>,
        }
        let report = Written {
            dir: dir.display().to_string(),
            written: written
                .iter()
                .map(|(path, _)| path.display().to_string())
                .collect(),
        };
        out!("{}", json(&report)?);
    } else {
        let width = written
            .iter()
            .map(|(path, _)| path.display().to_string().len())
            .max()
            .unwrap_or(0);
        for (path, what) in &written {
            out!("{:width$}  {what}", path.display().to_string());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `plan`: judges the layout given by `--zones` (and `--learners`) or read from a cluster.
fn plan(
    cli: &Cli,
    zones: Option<&Layout>,
    learners: Option<&str>,
    from_cluster: Option<SocketAddr>,
) -> Result<ExitCode, ToolError> {
    let layout = match (zones, from_cluster) {
        (Some(layout), _) => match learners {
            Some(spec) => layout
                .clone()
                .with_learners(spec)
                .map_err(|e| ToolError::usage(format!("--learners: {e}")))?,
            None => layout.clone(),
        },
        (None, Some(node)) => {
            let credentials = resolve_credentials(
                cli.tls_dir.as_deref(),
                cli.secret_file.as_deref(),
                cli.insecure,
            )?;
            let timeout = Duration::from_secs(cli.timeout.max(1));
            let nodes = runtime()?.block_on(async {
                let client =
                    AdminClient::with_credentials(node, &cli.cluster_name, &credentials, timeout)
                        .map_err(|e| e.to_string())?;
                fetch_nodes(&client).await
            })?;
            for member in &nodes.nodes {
                let state = if member.down {
                    "marked down"
                } else if member.draining {
                    "draining"
                } else {
                    continue;
                };
                eprintln!(
                    "note: node {} is {state} now; the plan counts it as a member, as raft does",
                    member.id
                );
            }
            nodes
                .layout()
                .map_err(|e| format!("the cluster's members: {e}"))?
        }
        (None, None) => {
            return Err(ToolError::usage(
                "give --zones SPEC (e.g. a=2,b=2,c=1) or --from-cluster IP:PORT",
            ))
        }
    };
    let plan = Plan::of(&layout);
    if cli.json {
        out!("{}", json(&plan)?);
    } else {
        print_plan(&plan);
    }
    Ok(if plan.survives {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_LAYOUT_AT_RISK)
    })
}

async fn fetch_nodes(client: &AdminClient) -> Result<NodesReport, String> {
    match client.request(AdminRequest::Nodes).await {
        Ok(AdminResponse::Nodes(nodes)) => Ok(nodes),
        Ok(_) => Err("the node answered `nodes` with another report; upgrade this tool".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The plan of the layout a membership change left, with the zones from a fresh `nodes`.
async fn plan_after_change(
    client: &AdminClient,
    change: &ChangeReport,
    added: Option<(u64, Option<String>)>,
) -> Result<Plan, String> {
    let nodes = fetch_nodes(client).await?;
    let layout = layout_after_change(change, &nodes, added.as_ref())?;
    Ok(Plan::of(&layout))
}

/// The layout a membership change left: the voters and learners of its report, each in its
/// zone as `nodes` reports it, or as `add-node --zone` gave it for the added node (the node
/// answering `nodes` may not have applied the change yet).
fn layout_after_change(
    change: &ChangeReport,
    nodes: &NodesReport,
    added: Option<&(u64, Option<String>)>,
) -> Result<Layout, String> {
    let zone_of = |id: u64| -> Result<Option<&str>, String> {
        if let Some((added_id, zone)) = added {
            if *added_id == id {
                return Ok(zone.as_deref());
            }
        }
        nodes
            .nodes
            .iter()
            .find(|node| node.id == id)
            .map(|node| node.zone.as_deref())
            .ok_or_else(|| format!("node {id} is missing from the `nodes` answer"))
    };
    let members = change
        .voters
        .iter()
        .map(|&id| zone_of(id).map(|zone| (zone, Role::Voter)))
        .chain(
            change
                .learners
                .iter()
                .map(|&id| zone_of(id).map(|zone| (zone, Role::Learner))),
        )
        .collect::<Result<Vec<_>, _>>()?;
    Layout::from_members(members).map_err(|e| e.to_string())
}

fn json(value: &impl Serialize) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| format!("cannot print JSON: {e}"))
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

fn plural(count: usize, one: &str, many: &str) -> String {
    match count {
        0 => format!("no {many}"),
        1 => format!("1 {one}"),
        _ => format!("{count} {many}"),
    }
}

/// `any 2 node failures, any 1 zone failure`, or `no node failure, …`.
fn tolerance(nodes: usize, zones: usize) -> String {
    let any = |count: usize, one: &str, many: &str| {
        let words = plural(count, one, many);
        if count == 0 {
            words
        } else {
            format!("any {words}")
        }
    };
    format!(
        "{}, {}",
        any(nodes, "node failure", "node failures"),
        any(zones, "zone failure", "zone failures")
    )
}

/// Prints a plan as a table of scenarios, then the verdict, warnings and suggestion.
fn print_plan(plan: &Plan) {
    out!(
        "layout {}: {}, {}; a quorum takes {}",
        plan.layout,
        plural(plan.voters, "voter", "voters"),
        plural(plan.learners, "learner", "learners"),
        plan.quorum
    );
    table(
        &["FAILURE", "VOTERS LEFT", "QUORUM SURVIVES", "SHARDS SERVED"],
        plan.scenarios
            .iter()
            .map(|s| {
                vec![
                    s.description.clone(),
                    format!("{} of {}", s.voters_left, plan.voters),
                    yes_no(s.quorum_survives),
                    yes_no(s.shards_served),
                ]
            })
            .collect(),
    );
    out!(
        "tolerates: {}",
        tolerance(plan.node_failures_tolerated, plan.zone_failures_tolerated)
    );
    if plan.survives {
        out!("verdict: survives any single node failure and any single zone failure");
    } else {
        let lost: Vec<&str> = plan
            .scenarios
            .iter()
            .filter(|s| s.failure != Failure::TwoZones && !s.shards_served)
            .map(|s| s.description.as_str())
            .collect();
        out!(
            "verdict: AT RISK: losing any one of these leaves shards unserved: {}",
            lost.join(", ")
        );
    }
    for warning in &plan.warnings {
        out!("warning: {}", warning.message);
    }
    if let Some(suggestion) = &plan.suggestion {
        out!(
            "suggestion: {} (tolerates {}):",
            suggestion.layout,
            tolerance(
                suggestion.node_failures_tolerated,
                suggestion.zone_failures_tolerated
            )
        );
        for change in &suggestion.changes {
            out!("  {change}");
        }
    }
}

/// A change report with the plan of the layout it left, for `add-node --json` and
/// `remove-node --json`: the report's fields stay as they are, `plan` is added.
#[derive(Serialize)]
struct ChangeWithPlan<'a> {
    #[serde(flatten)]
    change: &'a ChangeReport,
    plan: &'a Plan,
}

fn print(response: &AdminResponse, plan: Option<&Plan>, json: bool) -> Result<(), String> {
    let to_json =
        |value: &dyn erased::Json| value.json().map_err(|e| format!("cannot print JSON: {e}"));
    match response {
        AdminResponse::Status(status) if json => out!("{}", to_json(status)?),
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
        AdminResponse::Nodes(nodes) if json => out!("{}", to_json(nodes)?),
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
        AdminResponse::Shards(shards) if json => out!("{}", to_json(shards)?),
        AdminResponse::Shards(shards) => {
            out!("epoch {}", shards.epoch);
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
                match plan {
                    Some(plan) => out!("{}", to_json(&ChangeWithPlan { change, plan })?),
                    None => out!("{}", to_json(change)?),
                }
            } else {
                out!("{}", change.message);
                out!(
                    "voters: {}; learners: {}; tolerates {} failure(s); leader: {}",
                    join(&change.voters),
                    join(&change.learners),
                    change.failures_tolerated,
                    change.leader.map_or("-".to_string(), |l| l.to_string())
                );
                if let Some(plan) = plan {
                    out!();
                    print_plan(plan);
                }
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
        out!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// `clusterfunk recover`: offline, on a survivor's data dir.
mod recover {
    use std::path::Path;

    use clusterfunk::recover::{force_new_cluster, inspect, Inspection};
    use clusterfunk::NodeInfo;

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
            out!("{json}");
        } else {
            out!(
                "node {id} recovered: membership entry {} in term {} names voters {}",
                recovered.index,
                recovered.term,
                listed.join(", ")
            );
            out!(
                "next: start the node from {} (without --init); once it serves, add fresh nodes with `clusterfunk add-node`",
                args.data_dir.display()
            );
        }
        Ok(())
    }

    fn show(state: &Inspection, json: bool) -> Result<(), String> {
        if json {
            let json = serde_json::to_string(state).map_err(|e| e.to_string())?;
            out!("{json}");
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
        out!("  last log entry: {last}");
        out!(
            "  committed: {}",
            state.committed.map_or("-".to_string(), |c| c.to_string())
        );
        out!("  vote: term {}", state.vote_term);
        out!("  membership: {}", members.join(", "));
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

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;
    use clusterfunk::admin::NodeReport;
    use rustls_pki_types::pem::PemObject;

    use super::*;
    use clusterfunk::tool::EXIT_USAGE;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("clusterfunk").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn plan_takes_zones_or_a_cluster_but_not_both() {
        let cli = parse(&["plan", "--zones", "a=2,b=2,c=1"]).expect("--zones parses");
        match cli.command {
            Command::Plan {
                zones: Some(layout),
                learners: None,
                from_cluster: None,
            } => assert_eq!(layout.voters_spec(), "a=2,b=2,c=1"),
            _ => panic!("not a plan command"),
        }
        let cli = parse(&["--json", "plan", "--from-cluster", "127.0.0.1:7101"])
            .expect("--from-cluster parses");
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Plan {
                zones: None,
                from_cluster: Some(_),
                ..
            }
        ));
        let kind = |args: &[&str]| parse(args).err().map(|e| (e.kind(), e.exit_code()));
        assert_eq!(
            kind(&["plan"]),
            Some((ErrorKind::MissingRequiredArgument, 2))
        );
        assert_eq!(
            kind(&["plan", "--zones", "a=1", "--from-cluster", "127.0.0.1:1"]),
            Some((ErrorKind::ArgumentConflict, 2))
        );
        assert_eq!(
            kind(&["plan", "--from-cluster", "127.0.0.1:1", "--learners", "a=1"]),
            Some((ErrorKind::ArgumentConflict, 2))
        );
        // A bad spec is bad usage (exit 2), and the message says what to write.
        let error = parse(&["plan", "--zones", "a=2,b=0"])
            .err()
            .expect("refused");
        assert_eq!(
            (error.kind(), error.exit_code()),
            (ErrorKind::ValueValidation, 2)
        );
        assert!(error.to_string().contains("`b=1`"), "{error}");
    }

    #[test]
    fn plan_exits_3_when_a_zone_or_node_failure_leaves_shards_unserved() {
        let exit = |args: &[&str]| run(parse(args).expect("parses")).ok();
        assert_eq!(
            exit(&["plan", "--zones", "a=2,b=2,c=1"]),
            Some(ExitCode::SUCCESS)
        );
        assert_eq!(
            exit(&[
                "--json",
                "plan",
                "--zones",
                "a=1,b=1,c=1",
                "--learners",
                "d=2"
            ]),
            Some(ExitCode::SUCCESS)
        );
        assert_eq!(
            exit(&["plan", "--zones", "a=2,b=2"]),
            Some(ExitCode::from(EXIT_LAYOUT_AT_RISK))
        );
        assert_eq!(
            exit(&["--json", "plan", "--zones", "a=3"]),
            Some(ExitCode::from(EXIT_LAYOUT_AT_RISK))
        );
        let refused = run(parse(&["plan", "--zones", "a=1", "--learners", "b=x"]).expect("parses"))
            .expect_err("a bad learners spec is refused");
        assert_eq!(refused.code, EXIT_USAGE);
        assert!(refused
            .message
            .starts_with("--learners: `x` is not a node count"));
    }

    fn node(id: u64, zone: Option<&str>, role: &str) -> NodeReport {
        NodeReport {
            id,
            addr: format!("127.0.0.1:{}", 7100 + id),
            zone: zone.map(str::to_string),
            role: role.to_string(),
            leader: id == 1,
            shards: 4,
            down: false,
            draining: false,
        }
    }

    fn change(voters: &[u64], learners: &[u64]) -> ChangeReport {
        ChangeReport {
            message: "changed".into(),
            warnings: Vec::new(),
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            failures_tolerated: 0,
            leader: Some(1),
        }
    }

    #[test]
    fn the_layout_after_a_change_takes_roles_from_the_change_and_zones_from_nodes() {
        let nodes = NodesReport {
            leader: Some(1),
            nodes: vec![
                node(1, Some("a"), "voter"),
                node(2, Some("b"), "voter"),
                node(3, Some("c"), "voter"),
                node(4, Some("a"), "voter"),
            ],
        };
        // remove-node 4: the answering node may still list it; the change report decides.
        let removed =
            layout_after_change(&change(&[1, 2, 3], &[]), &nodes, None).expect("a layout");
        assert_eq!(removed.to_string(), "a=1,b=1,c=1");
        // add-node 5 --zone b --learner, before the answering node applied it.
        let added = (5, Some("b".to_string()));
        let layout = layout_after_change(&change(&[1, 2, 3, 4], &[5]), &nodes, Some(&added))
            .expect("a layout");
        assert_eq!(layout.to_string(), "a=2,b=1,c=1 (learners: b=1)");
        let plan = Plan::of(&layout);
        assert!(!plan.survives, "zone a holds half of four voters");
        // A member neither reported nor just added: no verdict rather than a wrong one.
        assert_eq!(
            layout_after_change(&change(&[1, 2, 9], &[]), &nodes, None),
            Err("node 9 is missing from the `nodes` answer".to_string())
        );
    }

    #[test]
    fn change_json_keeps_its_fields_and_adds_the_plan() {
        let change = change(&[1, 2, 3], &[]);
        let plan = Plan::of(&"a=1,b=1,c=1".parse::<Layout>().expect("a layout"));
        let with_plan: serde_json::Value = serde_json::from_str(
            &json(&ChangeWithPlan {
                change: &change,
                plan: &plan,
            })
            .expect("serialisable"),
        )
        .expect("JSON");
        let alone: serde_json::Value =
            serde_json::from_str(&json(&change).expect("serialisable")).expect("JSON");
        let alone = alone.as_object().expect("an object");
        for (key, value) in alone {
            assert_eq!(&with_plan[key], value, "field {key}");
        }
        assert_eq!(with_plan["plan"]["survives"], true);
        assert_eq!(
            with_plan.as_object().expect("an object").len(),
            alone.len() + 1
        );
    }

    #[test]
    fn certs_takes_a_node_list_or_one_added_node() {
        let cli = parse(&[
            "certs",
            "--dir",
            "d",
            "--nodes",
            "1=127.0.0.1:7001,2=127.0.0.1:7002",
        ])
        .expect("--nodes parses");
        match cli.command {
            Command::Certs {
                nodes: Some(NodeList(nodes)),
                add_node: None,
                ..
            } => assert_eq!(nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [1, 2]),
            _ => panic!("not certs --nodes"),
        }
        let cli = parse(&["certs", "--dir", "d", "--add-node", "3=10.0.0.3:7001"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Certs {
                nodes: None,
                add_node: Some(NodeSpec { id: 3, .. }),
                ..
            }
        ));
        let kind = |args: &[&str]| parse(args).err().map(|e| (e.kind(), e.exit_code()));
        assert_eq!(
            kind(&["certs", "--dir", "d"]),
            Some((ErrorKind::MissingRequiredArgument, 2))
        );
        assert_eq!(
            kind(&["certs", "--nodes", "1=127.0.0.1:7001"]),
            Some((ErrorKind::MissingRequiredArgument, 2))
        );
        assert_eq!(
            kind(&[
                "certs",
                "--dir",
                "d",
                "--nodes",
                "1=127.0.0.1:7001",
                "--add-node",
                "2=127.0.0.1:7002"
            ]),
            Some((ErrorKind::ArgumentConflict, 2))
        );
        // A bad list is bad usage (exit 2), and the message says what is wrong.
        let error = parse(&[
            "certs",
            "--dir",
            "d",
            "--nodes",
            "1=127.0.0.1:7001,1=127.0.0.1:7002",
        ])
        .err()
        .expect("refused");
        assert_eq!(
            (error.kind(), error.exit_code()),
            (ErrorKind::ValueValidation, 2)
        );
        assert!(
            error.to_string().contains("node 1 is listed twice"),
            "{error}"
        );
    }

    #[test]
    fn certs_writes_offline_then_adds_a_node_and_refuses_to_overwrite() {
        let temporary = tempfile::tempdir().expect("a temporary directory");
        let dir = temporary.path().join("certs");
        let dir_arg = dir.to_str().expect("a UTF-8 path");
        let run_args = |args: &[&str]| {
            run(parse(args).expect("parses")).map_err(|ToolError { message, code }| (code, message))
        };
        // No --node and no secret: certs never talks to a cluster.
        let first = [
            "--cluster-name",
            "prod",
            "certs",
            "--dir",
            dir_arg,
            "--nodes",
            "1=127.0.0.1:7001,2=127.0.0.1:7002",
        ];
        assert_eq!(run_args(&first), Ok(ExitCode::SUCCESS));
        for name in ["ca", "node-1", "node-2", "admin", "client"] {
            assert!(dir.join(name).is_dir(), "{name}");
        }
        let again = run_args(&first).expect_err("a CA exists");
        assert_eq!(again.0, EXIT_FAILED);
        assert!(again.1.contains("--add-node"), "{}", again.1);

        let add = |cluster: &str| {
            run_args(&[
                "--json",
                "--cluster-name",
                cluster,
                "certs",
                "--dir",
                dir_arg,
                "--add-node",
                "3=127.0.0.1:7003",
            ])
        };
        let other = add("staging").expect_err("another cluster's name");
        assert_eq!(other.0, EXIT_FAILED);
        assert!(other.1.contains("--cluster-name prod"), "{}", other.1);
        assert_eq!(add("prod"), Ok(ExitCode::SUCCESS));
        let der = rustls_pki_types::CertificateDer::from_pem_file(
            dir.join("node-3").join(tls::CERT_FILE),
        )
        .expect("a certificate");
        let identity = tls::CertIdentity::from_certificate(&der).expect("an identity");
        assert_eq!(identity.role, tls::Role::Node(3));
        assert_eq!(identity.cluster, "prod");
        assert_eq!(add("prod").expect_err("node 3 exists").0, EXIT_FAILED);
    }

    #[test]
    fn missing_node_is_a_usage_error_exit_2() {
        for command in [
            "status",
            "nodes",
            "shards",
            "step-down",
            "drain --id 2",
            "undrain --id 2",
            "remove-node --id 2",
            "add-node --id 4 --addr 127.0.0.1:7004",
        ] {
            let args: Vec<&str> = command.split(' ').collect();
            let Ok(cli) = parse(&args) else {
                panic!("{command} parses")
            };
            // Skipped when the test runs with the variable set: it would name the node.
            if cli.node.is_some() {
                return;
            }
            let refused = run(cli).expect_err("no node to talk to");
            assert_eq!(refused.code, EXIT_USAGE, "{command}: {}", refused.message);
            assert!(
                refused.message.contains("--node IP:PORT is required")
                    && refused.message.contains(NODE_ENV_VAR),
                "{command}: {}",
                refused.message
            );
        }
    }

    #[test]
    fn the_node_may_come_from_clusterfunk_node() {
        let command = Cli::command();
        let node = command
            .get_arguments()
            .find(|arg| arg.get_id() == "node")
            .expect("a --node option");
        assert_eq!(
            node.get_env().and_then(|env| env.to_str()),
            Some("CLUSTERFUNK_NODE")
        );
        // --node still wins over the environment (clap's rule), and parses as IP:PORT.
        let cli = parse(&["--node", "127.0.0.1:7101", "status"]).expect("parses");
        assert_eq!(
            cli.node,
            Some("127.0.0.1:7101".parse().expect("an address"))
        );
    }

    #[test]
    fn insecure_with_a_secret_is_a_usage_error_exit_2() {
        let cli = parse(&[
            "--node",
            "127.0.0.1:1",
            "--insecure",
            "--secret-file",
            "/nonexistent/secret",
            "status",
        ])
        .expect("parses");
        let refused = run(cli).expect_err("contradictory credentials");
        assert_eq!(refused.code, EXIT_USAGE, "{}", refused.message);
        assert!(
            refused
                .message
                .starts_with("--insecure cannot be combined with a cluster secret"),
            "{}",
            refused.message
        );
        // A secret file that cannot be read is a failure (1), not bad usage.
        let cli = parse(&[
            "--node",
            "127.0.0.1:1",
            "--secret-file",
            "/nonexistent/secret",
            "status",
        ])
        .expect("parses");
        assert_eq!(run(cli).expect_err("no such file").code, EXIT_FAILED);
    }

    #[test]
    fn version_prints_the_package_version() {
        let shown = parse(&["--version"])
            .err()
            .expect("clap prints the version");
        assert_eq!(shown.kind(), ErrorKind::DisplayVersion);
        assert_eq!(shown.exit_code(), 0);
        assert!(
            shown.to_string().contains(env!("CARGO_PKG_VERSION")),
            "{shown}"
        );
    }

    #[test]
    fn help_lists_every_exit_code() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        for code in [0, EXIT_FAILED, EXIT_USAGE, EXIT_LAYOUT_AT_RISK] {
            assert!(
                help.contains(&format!("\n  {code}  ")),
                "exit {code}:\n{help}"
            );
        }
        // Usage errors from clap itself exit 2, like ours.
        let unknown = parse(&["status", "--no-such-option"])
            .err()
            .expect("refused");
        assert_eq!(unknown.exit_code(), i32::from(EXIT_USAGE));
    }

    #[test]
    fn a_closed_stdout_ends_quietly_with_0_other_write_errors_with_1() {
        let closed = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(stdout_failed(&closed), 0);
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert_eq!(stdout_failed(&full), EXIT_FAILED);
    }

    #[test]
    fn tolerance_reads_as_words() {
        assert_eq!(tolerance(2, 1), "any 2 node failures, any 1 zone failure");
        assert_eq!(tolerance(1, 0), "any 1 node failure, no zone failures");
        assert_eq!(plural(0, "learner", "learners"), "no learners");
    }
}
