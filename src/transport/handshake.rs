//! The connection handshake: protocol version, cluster name and node id, and mutual
//! authentication by challenge–response over the shared cluster secret.
//!
//! ```text
//! client                                              server
//!   ClientHello { version, cluster, node, nonce_c } ──►
//!                                                     checks version, cluster, secure mode
//!   ◄── ServerHello { version, cluster, node, nonce_s }   (or Refused, then close)
//!   ClientProof { proof_c } ─────────────────────────►   (or Refused, then close)
//!                                                     checks proof_c
//!   ◄── Accepted { proof_s }                             (or Refused, then close)
//!   checks proof_s                                       (or Refused, then close)
//! ```
//!
//! A proof is HMAC-SHA256, keyed with the secret, over a domain tag, the prover's role, the
//! version, the cluster name, both node ids and both nonces. The role makes a reflected proof
//! fail, and each side's fresh nonce makes a replayed one fail. Proofs are checked in constant
//! time. In insecure mode (no secret) nonces and proofs are absent, and each side refuses a peer
//! whose mode differs from its own.
//!
//! What the handshake does not do: encrypt or protect the frames that follow. It keeps nodes of
//! other clusters and clients without the secret out; on a network where an attacker can
//! intercept and alter traffic, run the cluster inside a private network or an encrypted tunnel.
//! The client proves first and the server proves only to a client whose proof it checked, so a
//! peer without the secret that connects to a node learns nothing to test guesses against. A
//! client still reveals its proof to whatever answers at the address it dials (an attacker who
//! can take over a node's address can test guesses offline), so the secret must be random
//! (`clusterfunk new-secret`), never a password.
//!
//! This file does not own the framing (`codec.rs`) or what happens after `Accepted`.

use std::net::SocketAddr;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::codec::{bounded_reason, Frame, FrameKey, Header, Nonce, Tag};
use super::{Secret, TransportConfig, TransportError};

const SECRET_ADVICE: &str = "check CLUSTERFUNK_SECRET / --secret-file on both sides";

/// Which side of the connection computes a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client = 1,
    Server = 2,
}

/// Everything both sides have said, bound into each proof.
struct Transcript<'a> {
    version: u32,
    cluster_name: &'a str,
    client_node_id: Option<u64>,
    server_node_id: Option<u64>,
    client_nonce: &'a Nonce,
    server_nonce: &'a Nonce,
}

/// What one side computes from the secret and the transcript: a proof, or the key of the
/// frames it sends once the handshake succeeded.
const PROOF_LABEL: &[u8] = b"clusterfunk transport handshake\0";
const FRAME_KEY_LABEL: &[u8] = b"clusterfunk transport frame key\0";

fn mac(secret: &Secret, role: Role, transcript: &Transcript<'_>) -> Hmac<Sha256> {
    labelled_mac(PROOF_LABEL, secret, role, transcript)
}

fn labelled_mac(
    label: &[u8],
    secret: &Secret,
    role: Role,
    transcript: &Transcript<'_>,
) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(label);
    mac.update(&[role as u8]);
    mac.update(&transcript.version.to_be_bytes());
    // Length-prefix the variable-length field so that no two transcripts share an encoding.
    mac.update(&(transcript.cluster_name.len() as u64).to_be_bytes());
    mac.update(transcript.cluster_name.as_bytes());
    for node_id in [transcript.client_node_id, transcript.server_node_id] {
        match node_id {
            None => mac.update(&[0]),
            Some(id) => {
                mac.update(&[1]);
                mac.update(&id.to_be_bytes());
            }
        }
    }
    mac.update(transcript.client_nonce);
    mac.update(transcript.server_nonce);
    mac
}

fn prove(secret: &Secret, role: Role, transcript: &Transcript<'_>) -> Tag {
    mac(secret, role, transcript).finalize().into_bytes().into()
}

fn verify(secret: &Secret, role: Role, transcript: &Transcript<'_>, proof: &Tag) -> bool {
    // `verify_slice` compares in constant time.
    mac(secret, role, transcript).verify_slice(proof).is_ok()
}

/// The keys that authenticate the frames of one connection after its handshake, one per
/// direction, fresh for each connection (both nonces are in the transcript).
#[derive(Clone)]
pub(crate) struct FrameKeys {
    client_to_server: FrameKey,
    server_to_client: FrameKey,
}

