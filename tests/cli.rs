//! The two command-line tools as operators use them, where a unit test of the argument parser
//! cannot show it: a closed stdout, the `CLUSTERFUNK_NODE` variable and a secret in the
//! environment, several `kv --node` seeds, the exit status of a drain that did not finish, and
//! a node whose `--zone` differs from the zone the cluster's membership records for it.
//!
//! Real processes on 127.0.0.1 through the process harness (`tests/common`); run
//! `cargo build --examples` first.

#[allow(dead_code)]
mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{Cluster, DEADLINE};

/// Bound on a command expected to end by itself (a node that must refuse or stop, an add-node
/// that may wait for the catch-up timeout of 30 s).
const LIMIT: Duration = Duration::from_secs(90);

fn clusterfunk() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clusterfunk"));
    command
        .env_remove("CLUSTERFUNK_NODE")
        .env_remove("CLUSTERFUNK_SECRET")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    command
}

/// The `kv` binary (the harness of `cluster` checked that it is built and fresh).
fn kv(cluster: &Cluster) -> Command {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_clusterfunk"))
        .parent()
        .expect("the binary lives in a directory")
        .join("examples")
        .join("kv");
    let mut command = Command::new(path);
    command
        .env("CLUSTERFUNK_SECRET", cluster.secret())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    command
}

/// Runs a command whose stdout is a pipe nobody reads any more (as `| head -1` leaves it once
/// `head` has exited), and returns its exit status and stderr.
fn with_closed_stdout(mut command: Command) -> (ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut child = command
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the tool");
    drop(command);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (child.wait().expect("the tool exits"), stderr)
}

/// Waits (bounded by `cluster`'s polling) until `child` exits; returns its status and stderr.
fn wait_for_exit(cluster: &Cluster, child: &mut Child, what: &str) -> (ExitStatus, String) {
    let status = cluster.wait_until(what, LIMIT, || child.try_wait().expect("poll a process"));
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("read stderr");
    }
    (status, stderr)
}

// Goal: `clusterfunk ... | head -1` must not panic on the broken pipe: the tool ends quietly
// with status 0. `plan --zones` prints many lines offline, so no cluster is needed.
#[test]
fn a_closed_stdout_ends_clusterfunk_quietly_with_status_0() {
    let mut command = clusterfunk();
    command.args(["plan", "--zones", "a=2,b=2,c=1"]);
    let (status, stderr) = with_closed_stdout(command);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "", "nothing on stderr, no panic");
}

// Goal: a missing --node is bad usage (exit 2) with a message naming both ways to give it, and
// CLUSTERFUNK_NODE names the node when --node is not given.
#[test]
fn clusterfunk_node_names_the_node_when_node_is_not_given() {
    let mut missing = clusterfunk();
    missing.args(["--insecure", "status"]);
    let outcome = missing.output().expect("run clusterfunk");
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    assert_eq!(outcome.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--node IP:PORT is required") && stderr.contains("CLUSTERFUNK_NODE"),
        "{stderr}"
    );

    let cluster = Cluster::new("cli_node_from_env", 1);
    cluster.start_all_with_init();
    let mut command = cluster.cf_command(&["status", "--json"]);
    command.env("CLUSTERFUNK_NODE", cluster.addr(1));
    let (code, stdout, stderr) = cluster.run(command);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(status["node_id"], 1, "{stdout}");
}

// Goal: --insecure with CLUSTERFUNK_SECRET set used to be silently ignored (the secret won);
// now both tools refuse the combination as bad usage.
#[test]
fn insecure_with_the_secret_in_the_environment_is_a_usage_error_exit_2() {
    let cluster = Cluster::new("cli_insecure_and_secret", 1);
    let mut admin = clusterfunk();
    admin
        .args(["--node", "127.0.0.1:1", "--insecure", "status"])
        .env("CLUSTERFUNK_SECRET", cluster.secret());
    let mut client = kv(&cluster);
    client.args(["get", "--node", "127.0.0.1:1", "--insecure", "some-key"]);
    for mut command in [admin, client] {
        let outcome = command.output().expect("run the tool");
        let stderr = String::from_utf8_lossy(&outcome.stderr);
        assert_eq!(outcome.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(
            stderr.contains(
                "--insecure cannot be combined with a cluster secret (from CLUSTERFUNK_SECRET)"
            ),
            "{stderr}"
        );
    }
}

// Goal: `kv` takes several --node seeds and moves on to the next when one is unreachable.
#[test]
fn kv_tries_the_next_node_seed_when_one_is_unreachable() {
    let cluster = Cluster::new("cli_kv_seeds", 1);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1]);
    let seeds = ["--node", "127.0.0.1:1", "--node", &cluster.addr(1)];
    let mut put = kv(&cluster);
    put.arg("put").args(seeds).args(["seeded", "value"]);
    let (code, _, stderr) = cluster.run(put);
    assert_eq!(code, 0, "put through the second seed: {stderr}");
    let mut get = kv(&cluster);
    get.arg("get")
        .arg(format!("--node=127.0.0.1:1,{}", cluster.addr(1)))
        .arg("seeded");
    let (code, stdout, stderr) = cluster.run(get);
    assert_eq!((code, stdout.trim()), (0, "value"), "{stderr}");
}

