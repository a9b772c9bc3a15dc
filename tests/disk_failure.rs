//! A node that cannot write its raft log (a full disk) stops serving and exits with a clear
//! message, and its shards fail over; it used to keep running and log 35 errors a second.
//!
//! The full disk is real as far as the node can tell: node 3 is restarted under a file size
//! limit (`ulimit -f`, with SIGXFSZ ignored) below the size of its LMDB file, so its next log
//! write fails with EFBIG from the kernel. Real `kv serve` processes on 127.0.0.1.
//!
//! The node is the leader when it is killed: restarted, it reads its own committed vote and
//! leads again at once in its own view, so the failure hits a node that believes it leads
//! (regression: its shard-count writer retried the failed write in a spin, 190 error lines in
//! 2 ms).

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
    // The leader crashes; once the new leader marked it down, its restart must write.
    let victim = cluster.wait_until("a leader is known", DEADLINE, || {
        cluster.status(1)?["leader"].as_u64()
    });
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != victim).collect();
    cluster.kill9(victim);
    cluster.wait_until(&format!("node {victim} marked down"), DEADLINE, || {
        let status = cluster.status(others[0])?;
        id_list(&status["down"]).contains(&victim).then_some(())
    });

    // Its data dir is larger than the limit: the first write past it fails (EFBIG).
    let size = std::fs::metadata(cluster.data_dir(victim).join("data.mdb"))
        .expect("the victim's LMDB file")
        .len();
    assert!(size > 16 * 1024, "LMDB file of {size} bytes");
    let serve = cluster.serve_command(
        victim,
        &cluster.addr(victim),
        &cluster.data_dir(victim),
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
        .unwrap_or_else(|| panic!("node {victim} exits on its own once its log cannot be written"));
    println!("node {victim} under the file size limit exited with {code}:\n{stderr}");
    assert_ne!(code, 0, "node {victim} exited successfully: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("error: node {victim} stopped serving for good"))
            && last.contains("fix it and restart the node"),
        "the last line says what happened and what to do: {last}\n{stderr}"
    );
    let errors = stderr.lines().filter(|l| l.contains("ERROR")).count();
    assert!(errors < 20, "{errors} error lines:\n{stderr}");

    // The other two serve every shard; the values of their own shards are all there, read
    // back at the end (the victim's were lost with its memory when it was killed).
    let (_, after) =
        cluster.wait_for_one_map_where(&others, "the victim's shards moved", |_, map| {
            map.count(victim) == 0
        });
    assert_eq!(after.owners(), others);
    for key in &keys {
        let shard = shard_for(key.as_bytes(), SHARD_COUNT as u32) as usize;
        let (code, stdout, stderr) = cluster.kv(others[1], &["get", key]);
        if map.owners[shard] != victim {
            assert_eq!(code, 0, "get {key}: {stderr}");
            assert_eq!(stdout.trim(), format!("value-of-{key}"), "{key}");
        }
        let (code, _, stderr) = cluster.kv(others[0], &["put", key, "again"]);
        assert_eq!(code, 0, "shard of {key} served again: {stderr}");
    }
}
