//! Warnings about misbehaving peers at a bounded rate: a flood of refused connections must not
//! turn into a flood of log lines (one WARN per refusal wrote 1 MB of log in 2 s).
//!
//! A [`LogLimit`] admits a few lines per window and counts the rest; the first line admitted
//! after a suppression says how many were left out, so nothing goes unmentioned.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Admits at most `per_window` log lines per `window`.
#[derive(Debug)]
pub(crate) struct LogLimit {
    window: Duration,
    per_window: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the current window began (`None` before the first line).
    started: Option<Instant>,
    /// Lines admitted in the current window.
    admitted: u32,
    /// Lines left out since the last admitted one.
    suppressed: u64,
}

impl LogLimit {
    /// A limit of `per_window` lines per `window`.
    pub(crate) fn new(window: Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether to log a line now: `Some(n)` to log it, saying that `n` lines were left out
    /// since the last one logged; `None` to leave it out (it is counted).
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let in_window = state
            .started
            .is_some_and(|started| now.saturating_duration_since(started) < self.window);
        if !in_window {
            state.started = Some(now);
            state.admitted = 0;
        }
        if state.admitted >= self.per_window {
            state.suppressed = state.suppressed.saturating_add(1);
            return None;
        }
        state.admitted += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_a_few_lines_per_window_and_the_rest_counted() {
        let limit = LogLimit::new(Duration::from_secs(10), 3);
        let start = Instant::now();
        let admitted: Vec<Option<u64>> = (0..1000).map(|_| limit.admit(start)).collect();
        assert_eq!(admitted.iter().flatten().count(), 3);
        assert_eq!(&admitted[..4], &[Some(0), Some(0), Some(0), None]);
        // Still within the window: left out.
        assert_eq!(limit.admit(start + Duration::from_secs(9)), None);
        // The next window's first line reports what was left out.
        assert_eq!(limit.admit(start + Duration::from_secs(10)), Some(998));
        assert_eq!(limit.admit(start + Duration::from_secs(11)), Some(0));
    }
}
