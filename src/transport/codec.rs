//! The wire format: how one frame is laid out in bytes. All encoding and decoding of the
//! transport lives here, so the format can change in one place.
//!
//! A frame is a 4-byte big-endian length (as tokio-util's `LengthDelimitedCodec` reads it)
//! followed by a [`Header`] encoded with bincode's standard configuration and, for requests and
//! responses, the raw payload bytes. The payload is appended as it is rather than encoded by
//! serde, which would walk it byte by byte and need one more copy.
//!
//! After an authenticated handshake, every frame of each direction ends with a
//! [`FRAME_TAG_LEN`]-byte tag: HMAC-SHA256, under that direction's key for this connection,
//! of the frame's sequence number in its direction and its body (header and payload), cut to
//! 128 bits. The sequence number is counted, not sent: a frame altered, injected, replayed,
//! reordered or dropped on the way fails the check on the next frame, and the connection
//! closes.
//!
//! This file does not know what payloads mean: upper layers encode their own messages.

use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::codec::length_delimited::LengthDelimitedCodecError;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::{TransportError, PROTOCOL_VERSION};

/// A handshake nonce: 32 random bytes.
pub(crate) type Nonce = [u8; 32];
/// An HMAC-SHA256 tag.
pub(crate) type Tag = [u8; 32];

/// Frame size limit until the handshake has authenticated the peer, so that an unknown peer
/// cannot make a node reserve a large buffer by announcing a huge frame.
pub(crate) const HANDSHAKE_FRAME_MAX: usize = 64 * 1024;
/// Longest reason string carried in `Refused` and `Failed`; longer ones are cut.
pub(crate) const REASON_LENGTH_MAX: usize = 4096;
/// Bytes of the tag that authenticates a frame after the handshake.
pub(crate) const FRAME_TAG_LEN: usize = 16;
/// Upper bound of what a `Request` or `Response` frame adds to its payload: its header (a
/// one-byte variant tag and a varint u64 of at most 9 bytes, rounded up to 16) and the tag.
pub(crate) const PAYLOAD_OVERHEAD_MAX: usize = 16 + FRAME_TAG_LEN;
/// Size of the length prefix.
const LENGTH_PREFIX: usize = 4;
/// bincode's limit while decoding a header: it bounds what a claimed string length can make the
/// decoder allocate. Headers are small; payloads are not decoded by bincode.
const HEADER_SIZE_MAX: usize = HANDSHAKE_FRAME_MAX;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<HEADER_SIZE_MAX>()
}

/// The header of a frame. The variant order is part of the protocol: append new variants at the
/// end, and keep `version` the first field of both hellos, so that a peer of another version can
/// still be told apart from garbage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Header {
    /// First frame of the connecting side.
    ClientHello {
        version: u32,
        cluster_name: String,
        node_id: Option<u64>,
        /// `None` in insecure mode.
        nonce: Option<Nonce>,
    },
    /// The accepting side's answer to `ClientHello`.
    ServerHello {
        version: u32,
        cluster_name: String,
        node_id: Option<u64>,
        /// `None` in insecure mode.
        nonce: Option<Nonce>,
    },
    /// The connecting side's proof that it holds the secret; `None` in insecure mode.
    ClientProof { proof: Option<Tag> },
    /// The server accepts the connection; requests may follow. Carries the server's proof
    /// that it holds the secret (`None` in insecure mode): the server proves only to a client
    /// that proved first, so a peer without the secret never receives a proof to test
    /// guesses against.
    Accepted { proof: Option<Tag> },
    /// Either side refuses the connection and closes it.
    Refused { reason: String },
    /// A request; the payload follows the header.
    Request { id: u64 },
    /// The response to request `id`; the payload follows the header.
    Response { id: u64 },
    /// The service failed request `id`.
    Failed { id: u64, reason: String },
}

impl Header {
    /// The variant's name, for logs and errors.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Header::ClientHello { .. } => "ClientHello",
            Header::ServerHello { .. } => "ServerHello",
            Header::ClientProof { .. } => "ClientProof",
            Header::Accepted { .. } => "Accepted",
            Header::Refused { .. } => "Refused",
            Header::Request { .. } => "Request",
            Header::Response { .. } => "Response",
            Header::Failed { .. } => "Failed",
        }
    }

    fn carries_payload(&self) -> bool {
        matches!(self, Header::Request { .. } | Header::Response { .. })
    }
}

