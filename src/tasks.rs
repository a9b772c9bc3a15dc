//! One owner for a node's long-lived tasks: every task is spawned through [`NodeTasks`], which
//! cancels them all and waits until each has ended when the node shuts down, so a stopped node
//! leaves no task behind (the tasks no longer end only when a `Weak` fails to upgrade).

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A node's tasks: a cancellation token they all honour and a tracker that knows which still run.
/// Cheap to clone; clones share the tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeTasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl NodeTasks {
    /// Runs `task` until it ends or the node shuts down, whichever is first. A task spawned after
    /// shutdown ends at once.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            cancel.run_until_cancelled(task).await;
        });
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
