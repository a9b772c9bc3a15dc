//! TLS through the command line, as an operator runs it: `clusterfunk certs` makes the
//! certificates, `kv serve --tls-dir` runs each node, `clusterfunk --tls-dir D/admin` operates
//! the cluster and `kv put|get --tls-dir D/client` uses it; a fourth node joins with a
//! certificate from `certs --add-node`. The client certificate cannot drain a node.
//!
//! Real `kv serve` processes on 127.0.0.1 through the process harness (`tests/common`).

#[allow(dead_code)]
mod common;

use common::{id_list, Cluster};

#[test]
fn a_tls_cluster_runs_from_the_command_line_and_its_client_certificate_cannot_drain() {
    let cluster = Cluster::with_initial_members("tls_cli", 4, 3).with_tls();
    cluster.start_all_with_init();
    cluster.wait_for_one_map(&[1, 2, 3]);

    let keys: Vec<String> = (0..20).map(|i| format!("tls-key-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let via = 1 + (i as u64 % 3);
        let (code, _, stderr) = cluster.kv(via, &["put", key, &format!("value-{key}")]);
        assert_eq!(code, 0, "put {key} through node {via}: {stderr}");
    }

    // The client certificate may read status but not drain; the admin certificate may.
    let (code, _, stderr) = cluster.cf_as(
        "client",
        &["--node", &cluster.addr(1), "drain", "--id", "2"],
    );
    assert_ne!(code, 0, "a client certificate drained node 2");
    assert!(
        stderr.contains("not authorized") && stderr.contains("D/admin"),
        "{stderr}"
    );
    let status = cluster.status(2).expect("node 2 answers");
    assert_eq!(status["state"], "serving", "node 2 still serves: {status}");

    // A fourth node: its certificate from `certs --add-node`, then add-node with the admin one.
    let (code, _, stderr) = cluster.issue_certificate(4);
    assert_eq!(code, 0, "certs --add-node 4: {stderr}");
    cluster.start(4);
    let (code, _, stderr) = cluster.cf(&[
        "--node",
        &cluster.addr(1),
        "add-node",
        "--id",
        "4",
        "--addr",
        &cluster.addr(4),
    ]);
    assert_eq!(code, 0, "add-node 4: {stderr}");
    cluster.wait_for_one_map_where(&[1, 2, 3, 4], "node 4 is a voter", |agreement, _| {
        agreement.voters.contains(&4)
    });
    let status = cluster.status(4).expect("node 4 answers");
    assert!(id_list(&status["voters"]).contains(&4), "{status}");

    // Every value, read back at the end through the new node.
    for key in &keys {
        let (code, stdout, stderr) = cluster.kv(4, &["get", key]);
        assert_eq!(code, 0, "get {key} through node 4: {stderr}");
        assert_eq!(stdout.trim(), format!("value-{key}"), "{key}");
    }
}
