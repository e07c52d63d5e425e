//! Kubernetes resource quantities as used in `limits`/`requests`: memory in bytes
//! (`128Mi`, `1G`, `1048576`) and CPU in milli-cores (`500m`, `1`, `0.25`).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} quantity {value:?}: {why}")]
pub struct QuantityError {
    what: &'static str,
    value: String,
    why: &'static str,
}

/// Parses a memory quantity into bytes.
pub fn parse_memory(value: &str) -> Result<u64, QuantityError> {
    let err = |why| QuantityError {
        what: "memory",
        value: value.into(),
        why,
    };
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let num: f64 = num.parse().map_err(|_| err("expected a number"))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return Err(err("unknown suffix (use Ki, Mi, Gi, k, M or G)")),
    };
    let bytes = num * mult;
    if !bytes.is_finite() || !(4096.0..=1e15).contains(&bytes) {
        return Err(err("must be between 4Ki and 1P"));
    }
    Ok(bytes as u64)
}

/// Parses a CPU quantity into milli-cores.
pub fn parse_cpu(value: &str) -> Result<u64, QuantityError> {
    let err = |why| QuantityError {
        what: "cpu",
        value: value.into(),
        why,
    };
    let v = value.trim();
    let milli = match v.strip_suffix('m') {
        Some(m) => m.parse::<f64>().map_err(|_| err("expected a number"))?,
        None => v.parse::<f64>().map_err(|_| err("expected a number"))? * 1000.0,
    };
    if !milli.is_finite() || !(1.0..=1_000_000.0).contains(&milli) {
        return Err(err("must be between 1m and 1000 cores"));
    }
    Ok(milli as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("128Mi"), Ok(128 << 20));
        assert_eq!(parse_memory("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1048576"), Ok(1 << 20));
        assert!(parse_memory("12Qi").is_err());
        assert!(parse_memory("abc").is_err());
        assert!(parse_memory("1").is_err());
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.25"), Ok(250));
        assert!(parse_cpu("x").is_err());
        assert!(parse_cpu("0").is_err());
    }
}