impl FrameKeys {
    fn derive(secret: &Secret, transcript: &Transcript<'_>) -> Self {
        let key = |role| -> FrameKey {
            labelled_mac(FRAME_KEY_LABEL, secret, role, transcript)
                .finalize()
                .into_bytes()
                .into()
        };
        Self {
            client_to_server: key(Role::Client),
            server_to_client: key(Role::Server),
        }
    }

    /// The connecting side's keys: (to check what it reads, to tag what it writes).
    pub(crate) fn for_client(&self) -> (&FrameKey, &FrameKey) {
        (&self.server_to_client, &self.client_to_server)
    }

    /// The accepting side's keys: (to check what it reads, to tag what it writes).
    pub(crate) fn for_server(&self) -> (&FrameKey, &FrameKey) {
        (&self.client_to_server, &self.server_to_client)
    }
}

impl std::fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKeys(..)")
    }
}

/// What a successful handshake established.
#[derive(Debug)]
pub(crate) struct Established {
    /// The node id the peer announced (`None` for a client that is not a node).
    pub(crate) peer_node_id: Option<u64>,
    /// The frame keys; `None` in insecure mode.
    pub(crate) keys: Option<FrameKeys>,
}

fn random_nonce() -> Result<Nonce, TransportError> {
    let mut nonce = [0; 32];
    getrandom::fill(&mut nonce).map_err(|error| {
        TransportError::Io(std::io::Error::other(format!(
            "the operating system's random source failed: {error}"
        )))
    })?;
    Ok(nonce)
}

/// Reads the next handshake frame; the end of the stream is an error.
async fn next_frame<R>(reader: &mut R, addr: SocketAddr) -> Result<Frame, TransportError>
where
    R: Stream<Item = Result<Frame, TransportError>> + Unpin,
{
    match reader.next().await {
        Some(frame) => frame,
        None => Err(TransportError::Unreachable {
            addr,
            reason: "the peer closed the connection during the handshake (it may be at its connection limit or shutting down)".to_owned(),
        }),
    }
}

/// Sends `Refused { reason }` (best effort: the peer may be gone) and returns the error.
async fn refuse<W>(writer: &mut W, reason: String) -> TransportError
where
    W: Sink<Frame, Error = TransportError> + Unpin,
{
    let reason = bounded_reason(reason);
    let _ = writer
        .send(Frame::control(Header::Refused {
            reason: reason.clone(),
        }))
        .await;
    TransportError::Refused { reason }
}

fn unexpected(frame: &Frame, expected: &str) -> TransportError {
    TransportError::Protocol {
        reason: format!(
            "expected {expected} in the handshake, got {}",
            frame.header.kind()
        ),
    }
}

