//! Integration tests of the transport: real TCP servers and clients on 127.0.0.1 (port 0),
//! checking requests and responses, multiplexing, the authentication handshake, robustness
//! against bad peers, timeouts, reconnection and fault injection.
//!
//! Waiting is done on events (a response, a closed socket, a signal from the service), with
//! every wait bounded; the one polling loop (reconnection) is bounded in attempts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfunk::transport::{
    serve, PeerInfo, Secret, SecretError, ServerHandle, Service, ServiceError, Transport,
    TransportConfig, TransportError, OVERLOADED,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Bound on any single wait in these tests; far above what a passing test needs.
const PATIENCE: Duration = Duration::from_secs(5);

fn secret(byte: u8) -> Secret {
    Secret::new(format!("transport-test-secret-{byte:03}-0123456789")).expect("strong enough")
}

fn config(secret: Option<Secret>) -> TransportConfig {
    TransportConfig {
        node_id: Some(1),
        secret,
        // Short backoff keeps the reconnect test quick.
        reconnect_backoff_max: Duration::from_millis(50),
        ..Default::default()
    }
}

/// Answers `echo:<payload>`; `hang` never answers (and reports it got it, if `arrived` is set),
/// `fail` fails, `whoami` returns the caller's node id.
fn service(arrived: Option<mpsc::UnboundedSender<()>>) -> Arc<dyn Service> {
    Arc::new(move |peer: PeerInfo, payload: Vec<u8>| {
        let arrived = arrived.clone();
        async move {
            match payload.as_slice() {
                b"hang" => {
                    if let Some(arrived) = arrived {
                        let _ = arrived.send(());
                    }
                    std::future::pending().await
                }
                b"fail" => Err(ServiceError::failed("the handler failed on purpose")),
                b"whoami" => Ok(format!("{:?}", peer.node_id).into_bytes()),
                _ => Ok([b"echo:".as_slice(), &payload].concat()),
            }
        }
    })
}

async fn start(config: TransportConfig) -> ServerHandle {
    start_with(config, service(None)).await
}

async fn start_with(config: TransportConfig, service: Arc<dyn Service>) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    serve(listener, config, service)
        .await
        .expect("valid config")
}

fn client(config: TransportConfig) -> Transport {
    Transport::new(config).expect("valid config")
}

async fn ping(transport: &Transport, addr: SocketAddr) -> Result<Vec<u8>, TransportError> {
    transport.request(addr, b"ping".to_vec(), PATIENCE).await
}

/// Reads until the server closes the connection; fails the test if it stays open.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received)).await {
        // A reset is a close too.
        Ok(_) => received,
        Err(_) => panic!("the server kept the connection open"),
    }
}

// Goal: the basic exchange works in both secure and insecure mode, a service error arrives as
// `Remote`, and the service sees the caller's node id.
#[tokio::test]
async fn round_trip_returns_the_services_answer() {
    for secret in [Some(secret(1)), None] {
        let server = start(config(secret.clone())).await;
        let transport = client(TransportConfig {
            node_id: Some(42),
            ..config(secret)
        });
        let addr = server.local_addr();
        assert_eq!(
            ping(&transport, addr).await.expect("answered"),
            b"echo:ping"
        );
        let whoami = transport.request(addr, b"whoami".to_vec(), PATIENCE).await;
        assert_eq!(whoami.expect("answered"), b"Some(42)");
        let failed = transport.request(addr, b"fail".to_vec(), PATIENCE).await;
        assert!(
            matches!(&failed, Err(TransportError::Remote { reason }) if reason == "the handler failed on purpose"),
            "{failed:?}"
        );
        server.shutdown().await;
    }
}

