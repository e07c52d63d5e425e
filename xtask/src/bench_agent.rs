//! `cargo xtask bench agent`: gateway throughput with the node agent attached vs
//! detached in the same run, and the programs' kernel time per invocation.
//!
//! One release gateway with `hello-rust` deployed in http mode; wrk through
//! `/function/tiny`, the autoscaler off. Four arms — no agent; the agent as deployed;
//! the agent with the kernel's `bpf_stats` on; the agent attached but watching no replica
//! (the hooks' cost alone) — run in an order rotated every round, so
//! drift of a busy machine falls on each; medians are reported, with the share of requests
//! the agent metered and the CPU time the gateway and the agent processes used per request
//! (their `/proc/PID/stat` utime + stime over the wrk run): the gateway's share in the
//! attached arms includes ingesting one usage event per request. Kernel time comes from
//! the third arm's `/metrics` (`bpf_stats`, refreshed every 5 s): the growth of the
//! programs' summed run time over the run, divided by the requests wrk completed. The
//! syscall programs run on every syscall of the node and return at once for unwatched
//! cgroups, so this is the whole in-kernel cost, not only the function's share. Stats add
//! two clock reads to every program run, which is why the agent's cost is the second arm.
//! `TALLY_BENCH_AGENT_BASELINE=PATH` adds two arms: another agent binary (say, the last
//! commit's release build) as deployed and with bpf_stats on, in the same rotation, to judge
//! a change on a noisy machine against its baseline measured in the same minutes.
//! Besides the medians, each arm's median over the rounds of its run's requests/s divided by
//! the same round's detached run's (paired, so a VM whose speed drifts over minutes weighs
//! less); `TALLY_BENCH_AGENT_ARMS=ratio` runs only the arms that ratio needs, and
//! `TALLY_BENCH_AGENT_ARMS=toggle` measures instead by switching one agent off and on every
//! `--seconds` within one wrk run (`bench_toggle`), for `--rounds` pairs.
//! `TALLY_BENCH_AGENT_GATEWAY=PATH` runs that gateway binary instead of this tree's (in every
//! arm and in the toggles), to compare a gateway change against a baseline build.
//! `TALLY_BENCH_AGENT_FORK=1` also deploys an idle fork-mode function, as a node serving
//! both kinds has: the agent then attaches `sched_switch` (fork mode's CPU time), which
//! every context switch of the node runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bench::{
    Guard, RemoveCgroups, RemoveDir, agent, cpu_ticks, deploy_tiny, fresh_data_dir,
    gateway_dir_from_env, paired_ratio, per_request_us, release_build, start_gateway,
};
use crate::wrk::{self, Wrk};
use anyhow::{Context as _, Result, bail};

/// bpf_stats reach the agent's /metrics every 5 s: wait longer than that around a run.
const STATS_REFRESH: Duration = Duration::from_millis(5_300);
/// Time for a fresh agent to learn the replica (it polls every second), and after a run
/// for the last events to be counted.
const WATCH_SETTLE: Duration = Duration::from_millis(2_000);

