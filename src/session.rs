//! Exactly-once effects: client sessions and the per-shard record of their replies.
//!
//! Every [`Client`](crate::client::Client) has a session ([`SessionId`], 128 random bits) and numbers
//! its requests; a request carries its id ([`Once`]) on the wire. A durable shard (its handler
//! declares durable state and the node has a store) keeps, per session, the replies of the
//! requests it applied that the client may still ask again for, and writes that record **in
//! the same commit** as the state change: the record and the state cannot disagree. A retry
//! of an applied request is answered from the record; it is never applied twice.
//!
//! The rules:
//!
//! - **Answered from the record**: the request's reply is recorded and its digest (tag, key and
//!   payload) matches.
//! - **Id reused**: the reply is recorded under another digest: refused with
//!   [`Error::RequestIdReused`].
//! - **Below the low watermark**: every request carries the lowest sequence number its client
//!   still waits on; the record drops the replies below it, so a request under it is refused
//!   with [`Error::RequestTooOld`].
//! - **Expired session**: a session's record is deleted once it has been idle for twice the
//!   session idle time ([`NodeConfig::session_idle`](crate::NodeConfig::session_idle)); a
//!   retry (not a first attempt) older than the idle time that finds no record is refused with
//!   [`Error::SessionExpired`], since its first attempt's record may be gone.
//! - **Not recorded**: a shard without durable state in a store keeps no record: it handles a
//!   first attempt as usual and refuses a retry of a message that is not idempotent with
//!   [`Error::NotRecorded`] (the client reports the outcome as unknown).
//!
//! Records live in the shard's store under keys with a reserved prefix ([`RESERVED_PREFIX`]),
//! hidden from the handler's durable state; messages with such a key are refused. This module
//! holds the ids, the rules and the record; the shard actor reads and writes the records and
//! the router carries the ids.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::persist::Batch;
use crate::shard_map::{Key, ShardId};

/// The prefix of the store keys that hold session records. A message whose key starts with it
/// is refused ([`Error::ReservedKey`]), so a handler's records can never collide with them.
pub const RESERVED_PREFIX: &[u8] = b"\xff\xffclusterfunk:";

/// Whether `key` is reserved for the framework's own records.
pub fn is_reserved(key: &[u8]) -> bool {
    key.first() == Some(&0xff) && key.starts_with(RESERVED_PREFIX)
}

/// The id of a client session: 128 random bits (or, for the sends of a handler, derived from
/// the id of the request it handles).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId([u8; 16]);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl SessionId {
    /// A new session id from the operating system's random source.
    pub fn random() -> Result<Self, Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| Error::Internal {
            detail: format!("no random source for a session id: {e}"),
        })?;
        Ok(SessionId(bytes))
    }

    /// The session with these bytes (one a program kept from an earlier
    /// [`Client::session`](crate::client::Client::session)).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        SessionId(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The session of the messages a handler sends while it handles request `seq` of this
    /// session: the same for every attempt of that request, so a retried parent sends its
    /// children under the same ids.
    pub(crate) fn child(&self, seq: u64) -> SessionId {
        let mut input = Vec::with_capacity(32);
        input.extend_from_slice(b"child\0");
        input.extend_from_slice(&self.0);
        input.extend_from_slice(&seq.to_le_bytes());
        SessionId(xxhash_rust::xxh3::xxh3_128(&input).to_le_bytes())
    }
}

/// The id of one request: its session and its number in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The session.
    pub session: SessionId,
    /// The request's number in its session (from 1).
    pub seq: u64,
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.session, self.seq)
    }
}

/// What a request carries for exactly-once handling (on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Once {
    /// The client's session.
    pub session: SessionId,
    /// The request's number in the session.
    pub seq: u64,
    /// The lowest number the client still waits on: the replies below it may be dropped.
    pub low: u64,
    /// Milliseconds since the request's first attempt.
    pub age_ms: u64,
    /// 0 for the first attempt; more for a retry.
    pub attempt: u32,
    /// Whether the client lets the message be handled twice (a retry of it needs no record).
    pub idempotent: bool,
}

/// A request's [`Once`] with the digest of what it asks, as the shard judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) once: Once,
    pub(crate) digest: u128,
}

impl Stamp {
    /// The stamp of `once` for the message of type `tag` with the encoded `payload` to `key`.
    pub(crate) fn new(once: Once, tag: &str, key: &[u8], payload: &[u8]) -> Self {
        Stamp {
            once,
            digest: digest(tag, key, payload),
        }
    }
}

/// Binds a request id to what the request asks: its message type, key and payload.
pub(crate) fn digest(tag: &str, key: &[u8], payload: &[u8]) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for part in [tag.as_bytes(), key, payload] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.digest128()
}

