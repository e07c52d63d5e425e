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
//! `TALLY_BENCH_AGENT_BASELINE=PATH` toggles that agent binary instead of this tree's;
//! `TALLY_BENCH_AGENT_UNWATCHED=1` gives the agent no replica to watch (the hooks alone).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::bench::{median, per_request_us};
use crate::bench_agent::Agent;
use crate::wrk;

/// Time after a toggle before its slice is counted (`TALLY_BENCH_AGENT_SETTLE_MS`, default
/// 1000): the agent handles the signal and attaches or detaches, and the node gets over the
/// switch itself. On our VMs every process ran slower for a while after each switch (the
/// cause is not established; an attach or detach patches the tracepoints' call sites in
/// kernel text): with 100 ms of settling and 1 s slices, an agent watching no replica (its
/// hooks return at once) measured 79–80% attached over detached, with 1 s of settling
/// 100.1% (2026-11-23 17:10–17:18 UTC).
fn settle() -> Duration {
    Duration::from_millis(
        std::env::var("TALLY_BENCH_AGENT_SETTLE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000),
    )
}
/// Time for a fresh agent to learn the replica (it polls every second).
const WATCH_SETTLE: Duration = Duration::from_millis(2_000);

/// CPU time of everything in the function's cgroup (its replicas), in ns, where the host
/// has the v1 `cpuacct` controller; 0 elsewhere.
fn function_cpu_ns(cgroup_parent: &str) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/fs/cgroup/cpuacct/{cgroup_parent}/cpuacct.usage"
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// The node's idle and steal time so far (`/proc/stat`, clock ticks summed over the CPUs).
fn idle_steal_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok((
        f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0),
        f.get(7).copied().unwrap_or(0),
    ))
}

/// Interrupts of the kinds a program or its consumer can cause, summed over the CPUs:
/// IRQ work (ring-buffer wakeups), rescheduling, function-call and TLB-shootdown IPIs.
const INTERRUPTS: [&str; 4] = ["IWI", "RES", "CAL", "TLB"];

fn interrupts() -> Result<[u64; 4]> {
    let text = std::fs::read_to_string("/proc/interrupts")?;
    let mut out = [0u64; 4];
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next().and_then(|n| n.strip_suffix(':')) else {
            continue;
        };
        if let Some(i) = INTERRUPTS.iter().position(|k| *k == name) {
            out[i] = f.map_while(|x| x.parse::<u64>().ok()).sum();
        }
    }
    Ok(out)
}

/// The load generator's pid (the process named `wrk`), once it runs.
fn wrk_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "wrk").then_some(pid)
    })
}

/// The gateway's `gateway_function_invocation_total`, summed over its series.
fn served(http: &ureq::Agent, metrics: &str) -> Result<f64> {
    let text = http.get(metrics).call()?.body_mut().read_to_string()?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("gateway_function_invocation_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Counters read at a slice's start and end.
struct Sample {
    at: Instant,
    served: f64,
    /// utime + stime ticks and minor faults of the gateway, the agent and wrk.
    gateway: [u64; 2],
    agent: [u64; 2],
    wrk: [u64; 2],
    function_ns: u64,
    sent: f64,
    idle_steal: (u64, u64),
    interrupts: [u64; 4],
}

/// The processes and counters a slice is measured by.
struct Probes<'a> {
    http: &'a ureq::Agent,
    metrics: &'a str,
    agent: &'a Agent,
    pids: [u32; 3],
    cgroup_parent: &'a str,
}

impl Probes<'_> {
    fn sample(&self) -> Result<Sample> {
        let cpu_faults =
            |pid| crate::bench::stat_fields(pid, [11, 12, 7]).map(|[u, s, f]| [u + s, f]);
        Ok(Sample {
            at: Instant::now(),
            served: served(self.http, self.metrics)?,
            gateway: cpu_faults(self.pids[0])?,
            agent: cpu_faults(self.pids[1])?,
            wrk: cpu_faults(self.pids[2])?,
            function_ns: function_cpu_ns(self.cgroup_parent),
            sent: self.agent.metric("tally_agent_events_sent_total")?,
            idle_steal: idle_steal_ticks()?,
            interrupts: interrupts()?,
        })
    }
}

/// One slice: whether the programs were attached, its requests/s, and what each process
/// and the node spent over it.
struct Slice {
    attached: bool,
    rps: f64,
    requests: f64,
    gateway_ticks: u64,
    agent_ticks: u64,
    wrk_ticks: u64,
    function_ns: u64,
    /// Usage events the agent delivered to the gateway during the slice.
    sent: f64,
    idle_ticks: u64,
    steal_ticks: u64,
    interrupts: [u64; 4],
    /// Minor page faults of the gateway and of the agent.
    faults: (u64, u64),
}

