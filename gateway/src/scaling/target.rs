//! The target autoscaler's decisions as pure functions of their inputs (tested with
//! scenario tables): the desired count, the scale-down window, and scale to zero.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::labels::ScaleLabels;

/// `desired = ceil(ready × load_per_replica / (target × proportion))`, clamped to
/// [min, max]; `total_load` is the function's whole load (= ready × load per replica).
pub fn desired(total_load: f64, labels: &ScaleLabels) -> u64 {
    let per_replica = labels.target * labels.proportion;
    let raw = if total_load.is_finite() && total_load > 0.0 {
        (total_load / per_replica).ceil() as u64
    } else {
        0
    };
    raw.clamp(labels.min, labels.max)
}

/// Within this fraction of the current replicas' capacity the count stays (as
/// Kubernetes' HPA tolerance): a load sitting near a boundary does not flap it.
pub const TOLERANCE: f64 = 0.1;

/// [`desired`], unless the load is within [`TOLERANCE`] of what `current` replicas serve.
pub fn recommend(total_load: f64, current: u64, labels: &ScaleLabels) -> u64 {
    let capacity = current as f64 * labels.target * labels.proportion;
    if current >= labels.min
        && current <= labels.max
        && capacity > 0.0
        && (total_load / capacity - 1.0).abs() <= TOLERANCE
    {
        return current;
    }
    desired(total_load, labels)
}

/// Why a count was chosen, for the decision's log line and metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Load,
    Idle,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Load => "load",
            Reason::Idle => "idle",
        }
    }
}

/// Recent recommendations of one function: scale-up follows the latest at once;
/// scale-down only to the highest recommendation of the whole window (no flapping).
#[derive(Debug, Default)]
pub struct Smoother {
    recent: VecDeque<(Instant, u64)>,
    /// When the function's replica count last changed (by anyone).
    changed_at: Option<(Instant, u64)>,
}

impl Smoother {
    /// The count to scale to now, given the current count and this tick's recommendation.
    pub fn next(&mut self, now: Instant, current: u64, recommended: u64, window: Duration) -> u64 {
        match self.changed_at {
            Some((_, count)) if count == current => {}
            _ => self.changed_at = Some((now, current)),
        }
        self.recent.push_back((now, recommended));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        if recommended >= current {
            return recommended;
        }
        // Down only when the window since the last change is full and every
        // recommendation in it was below the current count.
        let settled = self
            .changed_at
            .is_some_and(|(t, _)| now.duration_since(t) >= window);
        if !settled {
            return current;
        }
        self.recent
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(current)
            .min(current)
    }
}

/// Scale to zero: the function opted in, has had no traffic for `zero_duration`, and has
/// nothing in flight or queued.
pub fn should_zero(labels: &ScaleLabels, idle_for: Duration, inflight: u64, queued: u64) -> bool {
    labels.zero && idle_for >= labels.zero_duration && inflight == 0 && queued == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(min: u64, max: u64, target: f64) -> ScaleLabels {
        ScaleLabels {
            min,
            max,
            target,
            proportion: 0.9,
            ..ScaleLabels::default()
        }
    }

    #[test]
    fn desired_counts() {
        let l = labels(1, 10, 50.0);
        for (load, want) in [
            (0.0, 1),
            (10.0, 1),
            (45.0, 1),
            (45.1, 2),
            (90.0, 2),
            (200.0, 5),
            (10_000.0, 10),
            (f64::NAN, 1),
        ] {
            assert_eq!(desired(load, &l), want, "load {load}");
        }
        assert_eq!(desired(0.0, &labels(0, 10, 50.0)), 0);
    }

    #[test]
    fn a_load_near_a_boundary_does_not_move_the_count() {
        let l = labels(1, 10, 150.0); // 135 per replica
        assert_eq!(recommend(800.0, 6, &l), 6, "800 / 810 is within 10%");
        assert_eq!(recommend(830.0, 6, &l), 6);
        assert_eq!(recommend(900.0, 6, &l), 7, "11% over: up");
        assert_eq!(
            recommend(700.0, 6, &l),
            6,
            "within 10% below: stays (the window smooths the rest)"
        );
        assert_eq!(recommend(500.0, 6, &l), 4);
        assert_eq!(
            recommend(800.0, 1, &l),
            6,
            "far from the current count: the formula"
        );
    }

    #[test]
    fn scale_down_waits_for_a_full_window_without_flapping() {
        let window = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut s = Smoother::default();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // (second, current, recommended, expected)
        let steps = [
            (0, 1, 4, 4),  // up at once
            (5, 4, 4, 4),  // (the count changed at 5 s)
            (10, 4, 1, 4), // down not yet: no full window since the change
            (20, 4, 3, 4),
            (36, 4, 1, 3), // window full: the highest recommendation in it is 3
            (50, 3, 1, 3), // changed at 50 s: wait a whole window again
            (70, 3, 1, 3),
            (81, 3, 1, 1), // a full window of 1s: down to 1
            (85, 1, 6, 6), // up at once again
        ];
        for (sec, current, recommended, expected) in steps {
            assert_eq!(
                s.next(at(sec), current, recommended, window),
                expected,
                "at {sec}s"
            );
        }
    }

    #[test]
    fn zero_only_when_idle_and_empty() {
        let mut l = labels(1, 5, 50.0);
        l.zero = true;
        l.zero_duration = Duration::from_secs(60);
        assert!(should_zero(&l, Duration::from_secs(61), 0, 0));
        assert!(!should_zero(&l, Duration::from_secs(59), 0, 0));
        assert!(
            !should_zero(&l, Duration::from_secs(600), 1, 0),
            "an invocation in flight"
        );
        assert!(
            !should_zero(&l, Duration::from_secs(600), 0, 3),
            "queued async calls"
        );
        l.zero = false;
        assert!(!should_zero(&l, Duration::from_secs(600), 0, 0));
    }
}
