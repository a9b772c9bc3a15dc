//! The shared cluster secret that both ends of every connection prove they hold.
//!
//! This file owns only loading and validating the secret bytes. How the secret is used (the
//! challenge–response handshake) lives in `handshake.rs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Shortest secret accepted, in bytes. A peer that does not hold the secret still receives a
/// handshake proof it can test guesses against offline, so the secret must be too large a
/// space to search.
pub const SECRET_LENGTH_MIN: usize = 24;

/// Fewest distinct byte values a secret must contain: a long run of one character (sixteen
/// spaces, a repeated letter) is long but easy to guess. Random secrets pass with room to spare
/// (32 random bytes hold about 30 distinct values; 48 hex digits about 16).
pub const SECRET_DISTINCT_MIN: usize = 10;

/// Environment variable read by [`Secret::from_env`].
pub const SECRET_ENV_VAR: &str = "CLUSTERFUNK_SECRET";

/// Advice appended to secret errors: how to make a good secret.
const SECRET_ADVICE: &str =
    "use at least 24 random bytes: `clusterfunk new-secret > FILE` writes a fresh one (or `head -c 32 /dev/urandom | base64`)";

/// The cluster secret: bytes every node (and every trusted client) of one cluster shares.
///
/// `Debug` prints it redacted, and there is deliberately no `Display` and no `PartialEq` (a
/// comparison would not be constant-time). Cloning is cheap (the bytes are shared).
#[derive(Clone)]
pub struct Secret {
    bytes: Arc<[u8]>,
}

/// Why a [`Secret`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret file could not be read.
    #[error("cannot read the cluster secret file {path}: {source}; check the path given to --secret-file and its permissions")]
    Read {
        /// The file that was to be read.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The secret is empty (after trimming the trailing newline).
    #[error("the cluster secret from {origin} is empty; {SECRET_ADVICE}")]
    Empty {
        /// Where the secret came from (a file, the environment, or code).
        origin: String,
    },
    /// The secret is shorter than [`SECRET_LENGTH_MIN`].
    #[error("the cluster secret from {origin} is {length} bytes long, shorter than the minimum of {SECRET_LENGTH_MIN}; {SECRET_ADVICE}")]
    TooShort {
        /// Where the secret came from (a file, the environment, or code).
        origin: String,
        /// Its length in bytes.
        length: usize,
    },
    /// The secret is long enough but made of fewer than [`SECRET_DISTINCT_MIN`] distinct byte
    /// values (a repeated character, a short pattern): easy to guess.
    #[error("the cluster secret from {origin} has only {distinct} distinct byte values, fewer than the minimum of {SECRET_DISTINCT_MIN}, so it is easy to guess; {SECRET_ADVICE}")]
    TooWeak {
        /// Where the secret came from (a file, the environment, or code).
        origin: String,
        /// How many distinct byte values it holds.
        distinct: usize,
    },
    /// The secret is a shorter piece repeated (`password1234password1234`): as easy to guess
    /// as the piece.
    #[error("the cluster secret from {origin} is a {period}-byte piece repeated, so it is as easy to guess as the piece; {SECRET_ADVICE}")]
    Repeated {
        /// Where the secret came from (a file, the environment, or code).
        origin: String,
        /// The length of the repeated piece.
        period: usize,
    },
    /// `CLUSTERFUNK_SECRET` is set but is not valid UTF-8.
    #[error("the {SECRET_ENV_VAR} environment variable is not valid UTF-8; {SECRET_ADVICE}, or use --secret-file")]
    NotUnicode,
}