/// One frame: a header and, for requests and responses, a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) header: Header,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    /// A frame without payload (`Vec::new` does not allocate).
    pub(crate) fn control(header: Header) -> Self {
        Self {
            header,
            payload: Vec::new(),
        }
    }

    pub(crate) fn request(id: u64, payload: Vec<u8>) -> Self {
        Self {
            header: Header::Request { id },
            payload,
        }
    }

    pub(crate) fn response(id: u64, payload: Vec<u8>) -> Self {
        Self {
            header: Header::Response { id },
            payload,
        }
    }

    pub(crate) fn failed(id: u64, reason: String) -> Self {
        Self::control(Header::Failed {
            id,
            reason: bounded_reason(reason),
        })
    }
}

/// Whether a payload of `len` bytes fits in a request or response frame of at most `max` bytes.
pub(crate) fn payload_fits(len: usize, max: usize) -> bool {
    len <= max.saturating_sub(PAYLOAD_OVERHEAD_MAX)
}

/// Cuts a reason to [`REASON_LENGTH_MAX`] bytes at a character boundary.
pub(crate) fn bounded_reason(mut reason: String) -> String {
    if reason.len() > REASON_LENGTH_MAX {
        let mut end = REASON_LENGTH_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// A key that authenticates the frames of one direction of one connection.
pub(crate) type FrameKey = [u8; 32];

/// Authenticates the frames of one direction: the keyed MAC state (computed once per
/// connection) and the sequence number of the next frame.
struct FrameAuth {
    mac: Hmac<Sha256>,
    next: u64,
}

impl FrameAuth {
    fn new(key: &FrameKey) -> Self {
        // HMAC takes keys of any length; a 32-byte key cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        Self { mac, next: 0 }
    }

    /// The MAC of the next frame's `body`, before truncation.
    fn mac_of(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(&self.next.to_be_bytes());
        mac.update(body);
        mac
    }
}

impl std::fmt::Debug for FrameAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameAuth")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// Encodes and decodes [`Frame`]s. Decoding delegates the length prefix to
/// `LengthDelimitedCodec`; encoding writes the same layout directly, so that header and payload
/// go into the write buffer without an intermediate copy.
#[derive(Debug)]
pub(crate) struct FrameCodec {
    framing: LengthDelimitedCodec,
    frame_size_max: usize,
    auth: Option<FrameAuth>,
}

impl FrameCodec {
    /// A codec accepting frames of at most `frame_size_max` bytes (without the length prefix).
    pub(crate) fn new(frame_size_max: usize) -> Self {
        Self {
            framing: LengthDelimitedCodec::builder()
                .length_field_type::<u32>()
                .max_frame_length(frame_size_max)
                .new_codec(),
            frame_size_max,
            auth: None,
        }
    }

    /// Authenticates every later frame with `key` (see the module documentation).
    pub(crate) fn authenticate(&mut self, key: &FrameKey) {
        self.auth = Some(FrameAuth::new(key));
    }

    /// Changes the limit, once the handshake has authenticated the peer.
    pub(crate) fn set_frame_size_max(&mut self, frame_size_max: usize) {
        self.framing.set_max_frame_length(frame_size_max);
        self.frame_size_max = frame_size_max;
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = TransportError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, TransportError> {
        let body = match self.framing.decode(src) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(error)
                if error
                    .get_ref()
                    .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>()) =>
            {
                // LengthDelimitedCodec leaves the prefix in place when it rejects it, so the
                // announced length can still be reported.
                let len = src
                    .get(..LENGTH_PREFIX)
                    .and_then(|prefix| <[u8; LENGTH_PREFIX]>::try_from(prefix).ok())
                    .map_or(usize::MAX, |prefix| u32::from_be_bytes(prefix) as usize);
                return Err(TransportError::FrameTooLarge {
                    len,
                    max: self.frame_size_max,
                });
            }
            Err(error) => return Err(TransportError::Io(error)),
        };
        let Some(auth) = self.auth.as_mut() else {
            return decode_body(&body).map(Some);
        };
        let Some(content_len) = body.len().checked_sub(FRAME_TAG_LEN) else {
            return Err(forged(auth.next, "it is shorter than its tag"));
        };
        let (content, tag) = body.split_at(content_len);
        // `verify_truncated_left` compares in constant time.
        if auth.mac_of(content).verify_truncated_left(tag).is_err() {
            return Err(forged(auth.next, "its tag does not match"));
        }
        auth.next = auth.next.wrapping_add(1);
        decode_body(content).map(Some)
    }
}

/// A frame that fails authentication: altered, injected, replayed or reordered on the way.
fn forged(sequence: u64, why: &str) -> TransportError {
    TransportError::Protocol {
        reason: format!("frame {sequence} of this connection failed authentication ({why}): it was altered, injected, replayed or reordered on the way; the connection is closed (a network device or relay between the nodes is tampering with the traffic)"),
    }
}

fn decode_body(body: &[u8]) -> Result<Frame, TransportError> {
    let (header, used): (Header, usize) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|error| TransportError::Protocol {
            reason: describe_undecodable(body, &error),
        })?;
    let rest = body.get(used..).unwrap_or_default();
    if !header.carries_payload() && !rest.is_empty() {
        return Err(TransportError::Protocol {
            reason: format!(
                "{} trailing bytes after a {} frame",
                rest.len(),
                header.kind()
            ),
        });
    }
    Ok(Frame {
        header,
        payload: rest.to_vec(),
    })
}