// Goal: concurrent requests are pipelined over one connection and each gets its own answer.
// Method: 1000 requests at once; check every answer against its request and count accepts.
#[tokio::test]
async fn thousand_concurrent_requests_share_one_connection() {
    let server = start(config(Some(secret(1)))).await;
    let transport = client(config(Some(secret(1))));
    let addr = server.local_addr();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let transport = transport.clone();
        requests.spawn(async move {
            let payload = i.to_be_bytes().to_vec();
            let answer = transport.request(addr, payload.clone(), PATIENCE).await;
            (payload, answer)
        });
    }
    let mut answered = 0;
    while let Some(joined) = requests.join_next().await {
        let (payload, answer) = joined.expect("request task did not panic");
        assert_eq!(
            answer.expect("answered"),
            [b"echo:".as_slice(), &payload].concat()
        );
        answered += 1;
    }
    assert_eq!(answered, 1000);
    assert_eq!(
        server.connections_accepted(),
        1,
        "all requests shared one connection"
    );
    server.shutdown().await;
}

// Goal: a client with the wrong secret is refused with advice, and does not disturb others.
#[tokio::test]
async fn wrong_secret_is_refused_while_correct_client_keeps_working() {
    let server = start(config(Some(secret(1)))).await;
    let addr = server.local_addr();
    let good = client(config(Some(secret(1))));
    let bad = client(config(Some(secret(2))));
    assert!(ping(&good, addr).await.is_ok());

    let error = ping(&bad, addr).await.expect_err("wrong secret");
    assert!(matches!(error, TransportError::Refused { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("authentication failed"), "{message}");
    assert!(
        message.contains("CLUSTERFUNK_SECRET / --secret-file"),
        "{message}"
    );

    assert_eq!(ping(&good, addr).await.expect("still served"), b"echo:ping");
    server.shutdown().await;
}

// Goal: insecure mode only talks to insecure peers, in both directions.
#[tokio::test]
async fn insecure_and_secured_peers_refuse_each_other() {
    let secured = start(config(Some(secret(1)))).await;
    let insecure_client = client(config(None));
    let error = ping(&insecure_client, secured.local_addr())
        .await
        .expect_err("refused");
    assert!(matches!(error, TransportError::Refused { .. }), "{error}");
    assert!(
        error.to_string().contains("requires the cluster secret"),
        "{error}"
    );
    assert!(error.to_string().contains("CLUSTERFUNK_SECRET"), "{error}");

    let insecure = start(config(None)).await;
    let secured_client = client(config(Some(secret(1))));
    let error = ping(&secured_client, insecure.local_addr())
        .await
        .expect_err("refused");
    assert!(matches!(error, TransportError::Refused { .. }), "{error}");
    assert!(error.to_string().contains("insecure mode"), "{error}");
    secured.shutdown().await;
    insecure.shutdown().await;
}

// Goal: nodes of another cluster are refused, even with the same secret.
#[tokio::test]
async fn different_cluster_name_is_refused() {
    let server = start(config(Some(secret(1)))).await;
    let stranger = client(TransportConfig {
        cluster_name: "other-cluster".to_owned(),
        ..config(Some(secret(1)))
    });
    let error = ping(&stranger, server.local_addr())
        .await
        .expect_err("refused");
    assert!(matches!(error, TransportError::Refused { .. }), "{error}");
    assert!(
        error.to_string().contains("cluster name mismatch"),
        "{error}"
    );
    server.shutdown().await;
}

// Goal: a peer sending garbage or an oversized length prefix loses its connection, and the
// server goes on serving a good client. Method: raw TCP clients; the server must close them.
#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let server = start(config(Some(secret(1)))).await;
    let addr = server.local_addr();
    let good = client(config(Some(secret(1))));
    assert!(ping(&good, addr).await.is_ok());

    // A well-framed body that is not a header.
    let mut garbage = TcpStream::connect(addr).await.expect("connect");
    garbage.write_all(&8u32.to_be_bytes()).await.expect("write");
    garbage.write_all(&[0xff; 8]).await.expect("write");
    let refusal = read_until_closed(&mut garbage).await;
    assert!(String::from_utf8_lossy(&refusal).contains("undecodable frame"));
    assert!(ping(&good, addr).await.is_ok());

    // A length prefix far above the limit.
    let mut oversized = TcpStream::connect(addr).await.expect("connect");
    oversized
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .expect("write");
    let refusal = read_until_closed(&mut oversized).await;
    assert!(String::from_utf8_lossy(&refusal).contains("above the handshake limit"));

    // Another protocol: the first bytes read as a huge length.
    let mut http = TcpStream::connect(addr).await.expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    read_until_closed(&mut http).await;

    assert_eq!(ping(&good, addr).await.expect("still served"), b"echo:ping");
    assert_eq!(server.connections_accepted(), 4);
    server.shutdown().await;
}

// Goal: a peer that connects and says nothing is dropped after the handshake timeout.
#[tokio::test]
async fn silent_peer_is_dropped_after_the_handshake_timeout() {
    let server = start(TransportConfig {
        handshake_timeout: Duration::from_millis(100),
        ..config(Some(secret(1)))
    })
    .await;
    let mut silent = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    assert!(read_until_closed(&mut silent).await.is_empty());
    server.shutdown().await;
}

// Goal: at `connections_max`, further connections wait until one closes, then get served.
// Method: limit 1; a second client's handshake times out while the first is connected, and
// succeeds (bounded retries) once the first closes its connection.
#[tokio::test]
async fn connections_past_the_limit_wait_until_one_closes() {
    let server = start(TransportConfig {
        connections_max: 1,
        ..config(None)
    })
    .await;
    let addr = server.local_addr();
    let first = client(config(None));
    let second = client(TransportConfig {
        handshake_timeout: Duration::from_millis(100),
        ..config(None)
    });
    assert!(ping(&first, addr).await.is_ok());
    assert_eq!(server.connections_open(), 1);
    let error = ping(&second, addr).await.expect_err("waits in the backlog");
    assert!(
        error.to_string().contains("handshake did not finish"),
        "{error}"
    );

    first.close(addr);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match ping(&second, addr).await {
            Ok(_) => break,
            Err(TransportError::Unreachable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("not served after a slot freed up: {error}"),
        }
    }
    server.shutdown().await;
}

// Goal: after the handshake, a frame above the server's limit closes that connection only.
// Method: a client whose own limit is larger than the server's sends a big payload.
#[tokio::test]
async fn oversized_frame_after_handshake_closes_only_that_connection() {
    let server = start(TransportConfig {
        frame_size_max: 64 * 1024,
        ..config(None)
    })
    .await;
    let addr = server.local_addr();
    let good = client(config(None));
    let big = client(config(None));
    assert!(ping(&big, addr).await.is_ok());

    let error = big
        .request(addr, vec![0; 100 * 1024], PATIENCE)
        .await
        .expect_err("too large for the server");
    assert!(matches!(error, TransportError::Closed { .. }), "{error}");
    assert_eq!(ping(&good, addr).await.expect("still served"), b"echo:ping");
    // The client whose connection was closed reconnects for its next request.
    assert!(ping(&big, addr).await.is_ok());
    server.shutdown().await;
}

// Goal: a payload above the client's own limit is refused before anything is sent.
#[tokio::test]
async fn payload_above_the_frame_limit_is_rejected_locally() {
    let transport = client(TransportConfig {
        frame_size_max: 64 * 1024,
        ..config(None)
    });
    let unused = SocketAddr::from(([127, 0, 0, 1], 9));
    let error = transport
        .request(unused, vec![0; 64 * 1024], PATIENCE)
        .await
        .expect_err("too large");
    assert!(
        matches!(error, TransportError::FrameTooLarge { max, .. } if max == 64 * 1024),
        "{error}"
    );
}

// Goal: a request whose answer never comes times out, and the connection stays usable.
#[tokio::test]
async fn request_times_out_when_the_service_never_answers() {
    let server = start(config(None)).await;
    let addr = server.local_addr();
    let transport = client(config(None));
    let timeout = Duration::from_millis(200);
    let error = transport
        .request(addr, b"hang".to_vec(), timeout)
        .await
        .expect_err("no answer");
    assert!(
        matches!(error, TransportError::Timeout { after, .. } if after == timeout),
        "{error}"
    );
    assert_eq!(
        ping(&transport, addr).await.expect("answered"),
        b"echo:ping"
    );
    assert_eq!(server.connections_accepted(), 1);
    server.shutdown().await;
}

// Goal: when a server restarts on the same port, clients reconnect by themselves.
// Method: shut the server down, bind the same address again, and retry (bounded) until the
// new server answers; errors meanwhile must be Closed or Unreachable.
#[tokio::test]
async fn reconnects_after_the_server_restarts_on_the_same_port() {
    let server = start(config(Some(secret(1)))).await;
    let addr = server.local_addr();
    let transport = client(config(Some(secret(1))));
    assert!(ping(&transport, addr).await.is_ok());
    server.shutdown().await;

    let error = ping(&transport, addr).await.expect_err("server is down");
    assert!(
        matches!(
            error,
            TransportError::Unreachable { .. } | TransportError::Closed { .. }
        ),
        "{error}"
    );

    let listener = TcpListener::bind(addr).await.expect("port is free again");
    let restarted = serve(listener, config(Some(secret(1))), service(None))
        .await
        .expect("valid config");
    let deadline = Instant::now() + PATIENCE;
    loop {
        match ping(&transport, addr).await {
            Ok(answer) => {
                assert_eq!(answer, b"echo:ping");
                break;
            }
            Err(TransportError::Unreachable { .. } | TransportError::Closed { .. })
                if Instant::now() < deadline =>
            {
                // Backoff is at most 50 ms here; wait a little less between attempts.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("no reconnection: {error}"),
        }
    }
    restarted.shutdown().await;
}

// Goal: a destination in reconnect backoff fails fast instead of queueing requests.
#[tokio::test]
async fn peer_in_backoff_fails_fast() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    drop(listener); // nobody listens there now
    let transport = client(TransportConfig {
        reconnect_backoff_min: Duration::from_secs(10),
        reconnect_backoff_max: Duration::from_secs(10),
        ..config(None)
    });
    let error = ping(&transport, addr).await.expect_err("nobody listens");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );
    let error = ping(&transport, addr).await.expect_err("in backoff");
    assert!(error.to_string().contains("next one in"), "{error}");
    // `close` forgets the backoff.
    transport.close(addr);
    let error = ping(&transport, addr).await.expect_err("nobody listens");
    assert!(error.to_string().contains("TCP connect failed"), "{error}");
}

