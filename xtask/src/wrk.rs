//! Load generation for the benchmarks: running `wrk` and reading its figures, medians,
//! percentiles, free ports and waiting for a URL to answer.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Waits (up to 30 s) until `url` answers 200.
pub fn wait_ok(http: &ureq::Agent, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http.get(url).call().is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{url} never answered 200")
}

/// Runs `wrk -t2 -cN -dSs --latency`; fails on any non-2xx answer or socket error.
pub fn run(url: &str, seconds: u32, connections: u32) -> Result<Wrk> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk on {url} failed or saw errors:\n{text}");
    }
    let field = |prefix: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    // "  123456 requests in 8.00s, 12.34MB read"
    let requests: u64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no request count")?;
    Ok(Wrk {
        rps: field("Requests/sec:").context("no Requests/sec")?.parse()?,
        requests,
        p50_ms: ms(field("50%").context("no p50")?)?,
        p99_ms: ms(field("99%").context("no p99")?)?,
    })
}

/// wrk's latency with its unit (`812.00us`, `1.20ms`, `2.01s`) in milliseconds.
pub fn ms(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown latency {v:?}")
    };
    Ok(num.parse::<f64>()? * scale)
}

pub fn median(runs: &[Wrk]) -> Wrk {
    let med = |f: fn(&Wrk) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    Wrk {
        rps: med(|w| w.rps),
        requests: med(|w| w.requests as f64) as u64,
        p50_ms: med(|w| w.p50_ms),
        p99_ms: med(|w| w.p99_ms),
    }
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
