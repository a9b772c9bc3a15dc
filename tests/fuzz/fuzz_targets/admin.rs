//! A transport payload decoded as each admin message.
//! The checks live in `clusterfunk::fuzzing::admin`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clusterfunk::fuzzing::admin(data));