// Goal: blocking a destination fails new requests at once and those in flight too (the
// connection is dropped); unblocking heals it with a new connection.
// Method: the service reports when the hanging request arrived, then the test blocks.
#[tokio::test]
async fn blocked_destination_fails_fast_with_unreachable() {
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let server = start_with(config(None), service(Some(arrived))).await;
    let addr = server.local_addr();
    let transport = client(config(None));
    assert!(ping(&transport, addr).await.is_ok());

    let in_flight = tokio::spawn({
        let transport = transport.clone();
        async move { transport.request(addr, b"hang".to_vec(), PATIENCE).await }
    });
    tokio::time::timeout(PATIENCE, arrivals.recv())
        .await
        .expect("the hanging request reached the service");
    transport.faults().block(addr);
    assert!(transport.faults().is_blocked(addr));

    let started = Instant::now();
    let error = ping(&transport, addr).await.expect_err("blocked");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "failed fast");
    let error = in_flight
        .await
        .expect("no panic")
        .expect_err("connection dropped");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "{error}"
    );

    transport.faults().unblock_all();
    assert_eq!(ping(&transport, addr).await.expect("healed"), b"echo:ping");
    assert_eq!(
        server.connections_accepted(),
        2,
        "reconnected after the block"
    );
    server.shutdown().await;
}

