//! The one decision about a failed batch, as a pure function of the outcome and the attempt:
//! retry after a capped exponential backoff, or give the batch up.

use std::time::Duration;

/// What to do with a batch after an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Retry {
    /// Delivered.
    Done,
    /// Try again after this long.
    After(Duration),
    /// The gateway refused it for good (a 4xx other than 408/429): drop and count it.
    GiveUp,
}

const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(10);

/// `status` is `None` when no response came (connection refused, timeout).
pub fn decide(status: Option<u16>, attempt: u32) -> Retry {
    match status {
        Some(s) if (200..300).contains(&s) => Retry::Done,
        Some(408 | 429) | None => Retry::After(backoff(attempt)),
        Some(s) if (400..500).contains(&s) => Retry::GiveUp,
        Some(_) => Retry::After(backoff(attempt)),
    }
}

fn backoff(attempt: u32) -> Duration {
    BASE.saturating_mul(1u32 << attempt.min(16)).min(CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ms = Duration::from_millis;
        for (status, attempt, want) in [
            (Some(200), 0, Retry::Done),
            (Some(204), 3, Retry::Done),
            (None, 0, Retry::After(ms(100))),
            (None, 3, Retry::After(ms(800))),
            (Some(503), 1, Retry::After(ms(200))),
            (Some(429), 2, Retry::After(ms(400))),
            (Some(500), 40, Retry::After(ms(10_000))),
            (Some(401), 0, Retry::GiveUp),
            (Some(400), 5, Retry::GiveUp),
        ] {
            assert_eq!(
                decide(status, attempt),
                want,
                "status {status:?} attempt {attempt}"
            );
        }
    }
}
