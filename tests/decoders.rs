//! The decoders under the fuzz targets (`tests/fuzz`), on stable: every input of the fuzz
//! corpus, random bytes, and real messages with bits flipped, bytes changed, cut or added. Each
//! input goes through the same `clusterfunk::fuzzing` function the fuzz target calls, which
//! panics if a decoder panics or breaks one of its properties (see that module).
//!
//! `cargo test --test decoders -- --ignored` writes the seeds (valid encodings of real
//! messages) into the corpus directories; see `tests/fuzz/README.md`.

use std::path::PathBuf;

use clusterfunk::fuzzing::Target;
use proptest::prelude::*;

fn corpus_dir(target: Target) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target.name())
}

#[test]
fn every_corpus_input_decodes_or_is_refused_without_panicking() {
    for target in Target::ALL {
        let dir = corpus_dir(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
        let mut inputs = 0;
        for entry in entries {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            target.run(&data);
            inputs += 1;
        }
        assert!(inputs > 0, "corpus {} is empty", dir.display());
    }
}

#[test]
fn seeds_are_real_messages_that_decode_without_panicking() {
    for target in Target::ALL {
        let seeds = target.seeds();
        assert!(
            seeds.len() >= 5,
            "{} has {} seeds",
            target.name(),
            seeds.len()
        );
        for seed in seeds {
            target.run(&seed);
        }
    }
}

#[test]
fn seeds_decode_as_the_messages_they_encode() {
    use clusterfunk::admin::{AdminError, AdminRequest, AdminResponse};
    use clusterfunk::internals::decode;
    use clusterfunk::internals::{Request, Response};
    for seed in Target::Wire.seeds() {
        assert!(
            decode::<Request>(&seed).is_ok() || decode::<Response>(&seed).is_ok(),
            "a wire seed is neither a Request nor a Response"
        );
    }
    for seed in Target::Admin.seeds() {
        assert!(
            decode::<AdminRequest>(&seed).is_ok()
                || decode::<AdminResponse>(&seed).is_ok()
                || decode::<AdminError>(&seed).is_ok()
                || decode::<Result<AdminResponse, AdminError>>(&seed).is_ok(),
            "an admin seed is no admin message"
        );
    }
}

/// Writes every target's seeds into its corpus directory as `seed-<target>-<n>`. Run by hand
/// after the messages change, then minimise the corpus (`tests/fuzz/README.md`).
#[test]
#[ignore = "writes into tests/fuzz/corpus; run by hand"]
fn write_seeds_into_the_corpus() {
    for target in Target::ALL {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (n, seed) in target.seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{}-{n:02}", target.name())), seed)
                .expect("seed written");
        }
    }
}

/// One way to spoil a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { at: usize, bit: u8 },
    SetByte { at: usize, value: u8 },
    Truncate { len: usize },
    Extend { bytes: Vec<u8> },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