// Goal: an injected delay counts against the request's timeout, and can be removed.
#[tokio::test]
async fn delayed_destination_times_out() {
    let server = start(config(None)).await;
    let addr = server.local_addr();
    let transport = client(config(None));
    transport.faults().set_delay(addr, Duration::from_secs(60));
    let error = transport
        .request(addr, b"ping".to_vec(), Duration::from_millis(100))
        .await
        .expect_err("delayed past the timeout");
    assert!(matches!(error, TransportError::Timeout { .. }), "{error}");
    transport.faults().set_delay(addr, Duration::ZERO);
    assert!(ping(&transport, addr).await.is_ok());
    server.shutdown().await;
}

// Goal: past `in_flight_per_connection_max`, requests are answered "overloaded" at once.
#[tokio::test]
async fn requests_past_the_in_flight_limit_are_overloaded() {
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let server = start_with(
        TransportConfig {
            in_flight_per_connection_max: 1,
            ..config(None)
        },
        service(Some(arrived)),
    )
    .await;
    let addr = server.local_addr();
    let transport = client(config(None));
    let hanging = tokio::spawn({
        let transport = transport.clone();
        async move { transport.request(addr, b"hang".to_vec(), PATIENCE).await }
    });
    tokio::time::timeout(PATIENCE, arrivals.recv())
        .await
        .expect("the hanging request reached the service");
    let error = ping(&transport, addr).await.expect_err("overloaded");
    assert!(
        matches!(&error, TransportError::Remote { reason } if reason == OVERLOADED),
        "{error}"
    );
    hanging.abort();
    server.shutdown().await;
}

