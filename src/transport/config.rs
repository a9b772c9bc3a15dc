//! Transport settings and their limits. Every limit has a default and is checked by
//! [`TransportConfig::validate`] before anything starts.

use std::time::Duration;

use super::codec::HANDSHAKE_FRAME_MAX;
use super::{Secret, TransportConfigError};
use crate::tls::{Role, TlsConfig};

/// Settings shared by the client side ([`Transport`](super::Transport)) and the server side
/// ([`serve`](super::serve)). Build it with `..Default::default()` and check it with
/// [`validate`](Self::validate) (both entry points validate it again).
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Name of the cluster. Both sides of a connection must use the same name, so that two
    /// clusters sharing a network (and, by mistake, a secret) never talk to each other.
    /// 1 to 255 bytes. Default: `"clusterfunk"`.
    pub cluster_name: String,
    /// This node's id, announced to peers in the handshake; `None` for external clients such as
    /// the command-line tool. Default: `None`.
    pub node_id: Option<u64>,
    /// The shared cluster secret both sides must prove they hold. `None` is insecure mode, which
    /// only talks to peers that are insecure too. Default: `None`.
    pub secret: Option<Secret>,
    /// TLS 1.3 with certificates of the cluster CA on both sides (see [`TlsConfig`]). Excludes
    /// `secret`: TLS authenticates and encrypts every connection, and the certificate's role
    /// decides what the peer may do. Default: `None`.
    pub tls: Option<TlsConfig>,
    /// Largest frame accepted or sent after the handshake, in bytes (a payload plus up to 16
    /// bytes of header). Between 64 KiB and 4 GiB − 1. Default: 16 MiB. Handshake frames are
    /// always limited to 64 KiB, so an unauthenticated peer cannot make a node reserve more.
    pub frame_size_max: usize,
    /// How long the handshake of a new connection may take, on either side. Default: 2 s.
    pub handshake_timeout: Duration,
    /// How long opening a TCP connection may take. Default: 1 s.
    pub connect_timeout: Duration,
    /// Wait before retrying a peer after its first failed connection attempt; it doubles with
    /// every further failure up to `reconnect_backoff_max`. Default: 10 ms.
    pub reconnect_backoff_min: Duration,
    /// Longest wait between connection attempts to a failing peer. Requests to it fail fast
    /// with `Unreachable` meanwhile. Default: 1 s.
    pub reconnect_backoff_max: Duration,
    /// Most connections a server holds at once; further connections wait in the listen
    /// backlog until one closes. Default: 1024.
    pub connections_max: usize,
    /// Most requests a server handles at once on one connection; past it, requests are
    /// answered at once with the error `"overloaded"`. Default: 4096.
    pub in_flight_per_connection_max: usize,
    /// A connection with requests outstanding that has received nothing for this long is
    /// probed: a tiny request the peer's I/O task answers itself, however busy its handlers
    /// are. Default: 150 ms.
    pub probe_after: Duration,
    /// A connection with requests outstanding that has received nothing (probe answers
    /// included) for this long counts as unresponsive ([`Transport::is_responsive`]) until
    /// the next frame arrives: the peer is frozen, cut off, or its runtime stalled. More than
    /// `probe_after`. Default: 400 ms.
    ///
    /// [`Transport::is_responsive`]: super::Transport::is_responsive
    pub unresponsive_after: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            cluster_name: "clusterfunk".to_owned(),
            node_id: None,
            secret: None,
            tls: None,
            frame_size_max: 16 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            reconnect_backoff_min: Duration::from_millis(10),
            reconnect_backoff_max: Duration::from_secs(1),
            connections_max: 1024,
            in_flight_per_connection_max: 4096,
            probe_after: Duration::from_millis(150),
            unresponsive_after: Duration::from_millis(400),
        }
    }
}

impl TransportConfig {
    /// The largest payload one request or response may carry: `frame_size_max` less the
    /// frame's header and tag. Larger payloads are refused before anything is sent.
    pub fn payload_max(&self) -> usize {
        self.frame_size_max
            .saturating_sub(super::codec::PAYLOAD_OVERHEAD_MAX)
    }

