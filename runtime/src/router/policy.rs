//! The router's role policies (`fdrt router --auto-roles`), as pure functions over what the
//! router knows of its instances, and the window of latencies the target policy reads.
//!
//! Two rules, in this order:
//! - **Targets** (`--ttft-target-ms`, `--tpot-target-ms`): time to first token is set by the
//!   prefill side's capacity and time per output token by the decode side's, so when one is
//!   over its target and the other within its own, an instance moves to the side that misses.
//!   Read over the streamed answers of the last [`WINDOW`] (non-streamed answers give no first
//!   token time and do not count), once at least [`MIN_SAMPLES`] answers say something.
//! - **Queues**: otherwise, when one side's instances hold on average more than twice the other
//!   side's requests, plus [`LOAD_SLACK`], an instance moves to the busy side.
//!
//! Either way the instance that moves is the least busy one of the other side that can take the
//! role, and each side keeps one instance.

use super::LOAD_SLACK;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The two sides of a disaggregated deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    Prefill,
    /// Decode instances, and mixed ones (which compute their prompts themselves).
    Decode,
}

/// An instance as the role policy sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Load {
    /// Requests running and waiting in its scheduler.
    pub queue: u64,
    /// Whether it can take the other part's role.
    pub can_switch: bool,
}

/// Latency targets of the target rule; either may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Targets {
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
}

/// Latencies observed recently: means over the window, `None` with too few answers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Observed {
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
}

/// How far back the target rule looks.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Answers the window needs before a mean of it counts.
pub const MIN_SAMPLES: usize = 8;
/// The most answers the window keeps, per kind.
const MAX_SAMPLES: usize = 1024;

/// The recent answers' time to first token and time per output token, as the router saw them.
#[derive(Debug, Default)]
pub(super) struct LatencyWindow {
    ttft: VecDeque<(Instant, Duration)>,
    tpot: VecDeque<(Instant, Duration)>,
}

impl LatencyWindow {
    pub fn first_token(&mut self, at: Instant, ttft: Duration) {
        push(&mut self.ttft, at, ttft);
    }

    pub fn per_output_token(&mut self, at: Instant, tpot: Duration) {
        push(&mut self.tpot, at, tpot);
    }

    /// Forgets the answers recorded before `at` (a role switch's request: the answers before
    /// it describe another deployment). Answers recorded while the request was on its way stay:
    /// the instance may have switched, and new answers come, before its reply is read.
    pub fn forget_before(&mut self, at: Instant) {
        for samples in [&mut self.ttft, &mut self.tpot] {
            samples.retain(|(recorded, _)| *recorded >= at);
        }
    }

    /// The means of the answers within [`WINDOW`] of `now`.
    pub fn observed(&mut self, now: Instant) -> Observed {
        Observed {
            ttft: mean(&mut self.ttft, now),
            tpot: mean(&mut self.tpot, now),
        }
    }
}

fn push(samples: &mut VecDeque<(Instant, Duration)>, at: Instant, value: Duration) {
    if samples.len() == MAX_SAMPLES {
        samples.pop_front();
    }
    samples.push_back((at, value));
}

fn mean(samples: &mut VecDeque<(Instant, Duration)>, now: Instant) -> Option<Duration> {
    while samples
        .front()
        .is_some_and(|(at, _)| now.saturating_duration_since(*at) > WINDOW)
    {
        samples.pop_front();
    }
    (samples.len() >= MIN_SAMPLES)
        .then(|| samples.iter().map(|(_, d)| *d).sum::<Duration>() / samples.len() as u32)
}

/// The role policy's decision (the module doc says how): the part an instance moves to and
/// its index among its current part's instances.
pub(super) fn pick_switch(
    prefill: &[Load],
    decode: &[Load],
    targets: Targets,
    observed: Observed,
) -> Option<(Part, usize)> {
    if prefill.is_empty() || decode.is_empty() {
        return None;
    }
    let misses = |target: Option<Duration>, seen: Option<Duration>| match (target, seen) {
        (Some(target), Some(seen)) => Some(seen > target),
        _ => None,
    };
    let to = match (
        misses(targets.ttft, observed.ttft),
        misses(targets.tpot, observed.tpot),
    ) {
        // First tokens late while the decode side keeps pace (or has no target): more prefill.
        (Some(true), Some(false) | None) => Some(Part::Prefill),
        (Some(false) | None, Some(true)) => Some(Part::Decode),
        _ => None,
    }
    .or_else(|| by_queues(prefill, decode))?;
    let from = match to {
        Part::Prefill if decode.len() > 1 => decode,
        Part::Decode if prefill.len() > 1 => prefill,
        _ => return None,
    };
    from.iter()
        .enumerate()
        .filter(|(_, l)| l.can_switch)
        .min_by_key(|(_, l)| l.queue)
        .map(|(index, _)| (to, index))
}

