//! Refusal of bad clients with real `kv serve` processes on 127.0.0.1: tools without the
//! cluster secret and peers speaking garbage are turned away while correct clients are served.
//!
//! Every wait polls with a generous deadline (see `common::DEADLINE`). The harness builds the
//! `kv` example itself.

#[allow(dead_code)]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::checks::{key_owned_by, put_and_get, status};
use common::{Cluster, DEADLINE};

// Goal: clients without the secret and peers speaking garbage are refused, while correct
// clients keep being served. Method: run `clusterfunk status` and `kv get` with a wrong
// secret; open raw TCP connections that send garbage and check that each node closes them;
// then check that every node still serves and a key can be written and read.
#[test]
fn unauthenticated_client_and_garbage_are_refused_while_the_cluster_works() {
    let cluster = Cluster::new("unauthenticated_client_and_garbage", 3);
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (_, map) = cluster.wait_for_one_map(&ids);
    let wrong_secret = "this-is-not-the-cluster-secret";
    assert_ne!(wrong_secret, cluster.secret());

    let mut command = cluster.cf_command(&["--node", &cluster.addr(1), "status"]);
    command.env("CLUSTERFUNK_SECRET", wrong_secret);
    let (code, stdout, stderr) = cluster.run(command);
    assert_ne!(code, 0, "status with a wrong secret succeeded: {stdout}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert!(
        stderr.contains("secret"),
        "the error mentions the secret: {stderr}"
    );

    let mut command = cluster.kv_command(2, &["get", "anything"]);
    command.env("CLUSTERFUNK_SECRET", wrong_secret);
    let (code, _, stderr) = cluster.run(command);
    assert!(
        code != 0 && code != 3,
        "kv get with a wrong secret: {code}, {stderr}"
    );
    assert!(
        stderr.contains("secret"),
        "the error mentions the secret: {stderr}"
    );

    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: clusterfunk\r\n\r\n",
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        &[
            0, 0, 0, 16, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        ],
    ];
    for &id in &ids {
        for bytes in garbage {
            assert_connection_closed(&cluster, id, bytes);
        }
    }

    for &id in &ids {
        let status = status(&cluster, id);
        assert_eq!(
            status["state"], "serving",
            "node {id} after the garbage: {status}"
        );
    }
    cluster.wait_for_one_map(&ids);
    let key = key_owned_by(&map, 3, "after-garbage");
    put_and_get(&cluster, 3, &key, "still works");
}

/// Sends `bytes` to node `id` on a raw TCP connection and fails unless the node closes it
/// (a read returns 0 or an error other than a timeout) within [`DEADLINE`].
fn assert_connection_closed(cluster: &Cluster, id: u64, bytes: &[u8]) {
    let mut stream = TcpStream::connect(cluster.addr(id)).expect("connect to the node");
    stream.write_all(bytes).expect("send garbage");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set a read timeout");
    let deadline = Instant::now() + DEADLINE;
    let mut buffer = [0_u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            // An error frame may come first; the end of the stream is what counts.
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
        assert!(
            Instant::now() < deadline,
            "node {id} kept a connection open after {bytes:?}\n{}",
            cluster.report()
        );
    }
}
