//! Overload (issue 13, item 7): a shard whose mailbox is full refuses further messages at once
//! with `Error::Overloaded` naming it, holds no more than its mailbox (and the message in
//! flight), keeps the process's memory bounded however much more is offered, and serves
//! normally again once it drains; other shards are served throughout.
//!
//! How a shard is made to fill up: its actor is plugged with a `Hold` message, whose `async`
//! handler waits on a [`Gate`] the test opens. While it waits the actor takes nothing from its
//! mailbox, so a flood of `Write`s to keys of that shard fills the mailbox (exactly
//! `MAILBOX` of them fit) and every further one is refused. The gate opens only after every
//! refusal has arrived: a refused sender was not held (the only thing holding anyone is the
//! closed gate). Nothing here waits by sleeping; every wait is for an event (the gate entered,
//! the refusals, the replies) and has a generous deadline as its failure guard; nothing
//! asserts a duration.
//!
//! Three paths are flooded: `Node::send` on an in-process node, a remote `Client` over TCP, and
//! a second node that forwards to the shard's owner. Two tests measure the process's resident
//! memory (VmRSS) while 64 KiB values are offered far beyond what the mailbox holds.
//!
//! The tests take a process-wide lock ([`SERIAL`]) and so run one at a time: the memory tests
//! measure this whole process, which a flood of a test running beside them would distort.
//! Nodes listen on `127.0.79.x` (loopback, used by no other harness; connections to it leave
//! from 127.0.0.1, so no outgoing connection can take its port) on ports the kernel picked.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_rt::{ArbiterHandle, System};
use clusterfunk::admin::{AdminRequest, AdminResponse};
use clusterfunk::client::{Client, ClientError};
use clusterfunk::prelude::*;
use clusterfunk::shard::Handles;
use clusterfunk::shard_map::shard_for;
use clusterfunk::transport::TransportConfig;
use clusterfunk::NodeInfo;
use clusterfunk::{ConsensusConfig, LeaseConfig, NodeConfig, StartError};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Shards of every node here: few, so keys of one shard are quick to find.
const SHARDS: u32 = 8;
/// Each shard's mailbox: small, so that a flood fills it at once.
const MAILBOX: usize = 16;
/// Concurrent sends of one flood: far beyond the mailbox, and more than the transport lets one
/// connection have in progress (4096), so that on the network paths a burst may meet that limit
/// too (whose refusal must end as `Overloaded` as well).
const FLOOD: u64 = 5_000;
/// How long a node or a client waits for a reply: far longer than any test holds a shard, so
/// that an accepted message can only end with its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The failure guard of every wait: far above what a passing run needs on a busy 2-core
/// machine. Nothing asserts how long anything takes.
const DEADLINE: Duration = Duration::from_secs(60);
/// Writes sent to the flooded shard after it drained, one after another.
const AFTERWARDS: u64 = 5;
/// Sequence numbers of the writes afterwards and of the probes of another shard.
const AFTERWARDS_SEQ: u64 = 1_000_000;
const PROBE_SEQ: u64 = 2_000_000;
/// Writes to another shard during each flood, one after another.
const PROBES: u64 = 20;

/// Makes the tests of this file run one at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// The handler
// ---------------------------------------------------------------------------------------------

/// Occupies the shard's actor until the test opens the gate.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(ShardId)]
struct Hold;

/// Records `seq` in the shard's state; `pad` is dropped at once (only its length is kept), so
/// the handler's state stays small however large the values are. Not idempotent: a request
/// whose connection broke can only end as `OutcomeUnknown`, never be re-sent behind our back.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Written)]
struct Write {
    seq: u64,
    pad: ByteBuf,
}

/// What a `Write` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Written {
    node: NodeId,
    shard: ShardId,
    seq: u64,
    pad_len: u64,
}

/// Reads back every sequence number the shard recorded, ascending.
#[derive(Debug, Serialize, Deserialize, ShardMessage)]
#[reply(Vec<u64>)]
struct Dump;

/// The gate a `Hold` waits at, and how many `Hold`s reached it.
struct Gate {
    /// No permits: `acquire` waits until the semaphore is closed, then fails at once for all.
    open: Semaphore,
    entered: watch::Sender<u64>,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            open: Semaphore::new(0),
            entered: watch::channel(0).0,
        })
    }

    async fn pass(&self) {
        self.entered.send_modify(|n| *n += 1);
        // Fails (and so returns) once the gate is opened.
        let _ = self.open.acquire().await;
    }

    fn open(&self) {
        self.open.close();
    }

    fn entered(&self) -> u64 {
        *self.entered.borrow()
    }

    async fn wait_entered(&self, count: u64) {
        let mut entered = self.entered.subscribe();
        tokio::time::timeout(DEADLINE, entered.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| panic!("no Hold reached the gate within {DEADLINE:?}"))
            .expect("the gate lives as long as the test");
    }
}

/// Records the sequence numbers written to one shard.
struct Gated {
    gate: Arc<Gate>,
    seqs: BTreeSet<u64>,
}

#[shard_handler]
impl Gated {
    async fn hold(&mut self, _key: Key, _msg: Hold, ctx: &mut ShardContext) -> ShardId {
        let gate = self.gate.clone();
        gate.pass().await;
        ctx.shard()
    }

    fn write(&mut self, _key: Key, msg: Write, ctx: &mut ShardContext) -> Written {
        self.seqs.insert(msg.seq);
        Written {
            node: ctx.node_id(),
            shard: ctx.shard(),
            seq: msg.seq,
            pad_len: msg.pad.len() as u64,
        }
    }

