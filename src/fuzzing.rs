//! The decoders' entry points for fuzzing. **Not a public API**: it exists for the cargo-fuzz
//! targets in `tests/fuzz` and for `tests/decoders.rs`, and may change in any release.
//!
//! Each function takes arbitrary bytes, runs them through the real decoder the way a node reads
//! them from a peer or from its disk, and checks what must hold of whatever decodes: it encodes
//! again to bytes that decode to the same value, and a frame or handshake never accepts what a
//! peer without the key could not have produced. Any input is fine; a panic is a bug, either in
//! the decoder or one of those properties broken.
//!
//! | function | decoder | what the bytes are |
//! |---|---|---|
//! | [`frame()`] | `transport::codec::FrameCodec`, plain and authenticated | a stream of frames |
//! | [`handshake()`] | `transport::handshake::{server, client}` | one mode byte, then what the peer sends |
//! | [`wire()`] | [`codec::decode`] of [`Request`] and [`Response`] | a transport payload |
//! | [`admin()`] | [`codec::decode`] of the admin messages | a transport payload |
//! | [`storage()`] | `storage::codec::decode` of every record kind, the identity file | a record of the data dir |
//!
//! [`Target::seeds`] builds valid encodings of real messages, the start of each corpus.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

use crate::admin::{
    AdminError, AdminRequest, AdminResponse, ChangeReport, NodeReport, NodeState, NodesReport,
    ShardOwner, ShardsReport, StatusReport,
};
use crate::codec;
use crate::codec::Handoff;
use crate::consensus::{ClusterState, Command, CommandResponse, NodeInfo, TypeConfig};
use crate::error::{Error, NotReadyReason};
use crate::lease::{LeaseGrant, LeaseRefusal, RenewLease};
use crate::shard_map::NodeId;
use crate::storage::codec as storage_codec;
use crate::storage::Identity;
use crate::transport::codec::{
    Frame, FrameCodec, FrameKey, Header, FRAME_TAG_LEN, HANDSHAKE_FRAME_MAX,
};
use crate::transport::handshake;
use crate::transport::{Secret, TransportConfig, PROTOCOL_VERSION};
use crate::wire::{RemoteRaftError, Request, Response, RoutingInfo};

/// One fuzz target: a decoder, the bytes it is fed and its corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// [`frame()`].
    Frame,
    /// [`handshake()`].
    Handshake,
    /// [`wire()`].
    Wire,
    /// [`admin()`].
    Admin,
    /// [`storage()`].
    Storage,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 5] = [
        Target::Frame,
        Target::Handshake,
        Target::Wire,
        Target::Admin,
        Target::Storage,
    ];

    /// The target's name: its file in `tests/fuzz/fuzz_targets` and its corpus directory in
    /// `tests/fuzz/corpus`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Frame => "frame",
            Target::Handshake => "handshake",
            Target::Wire => "wire",
            Target::Admin => "admin",
            Target::Storage => "storage",
        }
    }

    /// Feeds `data` to the target's decoder (see the module documentation).
    pub fn run(self, data: &[u8]) {
        match self {
            Target::Frame => frame(data),
            Target::Handshake => handshake(data),
            Target::Wire => wire(data),
            Target::Admin => admin(data),
            Target::Storage => storage(data),
        }
    }

    /// Valid inputs made of real messages, encoded by the real encoders: the seeds of the
    /// target's corpus, and the inputs that tests mutate.
    ///
    /// # Panics
    ///
    /// If one of the crate's encoders refuses one of these fixed messages (a bug).
    pub fn seeds(self) -> Vec<Vec<u8>> {
        match self {
            Target::Frame => frame_seeds(),
            Target::Handshake => handshake_seeds(),
            Target::Wire => wire_seeds(),
            Target::Admin => admin_seeds(),
            Target::Storage => storage_seeds(),
        }
    }
}

/// Reports a broken property of a decoder: the fuzzer records the input as a crash.
#[track_caller]
fn broken(what: impl Display) -> ! {
    panic!("decoder property broken: {what}")
}

// ---------------------------------------------------------------------------------------------
// Frames

/// The key the authenticated codecs use here. Fixed, so that runs are reproducible; the fuzzer
/// cannot use it to forge tags any more than it could guess a random one.
const FRAME_KEY: FrameKey = [0x5a; 32];

