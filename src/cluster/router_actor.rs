//! The router actor: the one owner of a node's rebalancing, as the design card names it.
//!
//! The router ([`crate::router::Router`]) answers the per-message question "where does this key
//! go?" from a lock-free table; it is not an actor, because a hop through a mailbox on every
//! message would cost the send path most of its speed. Everything that changes *which* shards a
//! node serves is this actor's: it receives every applied cluster state from consensus and
//! installs the routing table (which also stops the actors of shards lost without handoff),
//! drives the handoff rounds that carry planned moves (retiring shard actors, sending their
//! snapshots, proposing the release; re-targeted and cancelled moves included), and undrains the
//! node after a graceful shutdown's restart.
//!
//! It runs on the node's arbiter under actix's [`Supervisor`]: a handler that panics stops the
//! actor, and the supervisor starts it again with the same value ([`Supervised::restarting`]),
//! so what it remembers across rounds survives. A handoff round borrows that memory
//! ([`HandoffBook`]) by value; a round that panics gives back the copy taken before it, and a
//! restart does not abort a round in flight (its ledger steps finish; it reports to the restarted
//! actor). The ledger's own events apply by value too ([`crate::ledger::apply`]). The rounds' I/O runs as
//! tasks of the node ([`crate::tasks::NodeTasks`]) on the node's runtime, beside its
//! connections; [`Node::shutdown`](super::Node::shutdown) stops the actor, then the tasks.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message,
    StreamHandler, Supervised, Supervisor, WrapFuture,
};
use actix_rt::ArbiterHandle;
use futures_util::FutureExt;
use tokio::sync::{oneshot, watch};

use super::config::NodeConfig;
use super::tasks::{
    raft_task_ended, remove_undrain_marker, stop_for_good, undrain, undrain_step, zone_mismatch,
    zone_mismatch_reason, Followed, Follower, UndrainStep,
};
use crate::consensus::Consensus;
use crate::handoff::{self, HandoffBook};
use crate::router::Router;
use crate::shard::ShardHandler;

/// How often the undrain looks again while it waits (lease renewals are not announced).
const UNDRAIN_LOOK_EVERY: Duration = Duration::from_millis(100);
/// Pause after a refused undrain.
const UNDRAIN_RETRY: Duration = Duration::from_millis(500);

/// Something consensus reported.
#[derive(Debug)]
enum Change {
    /// The applied state or raft's metrics changed (or the actor just started).
    Changed,
    /// Raft's task ended.
    RaftEnded,
}

/// A handoff round ended: its book and whether some move must be tried again, or `None` if it
/// panicked.
#[derive(Message)]
#[rtype(result = "()")]
struct RoundEnded(Option<(HandoffBook, bool)>);

/// Stops the router actor for good (the node shuts down).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Stop;

/// The parts the router actor is started with.
pub(super) struct RouterActorParts<H: ShardHandler> {
    pub(super) router: Weak<Router<H>>,
    pub(super) consensus: Consensus,
    pub(super) config: NodeConfig,
    pub(super) stopped: watch::Sender<Option<String>>,
    /// The marker of a graceful shutdown's drain, when the node must undrain itself.
    pub(super) undrain_marker: Option<PathBuf>,
    pub(super) stuck_after: Duration,
}

/// The router actor (see the module docs).
pub(super) struct RouterActor<H: ShardHandler> {
    parts: RouterActorParts<H>,
    follower: Follower,
    /// Consensus stopped on its own (raft failed, zone mismatch): the table is no longer followed.
    stopped_following: bool,
    /// The handoff rounds' memory; `None` while a round has it.
    book: Option<HandoffBook>,
    /// The memory as it was before the round in flight, for a round that panics.
    book_before_round: Option<HandoffBook>,
    /// The pending retry of a round that must try again, if armed.
    retry_timer: Option<actix::SpawnHandle>,
    /// The applied index the last round was started for: rounds start when the applied state
    /// changed (or on retry), not on every tick of raft's metrics.
    round_applied: Option<Option<u64>>,
    /// A change arrived while a round ran: run another one after it.
    round_again: bool,
    /// The node shuts down: the supervisor must not start the actor again.
    stopping: bool,
    /// An undrain request is under way.
    undraining: bool,
    undrain_not_before: Option<Instant>,
    /// Told once the actor stopped for good.
    done: Option<oneshot::Sender<()>>,
    /// How often the supervisor restarted the actor after a panic.
    restarts: u64,
    /// Handoff rounds started.
    rounds: u64,
}

