//! The one wire and disk format: bincode 2 (standard configuration) over serde.
//!
//! Everything that leaves the process goes through these functions, so the format can change in
//! one place. Decoding is bounded by [`DECODE_LIMIT_BYTES`] so a corrupt length prefix cannot make
//! the decoder allocate without bound. This module knows nothing about what it encodes; [`Handoff`] is an encoded
//! value with a name (a shard's state on its way to the shard's next owner).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The largest snapshot a node accepts for one shard in a [`Handoff`] (receivers stage chunks in
/// memory).
pub(crate) const SNAPSHOT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// The largest value [`decode`] accepts: 64 MiB.
pub const DECODE_LIMIT_BYTES: usize = 64 << 20;

/// The capacity [`encode`] starts with. bincode's own `encode_to_vec` starts empty and grows
/// the buffer by doubling from 8 bytes, which costs a typical forwarded request or reply (30 to
/// 100 bytes) four or five reallocations; this holds such a message in one allocation, and
/// larger values still grow by doubling from here.
const ENCODE_CAPACITY_INITIAL: usize = 128;

/// Encodes `value` into a new buffer.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut writer = VecWriter(Vec::with_capacity(ENCODE_CAPACITY_INITIAL));
    bincode::serde::encode_into_writer(value, &mut writer, bincode::config::standard())
        .map_err(|e| Error::Codec(format!("encode: {e}")))?;
    Ok(writer.0)
}

/// Lets bincode append to a `Vec` we sized.
struct VecWriter(Vec<u8>);

impl bincode::enc::write::Writer for VecWriter {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes a `T` from `bytes`, refusing anything that would need more than
/// `DECODE_LIMIT_BYTES`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    decode_limited::<T, DECODE_LIMIT_BYTES>(bytes)
}

/// Decodes a handoff snapshot's own structure, which may be as large as a snapshot may be
/// ([`SNAPSHOT_BYTES_MAX`]) rather than one message.
pub(crate) fn decode_snapshot<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    decode_limited::<T, { SNAPSHOT_BYTES_MAX as usize }>(bytes)
}

fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, Error> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    bincode::serde::decode_from_slice(bytes, config)
        .map(|(value, _)| value)
        .map_err(|e| Error::Codec(format!("decode: {e}")))
}

/// An opaque snapshot of a shard's state, handed from the old owner of a shard to the new one on
/// a planned move (`on_deactivate` returns it, `on_restore` receives it). Cloning it is cheap
/// (the bytes are shared), so the handoff ledger can apply each event to a copy of its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    bytes: bytes::Bytes,
}

impl Handoff {
    /// Encodes `state` with the crate's wire codec.
    pub fn encode<T: Serialize>(state: &T) -> Result<Self, Error> {
        encode(state).map(Handoff::from_bytes)
    }

    /// Decodes the snapshot back into `T`; fails if it was encoded from another type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        decode(&self.bytes)
    }

    /// Wraps raw bytes (for handlers that bring their own format).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Handoff {
            bytes: bytes.into(),
        }
    }

    /// The raw bytes of the snapshot.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_any_value(v in proptest::collection::vec(any::<(u64, String, Option<i32>)>(), 0..20)) {
            let bytes = encode(&v).unwrap();
            let back: Vec<(u64, String, Option<i32>)> = decode(&bytes).unwrap();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<Vec<(u64, String)>>(&bytes);
        }
    }

    #[test]
    fn encoding_matches_bincode_encode_to_vec() {
        // The pre-sized writer must not change a single byte of the format.
        let small = (7u64, "tag".to_string(), vec![1u8; 32]);
        let large = vec![0xabu8; 10 * ENCODE_CAPACITY_INITIAL];
        let standard = bincode::config::standard();
        assert_eq!(
            encode(&small).unwrap(),
            bincode::serde::encode_to_vec(&small, standard).unwrap()
        );
        assert_eq!(
            encode(&large).unwrap(),
            bincode::serde::encode_to_vec(&large, standard).unwrap()
        );
    }

    #[test]
    fn huge_length_prefix_is_refused_not_allocated() {
        // A varint length of 2^40 elements followed by nothing.
        let bytes = [253u8, 0, 0, 0, 0, 1, 0, 0, 0];
        assert!(decode::<Vec<u8>>(&bytes).is_err());
    }
}
