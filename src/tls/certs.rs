//! Issuing the cluster's certificates: what `clusterfunk certs` writes. A cluster has one CA;
//! it signs a certificate for every node, one for operator tools (admin) and one for
//! application clients, each carrying its identity (see `identity.rs`). [`write_cluster`] makes
//! a new CA and all of these, [`add_node`] issues one more node certificate with an existing CA.
//!
//! The directory it writes (`D` is `--dir`):
//!
//! ```text
//! D/ca/ca.pem, D/ca/ca.key            the CA certificate and its private key (the only copy)
//! D/node-ID/ca.pem, cert.pem, key.pem  one per node: copy this directory to the node
//! D/admin/ca.pem, cert.pem, key.pem    for `clusterfunk` and other operator tools
//! D/client/ca.pem, cert.pem, key.pem   for application clients
//! ```
//!
//! Keys are ECDSA P-256. Private keys are written with mode 0600 and the directories with
//! 0700. Each directory is written under a temporary name and renamed into place, and an error
//! part way removes the directories the run had written, so a second run is not refused; after
//! a crash the refusal names what is left.
//!
//! This file does not own the identity format (`identity.rs`) nor loading certificates into
//! rustls (`config.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::identity::{valid_cluster_name, CertIdentity, Role};
use super::{CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};

/// The CA's directory under the certificate directory: the only one holding the CA's key.
pub const CA_DIR: &str = "ca";

/// How long the CA is valid: 10 years.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 60 * 60);
/// How long node, admin and client certificates are valid: 2 years (never past the CA).
const LEAF_VALIDITY: Duration = Duration::from_secs(730 * 24 * 60 * 60);
/// How far in the past certificates start, so a peer whose clock is a little behind accepts
/// them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);
/// The CA's common name is this followed by the cluster name; `add_node` reads the cluster
/// back from it.
const CA_NAME_PREFIX: &str = "clusterfunk CA ";

/// A node to issue a certificate for: its id and the address the other nodes and the tools
/// dial. The certificate carries the address's IP, which rustls checks when it dials an IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's id.
    pub id: u64,
    /// The address the node is reached at.
    pub addr: SocketAddr,
}

impl NodeSpec {
    /// Reads a list of nodes, `ID=IP:PORT,...` (e.g. `1=127.0.0.1:7001,2=127.0.0.1:7002`).
    /// Refuses an empty list, a malformed entry, an id or an address given twice, and an
    /// unspecified IP (`0.0.0.0`, `::`), which no peer can dial.
    pub fn parse_list(list: &str) -> Result<Vec<NodeSpec>, CertsError> {
        if list.trim().is_empty() {
            return Err(CertsError::NoNodes);
        }
        let nodes = list
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<NodeSpec>, _>>()?;
        check_nodes(&nodes)?;
        Ok(nodes)
    }
}

impl FromStr for NodeSpec {
    type Err = CertsError;

    /// Reads one node, `ID=IP:PORT` (e.g. `4=10.0.0.4:7001` or `4=[fd00::4]:7001`).
    fn from_str(spec: &str) -> Result<NodeSpec, CertsError> {
        let invalid = |problem| CertsError::InvalidNodeSpec {
            spec: spec.trim().to_owned(),
            problem,
        };
        let (id, addr) = spec
            .trim()
            .split_once('=')
            .ok_or_else(|| invalid("there is no `=` between the id and the address"))?;
        let id = id.trim();
        // Digits only, as identity URIs write ids: `+1` would parse but is not an id.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the id is not a number"));
        }
        let id = id
            .parse()
            .map_err(|_| invalid("the id does not fit in 64 bits"))?;
        // One spelling: an IPv4 address written as IPv6 is the IPv4 address others dial.
        let addr = crate::consensus::state::canonical_addr(
            addr.trim()
                .parse()
                .map_err(|_| invalid("the address is not IP:PORT"))?,
        );
        if addr.port() == 0 {
            return Err(invalid("port 0 is not a port others can dial"));
        }
        if addr.ip().is_multicast() || addr.ip() == std::net::Ipv4Addr::BROADCAST {
            return Err(invalid(
                "a broadcast or multicast address is not a node's address",
            ));
        }
        let node = NodeSpec { id, addr };
        if addr.ip().is_unspecified() {
            return Err(CertsError::UnspecifiedAddress { id, addr });
        }
        Ok(node)
    }
}

