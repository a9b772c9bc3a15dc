//! One owner for a node's long-lived tasks: every task is spawned through [`NodeTasks`], which
//! cancels them all and waits until each has ended when the node shuts down, so a stopped node
//! leaves no task behind (the tasks no longer end only when a `Weak` fails to upgrade).

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A node's tasks: a cancellation token they all honour and a tracker that knows which still run.
/// Cheap to clone; clones share the tasks.
#[derive(Debug, Clone)]
pub(crate) struct NodeTasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// The runtime the node was started on: tasks spawned from an actor (which runs on an actix
    /// arbiter) still run there, beside the node's connections.
    runtime: Option<tokio::runtime::Handle>,
}

impl Default for NodeTasks {
    /// A task set on the current tokio runtime (if any).
    fn default() -> Self {
        NodeTasks {
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl NodeTasks {
    /// Runs `task` until it ends or the node shuts down, whichever is first. A task spawned after
    /// shutdown ends at once.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.spawn_with_result(task));
    }

    /// Like [`spawn`](Self::spawn), on the node's runtime, and returns the task's handle: its
    /// output, or `None` if the node shut down first.
    pub(crate) fn spawn_with_result<F>(&self, task: F) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let cancel = self.cancel.clone();
        let task = async move { cancel.run_until_cancelled(task).await };
        match &self.runtime {
            Some(runtime) => self.tracker.spawn_on(task, runtime),
            None => self.tracker.spawn(task),
        }
    }

    /// Cancels every task and waits until each has ended.
    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// How many tasks still run.
    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_ends_every_task_also_one_that_would_run_forever() {
        let tasks = NodeTasks::default();
        let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(2);
        for _ in 0..2 {
            let started = started_tx.clone();
            tasks.spawn(async move {
                let _ = started.send(()).await;
                std::future::pending::<()>().await;
            });
        }
        for _ in 0..2 {
            started_rx.recv().await.expect("task started");
        }
        assert_eq!(tasks.running(), 2);
        tasks.shutdown().await;
        assert_eq!(tasks.running(), 0);
        // Spawned after shutdown: ends at once instead of outliving the node.
        let (ran_tx, ran_rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            std::future::pending::<()>().await;
            let _ = ran_tx.send(());
        });
        assert!(
            ran_rx.await.is_err(),
            "the late task was dropped unfinished"
        );
    }
}