    /// Checks every field against its allowed range.
    pub fn validate(&self) -> Result<(), TransportConfigError> {
        let invalid = |field: &'static str, problem: String| {
            Err(TransportConfigError::Invalid { field, problem })
        };
        if self.cluster_name.is_empty() || self.cluster_name.len() > 255 {
            return invalid(
                "cluster_name",
                format!(
                    "must be 1 to 255 bytes long, is {} bytes",
                    self.cluster_name.len()
                ),
            );
        }
        if let Some(tls) = &self.tls {
            if self.secret.is_some() {
                return invalid(
                    "tls",
                    "cannot be combined with a cluster secret: TLS authenticates every connection with certificates; drop the secret (CLUSTERFUNK_SECRET, --secret-file) or --tls-dir".to_owned(),
                );
            }
            let identity = tls.identity();
            if identity.cluster != self.cluster_name {
                return invalid(
                    "tls",
                    format!(
                        "holds a certificate of cluster {:?}, but the cluster name is {:?}; use that cluster's certificates or --cluster-name {:?}",
                        identity.cluster, self.cluster_name, identity.cluster
                    ),
                );
            }
            match (identity.role, self.node_id) {
                (Role::Node(id), Some(node)) if id == node => {}
                (Role::Node(id), Some(node)) => {
                    return invalid(
                        "tls",
                        format!("holds the certificate of node {id}, but this is node {node}; give each node its own directory (D/node-{node})"),
                    )
                }
                (role, Some(node)) => {
                    return invalid(
                        "tls",
                        format!("holds a certificate for {role}, but node {node} needs a node certificate (D/node-{node})"),
                    )
                }
                (Role::Node(id), None) => {
                    return invalid(
                        "tls",
                        format!("holds the certificate of node {id}, which only that node uses; tools take D/admin, applications D/client"),
                    )
                }
                (Role::Admin | Role::Client, None) => {}
            }
        }
        // The length prefix on the wire is a u32.
        let frame_size_limit = u32::MAX as usize;
        if self.frame_size_max < HANDSHAKE_FRAME_MAX || self.frame_size_max > frame_size_limit {
            return invalid(
                "frame_size_max",
                format!(
                    "must be between {HANDSHAKE_FRAME_MAX} and {frame_size_limit} bytes, is {}",
                    self.frame_size_max
                ),
            );
        }
        for (field, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("connect_timeout", self.connect_timeout),
            ("reconnect_backoff_min", self.reconnect_backoff_min),
            ("probe_after", self.probe_after),
        ] {
            if value.is_zero() {
                return invalid(field, "must be longer than zero".to_owned());
            }
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min {
            return invalid(
                "reconnect_backoff_max",
                format!(
                    "must be at least reconnect_backoff_min ({:?}), is {:?}",
                    self.reconnect_backoff_min, self.reconnect_backoff_max
                ),
            );
        }
        if self.unresponsive_after <= self.probe_after {
            return invalid(
                "unresponsive_after",
                format!(
                    "must be longer than probe_after ({:?}), is {:?}",
                    self.probe_after, self.unresponsive_after
                ),
            );
        }
        if self.connections_max == 0 {
            return invalid("connections_max", "must be at least 1".to_owned());
        }
        // A sanity bound far above any useful value; it also keeps tokio's semaphores (which
        // panic above usize::MAX >> 3 permits) safe.
        let in_flight_limit = 1 << 20;
        if self.in_flight_per_connection_max == 0
            || self.in_flight_per_connection_max > in_flight_limit
        {
            return invalid(
                "in_flight_per_connection_max",
                format!(
                    "must be between 1 and {in_flight_limit}, is {}",
                    self.in_flight_per_connection_max
                ),
            );
        }
        if self.connections_max > in_flight_limit {
            return invalid(
                "connections_max",
                format!(
                    "must be at most {in_flight_limit}, is {}",
                    self.connections_max
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(TransportConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_out_of_range_fields() {
        let cases = [
            TransportConfig {
                cluster_name: String::new(),
                ..Default::default()
            },
            TransportConfig {
                frame_size_max: 10,
                ..Default::default()
            },
            TransportConfig {
                handshake_timeout: Duration::ZERO,
                ..Default::default()
            },
            TransportConfig {
                reconnect_backoff_max: Duration::from_millis(1),
                ..Default::default()
            },
            TransportConfig {
                connections_max: 0,
                ..Default::default()
            },
            TransportConfig {
                in_flight_per_connection_max: 0,
                ..Default::default()
            },
        ];
        for config in cases {
            let error = config.validate().expect_err("config is invalid");
            assert!(
                error.to_string().contains("fix the configuration"),
                "{error}"
            );
        }
    }
}