/// The queue rule: the part that needs an instance, if one does.
fn by_queues(prefill: &[Load], decode: &[Load]) -> Option<Part> {
    let mean = |set: &[Load]| set.iter().map(|l| l.queue as f64).sum::<f64>() / set.len() as f64;
    let (p, d) = (mean(prefill), mean(decode));
    let slack = LOAD_SLACK as f64;
    if p > 2.0 * d + slack {
        Some(Part::Prefill)
    } else if d > 2.0 * p + slack {
        Some(Part::Decode)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(queues: &[(u64, bool)]) -> Vec<Load> {
        queues
            .iter()
            .map(|&(queue, can_switch)| Load { queue, can_switch })
            .collect()
    }

    fn by_queue(prefill: &[Load], decode: &[Load]) -> Option<(Part, usize)> {
        pick_switch(prefill, decode, Targets::default(), Observed::default())
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_least_busy_instance_that_can_switch_moves_to_the_busy_part() {
        // Prefill queues average 12, decode 2: 12 > 2 * 2 + 4, a decode instance moves.
        let prefill = loads(&[(12, false)]);
        let decode = loads(&[(1, false), (3, true), (2, true)]);
        assert_eq!(by_queue(&prefill, &decode), Some((Part::Prefill, 2)));
        // And the other way.
        let prefill = loads(&[(0, true), (1, true)]);
        let decode = loads(&[(9, false)]);
        assert_eq!(by_queue(&prefill, &decode), Some((Part::Decode, 0)));
    }

    #[test]
    fn no_switch_within_the_slack_without_a_candidate_or_from_a_last_instance() {
        // 8 is not above 2 * 2 + 4.
        assert_eq!(
            by_queue(&loads(&[(8, true)]), &loads(&[(2, true), (2, true)])),
            None
        );
        // Nobody can switch.
        assert_eq!(
            by_queue(&loads(&[(20, true)]), &loads(&[(0, false), (0, false)])),
            None
        );
        // The only decode instance stays.
        assert_eq!(by_queue(&loads(&[(20, true)]), &loads(&[(0, true)])), None);
        assert_eq!(by_queue(&[], &loads(&[(0, true)])), None);
    }

    #[test]
    fn a_missed_target_moves_an_instance_to_its_side_whatever_the_queues() {
        let targets = Targets {
            ttft: Some(500 * MS),
            tpot: Some(50 * MS),
        };
        let seen = |ttft, tpot| Observed {
            ttft: Some(ttft * MS),
            tpot: Some(tpot * MS),
        };
        // Equal queues: the queue rule would do nothing.
        let prefill = loads(&[(3, true), (1, true)]);
        let decode = loads(&[(3, true), (2, true)]);
        // First tokens late, decode within its target: a decode instance becomes a prefill one.
        assert_eq!(
            pick_switch(&prefill, &decode, targets, seen(900, 30)),
            Some((Part::Prefill, 1))
        );
        // Tokens slow, first tokens in time: the other way.
        assert_eq!(
            pick_switch(&prefill, &decode, targets, seen(200, 80)),
            Some((Part::Decode, 1))
        );
        // Only the first-token target set, and missed.
        let ttft_only = Targets {
            ttft: Some(500 * MS),
            tpot: None,
        };
        assert_eq!(
            pick_switch(&prefill, &decode, ttft_only, seen(900, 80)),
            Some((Part::Prefill, 1))
        );
        // Both met, or both missed: the queues decide (here nothing).
        assert_eq!(pick_switch(&prefill, &decode, targets, seen(200, 30)), None);
        assert_eq!(pick_switch(&prefill, &decode, targets, seen(900, 80)), None);
        // Both missed with prefill queues far longer: the queue rule moves a decode instance.
        let long = loads(&[(20, true), (20, true)]);
        assert_eq!(
            pick_switch(&long, &decode, targets, seen(900, 80)),
            Some((Part::Prefill, 1))
        );
        // A missed target never takes a side's last instance.
        assert_eq!(
            pick_switch(&prefill, &loads(&[(0, true)]), targets, seen(900, 30)),
            None
        );
        // Too few answers observed: no target reading, the queues decide.
        let unknown = Observed {
            ttft: None,
            tpot: Some(30 * MS),
        };
        assert_eq!(pick_switch(&prefill, &decode, targets, unknown), None);
    }

    #[test]
    fn the_window_averages_recent_answers_once_there_are_enough() {
        let mut window = LatencyWindow::default();
        let start = Instant::now();
        for i in 0..MIN_SAMPLES as u32 - 1 {
            window.first_token(start, (100 + i) * MS);
        }
        assert_eq!(window.observed(start).ttft, None, "too few answers");
        window.first_token(start, 107 * MS);
        // 100..=107 ms: the mean is 103.5 ms.
        assert_eq!(
            window.observed(start).ttft,
            Some(Duration::from_micros(103_500))
        );
        // Answers older than the window no longer count.
        let later = start + WINDOW + MS;
        assert_eq!(window.observed(later).ttft, None);
        for _ in 0..MIN_SAMPLES {
            window.per_output_token(later, 20 * MS);
        }
        assert_eq!(window.observed(later).tpot, Some(20 * MS));
    }

    #[test]
    fn a_switch_forgets_the_answers_before_its_request_only() {
        let mut window = LatencyWindow::default();
        let before = Instant::now();
        let asked = before + MS;
        let after = asked + MS;
        for _ in 0..MIN_SAMPLES {
            window.first_token(before, 100 * MS);
            window.per_output_token(before, 40 * MS);
        }
        for _ in 0..MIN_SAMPLES {
            window.first_token(after, 10 * MS);
            window.per_output_token(after, 4 * MS);
        }
        window.forget_before(asked);
        let observed = window.observed(after);
        assert_eq!(observed.ttft, Some(10 * MS));
        assert_eq!(observed.tpot, Some(4 * MS));
    }
}