/// Why certificates could not be issued. Every message ends with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// A node was not written as `ID=IP:PORT`.
    #[error("`{spec}` is not a node: {problem}; write ID=IP:PORT, e.g. 1=127.0.0.1:7001")]
    InvalidNodeSpec {
        /// The text that was given.
        spec: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The node list is empty.
    #[error(
        "no nodes given: list every node as ID=IP:PORT,..., e.g. 1=127.0.0.1:7001,2=127.0.0.1:7002"
    )]
    NoNodes,
    /// Two nodes have the same id.
    #[error("node {id} is listed twice: give each node its own id")]
    DuplicateNodeId {
        /// The id given twice.
        id: u64,
    },
    /// Two nodes have the same address.
    #[error("nodes {first} and {second} both have the address {addr}: give each node the address it is reached at")]
    DuplicateAddress {
        /// The address given twice.
        addr: SocketAddr,
        /// The first node with it.
        first: u64,
        /// The second node with it.
        second: u64,
    },
    /// A node's IP is `0.0.0.0` or `::`, which a node listens on but nobody can dial.
    #[error("node {id}'s address {addr} is the unspecified address, which no peer can dial: give the IP the other nodes and the tools reach node {id} at")]
    UnspecifiedAddress {
        /// The node.
        id: u64,
        /// Its address.
        addr: SocketAddr,
    },
    /// The cluster name cannot stand in an identity URI.
    #[error("`{name}` is not a valid cluster name: use 1 to 255 letters, digits, `.`, `-` and `_` (give it with --cluster-name)")]
    InvalidClusterName {
        /// The name given.
        name: String,
    },
    /// `write_cluster` found certificates already in the directory.
    #[error("{} exists already: choose an empty directory, or use --add-node to issue one more node certificate", path.display())]
    AlreadyIssued {
        /// The directory that exists.
        path: PathBuf,
    },
    /// `add_node` found the node's directory already.
    #[error("{} exists already: node {id} has a certificate; remove that directory first to reissue it", path.display())]
    NodeExists {
        /// The node.
        id: u64,
        /// Its directory.
        path: PathBuf,
    },
    /// `add_node` found no CA (certificate or key) in the directory.
    #[error("{} does not exist: run `clusterfunk certs --dir {} --nodes ID=IP:PORT,...` first, or give the --dir that holds ca/ with its ca.key", path.display(), dir.display())]
    MissingCa {
        /// The missing file.
        path: PathBuf,
        /// The certificate directory given.
        dir: PathBuf,
    },
    /// The CA's files do not hold a usable clusterfunk CA.
    #[error("{} is not a usable clusterfunk CA: {reason}; give the --dir written by `clusterfunk certs`", path.display())]
    InvalidCa {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA is not valid now, so nothing it signs would verify.
    #[error("the CA certificate {} is not valid now (expired, or this machine's clock is wrong): check the clock, or make a new CA and certificates for the whole cluster", path.display())]
    CaNotValidNow {
        /// The CA certificate.
        path: PathBuf,
    },
    /// `add_node` was given another cluster's name than the CA's.
    #[error("the CA in {} belongs to cluster `{found}`, not `{expected}`: give --cluster-name {found}, or the --dir of cluster `{expected}`", path.display())]
    ClusterMismatch {
        /// The CA certificate.
        path: PathBuf,
        /// The CA's cluster.
        found: String,
        /// The cluster name given.
        expected: String,
    },
    /// rcgen could not make a key or a certificate.
    #[error("cannot make {what}: {source}; this is a bug, please report it")]
    Generate {
        /// The key or certificate being made.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Reading or writing a file or directory failed.
    #[error("cannot {action} {}: {source}; check the path, its permissions and the free disk space", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// The directory of a holder's certificate under the certificate directory `dir`:
/// `dir/node-ID`, `dir/admin` or `dir/client`.
pub fn holder_dir(dir: &Path, role: Role) -> PathBuf {
    dir.join(holder_dir_name(role))
}

/// Makes a new CA for `cluster` and certificates for `nodes`, the admin and the client, under
/// `dir` (created if needed). Refuses a directory that already holds a CA or any of these
/// directories, an invalid cluster name and an empty or inconsistent node list.
pub fn write_cluster(dir: &Path, cluster: &str, nodes: &[NodeSpec]) -> Result<(), CertsError> {
    check_cluster_name(cluster)?;
    check_nodes(nodes)?;
    let roles = nodes
        .iter()
        .map(|node| Role::Node(node.id))
        .chain([Role::Admin, Role::Client]);
    let names: Vec<String> = std::iter::once(CA_DIR.to_owned())
        .chain(roles.map(holder_dir_name))
        .collect();
    for name in &names {
        let path = dir.join(name);
        if path.exists() {
            return Err(CertsError::AlreadyIssued { path });
        }
    }

    let ca_key = generate_key("the CA's key")?;
    let ca_params = ca_params(cluster, SystemTime::now());
    let ca_pem = ca_params
        .self_signed(&ca_key)
        .map_err(generate("the CA certificate"))?
        .pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut bundles = vec![Bundle {
        name: CA_DIR.to_owned(),
        files: vec![
            (CA_FILE, ca_pem.clone(), Access::Public),
            (CA_KEY_FILE, ca_key_pem, Access::Private),
        ],
    }];
    for node in nodes {
        let params = leaf_params(cluster, Role::Node(node.id), Some(node.addr.ip()), None)?;
        bundles.push(sign(params, Role::Node(node.id), &issuer, &ca_pem)?);
    }
    for role in [Role::Admin, Role::Client] {
        let params = leaf_params(cluster, role, None, None)?;
        bundles.push(sign(params, role, &issuer, &ca_pem)?);
    }
    write_bundles(dir, &bundles)
}

/// Issues a certificate for one more node with the CA under `dir` (written by
/// [`write_cluster`]) into `dir/node-ID`. Refuses when that directory exists, when the CA is
/// missing, unusable or not valid now, and when the CA is another cluster's.
pub fn add_node(dir: &Path, cluster: &str, node: &NodeSpec) -> Result<(), CertsError> {
    check_cluster_name(cluster)?;
    check_nodes(std::slice::from_ref(node))?;
    let role = Role::Node(node.id);
    let path = holder_dir(dir, role);
    if path.exists() {
        return Err(CertsError::NodeExists { id: node.id, path });
    }
    let ca = load_ca(dir)?;
    if ca.cluster != cluster {
        return Err(CertsError::ClusterMismatch {
            path: ca.certificate_path,
            found: ca.cluster,
            expected: cluster.to_owned(),
        });
    }
    let params = leaf_params(cluster, role, Some(node.addr.ip()), Some(ca.not_after))?;
    let bundle = sign(params, role, &ca.issuer, &ca.pem)?;
    write_bundles(dir, &[bundle])
}

/// Refuses a cluster name that cannot stand in an identity URI.
fn check_cluster_name(cluster: &str) -> Result<(), CertsError> {
    if valid_cluster_name(cluster) {
        Ok(())
    } else {
        Err(CertsError::InvalidClusterName {
            name: cluster.to_owned(),
        })
    }
}

/// Refuses an empty node list, an id or an address given twice and an unspecified IP.
fn check_nodes(nodes: &[NodeSpec]) -> Result<(), CertsError> {
    if nodes.is_empty() {
        return Err(CertsError::NoNodes);
    }
    let mut ids = BTreeMap::new();
    let mut addresses = HashMap::new();
    for node in nodes {
        if node.addr.ip().is_unspecified() {
            return Err(CertsError::UnspecifiedAddress {
                id: node.id,
                addr: node.addr,
            });
        }
        if ids.insert(node.id, ()).is_some() {
            return Err(CertsError::DuplicateNodeId { id: node.id });
        }
        // One spelling per socket: an IPv4 address written as IPv6 is the same address.
        let addr = SocketAddr::new(node.addr.ip().to_canonical(), node.addr.port());
        if let Some(first) = addresses.insert(addr, node.id) {
            return Err(CertsError::DuplicateAddress {
                addr: node.addr,
                first,
                second: node.id,
            });
        }
    }
    Ok(())
}

fn holder_dir_name(role: Role) -> String {
    match role {
        Role::Node(id) => format!("node-{id}"),
        Role::Admin => "admin".to_owned(),
        Role::Client => "client".to_owned(),
    }
}

fn generate(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertsError {
    let what = what.into();
    move |source| CertsError::Generate { what, source }
}

fn generate_key(what: &str) -> Result<KeyPair, CertsError> {
    // ECDSA P-256: small, fast, and what every TLS 1.3 stack accepts.
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate(what))
}

fn common_name(name: String) -> DistinguishedName {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    distinguished_name
}

/// The CA: signs certificates of holders only (no intermediate CAs), valid 10 years.
fn ca_params(cluster: &str, now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(format!("{CA_NAME_PREFIX}{cluster}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + CA_VALIDITY).into();
    params
}

/// A holder's certificate: its identity URI, a node's IP address, valid 2 years but not after
/// `ca_not_after` (a certificate outliving its CA would only fail later and more confusingly).
/// Nodes both accept connections and make them (to peers), so they get serverAuth and
/// clientAuth; admin and client certificates only make connections.
fn leaf_params(
    cluster: &str,
    role: Role,
    ip: Option<IpAddr>,
    ca_not_after: Option<SystemTime>,
) -> Result<CertificateParams, CertsError> {
    let identity = CertIdentity {
        cluster: cluster.to_owned(),
        role,
    };
    let uri = Ia5String::try_from(identity.uri())
        .map_err(generate(format!("the identity URI of {identity}")))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = std::iter::once(SanType::URI(uri))
        .chain(ip.map(SanType::IpAddress))
        .collect();
    params.distinguished_name = common_name(format!("clusterfunk {role}"));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Node(_) => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Admin | Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    let not_after = now + LEAF_VALIDITY;
    params.not_after = ca_not_after
        .map_or(not_after, |ca| ca.min(not_after))
        .into();
    Ok(params)
}

/// Makes a key for `role`, signs its certificate and returns its directory's files.
fn sign(
    params: CertificateParams,
    role: Role,
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
) -> Result<Bundle, CertsError> {
    let key = generate_key(&format!("the key of the {role} certificate"))?;
    let certificate = params
        .signed_by(&key, issuer)
        .map_err(generate(format!("the {role} certificate")))?;
    Ok(Bundle {
        name: holder_dir_name(role),
        files: vec![
            (CA_FILE, ca_pem.to_owned(), Access::Public),
            (CERT_FILE, certificate.pem(), Access::Public),
            (KEY_FILE, key.serialize_pem(), Access::Private),
        ],
    })
}

/// An existing CA, loaded to sign one more certificate.
struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    cluster: String,
    not_after: SystemTime,
    certificate_path: PathBuf,
}

fn load_ca(dir: &Path) -> Result<LoadedCa, CertsError> {
    let ca_dir = dir.join(CA_DIR);
    let certificate_path = ca_dir.join(CA_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let read = |path: &Path| match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(CertsError::MissingCa {
            path: path.to_owned(),
            dir: dir.to_owned(),
        }),
        Err(source) => Err(CertsError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    };
    let pem = read(&certificate_path)?;
    let key_pem = read(&key_path)?;
    let invalid = |path: &Path, reason: String| CertsError::InvalidCa {
        path: path.to_owned(),
        reason,
    };

    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| invalid(&certificate_path, format!("no PEM certificate in it ({e})")))?;
    let (_, certificate) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| invalid(&certificate_path, format!("it does not parse ({e})")))?;
    if !certificate.is_ca() {
        return Err(invalid(
            &certificate_path,
            "it is not a CA certificate".to_owned(),
        ));
    }
    let cluster = certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(|name| name.as_str().ok())
        .and_then(|name| name.strip_prefix(CA_NAME_PREFIX))
        .filter(|cluster| valid_cluster_name(cluster))
        .ok_or_else(|| {
            invalid(
                &certificate_path,
                format!("its common name is not `{CA_NAME_PREFIX}CLUSTER`"),
            )
        })?
        .to_owned();
    let not_after = u64::try_from(certificate.validity().not_after.timestamp())
        .ok()
        .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds));
    let not_after = match not_after {
        Some(not_after) if certificate.validity().is_valid() => not_after,
        _ => {
            return Err(CertsError::CaNotValidNow {
                path: certificate_path,
            })
        }
    };

    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| invalid(&key_path, format!("no usable private key in it ({e})")))?;
    // A key of another CA would sign certificates that verify nowhere.
    if certificate.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            &key_path,
            format!(
                "it is not the key of the CA certificate {}",
                certificate_path.display()
            ),
        ));
    }
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| {
        invalid(
            &certificate_path,
            format!("rcgen cannot sign with it ({e})"),
        )
    })?;
    Ok(LoadedCa {
        issuer,
        pem,
        cluster,
        not_after,
        certificate_path,
    })
}