pub fn run(seconds: u32, rounds: usize, connections: u32) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench agent: needs root (the agent loads eBPF programs); run it as root");
    }
    let bin = release_build(&["agent"])?;
    let data = fresh_data_dir("agent", &bin)?;
    set_mode(&data, 0o755)?;
    let _cleanup = RemoveDir(data.clone());
    let cgroup_parent = format!("tally-bench-agent-{}", std::process::id());
    // Declared before the gateway, so dropped after it: the gateway stops first.
    let _cgroups = RemoveCgroups(cgroup_parent.clone());
    // TALLY_BENCH_AGENT_GATEWAY=PATH runs that gateway binary (say, the last commit's
    // release build) instead of this tree's, to set a gateway change's figures beside it.
    let gateway_dir = gateway_dir_from_env("TALLY_BENCH_AGENT_GATEWAY")?.unwrap_or(bin.clone());
    eprintln!("gateway: {}", gateway_dir.join("gateway").display());
    // The autoscaler off, as in the other benchmarks: one replica's path in every arm (with
    // it on, the replica count would follow each arm's load and differ between them).
    let (gateway, url, auth) = start_gateway(
        &gateway_dir,
        &data,
        &cgroup_parent,
        &["--autoscaler".into(), "off".into()],
    )?;
    let gateway_pid = gateway.id();
    let _gateway = Guard(gateway);
    let http = agent();
    let target = deploy_tiny(&http, &url, &auth)?;
    if std::env::var("TALLY_BENCH_AGENT_FORK").is_ok_and(|v| v == "1") {
        crate::bench::deploy(
            &http,
            &url,
            &auth,
            serde_json::json!({"service": "forky", "image": "bench/forky", "envProcess": "cat", "envVars": {"mode": "fork"}}),
        )?;
    }
    // Warm up the gateway's pool and the function.
    wrk::run(&target, 2, connections)?;
    if std::env::var("TALLY_BENCH_AGENT_ARMS").is_ok_and(|v| v == "toggle") {
        return crate::bench_toggle::run(
            &bin,
            &data,
            &url,
            &target,
            gateway_pid,
            &cgroup_parent,
            seconds,
            rounds,
            connections,
        );
    }

    // Arm 0: no agent; 1: the agent with its defaults; 2: the agent with the kernel's
    // bpf_stats on, for the programs' run time (stats cost every program run two clock
    // reads, so arm 1, not arm 2, is the agent's cost); 3: the agent attached but told of
    // no replica (its replica list comes from an address nothing listens on): the cost of
    // the programs' hooks alone, with no event made or sent. (`sched_switch`, for fork-mode
    // `cpu_ns`, is attached only while fork-mode functions exist: not here.)
    // With TALLY_BENCH_AGENT_BASELINE=PATH (another build of the agent, e.g. the last
    // commit's), two more arms run that binary as deployed and with bpf_stats on, interleaved
    // with the others: on a shared, noisy machine a change is best judged against its
    // baseline in the same rounds.
    let baseline = std::env::var_os("TALLY_BENCH_AGENT_BASELINE").map(PathBuf::from);
    // TALLY_BENCH_AGENT_ARMS=ratio keeps only the arms of the throughput ratio (detached,
    // attached, and the baseline attached): more rounds in the same minutes on a noisy VM.
    let ratio_only = std::env::var("TALLY_BENCH_AGENT_ARMS").is_ok_and(|v| v == "ratio");
    let mut arms: Vec<Arm> = vec![Arm::new("agent detached", None)];
    arms.push(Arm::new("agent attached", Some(&[])));
    if !ratio_only {
        arms.push(Arm {
            stats: true,
            ..Arm::new(
                "agent attached, bpf_stats on",
                Some(&["--bpf-stats", "true"]),
            )
        });
        arms.push(Arm {
            unwatched: true,
            ..Arm::new("agent attached, no replica watched", Some(&[]))
        });
    }
    if baseline.is_some() {
        arms.push(Arm {
            baseline: true,
            ..Arm::new("baseline agent attached", Some(&[]))
        });
        if !ratio_only {
            arms.push(Arm {
                baseline: true,
                stats: true,
                ..Arm::new(
                    "baseline agent attached, bpf_stats on",
                    Some(&["--bpf-stats", "true"]),
                )
            });
        }
    }
    let arms = arms;
    let n = arms.len();
    let mut runs: Vec<Vec<Wrk>> = (0..n).map(|_| Vec::new()).collect();
    let mut kernel: Vec<Vec<KernelCost>> = (0..n).map(|_| Vec::new()).collect();
    let mut gateway_cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut agent_cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut metered: Vec<Vec<f64>> = vec![Vec::new(); n];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // Rotate the order each round, so a machine that drifts weighs on every arm.
        for k in 0..n {
            let arm = (round + k) % n;
            let Some(extra) = arms[arm].extra else {
                let g0 = cpu_ticks(gateway_pid)?;
                let w = wrk::run(&target, seconds, connections)?;
                gateway_cpu[arm].push(per_request_us(cpu_ticks(gateway_pid)? - g0, w.requests));
                runs[arm].push(w);
                continue;
            };
            let source = if arms[arm].unwatched { NOWHERE } else { &url };
            let program = match &baseline {
                Some(path) if arms[arm].baseline => path.clone(),
                _ => bin.join("agent"),
            };
            let agent = Agent::start(&program, source, &data, extra)?;
            // The replica list is polled every second: the replica is watched after that.
            std::thread::sleep(if arms[arm].stats {
                STATS_REFRESH
            } else {
                WATCH_SETTLE
            });
            let before = if arms[arm].stats {
                Some(agent.bpf()?)
            } else {
                None
            };
            let m0 = agent.metric("tally_agent_invocation_duration_seconds_count")?;
            let (g0, a0) = (cpu_ticks(gateway_pid)?, cpu_ticks(agent.child.0.id())?);
            let w = wrk::run(&target, seconds, connections)?;
            gateway_cpu[arm].push(per_request_us(cpu_ticks(gateway_pid)? - g0, w.requests));
            agent_cpu[arm].push(per_request_us(
                cpu_ticks(agent.child.0.id())? - a0,
                w.requests,
            ));
            std::thread::sleep(if arms[arm].stats {
                STATS_REFRESH
            } else {
                WATCH_SETTLE
            });
            let m1 = agent.metric("tally_agent_invocation_duration_seconds_count")?;
            metered[arm].push((m1 - m0) / w.requests.max(1) as f64);
            if let Some(before) = before {
                kernel[arm].push(KernelCost::between(&before, &agent.bpf()?, w.requests));
            }
            let dropped = agent.metric("tally_agent_events_dropped_total")?;
            drop(agent);
            if dropped > 0.0 {
                bail!("the agent dropped {dropped} usage events during the run");
            }
            runs[arm].push(w);
        }
    }

    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        wrk::percentile(&v, 0.5)
    };
    println!(
        "| hello-rust through the gateway (wrk, {connections} connections, {seconds} s, median of {rounds}) | requests/s | p50 ms | p99 ms | vs detached | requests metered |"
    );
    println!("|---|---|---|---|---|---|");
    let base = wrk::median(&runs[0]).rps;
    for (arm, Arm { name, .. }) in arms.iter().enumerate() {
        let m = wrk::median(&runs[arm]);
        let share = if metered[arm].is_empty() {
            "–".to_string()
        } else {
            format!("{:.1}%", 100.0 * med(&metered[arm]))
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1}% | {share} |",
            m.rps,
            m.p50_ms,
            m.p99_ms,
            100.0 * m.rps / base
        );
    }
    println!();
    for (arm, Arm { name, .. }) in arms.iter().enumerate() {
        println!(
            "{name}, requests/s by round: {:?}",
            runs[arm].iter().map(|w| w.rps.round()).collect::<Vec<_>>()
        );
    }
    // Each round's arms ran minutes apart at most, seconds apart next to each other: the
    // ratio within a round cancels the drift of a shared VM that the medians above keep.
    println!();
    println!("| paired: each round's requests/s over its detached run's | median | min–max |");
    println!("|---|---|---|");
    for (arm, Arm { name, .. }) in arms.iter().enumerate().skip(1) {
        let (mid, lo, hi) = paired_ratio(&runs[arm], &runs[0]);
        println!(
            "| {name} | {:.1}% | {:.1}–{:.1}% |",
            100.0 * mid,
            100.0 * lo,
            100.0 * hi
        );
    }
    println!();
    for (arm, kernel) in kernel.iter().enumerate().filter(|(_, k)| !k.is_empty()) {
        let name = arms[arm].name;
        let ns: Vec<f64> = kernel.iter().map(|k| k.ns_per_invocation).collect();
        let n: Vec<f64> = kernel.iter().map(|k| k.runs_per_invocation).collect();
        println!(
            "eBPF programs ({name}, median): {:.1} µs and {:.1} runs per invocation",
            med(&ns) / 1000.0,
            med(&n)
        );
        if let Some(k) = kernel.last() {
            println!("| dearest programs ({name}, last round) | µs per invocation |");
            println!("|---|---|");
            for (name, ns) in k.top.iter().take(6) {
                println!("| `{name}` | {:.2} |", ns / 1000.0);
            }
        }
        println!();
    }
    println!("| CPU per request (median) | gateway process | agent process |");
    println!("|---|---|---|");
    for (arm, Arm { name, extra, .. }) in arms.iter().enumerate() {
        let agent = if extra.is_some() {
            format!("{:.1} µs", med(&agent_cpu[arm]))
        } else {
            "–".to_string()
        };
        println!("| {name} | {:.1} µs | {agent} |", med(&gateway_cpu[arm]));
    }
    println!();
    println!("target: attached ≥ 97% of detached");
    Ok(())
}