/// Runs the connecting side's handshake with `config` and the given protocol `version` (a
/// parameter so tests can play an older or newer peer). Returns the server's node id.
pub(crate) async fn client<R, W>(
    reader: &mut R,
    writer: &mut W,
    config: &TransportConfig,
    addr: SocketAddr,
    version: u32,
) -> Result<Established, TransportError>
where
    R: Stream<Item = Result<Frame, TransportError>> + Unpin,
    W: Sink<Frame, Error = TransportError> + Unpin,
{
    let client_nonce = config.secret.as_ref().map(|_| random_nonce()).transpose()?;
    writer
        .send(Frame::control(Header::ClientHello {
            version,
            cluster_name: config.cluster_name.clone(),
            node_id: config.node_id,
            nonce: client_nonce,
        }))
        .await?;

    let frame = next_frame(reader, addr).await?;
    let (server_node_id, server_nonce) = match frame.header {
        Header::Refused { reason } => return Err(TransportError::Refused { reason }),
        Header::ServerHello {
            version: server_version,
            cluster_name,
            node_id,
            nonce,
        } => {
            // The server checks these first; checking again guards against a server that is
            // not ours.
            if server_version != version {
                return Err(refuse(writer, format!("protocol version mismatch: the client speaks {version}, the server {server_version}; run compatible clusterfunk releases on both sides")).await);
            }
            if cluster_name != config.cluster_name {
                return Err(refuse(writer, format!("cluster name mismatch: the client belongs to {:?}, the server at {addr} to {cluster_name:?}; give both sides the same cluster name", config.cluster_name)).await);
            }
            (node_id, nonce)
        }
        _ => return Err(unexpected(&frame, "ServerHello")),
    };

    // The client proves first; the server proves in `Accepted`, once it knows the client holds
    // the secret. So a peer without the secret that connects to a node never receives a proof.
    let secured = match (&config.secret, client_nonce, server_nonce) {
        (None, None, None) => None,
        (Some(secret), Some(client_nonce), Some(server_nonce)) => {
            Some((secret, client_nonce, server_nonce))
        }
        (Some(_), ..) => {
            return Err(refuse(writer, format!("the client has a cluster secret but the server at {addr} runs without one (insecure mode); {SECRET_ADVICE}")).await)
        }
        (None, ..) => {
            return Err(refuse(writer, format!("the server at {addr} requires the cluster secret but the client has none; {SECRET_ADVICE}")).await)
        }
    };
    let transcript = secured
        .as_ref()
        .map(|(_, client_nonce, server_nonce)| Transcript {
            version,
            cluster_name: &config.cluster_name,
            client_node_id: config.node_id,
            server_node_id,
            client_nonce,
            server_nonce,
        });
    let with_secret = secured
        .as_ref()
        .map(|(secret, ..)| *secret)
        .zip(transcript.as_ref());
    writer
        .send(Frame::control(Header::ClientProof {
            proof: with_secret.map(|(secret, transcript)| prove(secret, Role::Client, transcript)),
        }))
        .await?;

    let frame = next_frame(reader, addr).await?;
    let server_proof = match frame.header {
        Header::Accepted { proof } => proof,
        Header::Refused { reason } => return Err(TransportError::Refused { reason }),
        _ => return Err(unexpected(&frame, "Accepted")),
    };
    match (with_secret, server_proof) {
        (None, None) => {}
        (Some((secret, transcript)), Some(proof))
            if verify(secret, Role::Server, transcript, &proof) => {}
        _ => {
            return Err(refuse(writer, format!("authentication failed: the server at {addr} does not hold the client's cluster secret; {SECRET_ADVICE}")).await)
        }
    }
    Ok(Established {
        peer_node_id: server_node_id,
        keys: with_secret.map(|(secret, transcript)| FrameKeys::derive(secret, transcript)),
    })
}

/// Runs the accepting side's handshake. Returns the client's node id. On any failure the
/// client has been sent `Refused` where that makes sense, and the caller closes the connection.
pub(crate) async fn server<R, W>(
    reader: &mut R,
    writer: &mut W,
    config: &TransportConfig,
    addr: SocketAddr,
    version: u32,
) -> Result<Established, TransportError>
where
    R: Stream<Item = Result<Frame, TransportError>> + Unpin,
    W: Sink<Frame, Error = TransportError> + Unpin,
{
    let frame = match next_frame(reader, addr).await {
        Ok(frame) => frame,
        // Tell a peer that sent garbage or an oversized frame why it is dropped: it may be a
        // clusterfunk node of another release.
        Err(error @ TransportError::Protocol { .. }) => {
            let _ = refuse(writer, error.to_string()).await;
            return Err(error);
        }
        // The handshake limit is fixed, so "raise frame_size_max" would be the wrong advice.
        Err(TransportError::FrameTooLarge { len, max }) => {
            return Err(refuse(writer, format!("the first frame announces {len} bytes, above the handshake limit of {max} bytes; the peer is not a clusterfunk node of a compatible release")).await);
        }
        Err(error) => return Err(error),
    };
    let Header::ClientHello {
        version: client_version,
        cluster_name,
        node_id: client_node_id,
        nonce: client_nonce,
    } = frame.header
    else {
        return Err(refuse(writer, unexpected(&frame, "ClientHello").to_string()).await);
    };
    if client_version != version {
        return Err(refuse(writer, format!("protocol version mismatch: the client speaks {client_version}, the server {version}; run compatible clusterfunk releases on both sides")).await);
    }
    if cluster_name != config.cluster_name {
        return Err(refuse(writer, format!("cluster name mismatch: the client belongs to {cluster_name:?}, the server to {:?}; give both sides the same cluster name", config.cluster_name)).await);
    }

    let secured = match (&config.secret, client_nonce) {
        (None, None) => None,
        (Some(secret), Some(client_nonce)) => Some((secret, client_nonce, random_nonce()?)),
        (Some(_), None) => {
            return Err(refuse(writer, format!("the server requires the cluster secret but the client has none; {SECRET_ADVICE}")).await)
        }
        (None, Some(_)) => {
            return Err(refuse(writer, format!("the client has a cluster secret but the server runs without one (insecure mode); {SECRET_ADVICE}")).await)
        }
    };
    let transcript = secured
        .as_ref()
        .map(|(_, client_nonce, server_nonce)| Transcript {
            version,
            cluster_name: &config.cluster_name,
            client_node_id,
            server_node_id: config.node_id,
            client_nonce,
            server_nonce,
        });
    writer
        .send(Frame::control(Header::ServerHello {
            version,
            cluster_name: config.cluster_name.clone(),
            node_id: config.node_id,
            nonce: secured.as_ref().map(|(_, _, server_nonce)| *server_nonce),
        }))
        .await?;

    let frame = next_frame(reader, addr).await?;
    let client_proof = match frame.header {
        Header::ClientProof { proof } => proof,
        // The client refused us (our mode, our cluster): nothing to answer.
        Header::Refused { reason } => return Err(TransportError::Refused { reason }),
        _ => return Err(refuse(writer, unexpected(&frame, "ClientProof").to_string()).await),
    };
    let with_secret = secured
        .as_ref()
        .map(|(secret, ..)| *secret)
        .zip(transcript.as_ref());
    match (with_secret, client_proof) {
        (None, None) => {}
        (Some((secret, transcript)), Some(proof))
            if verify(secret, Role::Client, transcript, &proof) => {}
        _ => {
            return Err(refuse(writer, format!("authentication failed: the client does not hold the server's cluster secret; {SECRET_ADVICE}")).await)
        }
    }
    writer
        .send(Frame::control(Header::Accepted {
            proof: with_secret.map(|(secret, transcript)| prove(secret, Role::Server, transcript)),
        }))
        .await?;
    Ok(Established {
        peer_node_id: client_node_id,
        keys: with_secret.map(|(secret, transcript)| FrameKeys::derive(secret, transcript)),
    })
}

