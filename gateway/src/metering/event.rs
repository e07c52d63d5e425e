//! The webhook's event: OpenFaaS's `function_usage` fields unchanged (so existing
//! receivers parse it) plus Tally's additive fields with what was really measured.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionUsage {
    /// Always `function_usage`.
    pub event: String,
    /// Unique per event, stable across redelivery (the receiver dedupes on it).
    pub id: String,
    pub namespace: String,
    pub function_name: String,
    /// RFC3339 with nanoseconds.
    pub started: String,
    /// Nanoseconds.
    pub duration: u64,
    /// The function's memory limit, or the configured default (OpenFaaS's meaning).
    pub memory_bytes: u64,
    pub call_id: Option<String>,
    pub status_code: u16,
    /// Peak resident memory over the invocation, when measured in the kernel.
    pub memory_peak_bytes: Option<u64>,
    pub cpu_ns: Option<u64>,
    /// The invocation waited for a replica (scale from zero, or none ready).
    pub cold_start: bool,
    pub init_duration_ns: Option<u64>,
    /// `duration` rounded up to a whole millisecond.
    pub billed_duration_ms: u64,
    /// `kernel` or `gateway`.
    pub source: String,
}

impl FunctionUsage {
    pub fn billed_ms(duration_ns: u64) -> u64 {
        duration_ns.div_ceil(1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billed_duration_rounds_up() {
        assert_eq!(FunctionUsage::billed_ms(0), 0);
        assert_eq!(FunctionUsage::billed_ms(1), 1);
        assert_eq!(FunctionUsage::billed_ms(1_000_000), 1);
        assert_eq!(FunctionUsage::billed_ms(1_000_001), 2);
    }
}