impl Mutation {
    fn apply(&self, data: &mut Vec<u8>) {
        let at = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
        match self {
            Mutation::FlipBit { at: i, bit } => {
                if !data.is_empty() {
                    let i = at(*i, data.len());
                    data[i] ^= 1 << (bit % 8);
                }
            }
            Mutation::SetByte { at: i, value } => {
                if !data.is_empty() {
                    let i = at(*i, data.len());
                    data[i] = *value;
                }
            }
            Mutation::Truncate { len } => data.truncate(at(*len, data.len() + 1)),
            Mutation::Extend { bytes } => data.extend_from_slice(bytes),
            Mutation::Insert { at: i, bytes } => {
                let i = at(*i, data.len() + 1);
                data.splice(i..i, bytes.iter().copied());
            }
            Mutation::Remove { at: i, len } => {
                let i = at(*i, data.len() + 1);
                let end = (i + len).min(data.len());
                data.drain(i..end);
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = proptest::collection::vec(any::<u8>(), 1..16);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        // Bytes a length prefix or a varint tag is made of.
        (
            any::<usize>(),
            prop_oneof![
                Just(0u8),
                Just(0xff),
                Just(251),
                Just(252),
                Just(253),
                any::<u8>()
            ]
        )
            .prop_map(|(at, value)| Mutation::SetByte { at, value }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        bytes.clone().prop_map(|bytes| Mutation::Extend { bytes }),
        (any::<usize>(), bytes).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    proptest::sample::select(Target::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic_a_decoder(
        target in target(),
        data in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        target.run(&data);
    }

    #[test]
    fn real_messages_with_bits_flipped_cut_or_extended_never_panic_a_decoder(
        target in target(),
        seed in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let seeds = target.seeds();
        let mut data = seeds[seed.index(seeds.len())].clone();
        for mutation in &mutations {
            mutation.apply(&mut data);
        }
        target.run(&data);
    }
}

/// The answer to an append-entries request in the wire layout nodes used before raft errors
/// were flattened (`RemoteRaftError`): openraft's `RaftError` itself, whose `AnyError` cause
/// nests `levels` deep (3 bytes a level, 5 bytes each). Before the fix, 100 000 levels (500 KB,
/// well under the 16 MiB frame limit) overflowed the stack of any node or client decoding it.
fn response_nesting_errors(levels: usize) -> Vec<u8> {
    use openraft::error::{Fatal, RaftError};
    use openraft::raft::AppendEntriesResponse;
    use openraft::{AnyError, StorageError, StorageIOError};

    /// `Response` as it was: variant 0 carried openraft's error.
    #[derive(serde::Serialize)]
    enum OldResponse {
        AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    }

    const MARKER: &[u8] = b"nested-error-marker";
    let response = OldResponse::AppendEntries(Err(RaftError::Fatal(Fatal::StorageError(
        StorageError::IO {
            source: StorageIOError::read(AnyError::error(String::from_utf8_lossy(MARKER))),
        },
    ))));
    let bytes = clusterfunk::internals::encode(&response).expect("encodes");
    // The AnyError as encoded: typ None, the message's length and bytes, source None,
    // context empty, backtrace None.
    let at = bytes
        .windows(MARKER.len())
        .position(|window| window == MARKER)
        .expect("the marker is in the encoding");
    let (start, end) = (at - 2, at + MARKER.len() + 3);
    assert_eq!(bytes[start..at], [0, MARKER.len() as u8]);
    assert_eq!(bytes[at + MARKER.len()..end], [0, 0, 0]);
    let mut nested = bytes[..start].to_vec();
    for _ in 0..levels {
        nested.extend_from_slice(&[0, 0, 1]); // typ None, msg "", source Some(..
    }
    nested.extend_from_slice(&[0, 0, 0, 0, 0]); // the innermost: no source
    for _ in 0..levels {
        nested.extend_from_slice(&[0, 0]); // ..) context [], backtrace None
    }
    nested.extend_from_slice(&bytes[end..]);
    nested
}

#[test]
fn a_response_nesting_a_few_errors_is_decoded_or_refused_without_panicking() {
    let bytes = response_nesting_errors(8);
    let _ = clusterfunk::internals::decode::<clusterfunk::internals::Response>(&bytes);
    Target::Wire.run(&bytes);
}

/// Found while fuzzing (issue 13): the codec has no nesting limit, and openraft's `AnyError`
/// (inside the raft errors `Response` carried) nests without bound, so 100 000 levels aborted
/// the decoding process with a stack overflow. Raft errors now cross the wire flat
/// (`RemoteRaftError`); no `Request`, `Response` or stored record nests.
#[test]
fn a_response_nesting_errors_deeply_is_refused_without_overflowing_the_stack() {
    let bytes = response_nesting_errors(100_000);
    std::thread::Builder::new()
        .stack_size(2 << 20) // a tokio worker's
        .spawn(move || Target::Wire.run(&bytes))
        .expect("thread")
        .join()
        .expect("no panic");
}