// Goal: invalid configurations are rejected before anything starts.
#[tokio::test]
async fn invalid_config_is_rejected() {
    let invalid = TransportConfig {
        connections_max: 0,
        ..Default::default()
    };
    let error = Transport::new(invalid.clone()).expect_err("invalid");
    assert!(matches!(error, TransportError::Config(_)), "{error}");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let error = serve(listener, invalid, service(None))
        .await
        .expect_err("invalid");
    assert!(error.to_string().contains("connections_max"), "{error}");
}

// Goal: secrets from files are trimmed of their newline and must be long and varied enough.
#[test]
fn secret_from_file_rejects_empty_short_and_weak_secrets() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("secret");

    for empty in ["", "\n", "\r\n"] {
        std::fs::write(&path, empty).expect("write");
        let error = Secret::from_file(&path).expect_err("empty");
        assert!(matches!(error, SecretError::Empty { .. }), "{error}");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
    }

    std::fs::write(&path, "twenty-three-bytes-long\n").expect("write");
    let error = Secret::from_file(&path).expect_err("short");
    assert!(
        matches!(error, SecretError::TooShort { length: 23, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("at least 24"), "{error}");

    // Sixteen spaces were accepted once; long runs of few characters are refused too.
    for weak in [" ".repeat(16), " ".repeat(40), "abcabc".repeat(8)] {
        std::fs::write(&path, format!("{weak}\n")).expect("write");
        let error = Secret::from_file(&path).expect_err("weak");
        assert!(
            matches!(
                error,
                SecretError::TooShort { .. } | SecretError::TooWeak { .. }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("new-secret"), "{error}");
    }

    std::fs::write(&path, "twenty-four-bytes-long!!\n").expect("write");
    assert!(Secret::from_file(&path).is_ok());

    let error = Secret::from_file(dir.path().join("missing")).expect_err("no file");
    assert!(matches!(error, SecretError::Read { .. }), "{error}");
}

/// A client config that probes and judges silence quickly.
fn quick_liveness(secret: Option<Secret>) -> TransportConfig {
    TransportConfig {
        probe_after: Duration::from_millis(20),
        unresponsive_after: Duration::from_millis(60),
        ..config(secret)
    }
}

// Goal: a peer whose handlers are busy, but whose connection works, is never taken for a
// frozen one: its I/O task answers the liveness probes itself.
// Method: a request the service never answers stays outstanding for 20 times the silence bound
// (a wait for nothing to happen: no event marks it); the connection must still be responsive,
// and no health change may have been announced.
#[tokio::test]
async fn a_busy_service_keeps_its_connection_responsive() {
    let server = start(config(None)).await;
    let addr = server.local_addr();
    let transport = client(quick_liveness(None));
    assert_eq!(
        ping(&transport, addr).await.expect("answered"),
        b"echo:ping"
    );
    let health = transport.health_changes();
    let hanging = transport.request(addr, b"hang".to_vec(), Duration::from_millis(1200));
    let error = hanging.await.expect_err("the service never answers");
    assert!(matches!(error, TransportError::Timeout { .. }), "{error}");
    assert!(transport.is_responsive(addr));
    assert!(
        !health.has_changed().expect("the transport lives"),
        "the connection was judged unresponsive while its peer answered probes"
    );
    server.shutdown().await;
}

// Goal: a peer that answers nothing any more (frozen, or cut off without a reset) is flagged
// unresponsive while requests wait on it, and responsive again with its next frame; the
// connection stays open throughout.
// Method: blackhole the answers from the server (the probes' answers included), wait for the
// health change, check the flag; heal, wait for the next change, and send on the same
// connection.
#[tokio::test]
async fn a_silent_peer_turns_unresponsive_and_recovers_with_its_next_frame() {
    let server = start(config(None)).await;
    let addr = server.local_addr();
    let transport = client(quick_liveness(None));
    ping(&transport, addr).await.expect("answered");
    let mut health = transport.health_changes();
    transport.faults().blackhole_responses(addr);
    let waiting = {
        let transport = transport.clone();
        let timeout = Duration::from_secs(2);
        tokio::spawn(async move { transport.request(addr, b"ping".to_vec(), timeout).await })
    };
    tokio::time::timeout(PATIENCE, health.changed())
        .await
        .expect("the silence is noticed")
        .expect("the transport lives");
    assert!(!transport.is_responsive(addr));
    transport.faults().unblackhole(addr);
    tokio::time::timeout(PATIENCE, health.changed())
        .await
        .expect("the next probe's answer is noticed")
        .expect("the transport lives");
    assert!(transport.is_responsive(addr));
    assert_eq!(
        ping(&transport, addr).await.expect("answered"),
        b"echo:ping"
    );
    // The request whose answer was lost ends by its own timeout, on the open connection.
    let lost = waiting.await.expect("the request task");
    assert!(
        matches!(lost, Err(TransportError::Timeout { .. })),
        "{lost:?}"
    );
    assert_eq!(server.connections_accepted(), 1);
    server.shutdown().await;
}

// Goal: an empty payload, which the wire reserves for liveness probes, is refused locally with
// a reason instead of being swallowed by the peer's connection.
#[tokio::test]
async fn an_empty_payload_is_refused_locally() {
    let server = start(config(None)).await;
    let transport = client(config(None));
    let error = transport
        .request(server.local_addr(), Vec::new(), PATIENCE)
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, TransportError::Protocol { reason } if reason.contains("probe")),
        "{error}"
    );
    assert_eq!(server.connections_accepted(), 0);
    server.shutdown().await;
}

