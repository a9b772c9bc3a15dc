//! What a certificate says about its holder: the cluster, the role and (for nodes) the node
//! id, carried as a URI in the certificate's subject alternative names:
//!
//! ```text
//! clusterfunk://CLUSTER/node/ID     a node: everything a node does
//! clusterfunk://CLUSTER/admin       an operator tool: operator commands, plus what a client may
//! clusterfunk://CLUSTER/client      an application client: send to shards, read map and status
//! ```
//!
//! This file owns only the format and reading it out of a certificate; issuing certificates is
//! `certs.rs`, checking them during a connection is `config.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The URI scheme of the identity.
pub const SCHEME: &str = "clusterfunk://";

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A node of the cluster, with its id: raft, forwarding, handoff, leases, admin forwarding.
    Node(u64),
    /// An operator tool: membership, drain, step-down, recover, plus everything a client may.
    Admin,
    /// An application client: send to shards, read the shard map and status.
    Client,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Node(id) => write!(f, "node {id}"),
            Role::Admin => f.write_str("admin"),
            Role::Client => f.write_str("client"),
        }
    }
}

/// The identity a certificate carries: its cluster and role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertIdentity {
    /// The cluster name.
    pub cluster: String,
    /// The role.
    pub role: Role,
}

impl CertIdentity {
    /// The URI that carries this identity in a certificate.
    pub fn uri(&self) -> String {
        match self.role {
            Role::Node(id) => format!("{SCHEME}{}/node/{id}", self.cluster),
            Role::Admin => format!("{SCHEME}{}/admin", self.cluster),
            Role::Client => format!("{SCHEME}{}/client", self.cluster),
        }
    }

    /// Reads an identity URI; `None` if it is not one.
    pub fn parse_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(SCHEME)?;
        let (cluster, role) = rest.split_once('/')?;
        if !valid_cluster_name(cluster) {
            return None;
        }
        let role = match role {
            "admin" => Role::Admin,
            "client" => Role::Client,
            _ => {
                let id = role.strip_prefix("node/")?;
                // Digits only: `+1` or ` 1` would parse but are not how ids are written.
                // One spelling per id: `01` is not node 1.
                if id.is_empty()
                    || !id.bytes().all(|b| b.is_ascii_digit())
                    || (id.len() > 1 && id.starts_with('0'))
                {
                    return None;
                }
                Role::Node(id.parse().ok()?)
            }
        };
        Some(Self {
            cluster: cluster.to_owned(),
            role,
        })
    }

    /// Reads the identity out of a DER certificate: exactly one `clusterfunk://` URI among its
    /// subject alternative names.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| IdentityError::Unparsable(Box::new(error)))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|error| IdentityError::AlternativeNames(Box::new(error)))?;
        let mut found = names
            .into_iter()
            .flat_map(|extension| extension.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
                _ => None,
            });
        let uri = found.next().ok_or(IdentityError::Missing)?;
        if found.next().is_some() {
            return Err(IdentityError::Several);
        }
        Self::parse_uri(uri).ok_or_else(|| IdentityError::NotUnderstood {
            uri: uri.to_owned(),
        })
    }
}

/// Why a certificate carries no usable identity ([`CertIdentity::from_certificate`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The peer presented no certificate at all.
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The subject alternative names extension is malformed.
    #[error("its subject alternative names cannot be parsed: {0}")]
    AlternativeNames(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No subject alternative name is a `clusterfunk://` URI.
    #[error("it carries no clusterfunk:// identity (make certificates with `clusterfunk certs`)")]
    Missing,
    /// More than one subject alternative name is a `clusterfunk://` URI.
    #[error("it carries more than one clusterfunk:// identity; make certificates with `clusterfunk certs`")]
    Several,
    /// The `clusterfunk://` URI does not name a cluster and a role.
    #[error("its identity `{uri}` is not understood; make certificates with `clusterfunk certs` of this release")]
    NotUnderstood {
        /// The URI as the certificate carries it.
        uri: String,
    },
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of cluster {:?}", self.role, self.cluster)
    }
}

/// Whether `name` can stand in an identity URI: letters, digits, `.`, `-` and `_`.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_survive_their_uri() {
        for role in [
            Role::Node(7),
            Role::Node(u64::MAX),
            Role::Admin,
            Role::Client,
        ] {
            let identity = CertIdentity {
                cluster: "prod-eu_1.a".into(),
                role,
            };
            assert_eq!(CertIdentity::parse_uri(&identity.uri()), Some(identity));
        }
    }

    #[test]
    fn bytes_that_are_no_certificate_keep_the_parser_error_as_source() {
        let error = CertIdentity::from_certificate(b"not a certificate")
            .expect_err("garbage is no certificate");
        assert!(matches!(error, IdentityError::Unparsable(_)), "{error:?}");
        assert!(std::error::Error::source(&error).is_some(), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("the certificate cannot be parsed"),
            "{error}"
        );
    }

    #[test]
    fn malformed_identity_uris_are_not_identities() {
        for bad in [
            "clusterfunk://c/node/",
            "clusterfunk://c/node/+1",
            "clusterfunk://c/node/01",
            "clusterfunk://c/node/1/extra",
            "clusterfunk://c/root",
            "clusterfunk:///admin",
            "clusterfunk://a b/admin",
            "clusterfunk://c/admin/",
            "https://c/admin",
            "clusterfunk://c",
        ] {
            assert_eq!(CertIdentity::parse_uri(bad), None, "{bad:?}");
        }
    }
}