/// Explains an undecodable frame. A hello of another protocol version may not decode as ours,
/// but its first two fields (variant tag, version) do: report the version mismatch then, since
/// that is what the operator has to fix.
fn describe_undecodable(body: &[u8], error: &bincode::error::DecodeError) -> String {
    if let Ok(((variant, version), _)) =
        bincode::serde::decode_from_slice::<(u32, u32), _>(body, bincode_config())
    {
        if variant <= 1 && version != PROTOCOL_VERSION {
            return format!(
                "the peer speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}; run compatible clusterfunk releases on both sides"
            );
        }
    }
    format!(
        "undecodable frame ({error}); the peer is not a clusterfunk node of a compatible release"
    )
}

impl Encoder<Frame> for FrameCodec {
    type Error = TransportError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), TransportError> {
        let start = dst.len();
        dst.reserve(LENGTH_PREFIX + PAYLOAD_OVERHEAD_MAX + frame.payload.len());
        dst.put_u32(0); // patched below, once the length is known
        if let Err(error) =
            bincode::serde::encode_into_writer(&frame.header, BufWriter(dst), bincode_config())
        {
            dst.truncate(start);
            return Err(TransportError::Protocol {
                reason: format!("cannot encode a {} frame: {error}", frame.header.kind()),
            });
        }
        let tag_len = if self.auth.is_some() {
            FRAME_TAG_LEN
        } else {
            0
        };
        let len = dst.len() - start - LENGTH_PREFIX + frame.payload.len() + tag_len;
        let len_prefix = match u32::try_from(len) {
            Ok(len_prefix) if len <= self.frame_size_max => len_prefix,
            _ => {
                dst.truncate(start);
                return Err(TransportError::FrameTooLarge {
                    len,
                    max: self.frame_size_max,
                });
            }
        };
        dst.extend_from_slice(&frame.payload);
        if let Some(auth) = self.auth.as_mut() {
            let tag = auth
                .mac_of(&dst[start + LENGTH_PREFIX..])
                .finalize()
                .into_bytes();
            dst.extend_from_slice(&tag[..FRAME_TAG_LEN]);
            auth.next = auth.next.wrapping_add(1);
        }
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&len_prefix.to_be_bytes());
        Ok(())
    }
}

/// Lets bincode write straight into the frame buffer.
struct BufWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BufWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Both ends of one direction of a connection, for timing the frame codec
/// (`benches/codec.rs`): each round trip encodes a request frame as a sender does and decodes
/// it as the receiver does, tag and sequence number included when authenticated. Not a public
/// API.
#[doc(hidden)]
#[derive(Debug)]
pub struct FramePipe {
    sender: FrameCodec,
    receiver: FrameCodec,
    wire: BytesMut,
}