// Goal: a peer that accepts the TCP connection but never answers the handshake (a process
// frozen before this client first connected) fails a request as unreachable (nothing was sent:
// safe to send elsewhere), not as a timeout whose outcome is unknown.
#[tokio::test]
async fn a_request_that_never_got_a_connection_is_unreachable_not_timed_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    // Accepts, then holds the socket without a word.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let transport = client(config(None));
    let error = transport
        .request(addr, b"ping".to_vec(), Duration::from_millis(300))
        .await
        .expect_err("no handshake, no answer");
    assert!(
        matches!(error, TransportError::Unreachable { .. }),
        "a request that never left is unreachable: {error}"
    );
    holder.abort();
}

/// What the relay in [`relay`] does to the client's first frame after the handshake.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Flips the last byte of the request's payload.
    Flip,
    /// Passes the frame on and then sends it a second time.
    Replay,
    /// Sends its own request first (the client's frame with another payload byte, as a relay
    /// without the keys would forge one), then the client's.
    Inject,
    /// Passes the request on and flips the last byte of the server's answer on its way back.
    AlterAnswer,
}

/// Copies length-prefixed frames from `from` to `to`; frame `index` 2 (the first after the
/// handshake's two) goes through `tamper`, which returns the frames to send in its place.
async fn relay_frames<R, W>(
    mut from: R,
    mut to: W,
    tamper: impl Fn(Vec<u8>) -> Vec<Vec<u8>> + Send + 'static,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    for index in 0u32.. {
        let mut prefix = [0u8; 4];
        if from.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
        if from.read_exact(&mut body).await.is_err() {
            return;
        }
        let frame = [prefix.as_slice(), &body].concat();
        let frames = if index == 2 {
            tamper(frame)
        } else {
            vec![frame]
        };
        for frame in frames {
            if to.write_all(&frame).await.is_err() {
                return;
            }
        }
    }
}