/// One setup of the benchmark.
struct Arm {
    name: &'static str,
    /// The agent's extra flags; `None`: no agent.
    extra: Option<&'static [&'static str]>,
    /// The kernel's bpf_stats on (the programs' run time is read).
    stats: bool,
    /// The agent told of no replica: the hooks alone.
    unwatched: bool,
    /// The agent binary of `TALLY_BENCH_AGENT_BASELINE`.
    baseline: bool,
}

impl Arm {
    fn new(name: &'static str, extra: Option<&'static [&'static str]>) -> Self {
        Self {
            name,
            extra,
            stats: false,
            unwatched: false,
            baseline: false,
        }
    }
}

/// Program run time (s) and run count per program, from the agent's /metrics.
type Bpf = Vec<(String, f64, f64)>;

struct KernelCost {
    ns_per_invocation: f64,
    runs_per_invocation: f64,
    /// Programs by their time per invocation, dearest first.
    top: Vec<(String, f64)>,
}

impl KernelCost {
    fn between(before: &Bpf, after: &Bpf, requests: u64) -> Self {
        let n = requests.max(1) as f64;
        let mut top = Vec::new();
        let (mut time, mut runs) = (0.0, 0.0);
        for (name, t1, c1) in after {
            let (t0, c0) = before
                .iter()
                .find(|(b, ..)| b == name)
                .map_or((0.0, 0.0), |(_, t, c)| (*t, *c));
            time += t1 - t0;
            runs += c1 - c0;
            top.push((name.clone(), (t1 - t0) * 1e9 / n));
        }
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        Self {
            ns_per_invocation: time * 1e9 / n,
            runs_per_invocation: runs / n,
            top,
        }
    }
}

/// An address nothing listens on: an agent given it as its gateway learns no replica.
pub(crate) const NOWHERE: &str = "http://127.0.0.1:9";

/// The release agent beside the gateway, with its own spool and /metrics port; SIGTERM
/// and wait on drop (its programs detach when it exits). Also `bench syscalls`'s agent.
pub(crate) struct Agent {
    child: Guard,
    metrics: String,
    spool: PathBuf,
}

impl Agent {
    pub(crate) fn start(program: &Path, url: &str, data: &Path, extra: &[&str]) -> Result<Self> {
        let port = wrk::free_port()?;
        let spool = data.join(format!("spool-{port}"));
        let child = Command::new(program)
            .args(["--gateway-url", url])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .arg("--secret-mount-path")
            .arg(data.join("secrets"))
            .arg("--spool-dir")
            .arg(&spool)
            .args(extra)
            .env("RUST_LOG", "warn")
            .spawn()
            .context("starting the agent")?;
        let agent = Self {
            child: Guard(child),
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            spool,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.text().is_err() {
            if Instant::now() > deadline {
                bail!("the agent did not serve /metrics within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(agent)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn text(&self) -> Result<String> {
        Ok(ureq::get(&self.metrics)
            .call()?
            .body_mut()
            .read_to_string()?)
    }

    pub(crate) fn metric(&self, name: &str) -> Result<f64> {
        let text = self.text()?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            // An f64 sum starts at -0.0: no series reads as 0, not "-0".
            .fold(0.0, |a, b| a + b))
    }

    fn bpf(&self) -> Result<Bpf> {
        let text = self.text()?;
        let mut out: Bpf = Vec::new();
        for (prefix, is_time) in [
            ("tally_agent_bpf_run_time_seconds{program=\"", true),
            ("tally_agent_bpf_run_count{program=\"", false),
        ] {
            for l in text.lines() {
                let Some(rest) = l.strip_prefix(prefix) else {
                    continue;
                };
                let Some((name, value)) = rest.split_once("\"} ") else {
                    continue;
                };
                let value: f64 = value.trim().parse()?;
                match out.iter_mut().find(|(n, ..)| n == name) {
                    Some(e) if is_time => e.1 = value,
                    Some(e) => e.2 = value,
                    None if is_time => out.push((name.into(), value, 0.0)),
                    None => out.push((name.into(), 0.0, value)),
                }
            }
        }
        if out.is_empty() {
            bail!("the agent's /metrics has no bpf_stats yet");
        }
        Ok(out)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.0.wait();
        let _ = std::fs::remove_dir_all(&self.spool);
    }
}

/// Sets `path`'s permission bits.
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
