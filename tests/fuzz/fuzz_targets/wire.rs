//! A transport payload decoded as the node protocol's Request and Response.
//! The checks live in `clusterfunk::fuzzing::wire`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clusterfunk::fuzzing::wire(data));