impl Slice {
    fn between(attached: bool, a: &Sample, b: &Sample) -> Self {
        let requests = b.served - a.served;
        Self {
            attached,
            rps: requests / (b.at - a.at).as_secs_f64(),
            requests,
            gateway_ticks: b.gateway[0] - a.gateway[0],
            agent_ticks: b.agent[0] - a.agent[0],
            wrk_ticks: b.wrk[0] - a.wrk[0],
            function_ns: b.function_ns.saturating_sub(a.function_ns),
            sent: b.sent - a.sent,
            idle_ticks: b.idle_steal.0 - a.idle_steal.0,
            steal_ticks: b.idle_steal.1 - a.idle_steal.1,
            interrupts: std::array::from_fn(|k| b.interrupts[k] - a.interrupts[k]),
            faults: (b.gateway[1] - a.gateway[1], b.agent[1] - a.agent[1]),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    bin: &Path,
    data: &Path,
    url: &str,
    target: &str,
    gateway_pid: u32,
    cgroup_parent: &str,
    seconds: u32,
    pairs: usize,
    connections: u32,
) -> Result<()> {
    let http = crate::bench::agent();
    let metrics = format!("{url}/metrics");
    // With TALLY_BENCH_AGENT_BASELINE=PATH that agent binary is the one toggled (to set this
    // tree's figures beside a baseline's, run by run).
    let program = std::env::var_os("TALLY_BENCH_AGENT_BASELINE")
        .map_or_else(|| bin.join("agent"), std::path::PathBuf::from);
    eprintln!("toggling {}", program.display());
    // With TALLY_BENCH_AGENT_UNWATCHED=1 the agent learns no replica (its workload source is
    // an address nothing listens on): the hooks' cost alone is toggled, no event is made.
    let unwatched = std::env::var("TALLY_BENCH_AGENT_UNWATCHED").is_ok_and(|v| v == "1");
    let source = if unwatched {
        crate::bench_agent::NOWHERE
    } else {
        url
    };
    let agent = Agent::start(&program, source, data, &[])?;
    thread::sleep(WATCH_SETTLE);
    let agent_pid = agent.pid();
    let slices = 2 * pairs + 1;
    let slice = Duration::from_secs(seconds.into());
    // wrk outlasts the slices: 1 s of ramp-up before, the toggles' settling, a margin after.
    let settle = settle();
    let total = (slices as u32) * seconds
        + ((slices as u32) * settle.as_millis() as u32).div_ceil(1000)
        + 3;
    let load = {
        let target = target.to_owned();
        thread::spawn(move || wrk::run(&target, total, connections))
    };
    thread::sleep(Duration::from_secs(1));
    let m0 = agent.metric("tally_agent_invocation_duration_seconds_count")?;
    let probes = Probes {
        http: &http,
        metrics: &metrics,
        agent: &agent,
        pids: [
            gateway_pid,
            agent_pid,
            wrk_pid().context("wrk is not running")?,
        ],
        cgroup_parent,
    };
    let mut out: Vec<Slice> = Vec::with_capacity(slices);
    for i in 0..slices {
        let attached = i % 2 == 1;
        let signal = if attached {
            Signal::SIGUSR2
        } else {
            Signal::SIGUSR1
        };
        kill(Pid::from_raw(agent_pid as i32), signal).context("signalling the agent")?;
        thread::sleep(settle);
        let start = probes.sample()?;
        thread::sleep(slice);
        let s = Slice::between(attached, &start, &probes.sample()?);
        // Per slice: what a low slice spent its time on (CPU per request of each process,
        // the node's idle and steal time, the agent's deliveries).
        eprintln!(
            "slice {}/{slices} ({}): {:.0} requests/s; µs per request: gateway {:.1}, agent {:.1}, function {:.1}, wrk {:.1}; idle {} ticks, steal {} ticks; {:.0} events delivered; interrupts {:?} {:?}; minor faults gateway {}, agent {}",
            i + 1,
            if attached { "attached" } else { "detached" },
            s.rps,
            per_request_us(s.gateway_ticks, s.requests as u64),
            per_request_us(s.agent_ticks, s.requests as u64),
            s.function_ns as f64 / 1e3 / s.requests.max(1.0),
            per_request_us(s.wrk_ticks, s.requests as u64),
            s.idle_ticks,
            s.steal_ticks,
            s.sent,
            INTERRUPTS,
            s.interrupts,
            s.faults.0,
            s.faults.1,
        );
        out.push(s);
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
    // A per-slice quantity summed over a state's slices, per request of those slices.
    let per_request = |attached: bool, of: fn(&Slice) -> u64| {
        let total: u64 = state(attached).map(of).sum();
        let requests: f64 = state(attached).map(|s| s.requests).sum();
        (total, requests as u64)
    };
    let ticks_us = |attached: bool, of: fn(&Slice) -> u64| {
        let (ticks, requests) = per_request(attached, of);
        per_request_us(ticks, requests)
    };
    let cpu = |attached: bool, agent: bool| {
        ticks_us(
            attached,
            if agent {
                |s| s.agent_ticks
            } else {
                |s| s.gateway_ticks
            },
        )
    };
    let function = |attached: bool| {
        let (ns, requests) = per_request(attached, |s| s.function_ns);
        ns as f64 / 1e3 / requests.max(1) as f64
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
    let wrk_us = |attached: bool| ticks_us(attached, |s| s.wrk_ticks);
    println!(
        "| CPU per request, wrk (the load generator) | {:.1} µs | {:.1} µs |",
        wrk_us(false),
        wrk_us(true)
    );
    println!(
        "| CPU per request, function (its cgroup's cpuacct) | {:.1} µs | {:.1} µs |",
        function(false),
        function(true)
    );
    println!();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let state_mean = |attached: bool| mean(&state(attached).map(|s| s.rps).collect::<Vec<_>>());
    println!(
        "**attached / detached, each attached slice over the mean of its two detached neighbours: median {:.1}%, mean {:.1}% (min–max {:.1}–{:.1}%, {pairs} pairs)**; mean attached slice over mean detached slice: {:.1}%",
        100.0 * mid,
        100.0 * mean(&ratios),
        100.0 * lo,
        100.0 * hi,
        100.0 * state_mean(true) / state_mean(false),
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