/// How a stream of bytes ended for a frame decoder.
#[derive(Debug)]
enum End {
    /// No frame error: `left` bytes of an incomplete frame remain (0: the stream ended cleanly).
    Incomplete { left: usize },
    /// The decoder refused the stream, which closes a connection.
    Refused,
}

/// The frames a decoder reads from `bytes`, and how the stream ended.
fn decode_stream(codec: &mut FrameCodec, bytes: &[u8]) -> (Vec<Frame>, End) {
    let mut buffer = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        let before = buffer.len();
        match codec.decode(&mut buffer) {
            Ok(Some(frame)) => {
                if buffer.len() >= before {
                    broken("the frame decoder returned a frame without consuming bytes");
                }
                frames.push(frame);
            }
            Ok(None) => return (frames, End::Incomplete { left: buffer.len() }),
            Err(_) => return (frames, End::Refused),
        }
    }
}

fn encode_frames(codec: &mut FrameCodec, frames: &[Frame]) -> (BytesMut, Vec<usize>) {
    let mut wire = BytesMut::new();
    let mut ends = Vec::with_capacity(frames.len());
    for frame in frames {
        if let Err(error) = codec.encode(frame.clone(), &mut wire) {
            broken(format_args!(
                "a decoded {} frame does not encode again: {error}",
                frame.header.kind()
            ));
        }
        ends.push(wire.len());
    }
    (wire, ends)
}

fn authenticated(frame_size_max: usize) -> FrameCodec {
    let mut codec = FrameCodec::new(frame_size_max);
    codec.authenticate(&FRAME_KEY);
    codec
}

/// The frame limit of an established connection here: a configured value (at least the
/// handshake's limit). The default, 16 MiB, runs the same code, but a frame decoder reserves
/// the length a frame announces, and reserving megabytes for many inputs slows the fuzzer.
const FRAME_SIZE_MAX_AFTER_HANDSHAKE: usize = 2 * HANDSHAKE_FRAME_MAX;

/// The limit after the handshake plus room for the tag: every frame that decodes under the
/// limit without a tag encodes under it with one.
const FRAME_SIZE_MAX_TAGGED: usize = FRAME_SIZE_MAX_AFTER_HANDSHAKE + FRAME_TAG_LEN;

