//! The shared cluster secret that both ends of every connection prove they hold.
//!
//! This file owns only loading and validating the secret bytes. How the secret is used (the
//! challenge–response handshake) lives in `handshake.rs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Shortest secret accepted, in bytes. Anything shorter is too easy to guess offline from one
/// recorded handshake.
pub const SECRET_LENGTH_MIN: usize = 16;

/// Environment variable read by [`Secret::from_env`].
pub const SECRET_ENV_VAR: &str = "CLUSTERFUNK_SECRET";

/// Advice appended to secret errors: how to make a good secret.
const SECRET_ADVICE: &str =
    "use at least 16 random bytes, for example the output of `head -c 32 /dev/urandom | base64`";

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
    /// `CLUSTERFUNK_SECRET` is set but is not valid UTF-8.
    #[error("the {SECRET_ENV_VAR} environment variable is not valid UTF-8; {SECRET_ADVICE}, or use --secret-file")]
    NotUnicode,
}

impl Secret {
    /// Wraps secret bytes given by code. Fails if they are empty or shorter than
    /// [`SECRET_LENGTH_MIN`].
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
    /// Fails if the file cannot be read, or the secret is empty or shorter than
    /// [`SECRET_LENGTH_MIN`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SecretError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::validated(trim_newline(bytes), &format!("the file {}", path.display()))
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
        assert!(Secret::new([7u8; SECRET_LENGTH_MIN]).is_ok());
    }
}
