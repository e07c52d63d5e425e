//! `TALLY_BENCH_AGENT_ARMS=toggle cargo xtask bench agent`: the agent's cost measured by
//! switching it off and on every slice of one long wrk run, so that both sides of each
//! comparison are seconds apart.
//!
//! On a shared VM whose speed drifts by ±15% over minutes, separate runs per arm cannot
//! resolve a few percent. Here one agent runs throughout and its programs are detached
//! (SIGUSR1) and attached again (SIGUSR2) every `--seconds`, for `--rounds` on/off pairs,
//! starting and ending detached. The gateway's own request counter (`/metrics`) gives each
//! slice's requests/s; each attached slice is compared with the mean of the two detached
//! slices around it, and the median of those ratios is reported with its spread. CPU per
//! request of the gateway and the agent is summed per state over all slices.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::bench::{cpu_ticks, median, per_request_us};
use crate::bench_agent::Agent;
use crate::wrk;

/// Time for a toggle to take effect (the agent handles the signal, detaches or attaches,
/// and drains what the last slice left in its ring) before a slice is counted.
const TOGGLE_SETTLE: Duration = Duration::from_millis(100);
/// Time for a fresh agent to learn the replica (it polls every second).
const WATCH_SETTLE: Duration = Duration::from_millis(2_000);

/// The gateway's `gateway_function_invocation_total`, summed over its series.
fn served(http: &ureq::Agent, metrics: &str) -> Result<f64> {
    let text = http.get(metrics).call()?.body_mut().read_to_string()?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("gateway_function_invocation_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// One slice: whether the programs were attached, its requests/s, and its CPU ticks
/// (gateway, agent) and requests.
struct Slice {
    attached: bool,
    rps: f64,
    requests: f64,
    gateway_ticks: u64,
    agent_ticks: u64,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    data: &Path,
    url: &str,
    target: &str,
    gateway_pid: u32,
    seconds: u32,
    pairs: usize,
    connections: u32,
) -> Result<()> {
    let http = crate::bench::agent();
    let metrics = format!("{url}/metrics");
    let agent = Agent::start(&bin.join("agent"), url, data, &[])?;
    thread::sleep(WATCH_SETTLE);
    let agent_pid = agent.pid();
    let slices = 2 * pairs + 1;
    let slice = Duration::from_secs(seconds.into());
    // wrk outlasts the slices: 1 s of ramp-up before, the toggles' settling, a margin after.
    let total = (slices as u32) * seconds + (slices as u32).div_ceil(5) + 3;
    let load = {
        let target = target.to_owned();
        thread::spawn(move || wrk::run(&target, total, connections))
    };
    thread::sleep(Duration::from_secs(1));
    let m0 = agent.metric("tally_agent_invocation_duration_seconds_count")?;
    let mut out: Vec<Slice> = Vec::with_capacity(slices);
    for i in 0..slices {
        let attached = i % 2 == 1;
        let signal = if attached {
            Signal::SIGUSR2
        } else {
            Signal::SIGUSR1
        };
        kill(Pid::from_raw(agent_pid as i32), signal).context("signalling the agent")?;
        thread::sleep(TOGGLE_SETTLE);
        let (c0, g0, a0, t0) = (
            served(&http, &metrics)?,
            cpu_ticks(gateway_pid)?,
            cpu_ticks(agent_pid)?,
            Instant::now(),
        );
        thread::sleep(slice);
        let (c1, g1, a1) = (
            served(&http, &metrics)?,
            cpu_ticks(gateway_pid)?,
            cpu_ticks(agent_pid)?,
        );
        out.push(Slice {
            attached,
            rps: (c1 - c0) / t0.elapsed().as_secs_f64(),
            requests: c1 - c0,
            gateway_ticks: g1 - g0,
            agent_ticks: a1 - a0,
        });
        eprintln!(
            "slice {}/{slices} ({}): {:.0} requests/s",
            i + 1,
            if attached { "attached" } else { "detached" },
            (c1 - c0) / t0.elapsed().as_secs_f64()
        );
    }
    kill(Pid::from_raw(agent_pid as i32), Signal::SIGUSR2).context("signalling the agent")?;
    let w = load
        .join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
    thread::sleep(WATCH_SETTLE);
    let metered = agent.metric("tally_agent_invocation_duration_seconds_count")? - m0;
    let dropped = agent.metric("tally_agent_events_dropped_total")?;
    drop(agent);

    let mut ratios: Vec<f64> = (1..slices)
        .step_by(2)
        .map(|i| out[i].rps / ((out[i - 1].rps + out[i + 1].rps) / 2.0))
        .collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    // The middle of an even count is the mean of the two middle ratios.
    ratios.sort_by(f64::total_cmp);
    let mid = (ratios[(pairs - 1) / 2] + ratios[pairs / 2]) / 2.0;
    let state = |attached: bool| out.iter().filter(move |s| s.attached == attached);
    let rps = |attached: bool| median(&mut state(attached).map(|s| s.rps).collect::<Vec<_>>());
    let cpu = |attached: bool, agent: bool| {
        let ticks: u64 = state(attached)
            .map(|s| {
                if agent {
                    s.agent_ticks
                } else {
                    s.gateway_ticks
                }
            })
            .sum();
        let requests: f64 = state(attached).map(|s| s.requests).sum();
        per_request_us(ticks, requests as u64)
    };
    let served_attached: f64 = state(true).map(|s| s.requests).sum();
    println!(
        "| hello-rust through the gateway (one wrk run, {connections} connections; the agent's programs detached and attached every {seconds} s, {pairs} pairs) | detached | attached |"
    );
    println!("|---|---|---|");
    println!(
        "| requests/s, median of the slices | {:.0} | {:.0} |",
        rps(false),
        rps(true)
    );
    println!(
        "| CPU per request, gateway process | {:.1} µs | {:.1} µs |",
        cpu(false, false),
        cpu(true, false)
    );
    println!(
        "| CPU per request, agent process | {:.1} µs | {:.1} µs |",
        cpu(false, true),
        cpu(true, true)
    );
    println!();
    println!(
        "**attached / detached, each attached slice over the mean of its two detached neighbours: median {:.1}% (min–max {:.1}–{:.1}%, {pairs} pairs)**",
        100.0 * mid,
        100.0 * lo,
        100.0 * hi
    );
    println!(
        "events metered over the whole run: {metered:.0} (attached also during wrk's first second, the toggles' settling and wrk's tail after the last slice); requests in attached slices: {served_attached:.0}; {dropped:.0} dropped; wrk: {} requests, p50 {:.2} ms, p99 {:.2} ms",
        w.requests, w.p50_ms, w.p99_ms
    );
    println!(
        "by slice (requests/s, detached first): {:?}",
        out.iter().map(|s| s.rps.round()).collect::<Vec<_>>()
    );
    println!("target: attached ≥ 97% of detached");
    if dropped > 0.0 {
        anyhow::bail!("the agent dropped {dropped} usage events during the run");
    }
    Ok(())
}