/// A relay without the secret between a client and `server`: passes the handshake (the
/// client's first two frames) as it is and tampers with the third. Returns its address.
/// `tagged`: whether frames after the handshake end with a 16-byte tag (secure mode).
async fn relay(server: SocketAddr, tamper: Tamper, tagged: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(server).await else {
            return;
        };
        let (client_read, client_write) = client.into_split();
        let (upstream_read, upstream_write) = upstream.into_split();
        // The payload's last byte comes before the tag.
        let flip_last = move |mut frame: Vec<u8>| {
            let at = frame.len() - 1 - if tagged { 16 } else { 0 };
            frame[at] ^= 0x01;
            frame
        };
        tokio::spawn(relay_frames(
            upstream_read,
            client_write,
            move |frame| match tamper {
                Tamper::AlterAnswer => vec![flip_last(frame)],
                _ => vec![frame],
            },
        ));
        relay_frames(client_read, upstream_write, move |frame| match tamper {
            Tamper::Flip => vec![flip_last(frame)],
            Tamper::Replay => vec![frame.clone(), frame],
            Tamper::Inject => vec![flip_last(frame.clone()), frame],
            Tamper::AlterAnswer => vec![frame],
        })
        .await;
    });
    addr
}

// Goal: a relay without the secret cannot alter, replay or inject a frame after the
// handshake, in either direction: the receiver refuses the frame and the connection closes;
// the service never sees an altered, repeated or forged request and the client never accepts
// an altered answer. The same relay in insecure mode gets the altered request served, which
// shows that the relay does what it claims.
#[tokio::test]
async fn a_relay_cannot_alter_or_replay_frames_after_the_handshake() {
    for (tamper, secret) in [
        (Tamper::Flip, None),
        (Tamper::Flip, Some(secret(1))),
        (Tamper::Replay, Some(secret(1))),
        (Tamper::Inject, Some(secret(1))),
        (Tamper::AlterAnswer, Some(secret(1))),
    ] {
        let (seen, mut seen_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let recording: Arc<dyn Service> = Arc::new(move |_peer: PeerInfo, payload: Vec<u8>| {
            let _ = seen.send(payload.clone());
            async move { Ok::<_, ServiceError>([b"echo:".as_slice(), &payload].concat()) }
        });
        let server = start_with(config(secret.clone()), recording).await;
        let through = relay(server.local_addr(), tamper, secret.is_some()).await;
        let transport = client(config(secret.clone()));
        let answer = transport.request(through, b"ping".to_vec(), PATIENCE).await;
        if secret.is_none() {
            assert_eq!(
                answer.expect("insecure mode has no defence"),
                b"echo:pinf",
                "the relay flips the payload's last byte"
            );
            server.shutdown().await;
            continue;
        }
        match tamper {
            Tamper::Flip | Tamper::Inject => assert!(
                answer.is_err(),
                "{tamper:?}: a forged request was answered: {answer:?}"
            ),
            // The service answered the genuine request; the client refuses the altered answer.
            Tamper::AlterAnswer => assert!(
                answer.is_err(),
                "an altered answer was accepted: {answer:?}"
            ),
            // The genuine frame arrives first and may be answered; its replay is not.
            Tamper::Replay => {}
        }
        // The server closed the connection: the next request on it fails too.
        let again = transport
            .request(through, b"again".to_vec(), PATIENCE)
            .await;
        assert!(
            again.is_err(),
            "the connection survived tampering: {again:?}"
        );
        server.shutdown().await;
        let mut payloads = Vec::new();
        while let Ok(payload) = seen_rx.try_recv() {
            payloads.push(payload);
        }
        let expected: Vec<Vec<u8>> = match tamper {
            Tamper::Flip | Tamper::Inject => Vec::new(),
            Tamper::Replay | Tamper::AlterAnswer => vec![b"ping".to_vec()],
        };
        assert!(
            payloads.len() <= expected.len() && payloads.iter().all(|p| expected.contains(p)),
            "{tamper:?}: the service saw {payloads:?}"
        );
    }
}

// Goal: a caller that dials for one node never talks to another: raft, forwarding, handoff and
// routed client requests name the node they want, and a process announcing another id (two
// nodes configured with one address, a node started with the wrong id) gets nothing.
// Method: a server that is node 1; requests for node 2 and for node 1 at its address, with and
// without a secret; the service reports every request it receives.
#[tokio::test]
async fn a_request_for_one_node_is_not_sent_to_another_node_at_that_address() {
    for secret in [Some(secret(5)), None] {
        let (arrived, mut arrivals) = mpsc::unbounded_channel();
        let server = start_with(config(secret.clone()), service(Some(arrived))).await;
        let addr = server.local_addr();
        let transport = client(TransportConfig {
            node_id: Some(2),
            ..config(secret)
        });
        let wrong = transport
            .request_node(2, addr, b"hang".to_vec(), PATIENCE)
            .await;
        match &wrong {
            Err(TransportError::WrongNode {
                addr: at,
                expected: 2,
                announced: Some(1),
            }) => assert_eq!(*at, addr),
            other => panic!("expected WrongNode, got {other:?}"),
        }
        let message = wrong.expect_err("refused").to_string();
        assert!(
            message.contains("is node 1, not node 2") && message.contains("nothing was sent"),
            "{message}"
        );
        // The right node at the same address is served on the same connection...
        let right = transport
            .request_node(1, addr, b"ping".to_vec(), PATIENCE)
            .await;
        assert_eq!(right.expect("node 1 answers"), b"echo:ping");
        // ...and the refused request never reached the service.
        assert!(arrivals.try_recv().is_err(), "the refused request arrived");
        server.shutdown().await;
    }
}

/// Log lines written by the subscriber of [`capture_logs`].
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines_containing(&self, text: &str) -> usize {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| line.contains(text))
            .count()
    }
}