/// The node's handle on its router actor.
pub(super) struct RouterActorHandle<H: ShardHandler> {
    addr: Addr<RouterActor<H>>,
    done: oneshot::Receiver<()>,
}

impl<H: ShardHandler> std::fmt::Debug for RouterActorHandle<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterActorHandle").finish_non_exhaustive()
    }
}

impl<H: ShardHandler> RouterActorHandle<H> {
    /// Stops the actor and waits until it has stopped (a round in flight is dropped with it; its
    /// task ends with the node's tasks).
    pub(super) async fn stop(self) {
        let RouterActorHandle { addr, done } = self;
        let request = addr.send(Stop);
        // The last address goes before the actor stops, so the supervisor does not restart it.
        drop(addr);
        let _ = request.await;
        let _ = done.await;
    }
}

impl<H: ShardHandler> RouterActor<H> {
    /// Starts the router actor on `arbiter`, supervised.
    pub(super) fn start(
        arbiter: &ArbiterHandle,
        parts: RouterActorParts<H>,
    ) -> RouterActorHandle<H> {
        let (done_tx, done) = oneshot::channel();
        let addr = Supervisor::start_in_arbiter(arbiter, move |_| RouterActor {
            parts,
            follower: Follower::new(),
            stopped_following: false,
            book: Some(HandoffBook::default()),
            book_before_round: None,
            retry_timer: None,
            round_applied: None,
            round_again: false,
            stopping: false,
            undraining: false,
            undrain_not_before: None,
            done: Some(done_tx),
            restarts: 0,
            rounds: 0,
        });
        RouterActorHandle { addr, done }
    }

