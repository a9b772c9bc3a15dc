//! TLS mode end to end: three real nodes in this process on loopback addresses of their own
//! (127.78.P.1–3, P from the process id), each with its certificate from `clusterfunk::tls::
//! certs`, a remote `Client` with the client certificate, operator commands with the admin and
//! the client certificate, and peers the nodes must refuse: no certificate, another CA's, a
//! client certificate asking for what only nodes may do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfunk::admin::{AdminClient, AdminError, AdminRequest, AdminResponse};
use clusterfunk::client::Client;
use clusterfunk::internals::{Request, Response};
use clusterfunk::prelude::*;
use clusterfunk::tls::certs::{self, NodeSpec};
use clusterfunk::tls::TlsConfig;
use clusterfunk::transport::{Secret, Transport, TransportConfig, TransportError};
use clusterfunk::NodeInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Bound on waiting for the cluster to serve; far above what a passing test needs.
const DEADLINE: Duration = Duration::from_secs(30);

/// Stores a value under the key.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(())]
struct Put {
    value: String,
}

/// Reads the key's value.
#[derive(Serialize, Deserialize, ShardMessage)]
#[reply(Option<String>)]
struct Get;

#[derive(Default)]
struct Values {
    values: HashMap<Key, String>,
}

#[shard_handler]
impl Values {
    fn put(&mut self, key: Key, msg: Put, _ctx: &mut ShardContext) {
        self.values.insert(key, msg.value);
    }

    fn get(&mut self, key: Key, _msg: Get, _ctx: &mut ShardContext) -> Option<String> {
        self.values.get(&key).cloned()
    }
}

fn addr(node: u64) -> SocketAddr {
    let block = (std::process::id() % 250) as u8;
    SocketAddr::from(([127, 78, block, node as u8], 7501))
}

fn tls(dir: &Path, holder: &str) -> TlsConfig {
    TlsConfig::from_dir(dir.join(holder)).expect("the certificate directory loads")
}