// Goal: a flood of refused connections is counted in full but logged only a few lines per
// window (one WARN per refusal wrote 1 MB of log in 2 s), and a good client is served
// throughout. Method: this current-thread test runtime's tasks log to a captured writer; 300
// connections send a frame that is no handshake.
#[tokio::test]
async fn a_flood_of_refused_connections_is_counted_but_logged_at_a_bounded_rate() {
    const FLOOD: u64 = 300;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let server = start(config(Some(secret(1)))).await;
    let addr = server.local_addr();
    let good = client(config(Some(secret(1))));
    for attempt in 0..FLOOD {
        let mut garbage = TcpStream::connect(addr).await.expect("connect");
        garbage.write_all(&8u32.to_be_bytes()).await.expect("write");
        garbage.write_all(&[0xff; 8]).await.expect("write");
        read_until_closed(&mut garbage).await;
        if attempt % 100 == 0 {
            assert_eq!(ping(&good, addr).await.expect("served"), b"echo:ping");
        }
    }
    assert_eq!(server.connections_refused(), FLOOD, "every refusal counted");
    let logged = captured.lines_containing("refused connection");
    println!("{FLOOD} refused connections, {logged} log lines");
    assert!(logged >= 1, "refusals are still logged");
    // Ten per 10 s window; the flood may straddle a window boundary on a slow machine.
    assert!(
        logged <= 20,
        "{logged} lines for {FLOOD} refused connections"
    );
    assert_eq!(ping(&good, addr).await.expect("served"), b"echo:ping");
    server.shutdown().await;
}
