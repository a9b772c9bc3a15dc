//! The Prometheus endpoint of real `kv serve` processes on 127.0.0.1 (`--metrics`): requests
//! counted by route and outcome, and the node's state as gauges that agree with its status.
//!
//! Every wait polls with a generous deadline (see `common::DEADLINE`). The harness builds the
//! `kv` example itself.

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Cluster, DEADLINE};

/// `GET /metrics` from `addr`: the body, or `None` when the endpoint does not answer.
fn scrape(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the sample `name{labels}` (labels as rendered, e.g. `{route="client"}`), summed
/// over every sample whose label set contains all of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name || !labels.iter().all(|label| rest.contains(label)) {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

// Goal: every node serves Prometheus metrics that match what it does: requests counted by
// route and outcome with a latency histogram, and its shards, map epoch, term, leadership,
// lease and readiness as gauges. Method: 3 nodes with `--metrics`; route 20 `kv put`s through
// node 1 (the `kv` client sends each straight to its owner: route `client`); scrape every
// node until its gauges agree with its `status` (the sampler publishes every 500 ms) and the
// `client`/`ok` counters of all nodes add up to at least the 20 puts.
#[test]
fn metrics_endpoint_reports_requests_and_state() {
    let cluster = Cluster::new("metrics_endpoint", 3).with_metrics();
    cluster.start_all_with_init();
    let ids = cluster.ids();
    let (agreement, _) = cluster.wait_for_one_map(&ids);
    for i in 0..20 {
        let (code, _, stderr) = cluster.kv(1, &["put", &format!("metrics-{i}"), "x"]);
        assert_eq!(code, 0, "kv put: {stderr}");
    }
    for &id in &ids {
        cluster.wait_until(
            &format!("node {id}'s gauges agree with its status"),
            DEADLINE,
            || {
                let body = scrape(&cluster.metrics_addr(id))?;
                let status = cluster.status(id)?;
                let owned = sample(&body, "clusterfunk_shards_owned", &[])?;
                let leader = sample(&body, "clusterfunk_is_leader", &[])?;
                let ok = owned == status["shards_owned"].as_f64()?
                    && sample(&body, "clusterfunk_map_epoch", &[])? == status["epoch"].as_f64()?
                    && sample(&body, "clusterfunk_raft_term", &[])? == status["term"].as_f64()?
                    && sample(&body, "clusterfunk_raft_leader_id", &[])? == agreement.leader as f64
                    && leader == f64::from(u8::from(id == agreement.leader))
                    && sample(&body, "clusterfunk_ready", &[])? == 1.0
                    && sample(&body, "clusterfunk_lease_remaining_seconds", &[])? > 0.0
                    && sample(&body, "clusterfunk_voters", &[])? == 3.0;
                ok.then_some(())
            },
        );
    }
    let bodies: Vec<String> = ids
        .iter()
        .map(|&id| scrape(&cluster.metrics_addr(id)).expect("the endpoint answers"))
        .collect();
    let client_ok: f64 = bodies
        .iter()
        .filter_map(|body| {
            sample(
                body,
                "clusterfunk_requests_total",
                &["route=\"client\"", "outcome=\"ok\""],
            )
        })
        .sum();
    assert!(
        client_ok >= 20.0,
        "the 20 puts are counted as client requests: {client_ok}\n{}",
        bodies.join("\n---\n")
    );
    let observed: f64 = bodies
        .iter()
        .filter_map(|body| {
            sample(
                body,
                "clusterfunk_request_duration_seconds_count",
                &["route=\"client\""],
            )
        })
        .sum();
    assert!(
        observed >= 20.0,
        "every counted request has a latency sample: {observed}"
    );
    assert!(
        bodies
            .iter()
            .all(|body| body.contains("clusterfunk_request_duration_seconds_bucket")),
        "latency is exported as a histogram"
    );
}