    fn dump(&mut self, _key: Key, _msg: Dump, _ctx: &mut ShardContext) -> Vec<u64> {
        self.seqs.iter().copied().collect()
    }
}

fn factory(gate: &Arc<Gate>) -> impl Fn(ShardId) -> Gated + Send + Sync + 'static {
    let gate = gate.clone();
    move |_shard| Gated {
        gate: gate.clone(),
        seqs: BTreeSet::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Sending, the same way over every path
// ---------------------------------------------------------------------------------------------

/// How a send failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Overloaded(ShardId),
    /// Any other error, as its debug text.
    Other(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        match error {
            Error::Overloaded { shard } => Failure::Overloaded(shard),
            other => Failure::Other(format!("{other:?}")),
        }
    }
}

/// The path the test's messages take to the flooded shard.
#[derive(Clone)]
enum Via {
    /// `Node::send` on the node that owns the shard, from the test's runtime.
    Local(Node<Gated>),
    /// `Node::send` on a node that does not own the shard (it forwards), run on that node's
    /// own thread as its clients' requests would be.
    Forwarding(Node<Gated>, ArbiterHandle),
    /// A remote client over TCP.
    Remote(Client),
}

impl Via {
    async fn send<M>(&self, key: String, msg: M) -> Result<M::Reply, Failure>
    where
        M: ShardMessage,
        Gated: Handles<M>,
    {
        match self {
            Via::Local(node) => Ok(node.send(key, msg).await?),
            Via::Forwarding(node, arbiter) => {
                let (reply, answer) = oneshot::channel();
                let node = node.clone();
                let spawned = arbiter.spawn(async move {
                    let _ = reply.send(node.send(key, msg).await);
                });
                if !spawned {
                    return Err(Failure::Other("the forwarding node stopped".into()));
                }
                match answer.await {
                    Ok(result) => Ok(result?),
                    Err(_) => Err(Failure::Other(
                        "the forwarding node dropped the send".into(),
                    )),
                }
            }
            Via::Remote(client) => match client.send(key, msg).await {
                Ok(reply) => Ok(reply),
                Err(ClientError::Cluster(error)) => Err(error.into()),
                Err(other) => Err(Failure::Other(format!("client: {other:?}"))),
            },
        }
    }

    /// [`send`](Self::send), failing the test when it fails or takes longer than [`DEADLINE`].
    async fn must<M>(&self, what: &str, key: &str, msg: M) -> M::Reply
    where
        M: ShardMessage,
        Gated: Handles<M>,
    {
        match tokio::time::timeout(DEADLINE, self.send(key.to_string(), msg)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(failure)) => panic!("{what} (key {key}) failed: {failure:?}"),
            Err(_) => panic!("{what} (key {key}) got no answer within {DEADLINE:?}"),
        }
    }
}

/// `count` distinct keys of `shard`, each starting with `prefix`.
fn keys_of_shard(prefix: &str, shard: ShardId, count: usize) -> Vec<String> {
    (0u64..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|key| shard_for(key.as_bytes(), SHARDS) == shard)
        .take(count)
        .collect()
}

/// The outcome of one flooded `Write`: its sequence number and what it got.
type Outcome = (u64, Result<Written, Failure>);

/// Receives outcomes until `count` arrived or [`DEADLINE`] passed; `what` names the wait for the
/// failure message.
async fn receive(
    outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
    count: usize,
    what: &str,
    until: impl Fn(&[Outcome]) -> bool,
) -> Vec<Outcome> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut received = Vec::with_capacity(count);
    while received.len() < count && !until(&received) {
        match tokio::time::timeout_at(deadline, outcomes.recv()).await {
            Ok(Some(outcome)) => received.push(outcome),
            Ok(None) => panic!(
                "{what}: the senders ended after {} outcomes",
                received.len()
            ),
            Err(_) => {
                let refused = received
                    .iter()
                    .filter(|(_, r)| matches!(r, Err(Failure::Overloaded(_))))
                    .count();
                panic!(
                    "{what}: only {} of {count} outcomes ({refused} refusals) within {DEADLINE:?}; \
                     a shard holding more than its mailbox of {MAILBOX} would look like this",
                    received.len()
                )
            }
        }
    }
    received
}

/// What a flood came to, for the report.
#[derive(Debug)]
struct FloodSummary {
    offered: u64,
    accepted: usize,
    refused: usize,
}

impl FloodSummary {
    /// The mailbox took exactly `MAILBOX` writes beside the `Hold` and refused the rest.
    fn check(&self) {
        assert_eq!(
            (self.accepted, self.refused as u64),
            (MAILBOX, self.offered - MAILBOX as u64),
            "{self:?}"
        );
    }
}