#[cfg(test)]
mod tests {
    use super::super::codec::{FrameCodec, HANDSHAKE_FRAME_MAX};
    use super::super::PROTOCOL_VERSION;
    use super::*;
    use tokio_util::codec::{FramedRead, FramedWrite};

    fn secret(byte: u8) -> Secret {
        Secret::new(format!("handshake-test-secret-{byte:03}-0123456789")).expect("strong enough")
    }

    fn transcript<'a>(client_nonce: &'a Nonce, server_nonce: &'a Nonce) -> Transcript<'a> {
        Transcript {
            version: 1,
            cluster_name: "c",
            client_node_id: Some(1),
            server_node_id: Some(2),
            client_nonce,
            server_nonce,
        }
    }

    #[test]
    fn proofs_are_bound_to_role_secret_and_nonces() {
        let (a, b) = ([1; 32], [2; 32]);
        let proof = prove(&secret(1), Role::Server, &transcript(&a, &b));
        assert!(verify(
            &secret(1),
            Role::Server,
            &transcript(&a, &b),
            &proof
        ));
        assert!(
            !verify(&secret(1), Role::Client, &transcript(&a, &b), &proof),
            "reflected"
        );
        assert!(
            !verify(&secret(2), Role::Server, &transcript(&a, &b), &proof),
            "other secret"
        );
        assert!(
            !verify(&secret(1), Role::Server, &transcript(&b, &a), &proof),
            "other nonces"
        );
    }

    type Reader = FramedRead<tokio::io::ReadHalf<tokio::io::DuplexStream>, FrameCodec>;
    type Writer = FramedWrite<tokio::io::WriteHalf<tokio::io::DuplexStream>, FrameCodec>;

    /// The two framed ends of an in-memory pipe: (client side, server side).
    fn pipe() -> ((Reader, Writer), (Reader, Writer)) {
        let (client_io, server_io) = tokio::io::duplex(HANDSHAKE_FRAME_MAX);
        let framed = |io| {
            let (read, write) = tokio::io::split(io);
            (
                FramedRead::new(read, FrameCodec::new(HANDSHAKE_FRAME_MAX)),
                FramedWrite::new(write, FrameCodec::new(HANDSHAKE_FRAME_MAX)),
            )
        };
        (framed(client_io), framed(server_io))
    }

