//! Waiting with a deadline, synchronous ([`wait_until`]) and async ([`wait_for`]), and Ctrl-C
//! handling for tools ([`watch_interrupt`]). Every loop here is bounded by its deadline and by
//! a count of attempts. Does not own what is awaited.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::WaitError;

/// Set by the Ctrl-C watcher; every wait checks it and returns, so that the caller's clean-up
/// (dropping its [`NodeProcess`](super::NodeProcess)es) runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Calls `probe` every `every` until it returns `Some`, and returns that; `None` once `limit`
/// has passed (or as many attempts as fit in it were made) without one.
pub fn wait_until<T>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    for _ in 0..attempts(limit, every) {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(every);
    }
    None
}

/// Calls `probe` every `every` until it succeeds, at most for `limit` (and as many attempts
/// as fit); the error names `what` and keeps the last failure. Returns early, with
/// [`WaitError::Interrupted`], once [`interrupted`] says so.
pub async fn wait_for<T, E, F, Fut>(
    what: &str,
    every: Duration,
    limit: Duration,
    mut probe: F,
) -> Result<T, WaitError<E>>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    let mut last = None;
    for _ in 0..attempts(limit, every) {
        if interrupted() {
            return Err(WaitError::Interrupted {
                what: what.to_string(),
            });
        }
        match probe().await {
            Ok(value) => return Ok(value),
            Err(e) => last = Some(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(every).await;
    }
    Err(WaitError::TimedOut {
        what: what.to_string(),
        limit,
        last,
    })
}

/// Attempts that fit in `limit` at one per `every`, plus the first.
fn attempts(limit: Duration, every: Duration) -> u128 {
    limit.as_millis() / every.as_millis().max(1) + 1
}

/// Starts a thread that notes Ctrl-C or SIGTERM (see [`interrupted`]) and says so on stderr
/// as `program`. Either would otherwise end the program at once, leaving its node processes
/// running.
pub fn watch_interrupt(program: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let signalled = match signal(SignalKind::terminate()) {
                Ok(mut term) => tokio::select! {
                    _ = term.recv() => true,
                    answer = tokio::signal::ctrl_c() => answer.is_ok(),
                },
                Err(_) => tokio::signal::ctrl_c().await.is_ok(),
            };
            if signalled {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("{program}: interrupted; stopping the nodes");
            }
        });
    });
}

/// Whether Ctrl-C or SIGTERM arrived since [`watch_interrupt`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_answer_and_gives_up_after_its_limit() {
        let mut calls = 0;
        let found = wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(found, Some(3));
        let never: Option<()> =
            wait_until(Duration::from_millis(20), Duration::from_millis(5), || None);
        assert_eq!(never, None);
    }
}
