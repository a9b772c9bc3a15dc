//! The codec on the forwarding path: a typical [`Request::Forward`] as a node sends it to a
//! shard's owner (a 16-byte key, a message tag, a small encoded message, the map epoch), encoded
//! and decoded with the crate's one codec, and the owner's [`Response::Shard`] reply.
//!
//! Each forwarded request costs the sender an encode of the message and an encode of the
//! `Forward` around it, the owner a decode of both, and the reply the same again; these benches
//! time each step on its own so that their sum can be compared with a routed round trip.
//!
//! The `codec_frame` group times the transport's frame codec, plain and authenticated.
//!
//! Run: `cargo bench --bench codec`

use std::hint::black_box;

use clusterfunk::internals as codec;
use clusterfunk::internals::{Request, Response};
use clusterfunk::transport::FramePipe;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};

/// The routing key: 16 bytes, like a user id.
const KEY: &[u8] = b"user-0000000042!";
/// The wire tag of the message.
const TAG: &str = "bench.echo";
/// Bytes of the message's own payload: small, like a counter update or a short value.
const PAYLOAD_BYTES: usize = 32;
/// The sender's map epoch: a cluster that has seen a few membership changes.
const EPOCH: u64 = 42;

/// The forwarded message: a short value, as a key-value `put` carries.
#[derive(Serialize, Deserialize)]
struct Echo {
    payload: Vec<u8>,
}

/// The `Forward` request a node sends for `message`.
fn forward_request(message: &Echo) -> Request {
    Request::Forward {
        key: KEY.to_vec(),
        tag: TAG.to_owned(),
        payload: codec::encode(message).expect("a small message encodes"),
        epoch: EPOCH,
    }
}

fn forward(c: &mut Criterion) {
    let message = Echo {
        payload: vec![7; PAYLOAD_BYTES],
    };
    let request = forward_request(&message);
    let encoded = codec::encode(&request).expect("a forward request encodes");
    let reply = Response::Shard(Ok(codec::encode(&message).expect("a reply encodes")));
    let reply_encoded = codec::encode(&reply).expect("a reply encodes");

    let mut group = c.benchmark_group("codec_forward");
    // Bytes per second are bytes of the encoded request (the frame's payload on the wire).
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode_message", |b| {
        b.iter(|| codec::encode(black_box(&message)))
    });
    group.bench_function("encode_forward_request", |b| {
        b.iter(|| codec::encode(black_box(&request)))
    });
    group.bench_function("decode_forward_request", |b| {
        b.iter(|| codec::decode::<Request>(black_box(&encoded)))
    });
    group.bench_function("encode_reply", |b| {
        b.iter(|| codec::encode(black_box(&reply)))
    });
    group.bench_function("decode_reply", |b| {
        b.iter(|| codec::decode::<Response>(black_box(&reply_encoded)))
    });
    group.finish();
    println!(
        "encoded sizes: forward request {} bytes (message {} bytes), reply {} bytes",
        encoded.len(),
        PAYLOAD_BYTES,
        reply_encoded.len()
    );
}

/// The frame codec of the transport: one request frame encoded by the sender and decoded by
/// the receiver, plain (insecure mode) and authenticated (the 16-byte HMAC-SHA256 tag and
/// sequence number of every frame in secret mode), for a small and a large payload. The ratio
/// of the two is the cost of frame authentication.
fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_frame");
    for (size, label) in [(PAYLOAD_BYTES, "32B"), (16 * 1024, "16KiB")] {
        group.throughput(Throughput::Bytes(size as u64));
        for authenticated in [false, true] {
            let mode = if authenticated {
                "authenticated"
            } else {
                "plain"
            };
            let mut pipe = FramePipe::new(authenticated);
            let payload = vec![7u8; size];
            let mut id = 0u64;
            group.bench_function(format!("{mode}_{label}"), |b| {
                b.iter(|| {
                    id += 1;
                    pipe.round_trip(id, black_box(payload.clone()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, forward, frames);
criterion_main!(benches);