    /// Runs `step` with panics caught: a panicking step stops the actor, and the supervisor
    /// starts it again with its value.
    fn guarded(
        &mut self,
        ctx: &mut Context<Self>,
        what: &str,
        step: impl FnOnce(&mut Self, &mut Context<Self>),
    ) {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| step(self, ctx)));
        if outcome.is_err() {
            tracing::error!(
                node = self.parts.consensus.node_id(),
                "the router actor panicked while {what}; restarting it"
            );
            ctx.stop();
        }
    }

    /// Reacts to a change of consensus: installs the table, then starts a handoff round and
    /// looks at the undrain.
    fn on_change(&mut self, ctx: &mut Context<Self>) {
        self.follow();
        let applied = self
            .parts
            .consensus
            .applied()
            .last_applied
            .as_ref()
            .map(|l| l.index);
        if self.round_applied != Some(applied) {
            self.round_applied = Some(applied);
            self.start_round(ctx);
        }
        self.look_at_undrain(ctx);
    }

    /// Installs the applied state in the router (see [`Follower`]).
    fn follow(&mut self) {
        if self.stopped_following {
            return;
        }
        let Some(router) = self.parts.router.upgrade() else {
            return;
        };
        let consensus = &self.parts.consensus;
        match self.follower.step(&router, consensus, &self.parts.config) {
            Followed::Current => {}
            Followed::RaftStopped => self.stopped_following = true,
            Followed::RaftFailed(reason) => {
                self.stopped_following = true;
                stop_for_good(&router, &self.parts.stopped, reason);
            }
            Followed::ZoneMismatch(mismatch) => {
                self.stopped_following = true;
                let reason = zone_mismatch_reason(consensus, &mismatch);
                stop_for_good(&router, &self.parts.stopped, reason);
                consensus
                    .tasks()
                    .spawn(zone_mismatch(consensus.clone(), mismatch));
            }
        }
    }

    /// Starts a handoff round unless one runs (then another follows it). The round runs as a
    /// node task and reports its end with [`RoundEnded`] through a weak address: a restart of
    /// this actor neither aborts it (its shards' ledger steps finish) nor overlaps it with
    /// another (the book is out until it ends).
    fn start_round(&mut self, ctx: &mut Context<Self>) {
        let Some(book) = self.book.take() else {
            self.round_again = true;
            return;
        };
        self.round_again = false;
        self.rounds += 1;
        self.book_before_round = Some(book.clone());
        let (router, consensus) = (self.parts.router.clone(), self.parts.consensus.clone());
        let (deactivate_timeout, stuck_after) =
            (self.parts.config.deactivate_timeout, self.parts.stuck_after);
        let actor = ctx.address().downgrade();
        let round = async move {
            let mut book = book;
            let Some(router) = router.upgrade() else {
                return (book, false);
            };
            let retry = handoff::round(
                &router,
                &consensus,
                &mut book,
                deactivate_timeout,
                stuck_after,
            )
            .await;
            (book, retry)
        };
        let ended = async move {
            let outcome = AssertUnwindSafe(round).catch_unwind().await.ok();
            if let Some(actor) = actor.upgrade() {
                actor.do_send(RoundEnded(outcome));
            }
        };
        self.parts.consensus.tasks().spawn(ended);
    }

    /// Arms the retry timer unless it is armed already: one pending retry at most.
    fn retry_later(&mut self, ctx: &mut Context<Self>) {
        if self.retry_timer.is_some() {
            return;
        }
        self.retry_timer = Some(ctx.run_later(handoff::RETRY, |actor, ctx| {
            actor.retry_timer = None;
            actor.guarded(ctx, "starting a handoff round", Self::start_round)
        }));
    }

    /// Undrains the node after a graceful shutdown's restart, once it has rejoined.
    fn look_at_undrain(&mut self, ctx: &mut Context<Self>) {
        let Some(marker) = self.parts.undrain_marker.clone() else {
            return;
        };
        if self.undraining || self.undrain_not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let Some(router) = self.parts.router.upgrade() else {
            return;
        };
        match undrain_step(&router, &self.parts.consensus) {
            UndrainStep::Wait => {}
            UndrainStep::Done => {
                remove_undrain_marker(&marker);
                self.parts.undrain_marker = None;
            }
            UndrainStep::Undrain => {
                self.undraining = true;
                let task = self
                    .parts
                    .consensus
                    .tasks()
                    .spawn_with_result(undrain(self.parts.consensus.clone()));
                ctx.spawn(task.into_actor(self).map(move |ended, actor, _| {
                    actor.undraining = false;
                    if let Ok(Some(true)) = ended {
                        remove_undrain_marker(&marker);
                        actor.parts.undrain_marker = None;
                    } else {
                        actor.undrain_not_before = Some(Instant::now() + UNDRAIN_RETRY);
                    }
                }));
            }
        }
    }
}

impl<H: ShardHandler> Actor for RouterActor<H> {
    type Context = Context<Self>;

    /// Subscribes to consensus (again after a restart) and catches up at once.
    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            ctx.stop();
            return;
        }
        ctx.add_stream(changes(&self.parts.consensus));
        if self.parts.undrain_marker.is_some() {
            ctx.run_interval(UNDRAIN_LOOK_EVERY, |actor, ctx| {
                actor.guarded(ctx, "undraining", Self::look_at_undrain)
            });
        }
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if self.stopping {
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        }
    }
}

impl<H: ShardHandler> Supervised for RouterActor<H> {
    /// After a panic: the table is installed again from the applied state and a round starts
    /// again (after the one in flight, if any, reported its end).
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        if self.stopping {
            // `Stop` was handled before the node dropped its address: not a panic.
            return;
        }
        self.restarts += 1;
        tracing::warn!(
            node = self.parts.consensus.node_id(),
            restarts = self.restarts,
            "router actor restarted after a panic"
        );
        self.follower.forget();
        // A round in flight goes on and reports its end to this same actor; timers are gone.
        self.retry_timer = None;
        self.round_applied = None;
        self.undraining = false;
    }
}

