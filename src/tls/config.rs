//! A certificate directory loaded into rustls configurations: TLS 1.3 only, the `ring`
//! provider, the cluster CA as the only root, and a client certificate required both ways.
//!
//! This file owns loading and checking the files; the transport uses the configurations
//! (`transport/client.rs`, `transport/server.rs`) and decides what a peer may do
//! (`service.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::{CertIdentity, IdentityError, CA_FILE, CERT_FILE, KEY_FILE};

/// Why a certificate directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file is missing or unreadable, or holds no PEM of the expected kind.
    #[error("cannot read {what} from {path}: {source}; make the directory with `clusterfunk certs --dir D --nodes ...` and pass D/node-ID (nodes), D/admin (clusterfunk) or D/client (applications)")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{path} holds no PEM certificate, but should hold {what}; make the directory with `clusterfunk certs --dir D --nodes ...` and pass D/node-ID (nodes), D/admin (clusterfunk) or D/client (applications)")]
    NoCertificate {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The holder's certificate carries no usable identity.
    #[error("the certificate {path} cannot be used: {source}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        source: IdentityError,
    },
    /// rustls refused the certificates or key.
    #[error("the certificates in {dir} cannot be used for TLS: {source}; check that cert.pem and key.pem belong together and ca.pem is the cluster CA")]
    Rustls {
        /// The directory (or the certificate's directory).
        dir: PathBuf,
        /// What rustls said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// TLS settings of one process: its own certificate and key, the cluster CA, and its identity
/// as the certificate names it. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    identity: CertIdentity,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem` (what `clusterfunk certs` writes
    /// into each of its directories).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        Self::from_files(dir.join(CA_FILE), dir.join(CERT_FILE), dir.join(KEY_FILE))
    }

    /// Loads the CA certificate, the holder's certificate (chain) and its private key from
    /// explicit PEM files.
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let (ca, cert, key) = (ca.as_ref(), cert.as_ref(), key.as_ref());
        let cas = read_certificates("the CA certificate", ca)?;
        let chain = read_certificates("the certificate", cert)?;
        let private_key = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::File {
            what: "the private key",
            path: key.to_path_buf(),
            source: Box::new(error),
        })?;
        let identity =
            CertIdentity::from_certificate(&chain[0]).map_err(|source| TlsError::Identity {
                path: cert.to_path_buf(),
                source,
            })?;
        let dir = cert.parent().unwrap_or(cert).to_path_buf();
        let rustls_error = |error: rustls::Error| TlsError::Rustls {
            dir: dir.clone(),
            source: Box::new(error),
        };
        let mut roots = RootCertStore::empty();
        for certificate in cas {
            roots.add(certificate).map_err(rustls_error)?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|error| TlsError::Rustls {
                dir: dir.clone(),
                source: Box::new(error),
            })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private_key.clone_key())
            .map_err(rustls_error)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private_key)
            .map_err(rustls_error)?;
        Ok(Self {
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// Who this process is, as its certificate says.
    pub fn identity(&self) -> &CertIdentity {
        &self.identity
    }

    pub(crate) fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    pub(crate) fn client(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |error: rustls::pki_types::pem::Error| TlsError::File {
        what,
        path: path.to_path_buf(),
        source: Box::new(error),
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(file_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error)?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

/// The *ring* provider (no C toolchain, no OpenSSL). rustls 0.23.48 deprecates it for lacking
/// post-quantum key exchange; the classical X25519/P-256 exchange it offers is what TLS 1.3
/// clusters use today, and switching to `aws-lc-rs` later changes only this function.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identity in the certificate a peer presented in the TLS handshake.
pub(crate) fn peer_identity(
    certificates: Option<&[CertificateDer<'static>]>,
) -> Result<CertIdentity, IdentityError> {
    let leaf = certificates
        .and_then(|chain| chain.first())
        .ok_or(IdentityError::NoCertificate)?;
    CertIdentity::from_certificate(leaf)
}
