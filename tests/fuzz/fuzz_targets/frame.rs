//! A stream of frames through the transport's frame codec, plain and authenticated.
//! The checks live in `clusterfunk::fuzzing::frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clusterfunk::fuzzing::frame(data));
