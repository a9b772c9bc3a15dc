//! The one place where storage records are turned into bytes and back.
//!
//! Every value the storage module writes (log entries, vote, committed and purged log ids,
//! snapshots, and the state blob inside a snapshot) goes through [`encode`] and [`decode`], so the
//! on-disk format can change in one place. The format is one version byte followed by bincode 2
//! (`config::standard()`, the same encoding the transport uses on the wire).
//!
//! Decoding is given a size limit: bincode trusts length prefixes, and a flipped bit in a length
//! would otherwise make it allocate terabytes and abort the process instead of returning an error.
//! Keys are not encoded here: log keys are big-endian `u64` (heed's `U64<BigEndian>`) so LMDB's
//! byte order is index order, and meta keys are fixed strings.

use bincode::config::{self, Config};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Version byte written in front of every record. Bump it (and keep a decoder for the old one)
/// when the layout of any stored type changes.
///
/// Version 2 added the cluster state's `owned_since` (the state inside snapshots); every other
/// record is laid out as in version 1, so [`decode`] reads both, and the state machine decodes a
/// version-1 state through its application's legacy decoder.
pub(crate) const FORMAT_VERSION: u8 = 2;

/// The oldest version [`decode`] reads.
pub(crate) const FORMAT_VERSION_OLDEST: u8 = 1;

/// Largest record, in bytes, that is written or read. Larger claims inside a record are treated as
/// corruption. 256 MiB is far above any raft entry or shard-map snapshot this crate produces and
/// far below the default 1 GiB map size.
pub(crate) const RECORD_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The record is empty, so it has not even a version byte.
    #[error("record is empty (no format version byte)")]
    Empty,
    /// The record was written in a format this build does not read.
    #[error("record has format version {found}, this build reads version {FORMAT_VERSION}")]
    UnknownVersion {
        /// The version byte found in the record.
        found: u8,
    },
    /// bincode rejected the bytes (truncated, bad enum tag, length over the limit, ...).
    #[error("bincode could not decode the record: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The value decoded but did not use the whole record, which means the bytes are not what
    /// this build wrote.
    #[error("record has {trailing} unexpected trailing bytes after the value")]
    TrailingBytes {
        /// How many bytes were left over.
        trailing: usize,
    },
    /// The record decoded, but holds the log entry of another index than its key.
    #[error("record holds the log entry of index {found}, not the one of its key")]
    WrongKey {
        /// The index inside the record.
        found: u64,
    },
    /// bincode could not encode the value (a `Serialize` impl returned an error).
    #[error("bincode could not encode the value: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The encoded value is larger than the 256 MiB record limit, so it could not be read back.
    #[error("encoded record is {bytes} bytes, over the {RECORD_BYTES_MAX}-byte limit")]
    TooLarge {
        /// Size of the encoded value.
        bytes: usize,
    },
}

fn bincode_config() -> impl Config {
    config::standard().with_limit::<RECORD_BYTES_MAX>()
}

/// Encodes `value` as one storage record.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut bytes, bincode_config())?;
    if bytes.len() > RECORD_BYTES_MAX {
        return Err(CodecError::TooLarge { bytes: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes one storage record written by [`encode`]. Never panics on bad input.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::UnknownVersion { found: version });
    }
    decode_body(body)
}

/// The version byte of a record written by [`encode`].
pub(crate) fn version(bytes: &[u8]) -> Result<u8, CodecError> {
    bytes.first().copied().ok_or(CodecError::Empty)
}

/// Decodes a record's body (after its version byte), whole.
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(body, bincode_config())?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes {
            trailing: body.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_value_with_version_byte() {
        let value = (7_u64, String::from("shard"), vec![1_u8, 2, 3]);
        let bytes = encode(&value).expect("encoding a tuple cannot fail");
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: (u64, String, Vec<u8>) = decode(&bytes).expect("round trip");
        assert_eq!(back, value);
    }

    #[test]
    fn rejects_empty_unknown_version_and_trailing_bytes() {
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<u64>(&[FORMAT_VERSION + 1, 0]),
            Err(CodecError::UnknownVersion { .. })
        ));
        let mut bytes = encode(&5_u64).expect("encode");
        bytes.push(0);
        assert!(matches!(
            decode::<u64>(&bytes),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        // A Vec<u8> whose varint length claims u64::MAX bytes: without the limit bincode would
        // try to allocate it and abort the process.
        let mut bytes = vec![FORMAT_VERSION, 253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Vec<u8>>(&bytes),
            Err(CodecError::Decode(_))
        ));
    }
}
