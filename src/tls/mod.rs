//! TLS with client certificates: every connection encrypted and both ends identified by a
//! certificate of the cluster's CA, whose identity (cluster, role, node id) decides what the
//! peer may do.
//!
//! `identity.rs` owns the identity format, `certs.rs` issuing certificates (what `clusterfunk
//! certs` writes), `config.rs` loading a certificate directory into rustls configurations.

pub mod certs;
mod config;
pub mod identity;

pub(crate) use config::peer_identity;
pub use config::{TlsConfig, TlsError};
pub use identity::{CertIdentity, IdentityError, Role};

/// How a node's refusal of a request its peer's certificate does not allow begins (the rest
/// says what the role may not do and which certificate would).
pub const NOT_AUTHORIZED: &str = "not authorized";

/// The CA certificate in every certificate directory.
pub const CA_FILE: &str = "ca.pem";
/// The holder's certificate in a certificate directory.
pub const CERT_FILE: &str = "cert.pem";
/// The holder's private key in a certificate directory.
pub const KEY_FILE: &str = "key.pem";
/// The CA's private key, only in the CA's own directory (`D/ca/`).
pub const CA_KEY_FILE: &str = "ca.key";
