//! [`Credentials`]: how a tool, client or node proves who it is (TLS certificates, the cluster
//! secret, or nothing), and [`resolve_credentials`], which turns the binaries' options into
//! them. Used by [`AdminClient`](super::AdminClient) and the data client alike; the transport
//! that checks them lives in `transport` and `tls`.

use crate::transport::Secret;

/// How a tool, client or node proves who it is: what the binaries' `--tls-dir`,
/// `--secret-file`, `CLUSTERFUNK_SECRET` and `--insecure` resolve to.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// TLS with the certificates of one directory (`clusterfunk certs` writes them).
    Tls(crate::tls::TlsConfig),
    /// The shared cluster secret.
    Secret(Secret),
    /// Nothing: only clusters that run insecure accept it.
    Insecure,
}

impl Credentials {
    /// The cluster secret, if these are secret credentials.
    pub fn secret(&self) -> Option<Secret> {
        match self {
            Credentials::Secret(secret) => Some(secret.clone()),
            _ => None,
        }
    }

    /// The TLS settings, if these are TLS credentials.
    pub fn tls(&self) -> Option<crate::tls::TlsConfig> {
        match self {
            Credentials::Tls(tls) => Some(tls.clone()),
            _ => None,
        }
    }
}

/// Why [`resolve_credentials`] or [`resolve_secret`] found no credentials to use. Every message
/// says what to change; [`is_usage`](CredentialsError::is_usage) tells a contradictory or
/// missing choice (bad usage: the tools exit 2) from a file that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// `--tls-dir` and `--insecure` together.
    #[error("--tls-dir cannot be combined with --insecure: TLS authenticates every connection; drop one of them")]
    TlsAndInsecure,
    /// `--tls-dir` and a secret (`--secret-file` or the environment variable) together.
    #[error("--tls-dir cannot be combined with a cluster secret (--secret-file or {}): a cluster runs in one mode; drop the secret", crate::transport::SECRET_ENV_VAR)]
    TlsAndSecret,
    /// `--insecure` and a secret together: the secret would be used and `--insecure` ignored.
    #[error("--insecure cannot be combined with a cluster secret (from {origin}): a cluster runs in one mode; drop --insecure to use the secret, or {remedy} to run without one")]
    InsecureAndSecret {
        /// Where the secret came from: `--secret-file` or the environment variable.
        origin: &'static str,
        /// How to drop it.
        remedy: &'static str,
    },
    /// Neither a secret, nor `--tls-dir`, nor `--insecure`.
    #[error("no credentials: set {} or pass --secret-file FILE for a cluster with a secret, --tls-dir DIR for a cluster with certificates, or --insecure for a cluster without either", crate::transport::SECRET_ENV_VAR)]
    Missing,
    /// The secret could not be read or is unusable.
    #[error(transparent)]
    Secret(#[from] crate::transport::SecretError),
    /// The certificates could not be read or are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl CredentialsError {
    /// Whether the choice of options itself is wrong (contradictory or missing), as opposed to
    /// a secret or certificate that could not be read: command-line tools exit 2 (bad usage)
    /// on these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CredentialsError::TlsAndInsecure
                | CredentialsError::TlsAndSecret
                | CredentialsError::InsecureAndSecret { .. }
                | CredentialsError::Missing
        )
    }
}

/// Resolves credentials the way the binaries do: `--tls-dir` (which excludes a secret and
/// `--insecure`), else the secret as [`resolve_secret`] finds it.
pub fn resolve_credentials(
    tls_dir: Option<&std::path::Path>,
    secret_file: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Credentials, CredentialsError> {
    let Some(dir) = tls_dir else {
        return Ok(match resolve_secret(secret_file, insecure)? {
            Some(secret) => Credentials::Secret(secret),
            None => Credentials::Insecure,
        });
    };
    if insecure {
        return Err(CredentialsError::TlsAndInsecure);
    }
    if secret_file.is_some() || std::env::var_os(crate::transport::SECRET_ENV_VAR).is_some() {
        return Err(CredentialsError::TlsAndSecret);
    }
    Ok(Credentials::Tls(crate::tls::TlsConfig::from_dir(dir)?))
}

/// Resolves the cluster secret the way the binaries do: `--secret-file` first, then the
/// `CLUSTERFUNK_SECRET` environment variable. `insecure` means "no secret": with one of them
/// it is refused ([`CredentialsError::InsecureAndSecret`]) rather than silently ignored, and
/// without any of the three it is [`CredentialsError::Missing`].
pub fn resolve_secret(
    secret_file: Option<&std::path::Path>,
    insecure: bool,
) -> Result<Option<Secret>, CredentialsError> {
    let env_set = std::env::var_os(crate::transport::SECRET_ENV_VAR).is_some();
    secret_choice(secret_file.is_some(), env_set, insecure)?;
    if let Some(path) = secret_file {
        return Ok(Some(Secret::from_file(path)?));
    }
    Ok(Secret::from_env()?)
}

/// The rules of [`resolve_secret`] on what was given, before anything is read.
fn secret_choice(file: bool, env: bool, insecure: bool) -> Result<(), CredentialsError> {
    match (file, env, insecure) {
        (true, _, true) => Err(CredentialsError::InsecureAndSecret {
            origin: "--secret-file",
            remedy: "drop --secret-file",
        }),
        (false, true, true) => Err(CredentialsError::InsecureAndSecret {
            origin: crate::transport::SECRET_ENV_VAR,
            remedy: "unset the environment variable",
        }),
        (false, false, false) => Err(CredentialsError::Missing),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_with_a_secret_is_refused_as_bad_usage() {
        for (file, env) in [(true, false), (false, true), (true, true)] {
            let refused = secret_choice(file, env, true).expect_err("contradictory");
            assert!(
                matches!(refused, CredentialsError::InsecureAndSecret { .. }),
                "{refused}"
            );
            assert!(refused.is_usage());
            assert!(refused.to_string().contains("drop --insecure"), "{refused}");
        }
        let from_env = secret_choice(false, true, true).expect_err("contradictory");
        assert!(
            from_env
                .to_string()
                .contains(crate::transport::SECRET_ENV_VAR),
            "{from_env}"
        );
    }

    #[test]
    fn no_credentials_at_all_is_bad_usage_and_one_choice_is_fine() {
        let missing = secret_choice(false, false, false).expect_err("nothing given");
        assert!(matches!(missing, CredentialsError::Missing));
        assert!(missing.is_usage());
        for (file, env, insecure) in [
            (true, false, false),
            (false, true, false),
            (true, true, false),
            (false, false, true),
        ] {
            assert!(secret_choice(file, env, insecure).is_ok());
        }
    }

    #[test]
    fn an_unreadable_secret_file_is_a_failure_not_bad_usage() {
        let missing = std::path::Path::new("/nonexistent/clusterfunk-secret");
        let error = resolve_secret(Some(missing), false).expect_err("no such file");
        assert!(matches!(error, CredentialsError::Secret(_)), "{error}");
        assert!(!error.is_usage());
        assert!(error.to_string().contains("--secret-file"), "{error}");
    }
}
