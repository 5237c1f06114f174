//! What the kernel benchmarks share: the best-of-runs timer.

use std::time::{Duration, Instant};

/// Best time of repeated runs of `f` (after one warm-up): at least three runs, then more until
/// about `budget` has passed or `max_runs` were made.
pub fn best_time(budget: Duration, max_runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < budget && runs < max_runs) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}
