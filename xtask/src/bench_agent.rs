//! `cargo xtask bench agent`: gateway throughput with the node agent attached vs
//! detached in the same run, and the programs' kernel time per invocation.
//!
//! One release gateway with `hello-rust` deployed in http mode; wrk through
//! `/function/tiny`, the autoscaler off. Two arms — no agent, the agent — run in an order
//! rotated every round, so drift of a busy machine falls on each; medians are reported,
//! with the CPU time the gateway and the agent processes used per request (their
//! `/proc/PID/stat` utime + stime over the wrk run): the gateway's share in the attached arm
//! includes ingesting one usage event per request. Kernel time comes from the agent's
//! `/metrics` (the kernel's `bpf_stats`, refreshed every 5 s): the growth of the programs'
//! summed run time over an attached run, divided by the requests wrk completed. The
//! programs run on every traced syscall of the node and return at once for unwatched
//! cgroups, so this is the whole in-kernel cost, not only the function's share.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bench::{
    Guard, RemoveDir, agent, deploy_tiny, fresh_data_dir, release_build, start_gateway,
};
use crate::wrk::{self, Wrk};
use anyhow::{Context as _, Result, bail};

/// bpf_stats reach the agent's /metrics every 5 s: wait longer than that around a run.
const STATS_REFRESH: Duration = Duration::from_millis(5_300);

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
    // The autoscaler off, as in the other benchmarks: one replica's path in every arm (with
    // it on, the replica count would follow each arm's load and differ between them).
    let (gateway, url, auth) = start_gateway(
        &bin,
        &data,
        &cgroup_parent,
        &["--autoscaler".into(), "off".into()],
    )?;
    let gateway_pid = gateway.id();
    let _gateway = Guard(gateway);
    let http = agent();
    let target = deploy_tiny(&http, &url, &auth)?;
    // Warm up the gateway's pool and the function.
    wrk::run(&target, 2, connections)?;

    // Arm 0: no agent; 1: the agent with its defaults. (`sched_switch`, for fork-mode
    // `cpu_ns`, is attached only while fork-mode functions exist: not here.)
    const ARMS: [(&str, Option<&str>); 2] =
        [("agent detached", None), ("agent attached", Some("true"))];
    let mut runs: [Vec<Wrk>; 2] = Default::default();
    let mut kernel: [Vec<KernelCost>; 2] = Default::default();
    let mut gateway_cpu: [Vec<f64>; 2] = Default::default();
    let mut agent_cpu: Vec<f64> = Vec::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        // Rotate the order each round, so a machine that drifts weighs on every arm.
        for k in 0..ARMS.len() {
            let arm = (round + k) % ARMS.len();
            let Some(cpu_time) = ARMS[arm].1 else {
                let g0 = cpu_ticks(gateway_pid)?;
                let w = wrk::run(&target, seconds, connections)?;
                gateway_cpu[arm].push(per_request_us(cpu_ticks(gateway_pid)? - g0, w.requests));
                runs[arm].push(w);
                continue;
            };
            let agent = Agent::start(&bin, &url, &data, &["--cpu-time", cpu_time])?;
            std::thread::sleep(STATS_REFRESH);
            let before = agent.bpf()?;
            let (g0, a0) = (cpu_ticks(gateway_pid)?, cpu_ticks(agent.child.0.id())?);
            let w = wrk::run(&target, seconds, connections)?;
            gateway_cpu[arm].push(per_request_us(cpu_ticks(gateway_pid)? - g0, w.requests));
            agent_cpu.push(per_request_us(
                cpu_ticks(agent.child.0.id())? - a0,
                w.requests,
            ));
            std::thread::sleep(STATS_REFRESH);
            let after = agent.bpf()?;
            let dropped = agent.metric("tally_agent_events_dropped_total")?;
            drop(agent);
            if dropped > 0.0 {
                bail!("the agent dropped {dropped} usage events during the run");
            }
            kernel[arm].push(KernelCost::between(&before, &after, w.requests));
            runs[arm].push(w);
        }
    }

    println!(
        "| hello-rust through the gateway (wrk, {connections} connections, {seconds} s, median of {rounds}) | requests/s | p50 ms | p99 ms | vs detached | eBPF time per invocation | eBPF runs per invocation |"
    );
    println!("|---|---|---|---|---|---|---|");
    let base = wrk::median(&runs[0]).rps;
    for (arm, (name, _)) in ARMS.iter().enumerate() {
        let m = wrk::median(&runs[arm]);
        let (cost, count) = if kernel[arm].is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let mut ns: Vec<f64> = kernel[arm].iter().map(|k| k.ns_per_invocation).collect();
            let mut n: Vec<f64> = kernel[arm].iter().map(|k| k.runs_per_invocation).collect();
            ns.sort_by(f64::total_cmp);
            n.sort_by(f64::total_cmp);
            (
                format!("{:.1} µs", wrk::percentile(&ns, 0.5) / 1000.0),
                format!("{:.1}", wrk::percentile(&n, 0.5)),
            )
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1}% | {cost} | {count} |",
            m.rps,
            m.p50_ms,
            m.p99_ms,
            100.0 * m.rps / base
        );
    }
    println!();
    for (arm, (name, _)) in ARMS.iter().enumerate() {
        println!(
            "{name}, requests/s by round: {:?}",
            runs[arm].iter().map(|w| w.rps.round()).collect::<Vec<_>>()
        );
    }
    println!();
    if let Some(k) = kernel[1].last() {
        println!("| dearest programs (agent attached, last round) | µs per invocation |");
        println!("|---|---|");
        for (name, ns) in k.top.iter().take(6) {
            println!("| `{name}` | {:.2} |", ns / 1000.0);
        }
    }
    println!();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        wrk::percentile(v, 0.5)
    };
    println!("| CPU per request (median) | gateway process | agent process |");
    println!("|---|---|---|");
    println!(
        "| agent detached | {:.1} µs | – |",
        med(&mut gateway_cpu[0])
    );
    println!(
        "| agent attached | {:.1} µs | {:.1} µs |",
        med(&mut gateway_cpu[1]),
        med(&mut agent_cpu)
    );
    println!();
    println!("target: attached ≥ 97% of detached");
    Ok(())
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

/// The release agent beside the gateway, with its own spool and /metrics port; SIGTERM
/// and wait on drop (its programs detach when it exits).
struct Agent {
    child: Guard,
    metrics: String,
    spool: PathBuf,
}

impl Agent {
    fn start(bin: &Path, url: &str, data: &Path, extra: &[&str]) -> Result<Self> {
        let port = wrk::free_port()?;
        let spool = data.join(format!("spool-{port}"));
        let child = Command::new(bin.join("agent"))
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

    fn text(&self) -> Result<String> {
        Ok(ureq::get(&self.metrics)
            .call()?
            .body_mut()
            .read_to_string()?)
    }

    fn metric(&self, name: &str) -> Result<f64> {
        let text = self.text()?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
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

/// utime + stime of process `pid` so far, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field =
        |i: usize| -> Result<u64> { Ok(f.get(i).context("short /proc/PID/stat")?.parse()?) };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks (10 ms each) spread over `requests`, in µs per request.
fn per_request_us(ticks: u64, requests: u64) -> f64 {
    ticks as f64 * 10_000.0 / requests.max(1) as f64
}

/// Removes the data directory on drop.
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Removes the cgroup directories the gateway leaves when it does not stop cleanly.
struct RemoveCgroups(String);

impl Drop for RemoveCgroups {
    fn drop(&mut self) {
        for root in [
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu",
        ] {
            let dir = Path::new(root).join(&self.0);
            if dir.is_dir() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}
