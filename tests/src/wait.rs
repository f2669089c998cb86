//! Bounded waiting for conditions in end-to-end tests.
use std::time::{Duration, Instant};

/// Polls `check` every 100 ms until it returns `None` (done) or `timeout` passes; panics with
/// the last state `check` described.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check() {
            None => return,
            Some(state) => last = state,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen within {timeout:?}; last state: {last}");
}