impl FramePipe {
    /// A pipe with the default 16 MiB frame limit, authenticated with a fixed key or plain.
    pub fn new(authenticated: bool) -> Self {
        let frame_size_max = 16 * 1024 * 1024;
        let mut sender = FrameCodec::new(frame_size_max);
        let mut receiver = FrameCodec::new(frame_size_max);
        if authenticated {
            let key = [0x42; 32];
            sender.authenticate(&key);
            receiver.authenticate(&key);
        }
        Self {
            sender,
            receiver,
            wire: BytesMut::new(),
        }
    }

    /// Sends `payload` as request `id` through the pipe; returns the payload received.
    pub fn round_trip(&mut self, id: u64, payload: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        self.sender
            .encode(Frame::request(id, payload), &mut self.wire)?;
        match self.receiver.decode(&mut self.wire)? {
            Some(frame) => Ok(frame.payload),
            None => Err(TransportError::Protocol {
                reason: "the frame did not arrive whole".to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) -> Frame {
        let mut codec = FrameCodec::new(HANDSHAKE_FRAME_MAX);
        let mut buffer = BytesMut::new();
        codec.encode(frame, &mut buffer).expect("encodes");
        let decoded = codec
            .decode(&mut buffer)
            .expect("decodes")
            .expect("whole frame");
        assert!(buffer.is_empty());
        decoded
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::request(u64::MAX, vec![1, 2, 3]),
            Frame::response(7, Vec::new()),
            Frame::failed(9, "nope".to_owned()),
            Frame::control(Header::Refused {
                reason: "go away".to_owned(),
            }),
            Frame::control(Header::ClientHello {
                version: PROTOCOL_VERSION,
                cluster_name: "c".to_owned(),
                node_id: Some(3),
                nonce: Some([5; 32]),
            }),
            Frame::control(Header::Accepted { proof: None }),
        ];
        for frame in frames {
            assert_eq!(round_trip(frame.clone()), frame);
        }
    }

    #[test]
    fn request_overhead_is_bounded() {
        let mut buffer = BytesMut::new();
        FrameCodec::new(HANDSHAKE_FRAME_MAX)
            .encode(Frame::request(u64::MAX, Vec::new()), &mut buffer)
            .expect("encodes");
        assert!(buffer.len() - LENGTH_PREFIX <= PAYLOAD_OVERHEAD_MAX);
    }

    #[test]
    fn layout_matches_length_delimited_codec() {
        let mut buffer = BytesMut::new();
        FrameCodec::new(HANDSHAKE_FRAME_MAX)
            .encode(Frame::request(1, vec![9; 100]), &mut buffer)
            .expect("encodes");
        let body = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .new_codec()
            .decode(&mut buffer)
            .expect("valid")
            .expect("whole frame");
        assert_eq!(body.len(), 102);
    }

    #[test]
    fn oversized_frames_are_rejected_both_ways() {
        let mut codec = FrameCodec::new(HANDSHAKE_FRAME_MAX);
        let mut buffer = BytesMut::new();
        let error = codec
            .encode(Frame::request(1, vec![0; HANDSHAKE_FRAME_MAX]), &mut buffer)
            .expect_err("too large");
        assert!(
            matches!(error, TransportError::FrameTooLarge { .. }),
            "{error}"
        );
        assert!(buffer.is_empty(), "a failed encode leaves nothing behind");

        let mut buffer = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let error = codec.decode(&mut buffer).expect_err("too large");
        assert!(
            matches!(error, TransportError::FrameTooLarge { len, max } if len == u32::MAX as usize && max == HANDSHAKE_FRAME_MAX),
            "{error}"
        );
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let mut buffer = BytesMut::new();
        buffer.put_u32(5);
        buffer.extend_from_slice(&[0xff; 5]);
        let error = FrameCodec::new(HANDSHAKE_FRAME_MAX)
            .decode(&mut buffer)
            .expect_err("garbage");
        assert!(matches!(error, TransportError::Protocol { .. }), "{error}");
    }

    #[test]
    fn trailing_bytes_after_control_frames_are_rejected() {
        let mut body =
            bincode::serde::encode_to_vec(Header::Accepted { proof: None }, bincode_config())
                .expect("encodes");
        body.push(0);
        assert!(decode_body(&body).is_err());
    }

    #[test]
    fn hello_of_another_version_is_reported_as_such() {
        // A future hello with an extra leading field would not decode; its version still does.
        let body = bincode::serde::encode_to_vec(
            (0u32, PROTOCOL_VERSION + 1, [0xffu8; 3]),
            bincode_config(),
        )
        .expect("encodes");
        let error = decode_body(&body).expect_err("not our hello");
        assert!(error.to_string().contains("protocol version"), "{error}");
    }

    /// A writer and a reader sharing one direction's key, as after a handshake.
    fn authenticated_pair(key: u8) -> (FrameCodec, FrameCodec) {
        let (mut writer, mut reader) = (
            FrameCodec::new(HANDSHAKE_FRAME_MAX),
            FrameCodec::new(HANDSHAKE_FRAME_MAX),
        );
        writer.authenticate(&[key; 32]);
        reader.authenticate(&[key; 32]);
        (writer, reader)
    }

    fn encoded(codec: &mut FrameCodec, frame: Frame) -> BytesMut {
        let mut buffer = BytesMut::new();
        codec.encode(frame, &mut buffer).expect("encodes");
        buffer
    }

    fn is_forged(result: Result<Option<Frame>, TransportError>) -> bool {
        matches!(result, Err(TransportError::Protocol { reason }) if reason.contains("failed authentication"))
    }

    #[test]
    fn authenticated_frames_round_trip_in_order() {
        let (mut writer, mut reader) = authenticated_pair(1);
        let mut wire = BytesMut::new();
        for id in 0..3 {
            wire.extend_from_slice(&encoded(
                &mut writer,
                Frame::request(id, vec![id as u8; 40]),
            ));
        }
        for id in 0..3 {
            let frame = reader.decode(&mut wire).expect("authentic").expect("whole");
            assert_eq!(frame, Frame::request(id, vec![id as u8; 40]));
        }
        assert!(wire.is_empty());
    }

    #[test]
    fn an_altered_byte_anywhere_in_an_authenticated_frame_fails() {
        let (mut writer, _) = authenticated_pair(1);
        let frame = encoded(&mut writer, Frame::request(7, b"put k v".to_vec()));
        for at in LENGTH_PREFIX..frame.len() {
            let (_, mut reader) = authenticated_pair(1);
            let mut altered = frame.clone();
            altered[at] ^= 0x01;
            assert!(
                is_forged(reader.decode(&mut altered)),
                "byte {at} altered went unnoticed"
            );
        }
    }

    #[test]
    fn replayed_reordered_injected_or_foreign_frames_fail() {
        let (mut writer, _) = authenticated_pair(1);
        let first = encoded(&mut writer, Frame::request(1, b"a".to_vec()));
        let second = encoded(&mut writer, Frame::request(2, b"b".to_vec()));

        let (_, mut reader) = authenticated_pair(1);
        let mut wire = first.clone();
        reader.decode(&mut wire).expect("first is authentic");
        let mut replay = first.clone();
        assert!(is_forged(reader.decode(&mut replay)), "replayed");

        let (_, mut reader) = authenticated_pair(1);
        let mut reordered = second.clone();
        assert!(is_forged(reader.decode(&mut reordered)), "reordered");

        let (_, mut reader) = authenticated_pair(1);
        let mut injected = encoded(
            &mut FrameCodec::new(HANDSHAKE_FRAME_MAX),
            Frame::request(1, b"a".to_vec()),
        );
        assert!(is_forged(reader.decode(&mut injected)), "untagged");

        let (mut other_writer, _) = authenticated_pair(2);
        let (_, mut reader) = authenticated_pair(1);
        let mut foreign = encoded(&mut other_writer, Frame::request(1, b"a".to_vec()));
        assert!(
            is_forged(reader.decode(&mut foreign)),
            "another connection's key"
        );
    }

    #[test]
    fn the_tag_counts_in_the_frame_limit() {
        let (mut writer, mut reader) = authenticated_pair(1);
        let fits = HANDSHAKE_FRAME_MAX - PAYLOAD_OVERHEAD_MAX;
        assert!(payload_fits(fits, HANDSHAKE_FRAME_MAX));
        let mut wire = encoded(&mut writer, Frame::request(u64::MAX, vec![0; fits]));
        assert!(reader.decode(&mut wire).expect("authentic").is_some());
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(REASON_LENGTH_MAX);
        let cut = bounded_reason(reason);
        assert!(cut.len() <= REASON_LENGTH_MAX);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