/// Who may read a file.
#[derive(Clone, Copy)]
enum Access {
    /// Certificates: anyone.
    Public,
    /// Private keys: the owner only (0600).
    Private,
}

/// One directory to write under the certificate directory, with its files.
struct Bundle {
    name: String,
    files: Vec<(&'static str, String, Access)>,
}

/// Writes each bundle to `dir/NAME`; if one fails, removes those already written by this call.
fn write_bundles(dir: &Path, bundles: &[Bundle]) -> Result<(), CertsError> {
    fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    let mut written = Vec::new();
    for bundle in bundles {
        match write_bundle(dir, bundle) {
            Ok(path) => written.push(path),
            Err(error) => {
                for path in written {
                    // Best effort: the error being returned matters more than this one.
                    let _ = fs::remove_dir_all(path);
                }
                return Err(error);
            }
        }
    }
    sync_dir(dir)
}

/// Writes a bundle into `dir/.NAME.partial`, then renames that to `dir/NAME`.
fn write_bundle(dir: &Path, bundle: &Bundle) -> Result<PathBuf, CertsError> {
    let path = dir.join(&bundle.name);
    let partial = dir.join(format!(".{}.partial", bundle.name));
    // Left over from a run that crashed: it was never renamed into place, so nothing uses it.
    match fs::remove_dir_all(&partial) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            return Err(io_error("remove", &partial)(error))
        }
        _ => {}
    }
    let result = write_files(&partial, bundle).and_then(|()| {
        // rename would replace an empty directory made meanwhile; refuse instead.
        if path.exists() {
            return Err(CertsError::AlreadyIssued { path: path.clone() });
        }
        fs::rename(&partial, &path).map_err(io_error("rename into place", &path))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result.map(|()| path)
}

fn write_files(partial: &Path, bundle: &Bundle) -> Result<(), CertsError> {
    DirBuilder::new()
        .mode(0o700)
        .create(partial)
        .map_err(io_error("create", partial))?;
    for (name, contents, access) in &bundle.files {
        let path = partial.join(name);
        let mode = match access {
            Access::Public => 0o644,
            Access::Private => 0o600,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io_error("create", &path))?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &path))?;
    }
    sync_dir(partial)
}

