//! A record of the data dir decoded by the storage codec as each record kind.
//! The checks live in `clusterfunk::fuzzing::storage`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clusterfunk::fuzzing::storage(data));