/// Plugs `shard` with a `Hold`, floods it with [`FLOOD`] concurrent `Write`s through `via`, and
/// checks everything the module docs promise: the refusals name the shard and arrive while the
/// shard is still plugged; exactly `MAILBOX` writes are accepted (with the `Hold`, the mailbox
/// plus the one message in flight); another shard (`other`) answers meanwhile; every accepted
/// write is answered once the gate opens; the shard serves afterwards; and reading it back at
/// the end finds every accepted write and no refused one. `node`: the node that owns `shard`.
async fn flood_one_shard(
    label: &str,
    via: &Via,
    gate: &Arc<Gate>,
    node: NodeId,
    shard: ShardId,
    other: ShardId,
) -> FloodSummary {
    let keys = keys_of_shard(&format!("{label}-flood"), shard, 64);
    let hold_key = keys_of_shard(&format!("{label}-hold"), shard, 1).remove(0);
    let other_key = keys_of_shard(&format!("{label}-other"), other, 1).remove(0);
    assert_eq!(gate.entered(), 0, "{label}: nothing passed the gate yet");

    // The plug: the shard's actor takes the Hold out of its mailbox and waits at the gate.
    let plug = {
        let via = via.clone();
        let hold_key = hold_key.clone();
        tokio::spawn(async move { via.send(hold_key, Hold).await })
    };
    gate.wait_entered(1).await;

    // Another shard is written to, one write after another, all through the flood.
    let prober = {
        let (via, other_key) = (via.clone(), other_key.clone());
        tokio::spawn(async move {
            let mut replies = Vec::new();
            for i in 0..PROBES {
                let write = Write {
                    seq: PROBE_SEQ + i,
                    pad: ByteBuf::new(),
                };
                replies.push(via.send(other_key.clone(), write).await);
            }
            replies
        })
    };

    // The flood: every write at once, each on its own task; outcomes come back on a channel.
    let (report, mut outcomes) = mpsc::unbounded_channel::<Outcome>();
    for seq in 1..=FLOOD {
        let via = via.clone();
        let key = keys[seq as usize % keys.len()].clone();
        let report = report.clone();
        tokio::spawn(async move {
            let result = via
                .send(
                    key,
                    Write {
                        seq,
                        pad: ByteBuf::from(seq.to_le_bytes().to_vec()),
                    },
                )
                .await;
            let _ = report.send((seq, result));
        });
    }
    drop(report);

    // While the shard is plugged: FLOOD - MAILBOX refusals, nothing else.
    let expected_refusals = FLOOD as usize - MAILBOX;
    let refusals = receive(
        &mut outcomes,
        expected_refusals,
        &format!("{label}: refusals while the shard is plugged"),
        |received| received.iter().any(|(_, r)| r.is_ok()),
    )
    .await;
    let unexpected: Vec<&Outcome> = refusals
        .iter()
        .filter(|(_, r)| *r != Err(Failure::Overloaded(shard)))
        .take(10)
        .collect();
    assert!(
        unexpected.is_empty(),
        "{label}: while shard {shard} was plugged every outcome must be Overloaded {{ shard: {shard} }} \
         (got {} outcomes); unexpected: {unexpected:?}",
        refusals.len()
    );
    let refused: BTreeSet<u64> = refusals.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        refused.len(),
        expected_refusals,
        "{label}: one outcome per write"
    );
    assert_eq!(
        gate.entered(),
        1,
        "{label}: the shard took nothing else while plugged"
    );

    // Another shard was served during the flood, and still is while this one is plugged.
    let probes = tokio::time::timeout(DEADLINE, prober)
        .await
        .unwrap_or_else(|_| panic!("{label}: shard {other} was not served within {DEADLINE:?}"))
        .expect("the prober's task");
    let probe = via
        .must(
            &format!("{label}: a write to shard {other} while shard {shard} is full"),
            &other_key,
            Write {
                seq: PROBE_SEQ + PROBES,
                pad: ByteBuf::new(),
            },
        )
        .await;
    for (i, reply) in probes.into_iter().chain([Ok(probe)]).enumerate() {
        let seq = PROBE_SEQ + i as u64;
        match reply {
            Ok(written) => assert_eq!(
                (written.shard, written.seq, written.node),
                (other, seq, node),
                "{label}: the reply of a write to shard {other}"
            ),
            Err(failure) => panic!(
                "{label}: a write to shard {other} failed while shard {shard} was flooded: {failure:?}"
            ),
        }
    }

    // Open the gate: the Hold and every accepted write are answered, each with its own reply.
    gate.open();
    let plugged = tokio::time::timeout(DEADLINE, plug)
        .await
        .unwrap_or_else(|_| panic!("{label}: the Hold was not answered within {DEADLINE:?}"))
        .expect("the Hold's task");
    assert_eq!(plugged, Ok(shard), "{label}: the Hold's reply");
    let answered = receive(
        &mut outcomes,
        MAILBOX,
        &format!("{label}: replies once the gate opened"),
        |_| false,
    )
    .await;
    let mut accepted = BTreeSet::new();
    for (seq, result) in &answered {
        match result {
            Ok(written) => assert_eq!(
                *written,
                Written {
                    node,
                    shard,
                    seq: *seq,
                    pad_len: 8
                },
                "{label}: the reply of accepted write {seq}"
            ),
            Err(failure) => panic!(
                "{label}: write {seq} was neither refused while the shard was plugged nor \
                 answered after: {failure:?} (all that arrived after the gate opened: {answered:?})"
            ),
        }
        accepted.insert(*seq);
    }
    assert_eq!(
        accepted.len() + refused.len(),
        FLOOD as usize,
        "{label}: every write has one outcome"
    );
    // The mailbox plus the message in flight (the Hold).
    assert!(
        accepted.len() < MAILBOX + 1,
        "{label}: {} writes accepted beside the Hold; the mailbox holds {MAILBOX}",
        accepted.len()
    );

    // The shard serves normally afterwards.
    for i in 0..AFTERWARDS {
        let seq = AFTERWARDS_SEQ + i;
        let written = via
            .must(
                &format!("{label}: a write to shard {shard} after the flood"),
                &keys[i as usize],
                Write {
                    seq,
                    pad: ByteBuf::from(vec![1u8; 3]),
                },
            )
            .await;
        assert_eq!(
            written,
            Written {
                node,
                shard,
                seq,
                pad_len: 3
            },
            "{label}: a write after the flood"
        );
    }

    // Read back at the end: every accepted write is there, no refused one.
    let stored: BTreeSet<u64> = via
        .must(
            &format!("{label}: reading shard {shard} back"),
            &keys[0],
            Dump,
        )
        .await
        .into_iter()
        .collect();
    let expected: BTreeSet<u64> = accepted
        .iter()
        .copied()
        .chain((0..AFTERWARDS).map(|i| AFTERWARDS_SEQ + i))
        .collect();
    let leaked: Vec<&u64> = stored.intersection(&refused).take(10).collect();
    assert!(
        leaked.is_empty(),
        "{label}: refused writes took effect: {leaked:?}"
    );
    assert_eq!(
        stored, expected,
        "{label}: shard {shard} holds exactly the accepted writes and those after the flood"
    );
    let summary = FloodSummary {
        offered: FLOOD,
        accepted: accepted.len(),
        refused: refused.len(),
    };
    eprintln!("{label}: {summary:?} (plus the Hold in flight; mailbox {MAILBOX})");
    summary
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// The size of each value the memory tests offer.
const VALUE: usize = 64 * 1024;
/// How many values the memory tests offer to the plugged shard: with 64 KiB each, 512 MiB in
/// all, some 500 times what its mailbox holds.
const OFFERED: u64 = 8_192;
/// How many senders offer them at once (each has at most one value in flight).
const SENDERS: u64 = 32;
/// The bound on the growth of the resident memory while the shard is flooded:
///
/// - what the shard may hold: the `MAILBOX` writes it accepted, each held in at most ~6 copies
///   between the client and the mailbox (the client's encoded message and request, the frame,
///   the node's request payload and decoded message, and a spare): 16 × 6 × 64 KiB = 6 MiB;
/// - what the senders have in flight: `SENDERS` values, each in ~6 copies too:
///   32 × 6 × 64 KiB = 12 MiB;
/// - the allocator's and runtimes' slack (per-thread arenas keep freed chunks, connection
///   buffers, task bookkeeping): 46 MiB, so that a busy machine never fails it.
///
/// 6 + 12 + 46 = 64 MiB. Queuing the refused values instead would grow the memory by up to
/// (`OFFERED` − `MAILBOX`) × 64 KiB ≈ 511 MiB, eight times the bound (a router that kept every
/// refused message measured +512 MiB on both paths). Measured on a 2-core machine, also while
/// a release build ran beside: +0 to +1.8 MiB in-process, +9 to +13.6 MiB remote.
const GROWTH_BOUND_KIB: u64 = 64 * 1024;