fn sync_dir(dir: &Path) -> Result<(), CertsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CertsError {
    let path = path.to_owned();
    move |source| CertsError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use rustls_pki_types::{ServerName, UnixTime};
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn nodes() -> Vec<NodeSpec> {
        NodeSpec::parse_list("1=127.0.0.1:7001,2=127.0.0.2:7002,3=[::1]:7003").expect("a list")
    }

    fn cluster_dir(cluster: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        write_cluster(dir.path(), cluster, &nodes()).expect("certificates written");
        dir
    }

    fn certificate(dir: &Path, role: Role) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(holder_dir(dir, role).join(CERT_FILE)).expect("a PEM file")
    }

    fn ca_certificate(dir: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(CA_DIR).join(CA_FILE)).expect("a PEM file")
    }

    fn all_roles() -> Vec<Role> {
        vec![
            Role::Node(1),
            Role::Node(2),
            Role::Node(3),
            Role::Admin,
            Role::Client,
        ]
    }

    fn roots(ca_dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(ca_certificate(ca_dir)).expect("a usable root");
        Arc::new(roots)
    }

    // rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key exchange,
    // which verifying a certificate does not use; the project builds rustls with ring only.
    #[allow(deprecated)]
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Whether `certificate` verifies as a client certificate of the CA in `ca_dir`.
    fn client_verifies(ca_dir: &Path, certificate: &CertificateDer<'_>) -> bool {
        WebPkiClientVerifier::builder_with_provider(roots(ca_dir), provider())
            .build()
            .expect("a verifier")
            .verify_client_cert(certificate, &[], UnixTime::now())
            .is_ok()
    }

    /// Whether `certificate` verifies as the server at `ip` for the CA in `ca_dir`.
    fn server_verifies(ca_dir: &Path, certificate: &CertificateDer<'_>, ip: IpAddr) -> bool {
        WebPkiServerVerifier::builder_with_provider(roots(ca_dir), provider())
            .build()
            .expect("a verifier")
            .verify_server_cert(
                certificate,
                &[],
                &ServerName::from(ip),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("a directory")
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .into_string()
                    .expect("UTF-8")
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_cluster_writes_the_ca_and_a_directory_per_holder() {
        let dir = cluster_dir("prod");
        assert_eq!(
            files_in(dir.path()),
            ["admin", "ca", "client", "node-1", "node-2", "node-3"]
        );
        assert_eq!(files_in(&dir.path().join(CA_DIR)), [CA_KEY_FILE, CA_FILE]);
        let ca_pem = fs::read(dir.path().join(CA_DIR).join(CA_FILE)).expect("the CA");
        for role in all_roles() {
            let holder = holder_dir(dir.path(), role);
            assert_eq!(files_in(&holder), [CA_FILE, CERT_FILE, KEY_FILE], "{role}");
            assert_eq!(
                fs::read(holder.join(CA_FILE)).expect("a CA copy"),
                ca_pem,
                "{role}"
            );
        }
    }

    #[test]
    fn the_ca_key_is_only_in_the_ca_directory() {
        let dir = cluster_dir("prod");
        let ca_key = fs::read_to_string(dir.path().join(CA_DIR).join(CA_KEY_FILE)).expect("key");
        assert!(ca_key.contains("PRIVATE KEY"), "{ca_key}");
        for role in all_roles() {
            let holder = holder_dir(dir.path(), role);
            for name in files_in(&holder) {
                let contents = fs::read_to_string(holder.join(&name)).expect("a file");
                assert_ne!(contents, ca_key, "{role}: {name}");
            }
        }
    }

    #[test]
    fn private_keys_are_readable_by_their_owner_only() {
        let dir = cluster_dir("prod");
        let mode =
            |path: PathBuf| fs::metadata(&path).expect("a file").permissions().mode() & 0o777;
        assert_eq!(mode(dir.path().join(CA_DIR).join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(dir.path().join(CA_DIR)), 0o700);
        for role in all_roles() {
            assert_eq!(
                mode(holder_dir(dir.path(), role).join(KEY_FILE)),
                0o600,
                "{role}"
            );
        }
    }

    #[test]
    fn every_certificate_carries_its_identity() {
        let dir = cluster_dir("prod-eu_1");
        for role in all_roles() {
            let identity =
                CertIdentity::from_certificate(&certificate(dir.path(), role)).expect("identity");
            assert_eq!(
                identity,
                CertIdentity {
                    cluster: "prod-eu_1".into(),
                    role
                }
            );
        }
    }

    #[test]
    fn node_certificates_carry_the_ip_they_are_dialled_at_and_serve_and_connect() {
        let dir = cluster_dir("prod");
        for node in nodes() {
            let der = certificate(dir.path(), Role::Node(node.id));
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parses");
            let names = parsed
                .subject_alternative_name()
                .expect("parses")
                .expect("present");
            let ips: Vec<&[u8]> = names
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::IPAddress(ip) => Some(*ip),
                    _ => None,
                })
                .collect();
            let expected = match node.addr.ip() {
                IpAddr::V4(ip) => ip.octets().to_vec(),
                IpAddr::V6(ip) => ip.octets().to_vec(),
            };
            assert_eq!(ips, [expected.as_slice()], "node {}", node.id);
            let usage = parsed
                .extended_key_usage()
                .expect("parses")
                .expect("present");
            assert!(usage.value.server_auth && usage.value.client_auth);
            assert!(!parsed.is_ca());
            let name = parsed.subject().iter_common_name().next().expect("a CN");
            assert_eq!(
                name.as_str().expect("a string"),
                format!("clusterfunk node {}", node.id)
            );
        }
        for role in [Role::Admin, Role::Client] {
            let der = certificate(dir.path(), role);
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parses");
            let names = parsed
                .subject_alternative_name()
                .expect("parses")
                .expect("present");
            assert_eq!(names.value.general_names.len(), 1, "{role}: the URI only");
            let usage = parsed
                .extended_key_usage()
                .expect("parses")
                .expect("present");
            assert!(
                usage.value.client_auth && !usage.value.server_auth,
                "{role}"
            );
        }
    }

    #[test]
    fn the_ca_signs_holders_only_and_names_its_cluster() {
        let dir = cluster_dir("prod");
        let der = ca_certificate(dir.path());
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parses");
        let constraints = parsed
            .basic_constraints()
            .expect("parses")
            .expect("present");
        assert!(constraints.value.ca);
        assert_eq!(constraints.value.path_len_constraint, Some(0));
        let usage = parsed.key_usage().expect("parses").expect("present");
        assert!(usage.value.key_cert_sign() && usage.value.crl_sign());
        assert!(!usage.value.digital_signature());
        let name = parsed.subject().iter_common_name().next().expect("a CN");
        assert_eq!(name.as_str().expect("a string"), "clusterfunk CA prod");
        let validity = parsed.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        let year = 365 * 24 * 60 * 60;
        assert!((10 * year..11 * year).contains(&lifetime), "{lifetime}");
        assert!(validity.is_valid(), "valid from an hour ago");
    }

    #[test]
    fn every_certificate_verifies_against_its_ca() {
        let dir = cluster_dir("prod");
        for role in all_roles() {
            assert!(
                client_verifies(dir.path(), &certificate(dir.path(), role)),
                "{role}"
            );
        }
        for node in nodes() {
            let der = certificate(dir.path(), Role::Node(node.id));
            assert!(server_verifies(dir.path(), &der, node.addr.ip()));
            // Another node's IP is not this certificate's.
            assert!(!server_verifies(
                dir.path(),
                &der,
                "127.0.0.9".parse().expect("an IP")
            ));
        }
        // Admin and client certificates cannot serve: they carry neither serverAuth nor an IP.
        for role in [Role::Admin, Role::Client] {
            let der = certificate(dir.path(), role);
            assert!(!server_verifies(
                dir.path(),
                &der,
                "127.0.0.1".parse().expect("an IP")
            ));
        }
    }

    #[test]
    fn certificates_of_another_clusters_ca_do_not_verify() {
        let ours = cluster_dir("prod");
        let theirs = cluster_dir("prod");
        for role in all_roles() {
            assert!(
                !client_verifies(ours.path(), &certificate(theirs.path(), role)),
                "{role}"
            );
        }
        let node = nodes()[0];
        assert!(!server_verifies(
            ours.path(),
            &certificate(theirs.path(), Role::Node(node.id)),
            node.addr.ip()
        ));
    }

    #[test]
    fn add_node_issues_a_certificate_that_verifies_against_the_existing_ca() {
        let dir = cluster_dir("prod");
        let node: NodeSpec = "4=10.0.0.4:7001".parse().expect("a node");
        add_node(dir.path(), "prod", &node).expect("issued");
        let holder = holder_dir(dir.path(), Role::Node(4));
        assert_eq!(files_in(&holder), [CA_FILE, CERT_FILE, KEY_FILE]);
        assert_eq!(
            fs::read(holder.join(CA_FILE)).expect("a CA copy"),
            fs::read(dir.path().join(CA_DIR).join(CA_FILE)).expect("the CA")
        );
        let der = certificate(dir.path(), Role::Node(4));
        assert_eq!(
            CertIdentity::from_certificate(&der).expect("an identity"),
            CertIdentity {
                cluster: "prod".into(),
                role: Role::Node(4)
            }
        );
        assert!(client_verifies(dir.path(), &der));
        assert!(server_verifies(dir.path(), &der, node.addr.ip()));
        let mode = fs::metadata(holder.join(KEY_FILE))
            .expect("the key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!files_in(dir.path())
            .iter()
            .any(|name| name.ends_with(".partial")));
    }

    #[test]
    fn add_node_never_outlives_the_ca() {
        // A CA with 30 days left, written by hand as write_cluster would.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let now = SystemTime::now();
        let mut params = ca_params("prod", now);
        params.not_after = (now + Duration::from_secs(30 * 24 * 60 * 60)).into();
        let key = generate_key("a CA key").expect("a key");
        let pem = params.self_signed(&key).expect("a CA").pem();
        let ca = Bundle {
            name: CA_DIR.to_owned(),
            files: vec![
                (CA_FILE, pem, Access::Public),
                (CA_KEY_FILE, key.serialize_pem(), Access::Private),
            ],
        };
        write_bundles(dir.path(), &[ca]).expect("written");
        add_node(
            dir.path(),
            "prod",
            &"1=10.0.0.1:7001".parse().expect("a node"),
        )
        .expect("issued");
        let not_after = |der: &CertificateDer<'_>| {
            let (_, parsed) = x509_parser::parse_x509_certificate(der).expect("parses");
            parsed.validity().not_after.timestamp()
        };
        assert_eq!(
            not_after(&certificate(dir.path(), Role::Node(1))),
            not_after(&ca_certificate(dir.path()))
        );
        assert!(client_verifies(
            dir.path(),
            &certificate(dir.path(), Role::Node(1))
        ));
    }

    #[test]
    fn add_node_refuses_an_existing_node_directory() {
        let dir = cluster_dir("prod");
        let before = fs::read(holder_dir(dir.path(), Role::Node(2)).join(CERT_FILE)).expect("a");
        let error = add_node(
            dir.path(),
            "prod",
            &"2=127.0.0.2:7002".parse().expect("a node"),
        )
        .expect_err("node 2 exists");
        assert!(
            matches!(error, CertsError::NodeExists { id: 2, .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("remove that directory first"),
            "{error}"
        );
        let after = fs::read(holder_dir(dir.path(), Role::Node(2)).join(CERT_FILE)).expect("a");
        assert_eq!(before, after, "the existing certificate is kept");
    }

    #[test]
    fn add_node_refuses_a_missing_ca_and_another_clusters_name() {
        let empty = tempfile::tempdir().expect("a temporary directory");
        let node: NodeSpec = "4=10.0.0.4:7001".parse().expect("a node");
        let error = add_node(empty.path(), "prod", &node).expect_err("no CA");
        assert!(matches!(error, CertsError::MissingCa { .. }), "{error}");
        assert!(error.to_string().contains("--nodes ID=IP:PORT"), "{error}");

        let dir = cluster_dir("prod");
        fs::remove_file(dir.path().join(CA_DIR).join(CA_KEY_FILE)).expect("removed");
        let error = add_node(dir.path(), "prod", &node).expect_err("no CA key");
        assert!(matches!(error, CertsError::MissingCa { .. }), "{error}");

        let dir = cluster_dir("prod");
        let error = add_node(dir.path(), "staging", &node).expect_err("another cluster");
        match &error {
            CertsError::ClusterMismatch {
                found, expected, ..
            } => assert_eq!((found.as_str(), expected.as_str()), ("prod", "staging")),
            _ => panic!("not a mismatch: {error}"),
        }
        assert!(!holder_dir(dir.path(), Role::Node(4)).exists());
    }

    #[test]
    fn add_node_refuses_a_ca_key_that_is_not_the_cas() {
        let dir = cluster_dir("prod");
        let other = cluster_dir("prod");
        fs::copy(
            other.path().join(CA_DIR).join(CA_KEY_FILE),
            dir.path().join(CA_DIR).join(CA_KEY_FILE),
        )
        .expect("copied");
        let error = add_node(
            dir.path(),
            "prod",
            &"4=10.0.0.4:7001".parse().expect("a node"),
        )
        .expect_err("the wrong key");
        assert!(matches!(error, CertsError::InvalidCa { .. }), "{error}");
    }

    #[test]
    fn write_cluster_refuses_a_directory_with_certificates() {
        let dir = cluster_dir("prod");
        let before = fs::read(dir.path().join(CA_DIR).join(CA_KEY_FILE)).expect("the CA key");
        let error = write_cluster(dir.path(), "prod", &nodes()).expect_err("a CA exists");
        assert!(matches!(error, CertsError::AlreadyIssued { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains(&dir.path().join(CA_DIR).display().to_string()));
        assert!(message.contains("choose an empty directory, or use --add-node"));
        let after = fs::read(dir.path().join(CA_DIR).join(CA_KEY_FILE)).expect("the CA key");
        assert_eq!(before, after, "the CA is kept");

        // A holder directory without a CA is refused too, and nothing is written.
        let dir = tempfile::tempdir().expect("a temporary directory");
        fs::create_dir(dir.path().join("admin")).expect("created");
        let error = write_cluster(dir.path(), "prod", &nodes()).expect_err("admin exists");
        assert!(matches!(error, CertsError::AlreadyIssued { .. }), "{error}");
        assert_eq!(files_in(dir.path()), ["admin"]);
    }

    #[test]
    fn write_cluster_refuses_bad_input_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let node = |id, addr: &str| NodeSpec {
            id,
            addr: addr.parse().expect("an address"),
        };
        let refused = |cluster: &str, nodes: &[NodeSpec]| {
            write_cluster(dir.path(), cluster, nodes).expect_err("refused")
        };
        assert!(matches!(
            refused("a b", &nodes()),
            CertsError::InvalidClusterName { .. }
        ));
        assert!(matches!(
            refused("", &nodes()),
            CertsError::InvalidClusterName { .. }
        ));
        assert!(matches!(refused("prod", &[]), CertsError::NoNodes));
        assert!(matches!(
            refused("prod", &[node(1, "127.0.0.1:1"), node(1, "127.0.0.1:2")]),
            CertsError::DuplicateNodeId { id: 1 }
        ));
        assert!(matches!(
            refused(
                "prod",
                &[node(1, "127.0.0.1:1"), node(2, "[::ffff:127.0.0.1]:1")]
            ),
            CertsError::DuplicateAddress {
                first: 1,
                second: 2,
                ..
            }
        ));
        assert!(matches!(
            refused("prod", &[node(1, "0.0.0.0:7001")]),
            CertsError::UnspecifiedAddress { id: 1, .. }
        ));
        assert!(files_in(dir.path()).is_empty());
    }

    #[test]
    fn node_lists_read_as_id_equals_address() {
        assert_eq!(
            NodeSpec::parse_list(" 1=127.0.0.1:7001, 2=[::1]:7002 ").expect("a list"),
            [
                NodeSpec {
                    id: 1,
                    addr: "127.0.0.1:7001".parse().expect("an address")
                },
                NodeSpec {
                    id: 2,
                    addr: "[::1]:7002".parse().expect("an address")
                }
            ]
        );
        let problem = |list: &str| match NodeSpec::parse_list(list) {
            Err(CertsError::InvalidNodeSpec { problem, .. }) => problem,
            other => panic!("{list:?}: {other:?}"),
        };
        assert_eq!(
            problem("1"),
            "there is no `=` between the id and the address"
        );
        assert_eq!(problem("x=127.0.0.1:1"), "the id is not a number");
        assert_eq!(problem("+1=127.0.0.1:1"), "the id is not a number");
        assert_eq!(
            problem("99999999999999999999=127.0.0.1:1"),
            "the id does not fit in 64 bits"
        );
        assert_eq!(problem("1=127.0.0.1"), "the address is not IP:PORT");
        assert_eq!(problem("1=localhost:7001"), "the address is not IP:PORT");
        assert_eq!(
            problem("1=127.0.0.1:0"),
            "port 0 is not a port others can dial"
        );
        assert_eq!(
            problem("1=255.255.255.255:7001"),
            "a broadcast or multicast address is not a node's address"
        );
        // An IPv4 address written as IPv6 is issued for the IPv4 address others dial.
        assert_eq!(
            NodeSpec::parse_list("3=[::ffff:127.0.0.95]:7001").expect("a list")[0].addr,
            "127.0.0.95:7001".parse().expect("an address")
        );
        assert_eq!(
            problem("1=127.0.0.1:1,,2=127.0.0.1:2"),
            "there is no `=` between the id and the address"
        );
        assert!(matches!(
            NodeSpec::parse_list(" "),
            Err(CertsError::NoNodes)
        ));
        assert!(matches!(
            NodeSpec::parse_list("1=127.0.0.1:1,1=127.0.0.1:2"),
            Err(CertsError::DuplicateNodeId { id: 1 })
        ));
        assert!(matches!(
            NodeSpec::parse_list("1=127.0.0.1:1,2=127.0.0.1:1"),
            Err(CertsError::DuplicateAddress { .. })
        ));
        assert!(matches!(
            NodeSpec::parse_list("1=[::]:7001"),
            Err(CertsError::UnspecifiedAddress { id: 1, .. })
        ));
    }
}
