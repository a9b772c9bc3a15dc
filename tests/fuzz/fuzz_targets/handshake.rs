//! One side of the connection handshake against a peer that sends these bytes.
//! The checks live in `clusterfunk::fuzzing::handshake`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clusterfunk::fuzzing::handshake(data));