// The senders whose values were accepted wait; the others must go on offering.
const _: () = assert!(SENDERS as usize > MAILBOX);

/// This process's resident memory, in KiB (VmRSS from `/proc/self/status`).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Samples [`rss_kib`] on its own thread until stopped, and keeps the highest value.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = rss_kib();
                // Bounded: at most DEADLINE × 2 of samples a millisecond apart.
                let samples = DEADLINE.as_millis() as u64 * 2;
                for _ in 0..samples {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    peak = peak.max(rss_kib());
                    std::thread::sleep(Duration::from_millis(1));
                }
                peak.max(rss_kib())
            })
        };
        RssSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the RSS sampler")
    }
}

/// What a memory test measured, in KiB.
#[derive(Debug)]
struct MemoryFigures {
    before_kib: u64,
    peak_kib: u64,
    held_kib: u64,
    after_kib: u64,
    offered: u64,
    accepted: usize,
    refused: usize,
}

/// Plugs `shard`, offers it [`OFFERED`] values of 64 KiB from [`SENDERS`] concurrent senders
/// through `via`, and measures the resident memory before, at its peak while the mailbox is full
/// and the refusals pour in, once every offer was refused (still plugged), and after the
/// gate opened and the accepted writes were answered.
async fn offer_large_values(
    label: &str,
    via: &Via,
    gate: &Arc<Gate>,
    shard: ShardId,
    other: ShardId,
) -> MemoryFigures {
    let keys = keys_of_shard(&format!("{label}-big"), shard, 64);
    let hold_key = keys_of_shard(&format!("{label}-hold"), shard, 1).remove(0);
    let other_keys = keys_of_shard(&format!("{label}-warm"), other, 8);
    // Warm up the path with values of the same size (connections, buffers, the shard actors).
    for (i, key) in other_keys.iter().enumerate() {
        via.must(
            &format!("{label}: warm-up"),
            key,
            Write {
                seq: PROBE_SEQ + i as u64,
                pad: ByteBuf::from(vec![7u8; VALUE]),
            },
        )
        .await;
    }
    assert_eq!(gate.entered(), 0, "{label}: nothing passed the gate yet");
    let plug = {
        let via = via.clone();
        tokio::spawn(async move { via.send(hold_key, Hold).await })
    };
    gate.wait_entered(1).await;

    let before_kib = rss_kib();
    let sampler = RssSampler::start();
    let next = Arc::new(AtomicU64::new(1));
    let (report, mut outcomes) = mpsc::unbounded_channel::<Outcome>();
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (via, next, report, keys) =
                (via.clone(), next.clone(), report.clone(), keys.clone());
            tokio::spawn(async move {
                // Bounded in count (OFFERED in all) and in time.
                while started.elapsed() < DEADLINE {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq > OFFERED {
                        break;
                    }
                    let key = keys[seq as usize % keys.len()].clone();
                    let pad = ByteBuf::from(vec![seq as u8; VALUE]);
                    let result = via.send(key, Write { seq, pad }).await;
                    if report.send((seq, result)).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(report);
    let expected_refusals = OFFERED as usize - MAILBOX;
    let refusals = receive(
        &mut outcomes,
        expected_refusals,
        &format!("{label}: refusals of large values"),
        |received| received.iter().any(|(_, r)| r.is_ok()),
    )
    .await;
    let held_kib = rss_kib();
    let peak_kib = sampler.stop().max(held_kib);
    let unexpected: Vec<&Outcome> = refusals
        .iter()
        .filter(|(_, r)| *r != Err(Failure::Overloaded(shard)))
        .take(10)
        .collect();
    assert!(
        unexpected.is_empty(),
        "{label}: every large value offered to the plugged shard {shard} must be refused with \
         Overloaded; unexpected: {unexpected:?}"
    );
    assert_eq!(gate.entered(), 1, "{label}: the shard took nothing else");

    gate.open();
    let plugged = tokio::time::timeout(DEADLINE, plug)
        .await
        .unwrap_or_else(|_| panic!("{label}: the Hold was not answered within {DEADLINE:?}"))
        .expect("the Hold's task");
    assert_eq!(plugged, Ok(shard), "{label}: the Hold's reply");
    let answered = receive(
        &mut outcomes,
        MAILBOX,
        &format!("{label}: replies once the gate opened"),
        |_| false,
    )
    .await;
    let accepted: BTreeMap<u64, Written> = answered
        .into_iter()
        .map(|(seq, result)| match result {
            Ok(written) => (seq, written),
            Err(failure) => panic!("{label}: accepted large value {seq} failed: {failure:?}"),
        })
        .collect();
    for (seq, written) in &accepted {
        assert_eq!(
            (written.shard, written.seq, written.pad_len),
            (shard, *seq, VALUE as u64),
            "{label}: the reply of accepted value {seq}"
        );
    }
    for sender in senders {
        tokio::time::timeout(DEADLINE, sender)
            .await
            .unwrap_or_else(|_| panic!("{label}: a sender did not finish within {DEADLINE:?}"))
            .expect("a sender task");
    }
    let after_kib = rss_kib();
    // The shard serves afterwards, and holds exactly the accepted values.
    let stored: BTreeSet<u64> = via
        .must(
            &format!("{label}: reading shard {shard} back"),
            &keys[0],
            Dump,
        )
        .await
        .into_iter()
        .collect();
    assert_eq!(
        stored,
        accepted.keys().copied().collect::<BTreeSet<u64>>(),
        "{label}: shard {shard} holds exactly the accepted values"
    );
    MemoryFigures {
        before_kib,
        peak_kib,
        held_kib,
        after_kib,
        offered: OFFERED,
        accepted: accepted.len(),
        refused: refusals.len(),
    }
}

/// Prints the figures and checks them against [`GROWTH_BOUND_KIB`].
fn check_memory(label: &str, figures: &MemoryFigures) {
    let growth = figures.peak_kib.saturating_sub(figures.before_kib);
    let queued_all = (figures.offered - MAILBOX as u64) * VALUE as u64 / 1024;
    eprintln!(
        "{label}: VmRSS before {} KiB, peak {} KiB (+{growth} KiB), with every offer refused {} KiB, \
         after {} KiB; offered {} values of {} KiB ({} MiB), accepted {} (plus the Hold), refused {}; \
         bound on the growth {GROWTH_BOUND_KIB} KiB; queuing every refused value would add ~{queued_all} KiB",
        figures.before_kib,
        figures.peak_kib,
        figures.held_kib,
        figures.after_kib,
        figures.offered,
        VALUE / 1024,
        figures.offered * VALUE as u64 / (1024 * 1024),
        figures.accepted,
        figures.refused,
    );
    assert_eq!(
        (figures.accepted, figures.refused as u64),
        (MAILBOX, figures.offered - MAILBOX as u64),
        "{label}: the mailbox took {MAILBOX} values and refused the rest"
    );
    assert!(
        growth < GROWTH_BOUND_KIB,
        "{label}: the resident memory grew by {growth} KiB while the shard was flooded, above \
         the bound of {GROWTH_BOUND_KIB} KiB derived from what its mailbox may hold: refused \
         values are kept somewhere ({figures:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// A standalone node in this process (on a thread and actix `System` of its own, which the node
/// starts itself when started outside one).
async fn standalone(gate: &Arc<Gate>) -> Node<Gated> {
    Cluster::builder()
        .node_id(1)
        .shards(SHARDS)
        .mailbox_capacity(MAILBOX)
        .request_timeout(REQUEST_TIMEOUT)
        .handler_with(factory(gate))
        .standalone()
        .start()
        .await
        .expect("start a standalone node")
}

/// One node of a [`TestCluster`].
struct Member {
    id: NodeId,
    addr: SocketAddr,
    node: Node<Gated>,
    arbiter: ArbiterHandle,
    system: System,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Real clustered nodes in this process, each on its own thread and actix `System`, with
/// in-memory raft storage, talking over TCP on `127.0.79.<id>`. Timings are slow and leases
/// long, so that a flood on a busy machine never costs a lease or an election.
struct TestCluster {
    members: Vec<Member>,
}

impl TestCluster {
    async fn start(nodes: usize, gate: &Arc<Gate>) -> TestCluster {
        TestCluster::start_with(nodes, MAILBOX, gate).await
    }

    /// [`start`](Self::start) with shard mailboxes of `mailbox` messages.
    async fn start_with(nodes: usize, mailbox: usize, gate: &Arc<Gate>) -> TestCluster {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match TestCluster::try_start(nodes, mailbox, gate).await {
                Ok(cluster) => break cluster.ready().await,
                // Another process took a port between our probe and the node's bind: pick
                // new ones.
                Err(StartError::Listen { addr, source }) if attempt < 5 => {
                    eprintln!("cannot listen on {addr} ({source}); trying other ports");
                }
                Err(error) => panic!("start a test cluster: {error}"),
            }
        }
    }

    async fn try_start(
        nodes: usize,
        mailbox: usize,
        gate: &Arc<Gate>,
    ) -> Result<TestCluster, StartError> {
        let addrs: Vec<(NodeId, SocketAddr)> = (1..=nodes as NodeId)
            .map(|id| {
                let ip = Ipv4Addr::new(127, 0, 79, u8::try_from(id).expect("few nodes"));
                let probe = TcpListener::bind(SocketAddrV4::new(ip, 0)).expect("bind a port");
                (id, probe.local_addr().expect("a bound address"))
            })
            .collect();
        let members: Vec<(NodeId, NodeInfo)> = addrs
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    NodeInfo {
                        addr: addr.to_string(),
                        zone: None,
                    },
                )
            })
            .collect();
        let mut cluster = TestCluster {
            members: Vec::new(),
        };
        for (id, addr) in addrs {
            cluster
                .members
                .push(spawn_member(id, addr, mailbox, members.clone(), gate.clone()).await?);
        }
        Ok(cluster)
    }

    /// Waits until every node serves under one leader and one map, nothing moving.
    async fn ready(self) -> TestCluster {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.agreement().await.is_some() {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster did not agree on one map within {DEADLINE:?}: {:?}",
                self.members
                    .iter()
                    .map(|m| m.node.cluster_status())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The owner of every shard, once every node serves under the same map with nothing
    /// moving and nobody down.
    async fn agreement(&self) -> Option<Vec<NodeId>> {
        let mut first: Option<(u64, Vec<NodeId>)> = None;
        for member in &self.members {
            let status = member.node.cluster_status()?;
            if !member.node.status().serving
                || status.leader.is_none()
                || status.epoch == 0
                || status.shards_moving != 0
                || !status.down.is_empty()
            {
                return None;
            }
            let owners = match member.node.admin(AdminRequest::Shards).await {
                Ok(AdminResponse::Shards(report)) => {
                    (report.epoch, report.shards.iter().map(|s| s.node).collect())
                }
                _ => return None,
            };
            if first.as_ref().is_some_and(|f| *f != owners) {
                return None;
            }
            first = Some(owners);
        }
        first.map(|(_, owners)| owners)
    }

    fn member(&self, id: NodeId) -> &Member {
        self.members
            .iter()
            .find(|m| m.id == id)
            .expect("a member of the test cluster")
    }

    /// Two shards owned by node `id`.
    async fn two_shards_of(&self, id: NodeId) -> (ShardId, ShardId) {
        let owners = self
            .agreement()
            .await
            .expect("the cluster agrees on its map");
        let mut own = (0..SHARDS).filter(|&s| owners[s as usize] == id);
        match (own.next(), own.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => panic!("node {id} owns fewer than two shards: {owners:?}"),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.system.stop();
            if let Some(thread) = member.thread.take() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !thread.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if thread.is_finished() {
                    let _ = thread.join();
                }
            }
        }
    }
}

/// Starts node `id` on a new thread with its own `System`.
async fn spawn_member(
    id: NodeId,
    addr: SocketAddr,
    mailbox: usize,
    members: Vec<(NodeId, NodeInfo)>,
    gate: Arc<Gate>,
) -> Result<Member, StartError> {
    type Started = Result<(Node<Gated>, System, ArbiterHandle), StartError>;
    let (started, started_rx) = oneshot::channel::<Started>();
    let thread = std::thread::Builder::new()
        .name(format!("overload-node-{id}"))
        .spawn(move || {
            let runner = System::new();
            let node = runner.block_on(async move {
                let config = NodeConfig {
                    node_id: id,
                    shard_count: SHARDS,
                    mailbox_capacity: mailbox,
                    request_timeout: REQUEST_TIMEOUT,
                    consensus: ConsensusConfig {
                        heartbeat_interval: Duration::from_millis(100),
                        election_timeout_min: Duration::from_millis(1_000),
                        election_timeout_max: Duration::from_millis(2_000),
                        ..ConsensusConfig::default()
                    },
                    lease: LeaseConfig {
                        lease: Duration::from_secs(6),
                        renew_period: Duration::from_secs(1),
                        ..LeaseConfig::default()
                    },
                    ..NodeConfig::default()
                };
                Cluster::builder()
                    .config(config)
                    .listen(addr)
                    .in_memory_for_tests()
                    .insecure()
                    .initial_members(members)
                    .handler_with(factory(&gate))
                    .start()
                    .await
            });
            match node {
                Ok(node) => {
                    let system = System::current();
                    let arbiter = system.arbiter().clone();
                    if started.send(Ok((node, system, arbiter))).is_ok() {
                        let _ = runner.run();
                    }
                }
                Err(error) => {
                    let _ = started.send(Err(error));
                }
            }
        })
        .expect("spawn a node thread");
    match tokio::time::timeout(DEADLINE, started_rx).await {
        Ok(Ok(Ok((node, system, arbiter)))) => Ok(Member {
            id,
            addr,
            node,
            arbiter,
            system,
            thread: Some(thread),
        }),
        Ok(Ok(Err(error))) => {
            let _ = thread.join();
            Err(error)
        }
        Ok(Err(_)) => panic!("node {id}'s thread ended without starting it"),
        Err(_) => panic!("node {id} did not start within {DEADLINE:?}"),
    }
}

fn client_of(cluster: &TestCluster) -> Client {
    Client::with_config(
        cluster.members.iter().map(|m| m.addr),
        None,
        "clusterfunk",
        REQUEST_TIMEOUT,
    )
    .expect("a client of the test cluster")
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// The flooded shard and another one of the standalone node.
const SHARD: ShardId = 3;
const OTHER: ShardId = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_shard_refuses_past_its_mailbox_serves_the_rest_and_recovers() {
    let _serial = SERIAL.lock().await;
    let gate = Gate::new();
    let node = standalone(&gate).await;
    let summary = flood_one_shard(
        "in-process",
        &Via::Local(node.clone()),
        &gate,
        1,
        SHARD,
        OTHER,
    )
    .await;
    summary.check();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_client_flooding_a_shard_gets_overloaded_and_its_connection_keeps_serving() {
    let _serial = SERIAL.lock().await;
    let gate = Gate::new();
    let cluster = TestCluster::start(2, &gate).await;
    let (shard, other) = cluster.two_shards_of(1).await;
    let client = client_of(&cluster);
    // The client learns the map and opens its connection to node 1 before the flood.
    let other_key = keys_of_shard("remote-warm", other, 1).remove(0);
    let via = Via::Remote(client);
    let warm = via
        .must(
            "remote: warm-up",
            &other_key,
            Write {
                seq: 0,
                pad: ByteBuf::new(),
            },
        )
        .await;
    assert_eq!(warm.node, 1, "shard {other} is node 1's");
    // Every write of the flood goes over the client's one connection to node 1. An accepted
    // write is not idempotent: had that connection broken, it would end as OutcomeUnknown
    // (the client never re-sends it), so its reply after the flood shows the connection held.
    let summary = flood_one_shard("remote", &via, &gate, 1, shard, other).await;
    summary.check();
    // The same client keeps serving afterwards, on every shard.
    for s in 0..SHARDS {
        let key = keys_of_shard("remote-after", s, 1).remove(0);
        let written = via
            .must(
                "remote: a write after the flood",
                &key,
                Write {
                    seq: 7,
                    pad: ByteBuf::new(),
                },
            )
            .await;
        assert_eq!(written.shard, s);
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_forwarding_to_a_flooded_shard_passes_overloaded_back() {
    let _serial = SERIAL.lock().await;
    let gate = Gate::new();
    let cluster = TestCluster::start(2, &gate).await;
    let (shard, other) = cluster.two_shards_of(1).await;
    let forwarder = cluster.member(2);
    let via = Via::Forwarding(forwarder.node.clone(), forwarder.arbiter.clone());
    // Node 2 forwards every write to node 1 over its one connection to it; the connection is
    // open (raft uses it) before the flood. Accepted writes are not idempotent, so their
    // replies after the flood show that the connection held.
    let summary = flood_one_shard("forwarded", &via, &gate, 1, shard, other).await;
    summary.check();
    drop(cluster);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_flooded_shard_refuses_large_local_values() {
    let _serial = SERIAL.lock().await;
    let gate = Gate::new();
    let node = standalone(&gate).await;
    let figures = offer_large_values(
        "memory in-process",
        &Via::Local(node.clone()),
        &gate,
        SHARD,
        OTHER,
    )
    .await;
    check_memory("memory in-process", &figures);
    node.shutdown().await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_flooded_shard_refuses_large_remote_values() {
    let _serial = SERIAL.lock().await;
    let gate = Gate::new();
    let cluster = TestCluster::start(2, &gate).await;
    let (shard, other) = cluster.two_shards_of(1).await;
    let via = Via::Remote(client_of(&cluster));
    let figures = offer_large_values("memory remote", &via, &gate, shard, other).await;
    check_memory("memory remote", &figures);
    drop(cluster);
}

// ---------------------------------------------------------------------------------------------
// A forwarding node whose one connection to the owner is full
// ---------------------------------------------------------------------------------------------
//
// A node has one connection to each peer, and the peer's server takes at most
// `in_flight_per_connection_max` (4096) requests in progress on it; past that it answers
// "overloaded" at once. Forwarded messages that wait in a shard's mailbox stay in progress, so
// enough of them fill the connection: with a mailbox above 4096 here, or with the default
// mailbox of 1024 once four shards of one owner are full. These tests fill it that way.

/// Requests one connection may have in progress at its server (the transport's default, which
/// nodes use).
fn connection_in_flight_max() -> usize {
    TransportConfig::default().in_flight_per_connection_max
}

/// Node 2's connection to node 1, filled with forwarded writes held in a plugged shard of node 1.
struct Saturated {
    cluster: TestCluster,
    gate: Arc<Gate>,
    shard: ShardId,
    via: Via,
    plug: tokio::task::JoinHandle<Result<ShardId, Failure>>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// The outcomes that arrived while the shard was plugged.
    received: Vec<Outcome>,
    offered: u64,
}

/// Plugs a shard of node 1 whose mailbox holds twice what a connection carries, floods it
/// through node 2 with 1000 writes more than node 2's connection to node 1 carries, and waits
/// until every write beyond what the connection holds was answered (the connection is full
/// then, with held writes alone), or until one is answered with anything but `Overloaded` when
/// `stop_unless_overloaded`.
async fn saturate_forwarding_connection(stop_unless_overloaded: bool) -> Saturated {
    let in_flight_max = connection_in_flight_max();
    let gate = Gate::new();
    let cluster = TestCluster::start_with(2, 2 * in_flight_max, &gate).await;
    let (shard, _) = cluster.two_shards_of(1).await;
    let forwarder = cluster.member(2);
    let via = Via::Forwarding(forwarder.node.clone(), forwarder.arbiter.clone());
    let keys = keys_of_shard("saturate", shard, 64);
    let plug = {
        let (via, key) = (via.clone(), keys[0].clone());
        tokio::spawn(async move { via.send(key, Hold).await })
    };
    gate.wait_entered(1).await;
    let offered = in_flight_max as u64 + 1_000;
    let (report, mut outcomes) = mpsc::unbounded_channel::<Outcome>();
    for seq in 1..=offered {
        let (via, report) = (via.clone(), report.clone());
        let key = keys[seq as usize % keys.len()].clone();
        tokio::spawn(async move {
            let write = Write {
                seq,
                pad: ByteBuf::new(),
            };
            let _ = report.send((seq, via.send(key, write).await));
        });
    }
    drop(report);
    // The plug takes one place on the connection: at most in_flight_max - 1 writes are held.
    let refusals = offered as usize - (in_flight_max - 1);
    let received = receive(
        &mut outcomes,
        refusals,
        "writes beyond what node 2's connection to node 1 carries",
        |received| {
            stop_unless_overloaded
                && received
                    .iter()
                    .any(|(_, r)| *r != Err(Failure::Overloaded(shard)))
        },
    )
    .await;
    Saturated {
        cluster,
        gate,
        shard,
        via,
        plug,
        outcomes,
        received,
        offered,
    }
}

impl Saturated {
    /// Opens the gate and checks the end: every write held is answered by node 1, a late one
    /// refused as `Overloaded`, and the shard holds exactly the writes answered.
    async fn drain(mut self) {
        self.gate.open();
        let plugged = tokio::time::timeout(DEADLINE, self.plug)
            .await
            .unwrap_or_else(|_| panic!("the Hold was not answered within {DEADLINE:?}"))
            .expect("the Hold's task");
        assert_eq!(plugged, Ok(self.shard), "the Hold's reply");
        let rest = receive(
            &mut self.outcomes,
            self.offered as usize - self.received.len(),
            "the held writes once the gate opened",
            |_| false,
        )
        .await;
        let mut written = BTreeSet::new();
        for (seq, result) in &rest {
            match result {
                Ok(reply) => {
                    assert_eq!((reply.node, reply.shard, reply.seq), (1, self.shard, *seq));
                    written.insert(*seq);
                }
                Err(Failure::Overloaded(shard)) if *shard == self.shard => {}
                Err(failure) => panic!("write {seq} failed: {failure:?}"),
            }
        }
        assert!(
            written.len() < connection_in_flight_max(),
            "{} writes held on one connection",
            written.len()
        );
        let key = keys_of_shard("saturate", self.shard, 1).remove(0);
        let stored: BTreeSet<u64> = self
            .via
            .must("reading the saturated shard back", &key, Dump)
            .await
            .into_iter()
            .collect();
        assert_eq!(
            stored, written,
            "the shard holds exactly the writes answered"
        );
    }
}

/// What a node looks like from outside, for the health check below.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Health {
    id: NodeId,
    serving: bool,
    leader: Option<NodeId>,
    term: u64,
    epoch: u64,
    down: Vec<NodeId>,
}

fn health(cluster: &TestCluster) -> Vec<Health> {
    cluster
        .members
        .iter()
        .map(|m| {
            let status = m.node.cluster_status().expect("a clustered node");
            Health {
                id: m.id,
                serving: m.node.status().serving,
                leader: status.leader,
                term: status.term,
                epoch: status.epoch,
                down: status.down,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_node_whose_connection_to_the_owner_is_full_passes_overloaded_back() {
    let _serial = SERIAL.lock().await;
    let saturated = saturate_forwarding_connection(true).await;
    let unexpected: Vec<&Outcome> = saturated
        .received
        .iter()
        .filter(|(_, r)| *r != Err(Failure::Overloaded(saturated.shard)))
        .take(5)
        .collect();
    assert!(
        unexpected.is_empty(),
        "a write that node 2's full connection to node 1 refused must end as Overloaded {{ shard: {} }}, \
         as the Client reports the same refusal; got {unexpected:?}",
        saturated.shard
    );
    saturated.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_node_whose_connection_to_the_owner_is_full_keeps_its_lease_and_the_leader() {
    let _serial = SERIAL.lock().await;
    let saturated = saturate_forwarding_connection(false).await;
    // The connection is full now, and stays full until the gate opens. Node 2 must go on
    // renewing its lease (through node 1 when node 1 leads; with node 1's heartbeat answers
    // when node 2 leads), with no election, no map change and nobody marked down. Two
    // renewals are waited for: the first might have been asked for before the connection
    // filled.
    let before = health(&saturated.cluster);
    let forwarder = &saturated.cluster.member(2).node;
    let lease_ms = || {
        forwarder
            .cluster_status()
            .and_then(|status| status.lease_remaining_ms)
    };
    let mut last = lease_ms();
    let mut renewals = 0;
    let deadline = Instant::now() + DEADLINE;
    while renewals < 2 {
        let now = health(&saturated.cluster);
        let changed = now.iter().zip(&before).any(|(now, before)| {
            !now.serving
                || !now.down.is_empty()
                || (now.leader, now.term, now.epoch) != (before.leader, before.term, before.epoch)
        });
        assert!(
            !changed,
            "while node 2's connection to node 1 was full of held forwarded messages the \
             cluster's control traffic failed: before {before:?}, now {now:?}"
        );
        let remaining = lease_ms();
        if let (Some(previous), Some(now)) = (last, remaining) {
            // The lease only shrinks with time; it grows when a renewal is granted.
            if now > previous + 200 {
                renewals += 1;
            }
        }
        last = remaining;
        assert!(
            Instant::now() < deadline,
            "node 2 did not renew its lease within {DEADLINE:?} while its connection to node 1 \
             was full: {now:?}"
        );
        // Polling the nodes' state: no event announces a renewal.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    saturated.drain().await;
}
