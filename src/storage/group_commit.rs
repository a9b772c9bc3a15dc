//! The writer thread of an LMDB environment, with group commit: an actix actor alone on a named
//! thread, in an actix system of its own, that reads a bounded job queue as a stream of ready
//! chunks and hands each chunk to a [`GroupCommit`] to commit in one write transaction.
//!
//! Shared by the raft storage (`lmdb`) and the node-local shard store (`persist::lmdb`). This
//! module owns the thread, the queue, the batching and the shutdown; it does **not** know what a
//! job is or how a chunk is committed (the [`GroupCommit`] decides, including what a failure
//! means for later jobs). Why a thread of its own rather than `spawn_blocking`: see the `lmdb`
//! module.

use std::thread::JoinHandle;

use actix::{Actor, AsyncContext, Context, StreamHandler};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

/// What the writer thread does with the jobs it takes from its queue.
pub(crate) trait GroupCommit: Send + Unpin + 'static {
    /// One unit of work; a job usually carries the way to tell its sender how it went.
    type Job: Send + 'static;

    /// Commits a chunk of queued jobs, in queue order, and tells each job how it went. Called on
    /// the writer thread, so it may block (open a write transaction, fsync).
    fn commit(&mut self, jobs: Vec<Self::Job>);

    /// Called once the queue has closed (every sender dropped) and the last chunk committed.
    fn close(&mut self) {}
}

/// The sending side of a writer thread. Dropping it without [`Self::shut_down`] leaves the thread
/// to end on its own once the queue drains; owners call `shut_down` to wait for that.
pub(crate) struct GroupWriter<J> {
    sender: Option<mpsc::Sender<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> GroupWriter<J> {
    /// Starts the thread `thread_name` running `committer` over a queue of at most
    /// `queue_jobs_max` jobs (senders past it wait for room: the back-pressure that bounds
    /// memory when the disk is slow), committing at most `batch_jobs_max` jobs per chunk (so one
    /// fsync never covers an unbounded amount of work).
    pub(crate) fn spawn<G: GroupCommit<Job = J>>(
        thread_name: &str,
        queue_jobs_max: usize,
        batch_jobs_max: usize,
        committer: G,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel(queue_jobs_max);
        let thread = std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || run(committer, receiver, batch_jobs_max))?;
        Ok(GroupWriter {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Queues `job`, waiting (asynchronously) while the queue is full. Hands the job back if the
    /// thread is gone (it panicked, or [`Self::shut_down`] was called).
    pub(crate) async fn submit(&self, job: J) -> Result<(), J> {
        match &self.sender {
            Some(sender) => sender.send(job).await.map_err(|error| error.0),
            None => Err(job),
        }
    }

    /// Closes the queue and waits for the thread to commit what is queued and end. Idempotent.
    pub(crate) fn shut_down(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            // A completion running on the writer thread may drop the last handle; joining
            // ourselves would deadlock, and the thread ends on its own once the queue is closed.
            if thread.thread().id() == std::thread::current().id() {
                return;
            }
            let name = thread.thread().name().unwrap_or("writer").to_owned();
            if thread.join().is_err() {
                tracing::error!(thread = %name, "the writer thread panicked; see the panic message above");
            }
        }
    }
}

/// The actor that owns the write side: its input is the job queue read as ready chunks.
struct GroupCommitActor<G> {
    committer: G,
    /// Told when the actor stopped, so the thread's system can end.
    stopped: Option<oneshot::Sender<()>>,
}

impl<G: GroupCommit> Actor for GroupCommitActor<G> {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.committer.close();
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.send(());
        }
    }
}

impl<G: GroupCommit> StreamHandler<Vec<G::Job>> for GroupCommitActor<G> {
    fn handle(&mut self, jobs: Vec<G::Job>, _ctx: &mut Self::Context) {
        self.committer.commit(jobs);
    }
}

/// The writer thread: an actix system of its own that runs the actor until the queue closes.
fn run<G: GroupCommit>(committer: G, receiver: mpsc::Receiver<G::Job>, batch_jobs_max: usize) {
    let system = actix_rt::System::new();
    system.block_on(async move {
        let (stopped, done) = oneshot::channel();
        let jobs = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|job| (job, receiver))
        })
        .ready_chunks(batch_jobs_max);
        GroupCommitActor::create(move |ctx| {
            ctx.add_stream(jobs);
            GroupCommitActor {
                committer,
                stopped: Some(stopped),
            }
        });
        // The actor stops once the queue closed and its last chunk committed.
        let _ = done.await;
    });
}