impl<H: ShardHandler> StreamHandler<Change> for RouterActor<H> {
    fn handle(&mut self, change: Change, ctx: &mut Context<Self>) {
        match change {
            Change::Changed => self.guarded(ctx, "following consensus", Self::on_change),
            Change::RaftEnded => {
                // Raft's last metrics say why it ended (a fatal error stops the node for good,
                // `Node::shutdown` stops nothing more); if they say it still runs, its task ended
                // without a word.
                self.guarded(ctx, "following consensus", |actor, _| actor.follow());
                if let (Some(router), Some(reason), false) = (
                    self.parts.router.upgrade(),
                    raft_task_ended(&self.parts.consensus),
                    self.stopped_following,
                ) {
                    self.stopped_following = true;
                    stop_for_good(&router, &self.parts.stopped, reason);
                }
            }
        }
    }

    /// Consensus is gone (the node shuts down): nothing more comes.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl<H: ShardHandler> Handler<RoundEnded> for RouterActor<H> {
    type Result = ();

    fn handle(&mut self, RoundEnded(outcome): RoundEnded, ctx: &mut Context<Self>) {
        let before = self.book_before_round.take();
        match outcome {
            Some((book, retry)) => {
                self.book = Some(book);
                if retry {
                    self.retry_later(ctx);
                }
            }
            None => {
                // The round panicked: its memory goes back to where it was before the round
                // (the ledger's own events apply by value), and it is tried again.
                tracing::error!(
                    node = self.parts.consensus.node_id(),
                    "a handoff round panicked; its moves are retried"
                );
                self.book = Some(before.unwrap_or_default());
                self.retry_later(ctx);
            }
        }
        if self.round_again {
            self.guarded(ctx, "starting a handoff round", Self::start_round);
        }
    }
}

impl<H: ShardHandler> Handler<Stop> for RouterActor<H> {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        self.stopping = true;
        ctx.stop();
    }
}