tokio::task_local! {
    /// The exactly-once stamp of the request being routed: set by the node's service around
    /// a request that carries one (and by a handler's sends), read where the router takes the
    /// message.
    pub(crate) static STAMP: Stamp;
}

/// The stamp of the request being routed in this task, if any.
pub(crate) fn current_stamp() -> Option<Stamp> {
    STAMP.try_with(|stamp| *stamp).ok()
}

/// The most replies one session's record in one shard keeps. Beyond it the oldest are dropped
/// and the session's low watermark rises past them (their retries are refused with
/// [`Error::RequestTooOld`], never applied again): a client whose low watermark is stuck (one
/// request outstanding for long, or a client that never raises it) cannot grow a record
/// without bound.
pub const REPLIES_MAX: usize = 1024;

/// One recorded reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    digest: u128,
    #[serde(with = "serde_bytes")]
    reply: Vec<u8>,
}

/// One session's record in one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    /// Requests below this number are no longer answered (the client acknowledged them).
    low: u64,
    /// The replies of applied requests at or above `low`, by number.
    replies: BTreeMap<u64, Recorded>,
}

/// What to do with a stamped request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Handle it (and record its reply).
    Apply,
    /// Answer with this recorded reply (encoded); do not handle it again.
    Answer(Vec<u8>),
    /// Refuse it with this error.
    Refuse(Error),
}

/// The rules of the module docs for a request stamped `stamp`, given its session's record in
/// the shard (`None`: there is none) and the node's session idle time.
pub(crate) fn judge(
    shard: ShardId,
    record: Option<&SessionRecord>,
    stamp: &Stamp,
    idle: Duration,
) -> Verdict {
    let once = &stamp.once;
    let Some(record) = record else {
        let old = u128::from(once.age_ms) >= idle.as_millis();
        return match once.attempt > 0 && old {
            true => Verdict::Refuse(Error::SessionExpired {
                shard,
                idle_ms: idle.as_millis() as u64,
            }),
            false => Verdict::Apply,
        };
    };
    if once.seq < record.low {
        return Verdict::Refuse(Error::RequestTooOld {
            shard,
            seq: once.seq,
            low: record.low,
        });
    }
    match record.replies.get(&once.seq) {
        Some(recorded) if recorded.digest == stamp.digest => {
            Verdict::Answer(recorded.reply.clone())
        }
        Some(_) => Verdict::Refuse(Error::RequestIdReused {
            shard,
            seq: once.seq,
        }),
        None => Verdict::Apply,
    }
}

/// The store key of `session`'s record.
pub(crate) fn record_key(session: &SessionId) -> Key {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"session:");
    key.extend_from_slice(&session.0);
    Key::from(key)
}

/// The store key of a shard's session index (each session with when it was last active).
pub(crate) fn index_key() -> Key {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"sessions");
    Key::from(key)
}

