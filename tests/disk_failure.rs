//! A node that cannot write its raft log (a full disk) stops serving and exits with a clear
//! message, and its shards fail over; it used to keep running and log 35 errors a second.
//!
//! The full disk is real as far as the node can tell: node 3 is restarted under a file size
//! limit (`ulimit -f`, with SIGXFSZ ignored) below the size of its LMDB file, so its next log
//! write fails with EFBIG from the kernel. Real `kv serve` processes on 127.0.0.1.

#[allow(dead_code)]
mod common;

use std::process::Command;
use std::time::Duration;

use clusterfunk::shard_map::shard_for;
use common::{id_list, Cluster, DEADLINE, SHARD_COUNT};

/// Bound on node 3's run under the limit: it must exit well before.
const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn a_node_that_cannot_write_its_log_exits_clearly_and_its_shards_fail_over() {
    let cluster = Cluster::new("node_that_cannot_write_its_log", 3);
    cluster.start_all_with_init();
    let (_, map) = cluster.wait_for_one_map(&[1, 2, 3]);
    let keys: Vec<String> = (0..60).map(|i| format!("disk-{i}")).collect();
    for key in &keys {
        let (code, _, stderr) = cluster.kv(1, &["put", key, &format!("value-of-{key}")]);
        assert_eq!(code, 0, "put {key}: {stderr}");
    }
    // Node 3 crashes; once the leader marked it down, its restart must write a MarkUp entry.
    cluster.kill9(3);
    cluster.wait_until("node 3 marked down", DEADLINE, || {
        let status = cluster.status(1)?;
        id_list(&status["down"]).contains(&3).then_some(())
    });

    // Its data dir is larger than the limit: the first write past it fails (EFBIG).
    let size = std::fs::metadata(cluster.data_dir(3).join("data.mdb"))
        .expect("node 3's LMDB file")
        .len();
    assert!(size > 16 * 1024, "LMDB file of {size} bytes");
    let serve = cluster.serve_command(
        3,
        &cluster.addr(3),
        &cluster.data_dir(3),
        &["--init", &cluster.initial_member_list()],
    );
    let mut limited = Command::new("bash");
    limited
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\"")
        .arg(serve.get_program())
        .args(serve.get_args());
    for (name, value) in serve.get_envs() {
        match value {
            Some(value) => limited.env(name, value),
            None => limited.env_remove(name),
        };
    }
    let (code, _, stderr) = cluster
        .run_within(limited, LIMIT)
        .expect("node 3 exits on its own once its log cannot be written");
    println!("node 3 under the file size limit exited with {code}:\n{stderr}");
    assert_ne!(code, 0, "node 3 exited successfully: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("error: node 3 stopped serving for good")
            && last.contains("fix it and restart the node"),
        "the last line says what happened and what to do: {last}\n{stderr}"
    );
    let errors = stderr.lines().filter(|l| l.contains("ERROR")).count();
    assert!(errors < 20, "{errors} error lines:\n{stderr}");

    // Nodes 1 and 2 serve every shard; the values of their own shards are all there, read
    // back at the end (node 3's were lost with its memory when it was killed).
    let (_, after) = cluster
        .wait_for_one_map_where(&[1, 2], "node 3's shards moved", |_, map| map.count(3) == 0);
    assert_eq!(after.owners(), [1, 2]);
    for key in &keys {
        let shard = shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize;
        let (code, stdout, stderr) = cluster.kv(2, &["get", key]);
        if map.owners[shard] != 3 {
            assert_eq!(code, 0, "get {key}: {stderr}");
            assert_eq!(stdout.trim(), format!("value-of-{key}"), "{key}");
        }
        let (code, _, stderr) = cluster.kv(1, &["put", key, "again"]);
        assert_eq!(code, 0, "shard of {key} served again: {stderr}");
    }
}