/// Every change of consensus as a stream: one item at once (to catch up), then one for each
/// change of the applied state or of raft's metrics, and [`Change::RaftEnded`] once either
/// channel closed (raft's core or its state machine ended: both go when raft stops, in either
/// order, so the end is reported whichever closes first), then the end of the stream.
fn changes(consensus: &Consensus) -> impl futures_util::Stream<Item = Change> + 'static {
    let metrics = consensus.raft().metrics();
    let applied = consensus.subscribe();
    futures_util::stream::unfold(Some((metrics, applied, true)), |state| async move {
        let (mut metrics, mut applied, first) = state?;
        if first {
            metrics.borrow_and_update();
            applied.borrow_and_update();
            return Some((Change::Changed, Some((metrics, applied, false))));
        }
        let open = tokio::select! {
            changed = metrics.changed() => changed.is_ok(),
            changed = applied.changed() => changed.is_ok(),
        };
        if open {
            Some((Change::Changed, Some((metrics, applied, false))))
        } else {
            Some((Change::RaftEnded, None))
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::prelude::*;
    use crate::{ConsensusConfig, LeaseConfig, NodeInfo};

    /// Makes the actor's next step panic, as a bug in a handler would.
    #[derive(Message)]
    #[rtype(result = "()")]
    struct PanicInAStep;

    /// What the actor holds: its restarts, whether the handoff rounds' memory is home (or lent
    /// to a round in flight), and the rounds it started.
    #[derive(Message)]
    #[rtype(result = "(u64, bool, u64)")]
    struct Inspect;

    impl<H: ShardHandler> Handler<PanicInAStep> for RouterActor<H> {
        type Result = ();

        fn handle(&mut self, _: PanicInAStep, ctx: &mut Context<Self>) {
            self.guarded(ctx, "testing", |_, _| {
                panic!("a bug in a router actor step")
            });
        }
    }

    impl<H: ShardHandler> Handler<Inspect> for RouterActor<H> {
        type Result = actix::MessageResult<Inspect>;

        fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> Self::Result {
            let book = self.book.is_some() || self.book_before_round.is_some();
            actix::MessageResult((self.restarts, book, self.rounds))
        }
    }

    #[derive(Serialize, Deserialize, ShardMessage)]
    #[reply(u64)]
    struct Incr;

    #[derive(Default)]
    struct Counters {
        values: std::collections::HashMap<Key, u64>,
    }

    #[shard_handler]
    impl Counters {
        fn incr(&mut self, key: Key, _msg: Incr, _ctx: &mut ShardContext) -> u64 {
            let value = self.values.entry(key).or_default();
            *value += 1;
            *value
        }
    }

    async fn incr_until_served(node: &Node<Counters>, key: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match node.send(key, Incr).await {
                Ok(value) => return value,
                Err(error) => {
                    assert!(Instant::now() < deadline, "node not serving: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// A one-node cluster on loopback, serving, and its router actor's address.
    async fn serving_node(name: &str) -> (Node<Counters>, Addr<RouterActor<Counters>>) {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a loopback port");
        let members = BTreeMap::from([(
            1,
            NodeInfo {
                addr: addr.to_string(),
                zone: None,
            },
        )]);
        let node = Cluster::builder()
            .node_id(1)
            .shards(8)
            .listen(addr)
            .cluster_name(name)
            .handler::<Counters>()
            .in_memory_for_tests()
            .insecure()
            .lease(LeaseConfig::fast())
            .consensus(ConsensusConfig::fast())
            .initial_members(members)
            .start()
            .await
            .expect("node starts");
        assert_eq!(incr_until_served(&node, "a").await, 1);
        let actor = node
            .inner
            .router_actor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|handle| handle.addr.clone())
            .expect("a clustered node has a router actor");
        (node, actor)
    }

    #[actix_rt::test]
    async fn a_panicking_router_actor_is_restarted_with_its_state_and_the_node_keeps_serving() {
        let (node, actor) = serving_node("router-actor").await;
        let (restarts, book, rounds) = actor.send(Inspect).await.expect("alive");
        assert_eq!((restarts, book), (0, true));
        assert!(rounds > 0, "the applied states started handoff rounds");

        actor.send(PanicInAStep).await.expect("the step ran");
        // The supervisor started the same actor value again: its count and its memory are there.
        let (restarts, book, _) = actor.send(Inspect).await.expect("restarted, not gone");
        assert_eq!(restarts, 1);
        assert!(book, "the handoff rounds' memory survived the restart");
        // It follows consensus again (its table was installed anew) and the shard kept its state.
        assert_eq!(incr_until_served(&node, "a").await, 2);
        drop(actor);
        node.shutdown().await;
    }

    #[actix_rt::test]
    async fn an_idle_node_starts_no_handoff_rounds_on_raft_heartbeats() {
        let (node, actor) = serving_node("router-actor-idle").await;
        let consensus = node.inner.consensus.clone().expect("clustered");
        let applied = || consensus.applied().last_applied.as_ref().map(|l| l.index);
        // Raft's metrics change on every heartbeat (each 50 ms or so here); over 20 of them, an
        // idle node with an unchanged applied state starts no round (each used to start one, and
        // each round's retry timer could pile up).
        let (index, (_, _, rounds)) = (applied(), actor.send(Inspect).await.expect("alive"));
        let mut ticks = consensus.raft().metrics();
        for _ in 0..20 {
            let _ = tokio::time::timeout(Duration::from_secs(5), ticks.changed()).await;
        }
        let (_, _, rounds_after) = actor.send(Inspect).await.expect("alive");
        if applied() == index {
            assert_eq!(
                rounds_after, rounds,
                "rounds started without a new applied state"
            );
        }
        drop(actor);
        node.shutdown().await;
    }
}