/// Milliseconds since the Unix epoch by this node's clock.
pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The sessions of one activation of a durable shard: the records read so far (from the store,
/// key by key) and the shard's index of sessions, which decides when a record expires.
#[derive(Debug)]
pub(crate) struct Sessions {
    idle: Duration,
    /// Records read or written in this activation (`None`: the store has none).
    records: HashMap<SessionId, Option<SessionRecord>>,
    /// Each session with a record, and when it was last active (ms, wall clock, at most a
    /// quarter of the idle time old); `None` until read.
    index: Option<BTreeMap<SessionId, u64>>,
    /// When expired sessions were last looked for.
    swept_ms: u64,
}

impl Sessions {
    /// No records read yet; sessions expire after twice `idle` without a request.
    pub(crate) fn new(idle: Duration) -> Self {
        Sessions {
            idle,
            records: HashMap::new(),
            index: None,
            swept_ms: 0,
        }
    }

    /// The store keys to read before `session`'s requests can be judged and recorded.
    pub(crate) fn missing(&self, session: &SessionId) -> Vec<Key> {
        let mut keys = Vec::new();
        if self.index.is_none() {
            keys.push(index_key());
        }
        if !self.records.contains_key(session) {
            keys.push(record_key(session));
        }
        keys
    }

    /// Takes in what the store holds under one of the keys [`missing`](Self::missing) named.
    pub(crate) fn insert_read(
        &mut self,
        session: &SessionId,
        key: &Key,
        bytes: Option<&[u8]>,
    ) -> Result<(), Error> {
        if *key == index_key() {
            let index = match bytes {
                Some(bytes) => crate::codec::decode_snapshot(bytes)?,
                None => BTreeMap::new(),
            };
            self.index = Some(index);
        } else {
            let record = bytes.map(crate::codec::decode_snapshot).transpose()?;
            self.records.insert(*session, record);
        }
        Ok(())
    }

    /// [`judge`] with what was read for the stamp's session.
    pub(crate) fn judge(&self, shard: ShardId, stamp: &Stamp) -> Verdict {
        let record = self
            .records
            .get(&stamp.once.session)
            .and_then(Option::as_ref);
        judge(shard, record, stamp, self.idle)
    }

    /// Records the reply (encoded) of the applied request `stamp` into `batch`, beside the
    /// state change it goes with: the session's record (replies below the client's low
    /// watermark dropped), the index when it changed, and the deletion of expired sessions.
    /// `now_ms` is the node's wall clock.
    pub(crate) fn record(
        &mut self,
        stamp: &Stamp,
        reply: Vec<u8>,
        now_ms: u64,
        batch: &mut Batch,
    ) -> Result<(), Error> {
        let once = &stamp.once;
        let record = self
            .records
            .entry(once.session)
            .or_insert(None)
            .get_or_insert_with(SessionRecord::default);
        record.low = record.low.max(once.low);
        let low = record.low;
        record.replies.retain(|seq, _| *seq >= low);
        if once.seq >= low {
            record.replies.insert(
                once.seq,
                Recorded {
                    digest: stamp.digest,
                    reply,
                },
            );
        }
        while record.replies.len() > REPLIES_MAX {
            if let Some((dropped, _)) = record.replies.pop_first() {
                record.low = record.low.max(dropped + 1);
            }
        }
        batch.put(record_key(&once.session), crate::codec::encode(&*record)?);
        let idle_ms = self.idle.as_millis() as u64;
        let index = self.index.get_or_insert_with(BTreeMap::new);
        let mut index_changed = false;
        let stale = index
            .get(&once.session)
            .is_none_or(|seen| now_ms.saturating_sub(*seen) > idle_ms / 4);
        if stale {
            index.insert(once.session, now_ms);
            index_changed = true;
        }
        if now_ms.saturating_sub(self.swept_ms) > idle_ms / 8 {
            self.swept_ms = now_ms;
            let expired: Vec<SessionId> = index
                .iter()
                .filter(|(_, seen)| now_ms.saturating_sub(**seen) > 2 * idle_ms)
                .map(|(session, _)| *session)
                .collect();
            for session in expired {
                index.remove(&session);
                self.records.remove(&session);
                batch.delete(record_key(&session));
                index_changed = true;
            }
        }
        if index_changed {
            batch.put(index_key(), crate::codec::encode(&*index)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Change;

    const IDLE: Duration = Duration::from_secs(60);

    fn stamp(seq: u64, low: u64, payload: &[u8], attempt: u32, age_ms: u64) -> Stamp {
        Stamp::new(
            Once {
                session: SessionId([7; 16]),
                seq,
                low,
                age_ms,
                attempt,
                idempotent: false,
            },
            "Add",
            b"key",
            payload,
        )
    }

    fn recorded(sessions: &mut Sessions, stamp: &Stamp, reply: &[u8], now: u64) -> Batch {
        let mut batch = Batch::new();
        sessions
            .record(stamp, reply.to_vec(), now, &mut batch)
            .expect("record");
        batch
    }

    fn fresh() -> Sessions {
        let mut sessions = Sessions::new(IDLE);
        let session = SessionId([7; 16]);
        for key in sessions.missing(&session) {
            sessions.insert_read(&session, &key, None).expect("read");
        }
        sessions
    }

    #[test]
    fn a_retry_of_a_recorded_request_is_answered_from_the_record() {
        let mut sessions = fresh();
        let first = stamp(1, 1, b"+5", 0, 0);
        assert_eq!(sessions.judge(3, &first), Verdict::Apply);
        recorded(&mut sessions, &first, b"reply-5", 1_000);
        let retry = stamp(1, 1, b"+5", 1, 10);
        assert_eq!(
            sessions.judge(3, &retry),
            Verdict::Answer(b"reply-5".to_vec())
        );
    }

    #[test]
    fn the_same_id_with_another_payload_is_refused() {
        let mut sessions = fresh();
        recorded(&mut sessions, &stamp(1, 1, b"+5", 0, 0), b"r", 1_000);
        assert_eq!(
            sessions.judge(3, &stamp(1, 1, b"+6", 1, 10)),
            Verdict::Refuse(Error::RequestIdReused { shard: 3, seq: 1 })
        );
        // The key is part of what an id is bound to.
        let mut other_key = stamp(1, 1, b"+5", 1, 10);
        other_key.digest = digest("Add", b"other", b"+5");
        assert!(matches!(
            sessions.judge(3, &other_key),
            Verdict::Refuse(Error::RequestIdReused { .. })
        ));
    }

    #[test]
    fn replies_below_the_low_watermark_are_dropped_and_their_retries_refused() {
        let mut sessions = fresh();
        recorded(&mut sessions, &stamp(1, 1, b"a", 0, 0), b"r1", 1_000);
        recorded(&mut sessions, &stamp(2, 1, b"b", 0, 0), b"r2", 1_001);
        // The client got reply 1: its next request says it waits on nothing below 3.
        let batch = recorded(&mut sessions, &stamp(3, 3, b"c", 0, 0), b"r3", 1_002);
        let (_, records) = batch.into_parts();
        let Some(Change::Put(bytes)) = records.get(&record_key(&SessionId([7; 16]))) else {
            panic!("the record is written with the state change");
        };
        let record: SessionRecord = crate::codec::decode_snapshot(bytes).expect("decodes");
        assert_eq!(record.replies.keys().copied().collect::<Vec<_>>(), vec![3]);
        assert_eq!(
            sessions.judge(3, &stamp(2, 2, b"b", 1, 10)),
            Verdict::Refuse(Error::RequestTooOld {
                shard: 3,
                seq: 2,
                low: 3
            })
        );
    }

    #[test]
    fn an_old_retry_without_a_record_is_refused_as_an_expired_session() {
        let sessions = fresh();
        let idle_ms = IDLE.as_millis() as u64;
        assert_eq!(
            sessions.judge(3, &stamp(1, 1, b"a", 2, idle_ms)),
            Verdict::Refuse(Error::SessionExpired { shard: 3, idle_ms })
        );
        // A first attempt, however old, was never applied: it is.
        assert_eq!(
            sessions.judge(3, &stamp(1, 1, b"a", 0, idle_ms)),
            Verdict::Apply
        );
        // A young retry without a record: its first attempt never reached a commit.
        assert_eq!(
            sessions.judge(3, &stamp(1, 1, b"a", 1, idle_ms - 1)),
            Verdict::Apply
        );
    }

    #[test]
    fn sessions_idle_for_twice_the_idle_time_are_deleted_from_the_store() {
        let mut sessions = fresh();
        let idle_ms = IDLE.as_millis() as u64;
        recorded(&mut sessions, &stamp(1, 1, b"a", 0, 0), b"r", 1_000);
        let mut other = stamp(1, 1, b"x", 0, 0);
        other.once.session = SessionId([9; 16]);
        sessions.missing(&other.once.session);
        sessions
            .insert_read(&other.once.session, &record_key(&other.once.session), None)
            .expect("read");
        let batch = recorded(&mut sessions, &other, b"r", 1_000 + 2 * idle_ms + 1);
        let (_, records) = batch.into_parts();
        assert_eq!(
            records.get(&record_key(&SessionId([7; 16]))),
            Some(&Change::Delete)
        );
        assert!(records.contains_key(&index_key()));
        // Gone from memory too: a retry finds no record, and an old one is refused.
        assert!(matches!(
            sessions.judge(3, &stamp(1, 1, b"a", 1, idle_ms)),
            Verdict::Refuse(Error::SessionExpired { .. })
        ));
    }

    #[test]
    fn a_record_keeps_at_most_replies_max_replies_and_refuses_retries_of_the_dropped_ones() {
        let mut sessions = fresh();
        // The client never acknowledges anything: its low watermark stays at 1.
        let count = REPLIES_MAX as u64 + 10;
        for seq in 1..=count {
            recorded(&mut sessions, &stamp(seq, 1, b"x", 0, 0), b"r", 1_000);
        }
        let record = sessions.records[&SessionId([7; 16])]
            .clone()
            .expect("a record");
        assert_eq!(record.replies.len(), REPLIES_MAX);
        assert_eq!(record.low, 11);
        assert!(matches!(
            sessions.judge(3, &stamp(10, 1, b"x", 1, 10)),
            Verdict::Refuse(Error::RequestTooOld {
                seq: 10,
                low: 11,
                ..
            })
        ));
        assert_eq!(
            sessions.judge(3, &stamp(11, 1, b"x", 1, 10)),
            Verdict::Answer(b"r".to_vec())
        );
    }

    #[test]
    fn child_sessions_are_the_same_for_every_attempt_and_differ_by_parent() {
        let parent = SessionId([1; 16]);
        assert_eq!(parent.child(5), parent.child(5));
        assert_ne!(parent.child(5), parent.child(6));
        assert_ne!(parent.child(5), SessionId([2; 16]).child(5));
    }

    #[test]
    fn reserved_keys_are_recognised() {
        assert!(is_reserved(record_key(&SessionId([0; 16])).as_bytes()));
        assert!(is_reserved(index_key().as_bytes()));
        assert!(!is_reserved(b"user-1"));
        assert!(!is_reserved(b"\xff"));
    }
}
