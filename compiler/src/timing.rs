//! Named timing scopes for the compiler's phases: `let _t = timing::scope("fuse_matmuls");`
//! records how long the scope lived; `fdc compile --timings` prints the totals.

use std::sync::Mutex;
use std::time::{Duration, Instant};

static RECORDS: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());

pub struct Scope {
    name: String,
    start: Instant,
}

pub fn scope(name: &str) -> Scope {
    Scope {
        name: name.to_string(),
        start: Instant::now(),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Ok(mut records) = RECORDS.lock() {
            records.push((std::mem::take(&mut self.name), self.start.elapsed()));
        }
    }
}

/// Totals per name, in first-seen order.
pub fn report() -> Vec<(String, Duration)> {
    let records = RECORDS.lock().map(|r| r.clone()).unwrap_or_default();
    let mut totals: Vec<(String, Duration)> = vec![];
    for (name, d) in records {
        match totals.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += d,
            None => totals.push((name, d)),
        }
    }
    totals
}