    /// Runs both sides over an in-memory pipe and returns (client result, server result).
    async fn run(
        client_config: TransportConfig,
        client_version: u32,
        server_config: TransportConfig,
    ) -> (
        Result<Option<u64>, TransportError>,
        Result<Option<u64>, TransportError>,
    ) {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let ((mut client_reader, mut client_writer), (mut server_reader, mut server_writer)) =
            pipe();
        let server = async {
            let result = server(
                &mut server_reader,
                &mut server_writer,
                &server_config,
                addr,
                PROTOCOL_VERSION,
            )
            .await;
            // Closing the server's side ends the client's wait after a refusal.
            drop(server_writer);
            result
        };
        let (client, server) = tokio::join!(
            client(
                &mut client_reader,
                &mut client_writer,
                &client_config,
                addr,
                client_version
            ),
            server
        );
        (
            client.map(|done| done.peer_node_id),
            server.map(|done| done.peer_node_id),
        )
    }

    fn config(secret: Option<Secret>, node_id: Option<u64>) -> TransportConfig {
        TransportConfig {
            secret,
            node_id,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn matching_peers_learn_each_others_node_id() {
        let (client, server) = run(
            config(Some(secret(1)), None),
            PROTOCOL_VERSION,
            config(Some(secret(1)), Some(7)),
        )
        .await;
        assert_eq!(client.expect("client accepted"), Some(7));
        assert_eq!(server.expect("server accepted"), None);

        let (client, server) =
            run(config(None, Some(3)), PROTOCOL_VERSION, config(None, None)).await;
        assert_eq!(client.expect("insecure accepted"), None);
        assert_eq!(server.expect("insecure accepted"), Some(3));
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused() {
        let (client, server) =
            run(config(None, None), PROTOCOL_VERSION + 1, config(None, None)).await;
        let error = client.expect_err("refused");
        assert!(matches!(error, TransportError::Refused { .. }), "{error}");
        assert!(
            error.to_string().contains("protocol version mismatch"),
            "{error}"
        );
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn secured_client_is_refused_by_insecure_server() {
        let (client, server) = run(
            config(Some(secret(1)), None),
            PROTOCOL_VERSION,
            config(None, None),
        )
        .await;
        let error = client.expect_err("refused");
        assert!(error.to_string().contains("CLUSTERFUNK_SECRET"), "{error}");
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_on_both_sides() {
        let (client, server) = run(
            config(Some(secret(1)), None),
            PROTOCOL_VERSION,
            config(Some(secret(2)), Some(1)),
        )
        .await;
        let error = server.expect_err("the server refuses a client with another secret");
        assert!(
            error.to_string().contains("authentication failed"),
            "{error}"
        );
        let error = client.expect_err("the client learns it was refused");
        assert!(
            error.to_string().contains("authentication failed"),
            "{error}"
        );
    }

    /// A peer without the secret that connects to a node must not receive the node's proof:
    /// it could test guesses of the secret against it offline.
    #[tokio::test]
    async fn a_peer_without_the_secret_receives_no_proof_from_a_node() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let ((mut peer_reader, mut peer_writer), (mut server_reader, mut server_writer)) = pipe();
        let server_config = config(Some(secret(1)), Some(1));
        let server = async {
            let result = server(
                &mut server_reader,
                &mut server_writer,
                &server_config,
                addr,
                PROTOCOL_VERSION,
            )
            .await;
            // Both halves gone: the peer reads the end of the stream.
            drop(server_writer);
            drop(server_reader);
            result
        };
        let peer = async {
            peer_writer
                .send(Frame::control(Header::ClientHello {
                    version: PROTOCOL_VERSION,
                    cluster_name: server_config.cluster_name.clone(),
                    node_id: None,
                    nonce: Some([3; 32]),
                }))
                .await
                .expect("hello sent");
            // The attacker has no secret: it answers with a made-up proof.
            let hello = peer_reader
                .next()
                .await
                .expect("server hello")
                .expect("decodes");
            assert!(
                matches!(hello.header, Header::ServerHello { .. }),
                "{hello:?}"
            );
            peer_writer
                .send(Frame::control(Header::ClientProof {
                    proof: Some([4; 32]),
                }))
                .await
                .expect("proof sent");
            let mut rest = Vec::new();
            while let Some(Ok(frame)) = peer_reader.next().await {
                rest.push(frame.header);
            }
            rest
        };
        let (server, rest) = tokio::join!(server, peer);
        assert!(server.is_err(), "the made-up proof is refused");
        assert!(
            rest.iter()
                .all(|header| matches!(header, Header::Refused { .. })),
            "after its hello the server sent only a refusal, never a proof: {rest:?}"
        );
        assert!(!rest.is_empty(), "the peer is told why it is refused");
    }
}
