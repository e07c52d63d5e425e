//! When to try an async call again: one pure function of the status code, the attempt
//! and the policy (defaults, overridden per function by `com.openfaas.retry.*`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::parse_duration;

pub const ANN_ATTEMPTS: &str = "com.openfaas.retry.attempts";
pub const ANN_CODES: &str = "com.openfaas.retry.codes";
pub const ANN_MIN_WAIT: &str = "com.openfaas.retry.min_wait";
pub const ANN_MAX_WAIT: &str = "com.openfaas.retry.max_wait";

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub min_wait: Duration,
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 10,
            codes: vec![408, 429, 500, 502, 503, 504],
            min_wait: Duration::from_secs(10),
            max_wait: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// This policy with a function's annotations applied; a bad value is reported and
    /// the default kept for it.
    pub fn with_annotations(
        &self,
        annotations: Option<&BTreeMap<String, String>>,
    ) -> (Self, Vec<String>) {
        let mut p = self.clone();
        let mut problems = Vec::new();
        let Some(a) = annotations else {
            return (p, problems);
        };
        if let Some(v) = a.get(ANN_ATTEMPTS) {
            match v.trim().parse::<u32>() {
                Ok(n) if n >= 1 => p.attempts = n,
                _ => problems.push(format!("{ANN_ATTEMPTS} {v:?} must be a whole number >= 1")),
            }
        }
        if let Some(v) = a.get(ANN_CODES) {
            match parse_codes(v) {
                Ok(codes) => p.codes = codes,
                Err(e) => problems.push(format!("{ANN_CODES}: {e}")),
            }
        }
        for (key, slot) in [
            (ANN_MIN_WAIT, &mut p.min_wait),
            (ANN_MAX_WAIT, &mut p.max_wait),
        ] {
            if let Some(v) = a.get(key) {
                match parse_duration(v) {
                    Ok(d) => *slot = d,
                    Err(e) => problems.push(format!("{key}: {e}")),
                }
            }
        }
        if p.max_wait < p.min_wait {
            problems.push(format!(
                "{ANN_MAX_WAIT} is below {ANN_MIN_WAIT}; using the minimum for both"
            ));
            p.max_wait = p.min_wait;
        }
        (p, problems)
    }
}

/// `408,429,500` → codes; each must be an HTTP status.
pub fn parse_codes(v: &str) -> Result<Vec<u16>, String> {
    v.split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            c.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (100..600).contains(n))
                .ok_or_else(|| format!("{c:?} is not an HTTP status code"))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// The call is finished (success, or a status that is not retried).
    Done,
    /// Try again after this long.
    Retry(Duration),
    /// A retryable status, but this was the last attempt.
    Exhausted,
}

/// Decides after attempt number `attempt` (1-based) answered `status`. `retry_after`
/// (seconds, from a 429/503) replaces the computed wait, floored at `min_wait`; `jitter`
/// in [0, 1) spreads retries of many calls (0.5 = the exponential wait itself).
pub fn decide(
    status: u16,
    attempt: u32,
    policy: &RetryPolicy,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Decision {
    if !policy.codes.contains(&status) {
        return Decision::Done;
    }
    if attempt >= policy.attempts {
        return Decision::Exhausted;
    }
    if let Some(after) = retry_after.filter(|_| matches!(status, 429 | 503)) {
        return Decision::Retry(after.max(policy.min_wait));
    }
    let exp = policy
        .min_wait
        .saturating_mul(1u32 << (attempt - 1).min(20));
    let base = exp.min(policy.max_wait);
    // Jitter of ±25% around the exponential wait, kept within [min_wait, max_wait].
    let factor = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
    let wait = base.mul_f64(factor).clamp(policy.min_wait, policy.max_wait);
    Decision::Retry(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            codes: vec![500, 429, 503],
            min_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(5),
        }
    }

    #[test]
    fn exponential_capped_then_exhausted() {
        let p = policy();
        let waits: Vec<Decision> = (1..=4).map(|a| decide(500, a, &p, None, 0.5)).collect();
        assert_eq!(
            waits,
            [
                Decision::Retry(Duration::from_secs(1)),
                Decision::Retry(Duration::from_secs(2)),
                Decision::Retry(Duration::from_secs(4)),
                Decision::Exhausted,
            ]
        );
        let long = RetryPolicy {
            attempts: 10,
            ..p.clone()
        };
        assert_eq!(
            decide(500, 5, &long, None, 0.99),
            Decision::Retry(Duration::from_secs(5)),
            "capped at max_wait"
        );
        assert_eq!(
            decide(500, 1, &p, None, 0.0),
            Decision::Retry(Duration::from_secs(1)),
            "floored at min_wait"
        );
    }

    #[test]
    fn codes_and_retry_after() {
        let p = policy();
        assert_eq!(decide(200, 1, &p, None, 0.5), Decision::Done);
        assert_eq!(decide(404, 1, &p, None, 0.5), Decision::Done);
        assert_eq!(
            decide(429, 1, &p, Some(Duration::from_secs(3)), 0.5),
            Decision::Retry(Duration::from_secs(3))
        );
        assert_eq!(
            decide(503, 1, &p, Some(Duration::ZERO), 0.5),
            Decision::Retry(Duration::from_secs(1)),
            "floored"
        );
        assert_eq!(
            decide(500, 1, &p, Some(Duration::from_secs(3)), 0.5),
            Decision::Retry(Duration::from_secs(1)),
            "Retry-After only on 429/503"
        );
    }

    #[test]
    fn annotations_override() {
        let mut a = BTreeMap::new();
        a.insert(ANN_ATTEMPTS.to_string(), "2".to_string());
        a.insert(ANN_CODES.to_string(), "502, 418".to_string());
        a.insert(ANN_MIN_WAIT.to_string(), "100ms".to_string());
        a.insert(ANN_MAX_WAIT.to_string(), "1s".to_string());
        let (p, problems) = RetryPolicy::default().with_annotations(Some(&a));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.attempts, 2);
        assert_eq!(p.codes, [502, 418]);
        assert_eq!(p.min_wait, Duration::from_millis(100));
        a.insert(ANN_ATTEMPTS.to_string(), "zero".to_string());
        a.insert(ANN_CODES.to_string(), "700".to_string());
        let (p, problems) = RetryPolicy::default().with_annotations(Some(&a));
        assert_eq!(problems.len(), 2);
        assert_eq!(p.attempts, 10, "default kept");
    }
}
