//! The scaling labels of a function, with OpenFaaS's defaults. A bad value refuses the
//! deploy with a message naming the label (rather than deploying with a silent default).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::parse_duration;

pub const MIN: &str = "com.openfaas.scale.min";
pub const MAX: &str = "com.openfaas.scale.max";
pub const FACTOR: &str = "com.openfaas.scale.factor";
pub const ZERO: &str = "com.openfaas.scale.zero";
pub const ZERO_DURATION: &str = "com.openfaas.scale.zero-duration";
pub const TYPE: &str = "com.openfaas.scale.type";
pub const TARGET: &str = "com.openfaas.scale.target";
pub const PROPORTION: &str = "com.openfaas.scale.target-proportion";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleType {
    Rps,
    Capacity,
    Cpu,
    Queue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleLabels {
    pub min: u64,
    pub max: u64,
    /// Percent of `max` added per firing alert, 0..=100 (0 disables alert scaling).
    pub factor: u64,
    pub zero: bool,
    pub zero_duration: Duration,
    pub kind: ScaleType,
    pub target: f64,
    pub proportion: f64,
}

impl Default for ScaleLabels {
    fn default() -> Self {
        Self {
            min: 1,
            max: 20,
            factor: 20,
            zero: false,
            zero_duration: Duration::from_secs(15 * 60),
            kind: ScaleType::Rps,
            target: 50.0,
            proportion: 0.9,
        }
    }
}

impl ScaleLabels {
    pub fn parse(labels: Option<&BTreeMap<String, String>>) -> Result<Self, String> {
        let mut s = Self::default();
        let Some(labels) = labels else { return Ok(s) };
        let get = |k: &str| labels.get(k).map(|v| v.trim());
        let whole = |k: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("label {k} {v:?} must be a whole number"))
        };
        if let Some(v) = get(MIN) {
            s.min = whole(MIN, v)?;
        }
        if let Some(v) = get(MAX) {
            s.max = whole(MAX, v)?;
        }
        if let Some(v) = get(FACTOR) {
            s.factor = whole(FACTOR, v)?;
            if s.factor > 100 {
                return Err(format!("label {FACTOR} {v:?} must be between 0 and 100"));
            }
        }
        if let Some(v) = get(ZERO) {
            s.zero = match v {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(format!("label {ZERO} {v:?} must be true or false")),
            };
        }
        if let Some(v) = get(ZERO_DURATION) {
            s.zero_duration =
                parse_duration(v).map_err(|e| format!("label {ZERO_DURATION}: {e}"))?;
        }
        if let Some(v) = get(TYPE) {
            s.kind = match v {
                "rps" => ScaleType::Rps,
                "capacity" => ScaleType::Capacity,
                "cpu" => ScaleType::Cpu,
                "queue" => ScaleType::Queue,
                _ => {
                    return Err(format!(
                        "label {TYPE} {v:?} must be rps, capacity, cpu or queue"
                    ));
                }
            };
        }
        if let Some(v) = get(TARGET) {
            s.target = v
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t > 0.0)
                .ok_or_else(|| format!("label {TARGET} {v:?} must be a number above 0"))?;
        }
        if let Some(v) = get(PROPORTION) {
            s.proportion = v
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 1.0)
                .ok_or_else(|| format!("label {PROPORTION} {v:?} must be above 0 and at most 1"))?;
        }
        if s.max == 0 {
            return Err(format!("label {MAX} must be at least 1"));
        }
        if s.min > s.max {
            return Err(format!(
                "label {MIN} ({}) is greater than {MAX} ({})",
                s.min, s.max
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_bad_values() {
        assert_eq!(ScaleLabels::parse(None).unwrap(), ScaleLabels::default());
        let ok = ScaleLabels::parse(Some(&labels(&[
            (MIN, "0"),
            (MAX, "4"),
            (FACTOR, "100"),
            (ZERO, "true"),
            (ZERO_DURATION, "2m"),
            (TYPE, "capacity"),
            (TARGET, "5"),
            (PROPORTION, "0.5"),
        ])))
        .unwrap();
        assert_eq!(
            (ok.min, ok.max, ok.factor, ok.zero, ok.kind),
            (0, 4, 100, true, ScaleType::Capacity)
        );
        assert_eq!(ok.zero_duration, Duration::from_secs(120));
        for (k, v, says) in [
            (FACTOR, "150", "between 0 and 100"),
            (TARGET, "0", "above 0"),
            (PROPORTION, "1.5", "at most 1"),
            (TYPE, "memory", "rps, capacity"),
            (ZERO, "yes", "true or false"),
            (MAX, "0", "at least 1"),
            (MIN, "x", "whole number"),
        ] {
            let err = ScaleLabels::parse(Some(&labels(&[(k, v)]))).unwrap_err();
            assert!(err.contains(k) || err.contains(MAX), "{err}");
            assert!(err.contains(says), "{err}");
        }
        let err = ScaleLabels::parse(Some(&labels(&[(MIN, "5"), (MAX, "2")]))).unwrap_err();
        assert!(err.contains("greater"), "{err}");
    }
}