// Goal: a node that stops without handing every shard over exits 4 (it used to exit 2, the
// code of bad usage). A lone node has nobody to hand its shards to.
#[test]
fn a_node_stopped_without_handing_its_shards_over_exits_4() {
    let cluster = Cluster::new("cli_not_drained", 1);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1]);
    let status = cluster.stop(1);
    assert_eq!(status.code(), Some(4), "{status}\n{}", cluster.report());
}

// Goal: a node given --zone refuses to start when the initial members record another zone for
// it, and exits 1 with the reason when the membership in its data dir does (a restart with
// another --zone).
#[test]
fn a_node_in_another_zone_than_the_membership_records_refuses_to_serve() {
    let cluster = Cluster::new("cli_zone_at_start", 1);
    let addr = cluster.addr(1);
    let data_dir = cluster.data_dir(1);
    let init = format!("1={addr}@a");
    let refused = cluster
        .run_within(
            cluster.serve_command(1, &addr, &data_dir, &["--init", &init, "--zone", "b"]),
            LIMIT,
        )
        .expect("the node refuses at once");
    assert_eq!(refused.0, 1, "{}", refused.2);
    assert!(
        refused.2.contains("configured with zone `b`")
            && refused
                .2
                .contains("the initial members records it in zone `a`"),
        "{}",
        refused.2
    );

    let mut node = cluster
        .serve_command(1, &addr, &data_dir, &["--init", &init, "--zone", "a"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node 1 in zone a");
    cluster.wait_until("node 1 leads a cluster of its own", DEADLINE, || {
        let mut status = cluster.cf_command(&["--node", &addr, "status", "--json"]);
        status.env_remove("CLUSTERFUNK_NODE");
        let (code, stdout, _) = cluster.run(status);
        let status: serde_json::Value = serde_json::from_str(&stdout).ok()?;
        (code == 0 && status["leader"] == 1).then_some(())
    });
    node.kill().expect("kill node 1");
    node.wait().expect("reap node 1");

    // Refused before it starts when the applied state on disk lists it already, otherwise
    // stopped as soon as raft has replayed its log: either way it exits 1 with the reason.
    let refused = cluster
        .run_within(
            cluster.serve_command(1, &addr, &data_dir, &["--zone", "b"]),
            LIMIT,
        )
        .expect("the node refuses or stops by itself");
    assert_eq!(refused.0, 1, "{}", refused.2);
    assert!(
        refused.2.contains("configured with zone `b`")
            && refused.2.contains("membership")
            && refused.2.contains("records it in zone `a`"),
        "{}",
        refused.2
    );
}

// Goal: a node started with --zone b that the cluster then adds with `add-node --zone a` stops
// serving with a clear error and exits 1, instead of running in a zone the allocator does not
// know about.
#[test]
fn a_node_added_in_another_zone_stops_with_a_clear_error() {
    let cluster = Cluster::with_initial_members("cli_zone_after_add", 2, 1);
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1]);
    let addr = cluster.addr(2);
    let mut node = cluster
        .serve_command(2, &addr, &cluster.data_dir(2), &["--zone", "b"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node 2 in zone b");
    let added = cluster.run_within(
        cluster.cf_command(&[
            "--node",
            &cluster.addr(1),
            "add-node",
            "--id",
            "2",
            "--addr",
            &addr,
            "--zone",
            "a",
            "--learner",
        ]),
        LIMIT,
    );
    let (status, stderr) = wait_for_exit(&cluster, &mut node, "node 2 stops on its own");
    assert_eq!(status.code(), Some(1), "{stderr}\nadd-node: {added:?}");
    assert!(
        stderr.contains("node 2 stopped serving for good")
            && stderr.contains("configured with zone `b`")
            && stderr.contains("records it in zone `a`"),
        "{stderr}"
    );
}

// Goal: talking to an address where no node listens fails at once with one clear line.
// Method: allocate a port but start nothing; run `clusterfunk status` and `kv get` at it.
#[test]
fn status_against_a_closed_port_fails_cleanly() {
    let cluster = Cluster::new("status_against_a_closed_port", 1);
    let addr = cluster.addr(1);
    let (code, stdout, stderr) = cluster.cf_at(1, &["status"]);
    assert_ne!(code, 0, "status against a closed port succeeded: {stdout}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "one error line: {stderr}");
    assert!(
        stderr.starts_with("error:") && stderr.contains("cannot reach") && stderr.contains(&addr),
        "the error says what it could not reach: {stderr}"
    );
    assert!(cluster.status(1).is_none());
    let (code, _, stderr) = cluster.kv(1, &["get", "key"]);
    assert!(
        code != 0 && code != 3,
        "kv get against a closed port: {code}"
    );
    assert!(
        stderr.contains(&addr),
        "the error names the address: {stderr}"
    );
}