/// A rustls client configuration from a certificate directory, for speaking TLS to a node
/// without clusterfunk's transport.
fn raw_client_config(dir: &Path, with_certificate: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join("ca.pem")).expect("ca.pem") {
        roots
            .add(ca.expect("a CA certificate"))
            .expect("a usable CA");
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = if with_certificate {
        let chain = CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .expect("cert.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key.pem");
        builder
            .with_client_auth_cert(chain, key)
            .expect("a usable client certificate")
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(config)
}

/// Connects with `config` and returns what the first read after the TLS handshake brings:
/// the node's refusal of a peer without a certificate arrives there (TLS 1.3 checks the
/// client's certificate after the client considers the handshake done).
async fn raw_tls_session(
    config: Arc<rustls::ClientConfig>,
    node: SocketAddr,
) -> (Option<rustls::ProtocolVersion>, std::io::Result<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(node)
        .await
        .expect("TCP connect");
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::IpAddress(node.ip().into());
    let mut stream = match connector.connect(name, tcp).await {
        Ok(stream) => stream,
        Err(error) => return (None, Err(error)),
    };
    let version = stream.get_ref().1.protocol_version();
    // Something for the node to answer or refuse: garbage where its handshake expects a frame.
    let _ = stream.write_all(&[0, 0, 0, 4, 1, 2, 3, 4]).await;
    let mut buffer = [0u8; 256];
    let read = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
        .await
        .expect("the node answers or closes in time");
    (version, read)
}

#[test]
fn a_tls_cluster_serves_clients_and_their_certificates_decide_what_they_may_do() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let certs_dir = dir.path().join("certs");
    let specs: Vec<NodeSpec> = [1, 2, 3]
        .into_iter()
        .map(|id| NodeSpec { id, addr: addr(id) })
        .collect();
    certs::write_cluster(&certs_dir, "clusterfunk", &specs).expect("certificates written");
    let other_dir = dir.path().join("other-ca");
    certs::write_cluster(&other_dir, "clusterfunk", &specs).expect("another CA's certificates");
    let members: Vec<(u64, NodeInfo)> = [1, 2, 3]
        .into_iter()
        .map(|id| {
            (
                id,
                NodeInfo {
                    addr: addr(id).to_string(),
                    zone: None,
                },
            )
        })
        .collect();
    actix::System::new().block_on(async move {
        let mut nodes = Vec::new();
        for id in [1, 2, 3] {
            let node = clusterfunk::Cluster::builder()
                .node_id(id)
                .listen(addr(id))
                .data_dir(dir.path().join(format!("node-{id}")))
                .shards(16)
                .tls(tls(&certs_dir, &format!("node-{id}")))
                .initial_members(members.clone())
                .handler::<Values>()
                .start()
                .await
                .expect("the node starts with its certificate");
            nodes.push(node);
        }

        // An application client with the client certificate: writes through any node, and
        // every value is read back at the end.
        let client = Client::with_tls(
            [addr(1), addr(2), addr(3)],
            tls(&certs_dir, "client"),
            DEADLINE,
        )
        .expect("a TLS client");
        let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
        let until = Instant::now() + DEADLINE;
        for key in &keys {
            loop {
                match client
                    .send(
                        key.as_str(),
                        Put {
                            value: format!("value of {key}"),
                        },
                    )
                    .await
                {
                    Ok(()) => break,
                    Err(_) if Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(error) => panic!("put {key} over TLS failed: {error}"),
                }
            }
        }

        // The admin certificate runs operator commands; the client certificate may read status
        // but may not drain a node.
        let admin = AdminClient::with_tls(addr(2), tls(&certs_dir, "admin"), DEADLINE)
            .expect("an admin client");
        assert!(matches!(
            admin.request(AdminRequest::Nodes).await,
            Ok(AdminResponse::Nodes(_))
        ));
        let as_client = AdminClient::with_tls(addr(2), tls(&certs_dir, "client"), DEADLINE)
            .expect("an admin client with the client certificate");
        assert!(matches!(
            as_client.request(AdminRequest::Status).await,
            Ok(AdminResponse::Status(_))
        ));
        let drain = as_client.request(AdminRequest::Drain { id: 1 }).await;
        let message = match drain {
            Err(error @ AdminError::NotAuthorized { .. }) => error.to_string(),
            other => panic!("a client certificate asked to drain a node: {other:?}"),
        };
        assert!(
            message.starts_with("not authorized") && message.contains("D/admin"),
            "{message}"
        );

        // A client with a secret instead of a certificate is told the cluster speaks TLS.
        let with_secret = Client::with_config(
            [addr(1)],
            Some(Secret::new("tls-test-secret-0123456789abcdef").expect("secret")),
            "clusterfunk",
            DEADLINE,
        )
        .expect("a secret-mode client");
        let refused = with_secret
            .send("key-1", Get)
            .await
            .expect_err("a secret-mode client cannot talk to a TLS cluster");
        assert!(refused.to_string().contains("speaks TLS"), "{refused}");

        // A client certificate cannot speak for a node: a raw forwarded message and an admin
        // request marked as forwarded are refused whatever the request says.
        let raw = Transport::new(TransportConfig {
            tls: Some(tls(&certs_dir, "client")),
            ..TransportConfig::default()
        })
        .expect("a raw TLS transport");
        for request in [
            Request::Forward {
                key: b"key-1".to_vec(),
                tag: "t".into(),
                payload: Vec::new(),
                epoch: 1,
            },
            Request::Admin {
                request: AdminRequest::Drain { id: 1 },
                forwarded: true,
            },
        ] {
            let payload = clusterfunk::internals::encode(&request).expect("encodes");
            match raw.request(addr(1), payload, DEADLINE).await {
                Err(TransportError::Remote { reason }) => {
                    assert!(reason.contains("not authorized"), "{reason}")
                }
                Ok(answer) => panic!(
                    "a client certificate was served as a node: {:?}",
                    clusterfunk::internals::decode::<Response>(&answer).map(|_| "a response")
                ),
                Err(other) => panic!("expected a refusal, got {other}"),
            }
        }

        // A node certificate of a node never added (issued with `certs --add-node`) has no node
        // power: it may not drain through the leader's forwarding path, nor renew a lease for a
        // member (which would keep that member's shards where nobody serves them).
        certs::add_node(
            &certs_dir,
            "clusterfunk",
            &NodeSpec {
                id: 9,
                addr: addr(9),
            },
        )
        .expect("a certificate for node 9");
        let rogue = Transport::new(TransportConfig {
            node_id: Some(9),
            tls: Some(tls(&certs_dir, "node-9")),
            ..TransportConfig::default()
        })
        .expect("a transport with node 9's certificate");
        for (request, expected) in [
            (
                Request::Admin {
                    request: AdminRequest::Drain { id: 3 },
                    forwarded: true,
                },
                "not a member",
            ),
            (
                Request::RenewLease(clusterfunk::internals::RenewLease {
                    node: 3,
                    epoch: 1,
                    incarnation: 1,
                    request_id: 1,
                }),
                "not a member",
            ),
        ] {
            let payload = clusterfunk::internals::encode(&request).expect("encodes");
            match rogue.request(addr(2), payload, DEADLINE).await {
                Err(TransportError::Remote { reason }) => {
                    assert!(reason.contains(expected), "{reason}")
                }
                Ok(_) => panic!("node 9, never added, was served as a node: {request:?}"),
                Err(other) => panic!("expected a refusal, got {other}"),
            }
        }

        // Another CA's certificates are refused during the handshake, both ways.
        let stranger = Client::with_tls([addr(1)], tls(&other_dir, "client"), DEADLINE)
            .expect("a client of another CA");
        let refused = stranger
            .send("key-1", Get)
            .await
            .expect_err("a certificate of another CA is refused");
        assert!(!refused.is_outcome_unknown(), "{refused}");
        let message = refused.to_string();
        assert!(
            message.contains("certificate") && message.contains("refused"),
            "the refusal says why: {message}"
        );

        // Raw TLS: the node speaks TLS 1.3, and a peer without a certificate is refused.
        let (version, _) =
            raw_tls_session(raw_client_config(&certs_dir.join("client"), true), addr(1)).await;
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
        let (_, read) =
            raw_tls_session(raw_client_config(&certs_dir.join("client"), false), addr(1)).await;
        match read {
            Err(error) => assert!(
                error.to_string().to_lowercase().contains("certificate"),
                "refused for another reason: {error}"
            ),
            Ok(0) => {}
            Ok(n) => panic!("a peer without a certificate read {n} bytes from a node"),
        }

        // Every value, read back at the end through another node.
        let reader =
            Client::with_tls([addr(3)], tls(&certs_dir, "client"), DEADLINE).expect("a TLS client");
        for key in &keys {
            let value = reader.send(key.as_str(), Get).await.expect("read back");
            assert_eq!(value.as_deref(), Some(format!("value of {key}").as_str()));
        }
        for node in nodes {
            node.shutdown().await;
        }
    });
}

#[test]
fn tls_with_a_secret_or_with_another_nodes_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let certs_dir = dir.path().join("certs");
    certs::write_cluster(
        &certs_dir,
        "clusterfunk",
        &[NodeSpec {
            id: 1,
            addr: addr(11),
        }],
    )
    .expect("certificates written");
    actix::System::new().block_on(async move {
        let with_secret = clusterfunk::Cluster::builder()
            .node_id(1)
            .listen(addr(11))
            .data_dir(dir.path().join("a"))
            .tls(tls(&certs_dir, "node-1"))
            .secret(Secret::new("tls-test-secret-0123456789abcdef").expect("secret"))
            .handler::<Values>()
            .start()
            .await;
        let message = with_secret.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("choose one mode"), "{message}");

        let wrong_node = clusterfunk::Cluster::builder()
            .node_id(2)
            .listen(addr(12))
            .data_dir(dir.path().join("b"))
            .tls(tls(&certs_dir, "node-1"))
            .handler::<Values>()
            .start()
            .await;
        let message = wrong_node.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("certificate of node 1, but this is node 2"),
            "{message}"
        );
    });
}