impl Secret {
    /// Wraps secret bytes given by code. Fails if they are empty, shorter than
    /// [`SECRET_LENGTH_MIN`] or hold fewer than [`SECRET_DISTINCT_MIN`] distinct byte values.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        Self::validated(bytes.into(), "Secret::new")
    }

    /// Reads the secret from the `CLUSTERFUNK_SECRET` environment variable, trimming a trailing
    /// newline. Returns `Ok(None)` when the variable is not set: whether that means insecure mode
    /// or an error is the caller's decision.
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        match std::env::var(SECRET_ENV_VAR) {
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::NotUnicode),
            Ok(value) => Self::validated(
                trim_newline(value.into_bytes()),
                &format!("the {SECRET_ENV_VAR} environment variable"),
            )
            .map(Some),
        }
    }

    /// Reads the secret from a file, trimming a trailing newline (editors and `echo` add one).
    /// Fails if the file cannot be read, or the secret is empty or too weak (see
    /// [`new`](Self::new)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SecretError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::validated(trim_newline(bytes), &format!("the file {}", path.display()))
    }

    /// A fresh secret of 32 random bytes from the operating system, written as 64 lowercase
    /// hex digits (so it can go in a file or an environment variable as it is). What
    /// `clusterfunk new-secret` prints.
    pub fn generate_hex() -> Result<String, std::io::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|error| {
            std::io::Error::other(format!(
                "the operating system's random source failed: {error}"
            ))
        })?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The secret bytes, for keying the handshake MAC.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn validated(bytes: Vec<u8>, origin: &str) -> Result<Self, SecretError> {
        if bytes.is_empty() {
            return Err(SecretError::Empty {
                origin: origin.to_owned(),
            });
        }
        if bytes.len() < SECRET_LENGTH_MIN {
            return Err(SecretError::TooShort {
                origin: origin.to_owned(),
                length: bytes.len(),
            });
        }
        let distinct = distinct_bytes(&bytes);
        if distinct < SECRET_DISTINCT_MIN {
            return Err(SecretError::TooWeak {
                origin: origin.to_owned(),
                distinct,
            });
        }
        if let Some(period) = repeated_period(&bytes) {
            return Err(SecretError::Repeated {
                origin: origin.to_owned(),
                period,
            });
        }
        Ok(Self {
            bytes: bytes.into(),
        })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How many different byte values `bytes` holds.
fn distinct_bytes(bytes: &[u8]) -> usize {
    let mut seen = [false; 256];
    for &b in bytes {
        seen[usize::from(b)] = true;
    }
    seen.iter().filter(|&&s| s).count()
}

/// The length of the shortest piece that `bytes` repeats (at least twice, the last time
/// perhaps cut short), if there is one.
fn repeated_period(bytes: &[u8]) -> Option<usize> {
    (1..=bytes.len() / 2).find(|&period| bytes[period..] == bytes[..bytes.len() - period])
}

/// Drops trailing `\n` and `\r\n`: only line ends, since other whitespace may be part of the
/// secret.
fn trim_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let secret = Secret::new("0123456789abcdef-very-secret").expect("long enough");
        let printed = format!("{secret:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn trims_only_line_ends() {
        assert_eq!(trim_newline(b"abc \r\n\n".to_vec()), b"abc ".to_vec());
        assert_eq!(trim_newline(b"\n".to_vec()), Vec::<u8>::new());
    }

    #[test]
    fn new_rejects_short_and_empty() {
        assert!(matches!(Secret::new(""), Err(SecretError::Empty { .. })));
        assert!(matches!(
            Secret::new("short"),
            Err(SecretError::TooShort { length: 5, .. })
        ));
        assert!(matches!(
            Secret::new("0123456789abcdefghijklm"),
            Err(SecretError::TooShort { length: 23, .. })
        ));
        assert!(Secret::new("0123456789abcdefghijklmn").is_ok());
    }

    #[test]
    fn a_long_secret_of_few_distinct_bytes_is_refused_as_too_weak() {
        // The attack's secret: sixteen spaces (now also too short), and longer repetitions.
        assert!(Secret::new(" ".repeat(16)).is_err());
        for weak in [" ".repeat(64), "ab".repeat(32), "012345678".repeat(4)] {
            match Secret::new(weak.clone()) {
                Err(SecretError::TooWeak { distinct, .. }) => {
                    assert!(distinct < SECRET_DISTINCT_MIN, "{weak:?}")
                }
                other => panic!("{weak:?} should be too weak, got {other:?}"),
            }
        }
        let message = Secret::new("ab".repeat(32)).expect_err("weak").to_string();
        assert!(message.contains("clusterfunk new-secret"), "{message}");
        // The command-line contract check's secret passes.
        assert!(Secret::new("contract-check-secret-0123456789").is_ok());
    }

    #[test]
    fn a_secret_that_repeats_a_shorter_piece_is_refused() {
        for weak in [
            "password1234password1234",
            "Correct-Horse!9Correct-Horse!9Co",
        ] {
            assert!(
                matches!(Secret::new(weak), Err(SecretError::Repeated { .. })),
                "{weak:?} should be refused as repeated"
            );
        }
        assert_eq!(repeated_period(b"abcabcab"), Some(3));
        assert_eq!(repeated_period(b"abcabd"), None);
        let message = Secret::new("password1234password1234")
            .expect_err("repeated")
            .to_string();
        assert!(message.contains("12-byte piece repeated"), "{message}");
    }

    #[test]
    fn generated_secrets_are_accepted_and_differ() {
        let a = Secret::generate_hex().expect("random source");
        let b = Secret::generate_hex().expect("random source");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(Secret::new(a).is_ok());
    }
}