/// A hash of the input that picks which byte of the authenticated stream is altered.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Decodes `data` as a stream of frames with the handshake's limit and with the larger limit of
/// an established connection, plain and authenticated.
///
/// Checks: every frame decoded encodes again to bytes that decode to the same frame; the larger
/// limit reads the same frames as the smaller one, and maybe more; the frames re-encoded by an
/// authenticating writer are read back in order, and after one bit of that stream is flipped
/// (which bit depends on `data`) the reader accepts exactly the frames before the altered one.
pub fn frame(data: &[u8]) {
    let (frames, _) = decode_stream(&mut FrameCodec::new(HANDSHAKE_FRAME_MAX), data);
    for frame in &frames {
        let (wire, _) = encode_frames(
            &mut FrameCodec::new(HANDSHAKE_FRAME_MAX),
            std::slice::from_ref(frame),
        );
        let (again, end) = decode_stream(&mut FrameCodec::new(HANDSHAKE_FRAME_MAX), &wire);
        if again.as_slice() != std::slice::from_ref(frame)
            || !matches!(end, End::Incomplete { left: 0 })
        {
            broken(format_args!(
                "{frame:?} re-encoded decodes as {again:?}, then {end:?}"
            ));
        }
    }

    let (after, _) = decode_stream(&mut FrameCodec::new(FRAME_SIZE_MAX_AFTER_HANDSHAKE), data);
    if !after.starts_with(&frames) {
        broken("a larger frame limit reads other frames than the handshake's limit");
    }

    // A peer without the key: whatever it sends must not panic the authenticating reader.
    let _ = decode_stream(&mut authenticated(HANDSHAKE_FRAME_MAX), data);

    let limit = FRAME_SIZE_MAX_TAGGED;
    let (mut wire, ends) = encode_frames(&mut authenticated(limit), &after);
    let (back, end) = decode_stream(&mut authenticated(limit), &wire);
    if back != after || !matches!(end, End::Incomplete { left: 0 }) {
        broken(format_args!(
            "authenticated frames came back as {back:?}, then {end:?}, instead of {after:?}"
        ));
    }
    if wire.is_empty() {
        return;
    }
    let hash = fnv1a(data);
    let at = (hash % wire.len() as u64) as usize;
    wire[at] ^= 1 << ((hash >> 32) % 8);
    let altered = ends.iter().position(|&end| at < end).unwrap_or(after.len());
    let (read, _) = decode_stream(&mut authenticated(limit), &wire);
    if read.as_slice() != &after[..altered] {
        broken(format_args!(
            "after byte {at} of an authenticated stream was altered (in frame {altered}), the reader accepted {} frames: {read:?}",
            read.len()
        ));
    }
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let frames = sample_frames();
    let mut seeds: Vec<Vec<u8>> = frames
        .iter()
        .map(|frame| {
            encode_frames(
                &mut FrameCodec::new(HANDSHAKE_FRAME_MAX),
                std::slice::from_ref(frame),
            )
            .0
            .to_vec()
        })
        .collect();
    seeds.push(
        encode_frames(&mut FrameCodec::new(HANDSHAKE_FRAME_MAX), &frames)
            .0
            .to_vec(),
    );
    seeds.push(
        encode_frames(&mut authenticated(HANDSHAKE_FRAME_MAX), &frames)
            .0
            .to_vec(),
    );
    seeds
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::control(Header::ClientHello {
            version: PROTOCOL_VERSION,
            cluster_name: "clusterfunk".to_owned(),
            node_id: Some(2),
            nonce: Some([7; 32]),
        }),
        Frame::control(Header::ServerHello {
            version: PROTOCOL_VERSION,
            cluster_name: "clusterfunk".to_owned(),
            node_id: Some(1),
            nonce: Some([8; 32]),
        }),
        Frame::control(Header::ClientProof {
            proof: Some([10; 32]),
        }),
        Frame::control(Header::Accepted {
            proof: Some([9; 32]),
        }),
        Frame::control(Header::Refused {
            reason: "cluster name mismatch".to_owned(),
        }),
        Frame::request(1, b"ping".to_vec()),
        Frame::response(1, b"pong".to_vec()),
        Frame::request(u64::MAX, Vec::new()),
        Frame::failed(2, "overloaded".to_owned()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Mode bit: this side accepts the connection (runs `handshake::server`); otherwise it dials.
pub const MODE_SERVER: u8 = 1;
/// Mode bit: this side has the cluster secret; otherwise it runs in insecure mode.
pub const MODE_SECRET: u8 = 2;
/// Mode bit: this side is node 1; otherwise it is a client that is no node.
pub const MODE_NODE_ID: u8 = 4;

/// The secret of the side under test, strong enough for any rule on secrets.
fn fuzz_secret() -> Secret {
    static SECRET: OnceLock<Secret> = OnceLock::new();
    SECRET
        .get_or_init(
            || match Secret::new(b"fuzzing: 7Qx!f2#Lk9$wZ0&pE3*vB6^yN1".to_vec()) {
                Ok(secret) => secret,
                Err(error) => panic!("the fuzzing secret is refused: {error}"),
            },
        )
        .clone()
}

/// Polls `future` until it completes, or gives up after a bound of polls (`None`). The futures
/// run here read from a byte slice and write into a `Vec`, which never wait.
fn run_to_end<F: Future>(future: F) -> Option<F::Output> {
    const POLLS_MAX: usize = 64;
    let mut future = pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    for _ in 0..POLLS_MAX {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return Some(output);
        }
    }
    None
}

/// Runs one side of the real handshake against a peer that sends `data[1..]` and then closes
/// its side; `data[0]` picks the side and its configuration ([`MODE_SERVER`], [`MODE_SECRET`],
/// [`MODE_NODE_ID`]). After a successful handshake the rest of the peer's bytes are read as an
/// established connection reads them (the configured frame limit, and the frame key with a
/// secret).
///
/// Checks: the handshake ends (it never waits once the peer's bytes are read and its side is
/// closed); everything this side sent decodes as whole frames on the peer's side; with a secret,
/// the handshake never succeeds (the peer's bytes were fixed before this side drew its nonce, so
/// success would mean a proof forged without the secret).
pub fn handshake(data: &[u8]) {
    let Some((&mode, peer)) = data.split_first() else {
        return;
    };
    let config = TransportConfig {
        node_id: (mode & MODE_NODE_ID != 0).then_some(1),
        secret: (mode & MODE_SECRET != 0).then(fuzz_secret),
        frame_size_max: FRAME_SIZE_MAX_AFTER_HANDSHAKE,
        ..TransportConfig::default()
    };
    let server_side = mode & MODE_SERVER != 0;
    let addr = SocketAddr::from(([127, 0, 0, 1], 7000));
    let mut reader = FramedRead::new(peer, FrameCodec::new(HANDSHAKE_FRAME_MAX));
    let mut writer = FramedWrite::new(Vec::new(), FrameCodec::new(HANDSHAKE_FRAME_MAX));
    let done = run_to_end(async {
        if server_side {
            handshake::server(&mut reader, &mut writer, &config, addr, PROTOCOL_VERSION).await
        } else {
            handshake::client(&mut reader, &mut writer, &config, addr, PROTOCOL_VERSION).await
        }
    });
    let Some(result) = done else {
        broken("the handshake waits although the peer's bytes are all read and its side closed");
    };

    let (_, end) = decode_stream(&mut FrameCodec::new(HANDSHAKE_FRAME_MAX), writer.get_ref());
    if !matches!(end, End::Incomplete { left: 0 }) {
        broken(format_args!(
            "the handshake sent bytes its peer cannot decode ({end:?}); result {result:?}"
        ));
    }
    let established = match result {
        Ok(established) => established,
        Err(_) => return,
    };
    if config.secret.is_some() {
        broken("a handshake with a secret succeeded against bytes made without it");
    }
    // As `connection::secure_frames` does once the peer is authenticated.
    reader
        .decoder_mut()
        .set_frame_size_max(config.frame_size_max);
    if let Some(keys) = &established.keys {
        let (read, _) = if server_side {
            keys.for_server()
        } else {
            keys.for_client()
        };
        reader.decoder_mut().authenticate(read);
    }
    while let Some(Some(Ok(_))) = run_to_end(reader.next()) {}
}

fn handshake_seeds() -> Vec<Vec<u8>> {
    let client_hello = |version, cluster: &str, node_id, nonce| {
        Frame::control(Header::ClientHello {
            version,
            cluster_name: cluster.to_owned(),
            node_id,
            nonce,
        })
    };
    let server_hello = |node_id, nonce| {
        Frame::control(Header::ServerHello {
            version: PROTOCOL_VERSION,
            cluster_name: "clusterfunk".to_owned(),
            node_id,
            nonce,
        })
    };
    let proof = |proof| Frame::control(Header::ClientProof { proof });
    let accepted = |proof| Frame::control(Header::Accepted { proof });
    let refused = Frame::control(Header::Refused {
        reason: "authentication failed".to_owned(),
    });
    let peers: Vec<(u8, Vec<Frame>)> = vec![
        // Insecure server: hello, proof, then requests on the established connection.
        (
            MODE_SERVER | MODE_NODE_ID,
            vec![
                client_hello(PROTOCOL_VERSION, "clusterfunk", Some(2), None),
                proof(None),
                Frame::request(1, b"ping".to_vec()),
                Frame::request(2, vec![0; 40]),
            ],
        ),
        (
            MODE_SERVER,
            vec![
                client_hello(PROTOCOL_VERSION, "clusterfunk", None, None),
                proof(None),
            ],
        ),
        // Secure server: the peer's proof cannot be right.
        (
            MODE_SERVER | MODE_SECRET | MODE_NODE_ID,
            vec![
                client_hello(PROTOCOL_VERSION, "clusterfunk", Some(2), Some([3; 32])),
                proof(Some([4; 32])),
            ],
        ),
        (
            MODE_SERVER | MODE_SECRET,
            vec![client_hello(PROTOCOL_VERSION, "clusterfunk", Some(2), None)],
        ),
        (
            MODE_SERVER,
            vec![client_hello(
                PROTOCOL_VERSION + 1,
                "clusterfunk",
                None,
                None,
            )],
        ),
        (
            MODE_SERVER,
            vec![
                client_hello(PROTOCOL_VERSION, "another", None, None),
                refused.clone(),
            ],
        ),
        // Insecure client: the server's hello, accepted, then responses.
        (
            MODE_NODE_ID,
            vec![
                server_hello(Some(1), None),
                accepted(None),
                Frame::response(1, b"pong".to_vec()),
                Frame::failed(2, "overloaded".to_owned()),
            ],
        ),
        (0, vec![server_hello(None, None), accepted(None)]),
        // Secure client: the server's proof cannot be right.
        (
            MODE_SECRET,
            vec![
                server_hello(Some(1), Some([5; 32])),
                accepted(Some([6; 32])),
            ],
        ),
        (MODE_SECRET | MODE_NODE_ID, vec![refused]),
    ];
    peers
        .into_iter()
        .map(|(mode, frames)| {
            let mut seed = vec![mode];
            seed.extend_from_slice(
                &encode_frames(&mut FrameCodec::new(HANDSHAKE_FRAME_MAX), &frames).0,
            );
            seed
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Payloads: the node protocol, the admin messages and storage records

/// Encodes `value` and decodes it again, and checks that the second encoding is the first:
/// whatever decodes can be sent on or stored again unchanged. Returns the decoded copy.
fn re_encoded<T, EncodeError: Display, DecodeError: Display>(
    what: &str,
    value: &T,
    encode: impl Fn(&T) -> Result<Vec<u8>, EncodeError>,
    decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
) -> T {
    let first = match encode(value) {
        Ok(bytes) => bytes,
        Err(error) => broken(format_args!("a decoded {what} does not encode: {error}")),
    };
    let again = match decode(&first) {
        Ok(value) => value,
        Err(error) => broken(format_args!(
            "the encoding of a decoded {what} does not decode: {error}"
        )),
    };
    match encode(&again) {
        Ok(second) if second == first => again,
        Ok(_) => broken(format_args!("a decoded {what} encodes differently twice")),
        Err(error) => broken(format_args!(
            "a twice-decoded {what} does not encode: {error}"
        )),
    }
}

/// Decodes `data` with the wire codec as `T`; if it decodes, checks it re-encodes stably.
fn wire_value<T: Serialize + DeserializeOwned>(what: &str, data: &[u8]) -> Option<(T, T)> {
    let value = codec::decode::<T>(data).ok()?;
    let again = re_encoded(
        what,
        &value,
        |v| codec::encode(v),
        |b| codec::decode::<T>(b),
    );
    Some((value, again))
}

/// Decodes `data` as a [`Request`] and as a [`Response`], as a node and a client read a
/// transport payload.
///
/// Checks: what decodes encodes again, and that encoding decodes to a value that encodes to the
/// same bytes.
pub fn wire(data: &[u8]) {
    let _ = wire_value::<Request>("Request", data);
    let _ = wire_value::<Response>("Response", data);
}

/// Decodes `data` as each admin message: [`AdminRequest`], [`AdminResponse`], [`AdminError`]
/// and `Result<AdminResponse, AdminError>` (what [`Response::Admin`] carries).
///
/// Checks: what decodes encodes again to the same value; an answer can be printed as the
/// tool's JSON; an error can be displayed.
pub fn admin(data: &[u8]) {
    fn same<T: PartialEq + std::fmt::Debug>(what: &str, pair: &(T, T)) {
        if pair.0 != pair.1 {
            broken(format_args!(
                "a decoded {what} re-encodes as another value: {:?} became {:?}",
                pair.0, pair.1
            ));
        }
    }
    if let Some(pair) = wire_value::<AdminRequest>("AdminRequest", data) {
        same("AdminRequest", &pair);
        let _ = pair.0.is_write();
    }
    if let Some(pair) = wire_value::<AdminResponse>("AdminResponse", data) {
        same("AdminResponse", &pair);
        if let Err(error) = serde_json::to_string(&pair.0) {
            broken(format_args!(
                "a decoded admin answer cannot be printed as JSON: {error}"
            ));
        }
    }
    if let Some(pair) = wire_value::<AdminError>("AdminError", data) {
        same("AdminError", &pair);
        let _ = pair.0.to_string();
    }
    if let Some(pair) = wire_value::<Result<AdminResponse, AdminError>>("admin answer", data) {
        same("admin answer", &pair);
    }
}

/// The snapshot record as `storage::state_machine` stores it: the same fields in the same
/// order (bincode encodes a struct as its fields in order).
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// Decodes `data` with the storage codec as `T`; if it decodes, checks it re-encodes stably.
fn record<T: Serialize + DeserializeOwned>(what: &str, data: &[u8]) -> Option<T> {
    let value = storage_codec::decode::<T>(data).ok()?;
    Some(re_encoded(
        what,
        &value,
        |v| storage_codec::encode(v),
        |b| storage_codec::decode::<T>(b),
    ))
}

/// Decodes `data` as every record a node reads from its data dir: with the storage codec a log
/// entry, the vote, the committed and the last purged log id, the snapshot record and the
/// cluster state inside it; as JSON the identity file.
///
/// Checks: what decodes encodes again, and that encoding decodes to a value that encodes to the
/// same bytes.
pub fn storage(data: &[u8]) {
    let _ = record::<Entry<TypeConfig>>("log entry", data);
    let _ = record::<Vote<NodeId>>("vote", data);
    let _ = record::<Option<LogId<NodeId>>>("committed log id", data);
    let _ = record::<LogId<NodeId>>("last purged log id", data);
    if let Some(snapshot) = record::<SnapshotRecord>("snapshot record", data) {
        let _ = record::<ClusterState>("snapshot state", &snapshot.data);
    }
    let _ = record::<ClusterState>("cluster state", data);
    if let Ok(identity) = serde_json::from_slice::<Identity>(data) {
        let again = re_encoded("identity", &identity, serde_json::to_vec, |b| {
            serde_json::from_slice::<Identity>(b)
        });
        if again != identity {
            broken(format_args!(
                "the identity {identity:?} is read back as {again:?}"
            ));
        }
    }
}

fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn sample_nodes() -> BTreeMap<NodeId, NodeInfo> {
    (1..=3)
        .map(|id| {
            (
                id,
                NodeInfo {
                    addr: format!("127.0.0.1:{}", 7000 + id),
                    zone: Some(format!("zone-{id}")),
                },
            )
        })
        .collect()
}

fn sample_membership() -> Membership<NodeId, NodeInfo> {
    Membership::new(vec![BTreeSet::from([1, 2, 3])], sample_nodes())
}

fn sample_state() -> ClusterState {
    let nodes = sample_nodes();
    let mut state = ClusterState::default();
    state.apply_membership(nodes.iter().map(|(id, info)| (*id, info)), [1, 2, 3]);
    state.apply(&Command::Init { shard_count: 8 });
    state.apply(&Command::SetDraining {
        node: 3,
        draining: true,
    });
    state
}

fn sample_entries() -> Vec<Entry<TypeConfig>> {
    vec![
        Entry {
            log_id: log_id(1, 1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 1, 2),
            payload: EntryPayload::Membership(sample_membership()),
        },
        Entry {
            log_id: log_id(1, 1, 3),
            payload: EntryPayload::Normal(Command::Init { shard_count: 8 }),
        },
        Entry {
            log_id: log_id(2, 2, 4),
            payload: EntryPayload::Normal(Command::MoveStuck {
                shards: vec![1, 5],
                epoch: 3,
                from: 1,
                to: 2,
            }),
        },
    ]
}

fn sample_snapshot_meta() -> SnapshotMeta<NodeId, NodeInfo> {
    SnapshotMeta {
        last_log_id: Some(log_id(2, 2, 4)),
        last_membership: StoredMembership::new(Some(log_id(1, 1, 2)), sample_membership()),
        snapshot_id: "2-2-4-1".to_owned(),
    }
}

fn wire_encoded<T: Serialize>(value: &T) -> Vec<u8> {
    match codec::encode(value) {
        Ok(bytes) => bytes,
        Err(error) => panic!("a seed does not encode: {error}"),
    }
}

fn storage_encoded<T: Serialize>(value: &T) -> Vec<u8> {
    match storage_codec::encode(value) {
        Ok(bytes) => bytes,
        Err(error) => panic!("a seed does not encode: {error}"),
    }
}

fn sample_status() -> StatusReport {
    StatusReport {
        node_id: 1,
        state: NodeState::Serving,
        reason: None,
        leader: Some(1),
        term: 3,
        epoch: 5,
        voters: vec![1, 2, 3],
        learners: vec![4],
        shards_owned: 3,
        shard_count: Some(8),
        raft_state: "leader".to_owned(),
        last_log_index: Some(42),
        last_applied_index: Some(42),
        failures_tolerated: 1,
        lease_remaining_ms: Some(900),
        down: vec![],
        draining: vec![3],
        shards_moving: 1,
    }
}

fn sample_admin_requests() -> Vec<AdminRequest> {
    vec![
        AdminRequest::Status,
        AdminRequest::Nodes,
        AdminRequest::Shards,
        AdminRequest::AddNode {
            id: 4,
            addr: "127.0.0.1:7004".to_owned(),
            zone: Some("zone-b".to_owned()),
            learner: false,
        },
        AdminRequest::RemoveNode { id: 2 },
        AdminRequest::StepDown,
        AdminRequest::Drain { id: 3 },
        AdminRequest::Undrain { id: 3 },
        AdminRequest::Elect,
    ]
}

fn sample_admin_responses() -> Vec<AdminResponse> {
    vec![
        AdminResponse::Status(sample_status()),
        AdminResponse::Nodes(NodesReport {
            leader: Some(1),
            nodes: vec![NodeReport {
                id: 1,
                addr: "127.0.0.1:7001".to_owned(),
                zone: None,
                role: "voter".to_owned(),
                leader: true,
                shards: 3,
                down: false,
                draining: true,
            }],
        }),
        AdminResponse::Shards(ShardsReport {
            epoch: 5,
            shards: vec![
                ShardOwner { shard: 0, node: 1 },
                ShardOwner { shard: 1, node: 2 },
            ],
        }),
        AdminResponse::Changed(ChangeReport {
            message: "node 4 added as a voter".to_owned(),
            warnings: vec!["4 voters: an even count tolerates no more failures than 3".to_owned()],
            voters: vec![1, 2, 3, 4],
            learners: vec![],
            failures_tolerated: 1,
            leader: Some(1),
        }),
    ]
}

fn sample_admin_errors() -> Vec<AdminError> {
    vec![
        AdminError::NoLeader,
        AdminError::NotLeader { leader: Some(2) },
        AdminError::Invalid {
            reason: "node 9 is not a member".to_owned(),
        },
        AdminError::Failed {
            reason: "timed out".to_owned(),
        },
        AdminError::NotAMember { node: 9 },
        AdminError::Unreachable {
            reason: "connection refused".to_owned(),
        },
        AdminError::NoNodeToTakeShards { node: 1 },
    ]
}

fn admin_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = sample_admin_requests().iter().map(wire_encoded).collect();
    seeds.extend(sample_admin_responses().iter().map(wire_encoded));
    seeds.extend(sample_admin_errors().iter().map(wire_encoded));
    seeds.extend(
        sample_admin_responses()
            .into_iter()
            .map(Ok)
            .chain(sample_admin_errors().into_iter().map(Err))
            .map(|answer: Result<AdminResponse, AdminError>| wire_encoded(&answer)),
    );
    seeds
}

fn wire_seeds() -> Vec<Vec<u8>> {
    let vote = Vote::new_committed(2, 1);
    let requests = vec![
        Request::AppendEntries(AppendEntriesRequest {
            vote,
            prev_log_id: Some(log_id(1, 1, 1)),
            entries: sample_entries(),
            leader_commit: Some(log_id(1, 1, 2)),
        }),
        Request::Vote(VoteRequest {
            vote: Vote::new(3, 2),
            last_log_id: Some(log_id(2, 2, 4)),
        }),
        Request::InstallSnapshot(InstallSnapshotRequest {
            vote,
            meta: sample_snapshot_meta(),
            offset: 0,
            data: storage_encoded(&sample_state()),
            done: true,
        }),
        Request::Admin {
            request: AdminRequest::Drain { id: 3 },
            forwarded: true,
        },
        Request::Forward {
            key: b"user-42".to_vec(),
            tag: "kv.put".to_owned(),
            payload: vec![1, 2, 3, 250],
            epoch: 7,
        },
        Request::RenewLease(RenewLease {
            node: 2,
            epoch: 5,
            incarnation: 1,
            request_id: 17,
        }),
        Request::Handoff {
            from: 1,
            epoch: 5,
            shards: vec![
                (3, Handoff::encode(&vec![("k".to_owned(), 1_u64)]).ok()),
                (4, None),
            ],
        },
        Request::Propose(Command::Released {
            shards: vec![3],
            epoch: 5,
            from: 1,
        }),
        Request::Routing,
        Request::Shard {
            key: b"user-42".to_vec(),
            tag: "kv.get".to_owned(),
            payload: vec![0],
        },
        Request::HandoffChunk {
            from: 1,
            epoch: 5,
            shard: 3,
            offset: 4096,
            total: 8192,
            bytes: vec![0xab; 32],
        },
        Request::WatchRouting { epoch: 5 },
        Request::ShardAt {
            key: b"user-42".to_vec(),
            tag: "kv.put".to_owned(),
            payload: vec![1, 2],
            epoch: 5,
        },
        Request::ShardOnce {
            key: b"user-42".to_vec(),
            tag: "kv.incr".to_owned(),
            payload: vec![1, 2],
            epoch: 5,
            once: sample_once(),
        },
        Request::ForwardOnce {
            key: b"user-42".to_vec(),
            tag: "kv.incr".to_owned(),
            payload: vec![1, 2],
            epoch: 5,
            once: sample_once(),
        },
    ];
    let responses = vec![
        Response::AppendEntries(Ok(AppendEntriesResponse::Success)),
        Response::AppendEntries(Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(
            1, 1, 3,
        ))))),
        Response::AppendEntries(Ok(AppendEntriesResponse::HigherVote(Vote::new(4, 3)))),
        Response::AppendEntries(Err(RemoteRaftError::Fatal {
            stopped: false,
            message: "when Write Logs: disk full".to_owned(),
        })),
        Response::Vote {
            result: Ok(VoteResponse {
                vote: Vote::new(3, 2),
                vote_granted: true,
                last_log_id: Some(log_id(2, 2, 4)),
            }),
            since_contact: Some(std::time::Duration::from_micros(312_345)),
        },
        Response::InstallSnapshot(Ok(InstallSnapshotResponse { vote })),
        Response::Admin(Ok(AdminResponse::Status(sample_status()))),
        Response::Admin(Err(AdminError::NotLeader { leader: Some(2) })),
        Response::Shard(Ok(vec![1, 2, 3])),
        Response::Shard(Err(Error::WrongOwner {
            shard: 3,
            owner: 2,
            epoch: 5,
        })),
        Response::Shard(Err(Error::NotReady {
            reason: NotReadyReason::NoLeader,
        })),
        Response::Shard(Err(Error::Timeout {
            shard: 3,
            after: Duration::from_millis(1500),
        })),
        Response::Lease(Ok(LeaseGrant {
            request_id: 17,
            incarnation: 1,
            epoch: 5,
        })),
        Response::Lease(Err(LeaseRefusal::StaleEpoch { newest: 6 })),
        Response::HandoffAccepted,
        Response::Proposed(Ok(CommandResponse::Released {
            shards: vec![3],
            epoch: 6,
        })),
        Response::Routing(RoutingInfo {
            epoch: 5,
            owners: vec![1, 2, 1, 2, 1, 2, 1, 2],
            addrs: vec![
                (1, "127.0.0.1:7001".to_owned()),
                (2, "127.0.0.1:7002".to_owned()),
            ],
        }),
        Response::HandoffRefused {
            reason: "piece out of order".to_owned(),
        },
    ];
    let mut seeds: Vec<Vec<u8>> = requests.iter().map(wire_encoded).collect();
    seeds.extend(responses.iter().map(wire_encoded));
    seeds
}

fn storage_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = sample_entries().iter().map(storage_encoded).collect();
    seeds.push(storage_encoded(&Vote::<NodeId>::new_committed(2, 1)));
    seeds.push(storage_encoded(&Vote::<NodeId>::new(3, 2)));
    seeds.push(storage_encoded(&Some(log_id(2, 2, 4))));
    seeds.push(storage_encoded(&None::<LogId<NodeId>>));
    seeds.push(storage_encoded(&log_id(1, 1, 1)));
    seeds.push(storage_encoded(&SnapshotRecord {
        meta: sample_snapshot_meta(),
        data: storage_encoded(&sample_state()),
    }));
    seeds.push(storage_encoded(&sample_state()));
    seeds.push(
        serde_json::to_vec(&Identity {
            cluster_name: "clusterfunk".to_owned(),
            node_id: 1,
        })
        .unwrap_or_default(),
    );
    seeds
}

/// A request id with a low watermark, as a client's retry carries it.
fn sample_once() -> crate::session::Once {
    crate::session::Once {
        session: crate::session::SessionId::from_bytes([7; 16]),
        seq: 12,
        low: 9,
        age_ms: 1_500,
        attempt: 1,
        idempotent: false,
    }
}
