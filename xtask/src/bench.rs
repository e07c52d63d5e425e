//! `cargo xtask bench sync`: throughput and latency of a tiny http-mode function, direct
//! vs through the gateway in the same run (wrk), and cold starts from zero (fork, http).
//! `cargo xtask bench async`: async calls accepted/s and completed/s with callbacks on.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::wrk;
use crate::{basic_auth, root, run_cmd};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Sync,
    Async,
    /// Gateway throughput with the node agent attached vs detached.
    Agent,
    /// ns per syscall of an unwatched process with the node agent attached vs detached.
    Syscalls,
    /// Fork-mode calls through tally-spawn vs forked from the gateway.
    Fork,
    /// Sync throughput with metering (webhook batches) on vs off.
    Metering,
    /// The gateway's CPU per usage event taken in from the node agent (`POST /system/usage`).
    Ingest,
    /// Usage events from their source to committed PostgreSQL rows: events/s and lag.
    Billing,
    /// The target autoscaler under a step of steady load: time to the desired count and
    /// changes over two minutes.
    Autoscale,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which benchmark.
    #[arg(value_enum)]
    which: Which,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    /// wrk runs per target (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Events/s posted to `/system/usage` (bench billing).
    #[arg(long, default_value_t = 25_000)]
    rate: u32,
    /// Cold starts measured per mode.
    #[arg(long, default_value_t = 30)]
    cold_starts: usize,
}

/// A release gateway (embedded NATS) with its own data directory, plus a standalone
/// hello-rust on `function_port`; everything stops and is removed on drop.
struct Bench {
    data: PathBuf,
    function_port: u16,
    url: String,
    auth: String,
    gateway_pid: u32,
    _processes: Vec<Guard>,
    /// Dropped after the processes (cleared first in `drop`).
    _cgroups: RemoveCgroups,
}

impl Bench {
    /// With the autoscaler off: these benchmarks measure one replica's path, not scaling.
    fn start(name: &str) -> Result<Self> {
        Self::start_with(name, &["--autoscaler".into(), "off".into()])
    }

    fn start_with(name: &str, gateway_args: &[String]) -> Result<Self> {
        let bin = release_build(&[])?;
        let data = fresh_data_dir(name, &bin)?;
        let function_port = wrk::free_port()?;
        let function = Guard(
            Command::new(bin.join("hello-rust"))
                .env("PORT", function_port.to_string())
                .spawn()?,
        );
        let cgroup_parent = format!("tally-bench-{name}");
        let (gateway, url, auth) = start_gateway(&bin, &data, &cgroup_parent, gateway_args)?;
        Ok(Self {
            data,
            function_port,
            url,
            auth,
            gateway_pid: gateway.id(),
            _processes: vec![function, Guard(gateway)],
            _cgroups: RemoveCgroups(cgroup_parent),
        })
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self._processes.clear();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The directory of the gateway binary that env var `var` names (a baseline build to
/// measure beside this tree's), if it is set; an error unless it names a `gateway` file.
pub(crate) fn gateway_dir_from_env(var: &str) -> Result<Option<PathBuf>> {
    let Some(path) = std::env::var_os(var).map(PathBuf::from) else {
        return Ok(None);
    };
    if path.file_name() != Some("gateway".as_ref()) || !path.is_file() {
        bail!("{var} must name a `gateway` binary");
    }
    let dir = path
        .parent()
        .with_context(|| format!("{var}: no directory"))?;
    Ok(Some(dir.to_path_buf()))
}

/// Builds the gateway, hello-rust and the `extra` packages in release; their directory.
pub(crate) fn release_build(extra: &[&str]) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "gateway",
        "-p",
        "hello-rust",
    ]);
    for p in extra {
        cmd.args(["-p", p]);
    }
    run_cmd(&mut cmd)?;
    Ok(root().join("target/release"))
}

/// A fresh `tally-bench-NAME-PID` temp directory holding `functions/hello-rust`.
pub(crate) fn fresh_data_dir(name: &str, bin: &Path) -> Result<PathBuf> {
    let data = std::env::temp_dir().join(format!("tally-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(data.join("functions"))?;
    std::fs::copy(bin.join("hello-rust"), data.join("functions/hello-rust"))?;
    Ok(data)
}

/// Removes a benchmark's directory on drop.
pub(crate) struct RemoveDir(pub(crate) PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A benchmark gateway's `--cgroup-parent`, removed from every hierarchy on drop (the
/// end-to-end tests' guard; drop it after the gateway).
pub(crate) use tally_e2e::stack::RemoveCgroups;

/// Kills the child on drop, so a failed benchmark leaves nothing running.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.0.wait();
    }
}

pub fn run(args: Args) -> Result<()> {
    crate::setup::ensure_all()?;
    match args.which {
        Which::Async => return run_async(&args),
        Which::Agent => {
            return crate::bench_agent::run(args.seconds, args.rounds, args.connections);
        }
        Which::Syscalls => return crate::bench_syscalls::run(args.rounds),
        Which::Fork => return crate::bench_fork::run(args.seconds, args.rounds),
        Which::Metering => return run_metering(&args),
        Which::Ingest => return crate::bench_ingest::run(args.rounds),
        Which::Billing => {
            return crate::bench_billing::run(args.seconds.max(20), args.rate, args.connections);
        }
        Which::Autoscale => return run_autoscale(),
        Which::Sync => {}
    }
    // The function on its own, started as the gateway would start it.
    let bench = Bench::start("sync")?;
    let (port, url, auth) = (bench.function_port, bench.url.clone(), bench.auth.clone());
    let agent = agent();
    deploy(
        &agent,
        &url,
        &auth,
        json!({"service": "tiny", "image": "bench/tiny", "envProcess": "./hello-rust", "envVars": {"mode": "http"}}),
    )?;
    deploy(
        &agent,
        &url,
        &auth,
        json!({"service": "fork", "image": "bench/fork", "envProcess": "echo hi"}),
    )?;
    wrk::wait_ok(&agent, &format!("{url}/function/tiny"))?;
    wrk::wait_ok(&agent, &format!("http://127.0.0.1:{port}/"))?;

    let mut direct = Vec::new();
    let mut through = Vec::new();
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        direct.push(wrk::run(
            &format!("http://127.0.0.1:{port}/"),
            args.seconds,
            args.connections,
        )?);
        through.push(wrk::run(
            &format!("{url}/function/tiny"),
            args.seconds,
            args.connections,
        )?);
    }
    let fork_cold = cold_starts(&agent, &url, &auth, "fork", args.cold_starts)?;
    let http_cold = cold_starts(&agent, &url, &auth, "tiny", args.cold_starts)?;
    drop(bench);

    let d = wrk::median(&direct);
    let g = wrk::median(&through);
    println!("| target | requests/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    println!(
        "| direct to the function | {:.0} | {:.2} | {:.2} |",
        d.rps, d.p50_ms, d.p99_ms
    );
    println!(
        "| through the gateway | {:.0} | {:.2} | {:.2} |",
        g.rps, g.p50_ms, g.p99_ms
    );
    println!();
    println!("through / direct throughput: {:.1}%", 100.0 * g.rps / d.rps);
    println!();
    println!("| cold start (0 → first response) | p50 ms | p99 ms | n |");
    println!("|---|---|---|---|");
    for (name, mut v) in [
        ("fork mode (`echo hi`)", fork_cold),
        ("http mode (hello-rust)", http_cold),
    ] {
        v.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.2} | {:.2} | {} |",
            wrk::percentile(&v, 0.5),
            wrk::percentile(&v, 0.99),
            v.len()
        );
    }
    Ok(())
}

/// A release gateway on a free loopback port with its own data dir and cgroup parent;
/// returns it, its URL and the admin `Authorization` value.
pub(crate) fn start_gateway(
    bin: &Path,
    data: &Path,
    cgroup_parent: &str,
    extra: &[String],
) -> Result<(Child, String, String)> {
    start_gateway_env(bin, data, cgroup_parent, extra, &[])
}

/// [`start_gateway`] with more environment variables.
pub(crate) fn start_gateway_env(
    bin: &Path,
    data: &Path,
    cgroup_parent: &str,
    extra: &[String],
    env: &[(&str, &str)],
) -> Result<(Child, String, String)> {
    let mut child = Command::new(bin.join("gateway"))
        .envs(env.iter().copied())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cgroup-parent",
            cgroup_parent,
            "--data-dir",
        ])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let url = lines
        .next()
        .context("gateway exited")??
        .strip_prefix("tally gateway listening on ")
        .context("unexpected gateway output")?
        .to_string();
    std::thread::spawn(move || lines.for_each(drop));
    let password = std::fs::read_to_string(data.join("secrets/basic-auth-password"))?;
    Ok((child, url, basic_auth("admin", password.trim())))
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Deploys `tiny` (hello-rust, http mode) and waits until it answers; its URL.
pub(crate) fn deploy_tiny(agent: &ureq::Agent, url: &str, auth: &str) -> Result<String> {
    deploy(
        agent,
        url,
        auth,
        json!({"service": "tiny", "image": "bench/tiny", "envProcess": "./hello-rust", "envVars": {"mode": "http"}}),
    )?;
    let target = format!("{url}/function/tiny");
    wrk::wait_ok(agent, &target)?;
    Ok(target)
}

pub(crate) fn deploy(
    agent: &ureq::Agent,
    url: &str,
    auth: &str,
    body: serde_json::Value,
) -> Result<()> {
    let r = agent
        .post(&format!("{url}/system/functions"))
        .header("Authorization", auth)
        .send_json(&body)?;
    if r.status() != 202 {
        bail!("deploy {body}: {}", r.status());
    }
    Ok(())
}

/// Scales `function` to zero, waits until it is down, then times one request.
fn cold_starts(
    agent: &ureq::Agent,
    url: &str,
    auth: &str,
    function: &str,
    n: usize,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let scale = json!({"serviceName": function, "replicas": 0});
        agent
            .post(&format!("{url}/system/scale-function/{function}"))
            .header("Authorization", auth)
            .send_json(&scale)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut r = agent
                .get(&format!("{url}/system/function/{function}"))
                .header("Authorization", auth)
                .call()?;
            let status: serde_json::Value = r.body_mut().read_json()?;
            if status["availableReplicas"] == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{function} did not scale to zero");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the retired replica's process and cgroup go before timing the next start.
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let r = agent.get(&format!("{url}/function/{function}")).call()?;
        let elapsed = t.elapsed().as_secs_f64() * 1000.0;
        if r.status() != 200 {
            bail!("cold start of {function}: {}", r.status());
        }
        times.push(elapsed);
    }
    Ok(times)
}

/// Async: wrk POSTs to /async-function for `seconds` (accepted/s, enqueue latency), then
/// the run waits until the queue-worker has completed every call, callbacks included.
fn run_async(args: &Args) -> Result<()> {
    // The callback receiver: a standalone hello-rust, which answers 200 to anything.
    let bench = Bench::start("async")?;
    let (cb_port, url, auth, data) = (
        bench.function_port,
        bench.url.clone(),
        bench.auth.clone(),
        bench.data.clone(),
    );
    let agent = agent();
    deploy(
        &agent,
        &url,
        &auth,
        json!({"service": "noop", "image": "bench/noop", "envProcess": "./hello-rust", "envVars": {"mode": "http"}}),
    )?;
    wrk::wait_ok(&agent, &format!("{url}/function/noop"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent
        .get(&format!("{url}/system/async-dead-letters"))
        .header("Authorization", &auth)
        .call()?
        .status()
        != 200
    {
        if Instant::now() > deadline {
            bail!("async API not ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let script = data.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"X-Callback-Url\"] = \"http://127.0.0.1:{cb_port}/cb\"\nwrk.body = \"\"\n"
        ),
    )?;
    let started = Instant::now();
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{}", args.connections),
            &format!("-d{}s", args.seconds),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("{url}/async-function/noop"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || text.contains("Non-2xx") {
        bail!("wrk saw errors:\n{text}");
    }
    let accepted_rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec")?
        .trim()
        .parse()?;
    let field = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(str::trim)
            .context("no latency")
    };
    let (p50, p99) = (wrk::ms(field("50%")?)?, wrk::ms(field("99%")?)?);
    let metric = |name: &str| -> Result<f64> {
        let mut r = agent.get(&format!("{url}/metrics")).call()?;
        let body = r.body_mut().read_to_string()?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0))
    };
    // Let the last requests wrk cut off settle before counting.
    std::thread::sleep(Duration::from_millis(500));
    let submitted = metric("queue_worker_messages_submitted_total")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while metric("queue_worker_messages_processed_total")? < submitted {
        if Instant::now() > deadline {
            bail!("the queue-worker did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = metric("queue_worker_callbacks_total{result=\"delivered\"}")?;
    drop(bench);
    println!("| async (no-op http function, callbacks on) | value |");
    println!("|---|---|");
    println!(
        "| calls accepted (202) | {submitted:.0} in {}s |",
        args.seconds
    );
    println!("| accepted/s | {accepted_rps:.0} |");
    println!("| enqueue latency p50 / p99 ms | {p50:.2} / {p99:.2} |");
    println!(
        "| completed/s (first accept to last callback) | {:.0} |",
        submitted / elapsed
    );
    println!("| callbacks delivered | {delivered:.0} |");
    Ok(())
}

/// Sync throughput through two gateways in the same run: one without metering, one
/// metering every call to a webhook (a hello-rust that accepts the batches).
fn run_metering(args: &Args) -> Result<()> {
    let off = Bench::start("metering-off")?;
    let secret = off.data.join("webhook-secret");
    std::fs::write(&secret, "bench-secret\n")?;
    let on = Bench::start_with(
        "metering-on",
        &[
            "--webhook-endpoint".into(),
            format!("http://127.0.0.1:{}/usage", off.function_port),
            "--webhook-secret-file".into(),
            secret.display().to_string(),
            "--autoscaler".into(),
            "off".into(),
        ],
    )?;
    let agent = agent();
    for b in [&off, &on] {
        deploy_tiny(&agent, &b.url, &b.auth)?;
    }
    let (mut without, mut with) = (Vec::new(), Vec::new());
    // CPU per request of each setup's gateway and the nats-server it supervises.
    let (mut cpu_off, mut cpu_on) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        // Which gateway goes first alternates, so a VM whose speed drifts weighs on both.
        let mut arms = [
            (&off, &mut without, &mut cpu_off),
            (&on, &mut with, &mut cpu_on),
        ];
        if round % 2 == 1 {
            arms.reverse();
        }
        for (b, runs, cpu) in arms {
            let before = gateway_and_nats_ticks(b.gateway_pid)?;
            let w = wrk::run(
                &format!("{}/function/tiny", b.url),
                args.seconds,
                args.connections,
            )?;
            // The metering pipeline runs behind the calls (flush interval, batch wait): its
            // tail is waited for here, so that it is charged to this run's CPU and does not
            // slow the other gateway's run that follows.
            if std::ptr::eq(b, &on) {
                drain_metering(&agent, &on.url)?;
            }
            let after = gateway_and_nats_ticks(b.gateway_pid)?;
            cpu.push(per_request_us(after - before, w.requests));
            runs.push(w);
        }
    }
    let stages = metering_stages(&agent, &on.url)?;
    let stage = |s: &str| stages.get(s).copied().unwrap_or(0.0);
    let (a, b) = (wrk::median(&without), wrk::median(&with));
    println!("| sync through the gateway | requests/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    println!(
        "| metering off | {:.0} | {:.2} | {:.2} |",
        a.rps, a.p50_ms, a.p99_ms
    );
    let on_label = if upstream_only() {
        "metering on, to JetStream only (TALLY_EVENT_WORKER=false)"
    } else {
        "metering on (webhook batches)"
    };
    println!(
        "| {on_label} | {:.0} | {:.2} | {:.2} |",
        b.rps, b.p50_ms, b.p99_ms
    );
    println!();
    println!("on / off throughput: {:.1}%", 100.0 * b.rps / a.rps);
    // Each round's two runs are seconds apart: their ratio cancels the drift of a shared VM
    // that the medians keep.
    let (mid, lo, hi) = paired_ratio(&with, &without);
    println!(
        "on / off paired (each round's on over its off), median: {:.1}% (min–max {:.1}–{:.1}%)",
        100.0 * mid,
        100.0 * lo,
        100.0 * hi
    );
    println!(
        "CPU per request, gateway + its nats-server (medians): off {:.1} µs, on {:.1} µs (rounds: off {:?}, on {:?})",
        median(&mut cpu_off.clone()),
        median(&mut cpu_on.clone()),
        cpu_off
            .iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>(),
        cpu_on.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>(),
    );
    println!(
        "requests/s by round: off {:?}, on {:?}",
        without.iter().map(|w| w.rps.round()).collect::<Vec<_>>(),
        with.iter().map(|w| w.rps.round()).collect::<Vec<_>>(),
    );
    println!(
        "events produced {:.0}, delivered {:.0}, dropped {:.0}",
        stage("produced"),
        stage("delivered"),
        stage("dropped")
    );
    Ok(())
}

/// The metering gateway's `gateway_metering_events_total` by stage.
fn metering_stages(
    agent: &ureq::Agent,
    url: &str,
) -> Result<std::collections::HashMap<String, f64>> {
    let mut r = agent.get(&format!("{url}/metrics")).call()?;
    let metrics = r.body_mut().read_to_string()?;
    Ok(metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("gateway_metering_events_total{stage=\"")?;
            let (stage, value) = rest.split_once("\"}")?;
            Some((stage.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

/// Whether the metering gateway runs without its event-worker (`TALLY_EVENT_WORKER=false`,
/// which it inherits): its events go to JetStream and no further.
fn upstream_only() -> bool {
    std::env::var("TALLY_EVENT_WORKER").is_ok_and(|v| v == "false")
}

/// Waits until every event the gateway at `url` produced was delivered, parked or dropped (at
/// most 30 s: a pipeline that cannot keep up is an error, not a figure). A gateway run with
/// `TALLY_EVENT_WORKER=false` delivers nothing: there, until every event reached JetStream,
/// which measures the invocation side of metering alone.
fn drain_metering(agent: &ureq::Agent, url: &str) -> Result<()> {
    let upstream_only = upstream_only();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = metering_stages(agent, url)?;
        let at = |k: &str| s.get(k).copied().unwrap_or(0.0);
        let done = if upstream_only {
            at("flushed") + at("dropped")
        } else {
            at("delivered") + at("parked") + at("dropped")
        };
        if done >= at("produced") {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "metering did not drain within 30 s: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of process `pid` so far, in clock ticks (1/100 s).
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let [utime, stime] = stat_fields(pid, [11, 12])?;
    Ok(utime + stime)
}

/// Numeric fields of `/proc/PID/stat`, counted from the first after the command name (which
/// may hold spaces, in parentheses): 7 is minflt, 11 utime, 12 stime.
pub(crate) fn stat_fields<const N: usize>(pid: u32, at: [usize; N]) -> Result<[u64; N]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut out = [0; N];
    for (o, i) in out.iter_mut().zip(at) {
        *o = f.get(i).context("short /proc/PID/stat")?.parse()?;
    }
    Ok(out)
}

/// Clock ticks (10 ms each) spread over `requests`, in µs per request.
pub(crate) fn per_request_us(ticks: u64, requests: u64) -> f64 {
    ticks as f64 * 10_000.0 / requests.max(1) as f64
}

/// CPU ticks of a gateway and of the `nats-server` it started (its child).
fn gateway_and_nats_ticks(gateway: u32) -> Result<u64> {
    let mut ticks = cpu_ticks(gateway)?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let is_child = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .is_some_and(|ppid| ppid == gateway.to_string());
        if is_child && stat.contains("(nats-server)") {
            ticks += cpu_ticks(pid).unwrap_or(0);
        }
    }
    Ok(ticks)
}

/// Round by round, `runs`' requests/s over `base`'s (the same round's baseline run): the
/// median, smallest and largest of those ratios.
pub(crate) fn paired_ratio(runs: &[crate::wrk::Wrk], base: &[crate::wrk::Wrk]) -> (f64, f64, f64) {
    let mut ratios: Vec<f64> = runs.iter().zip(base).map(|(r, b)| r.rps / b.rps).collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    (median(&mut ratios), lo, hi)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A step from idle to a paced ~800 requests/s (8 senders) held for 120 s against a
/// function with a target of 150 requests/s per replica (× 0.9); the desired count is
/// computed from the load actually achieved.
fn run_autoscale() -> Result<()> {
    const RPS: u64 = 800;
    const TARGET: f64 = 150.0;
    const SENDERS: u64 = 8;
    const HOLD: Duration = Duration::from_secs(120);
    let bench = Bench::start_with(
        "autoscale",
        &[
            "--autoscaler".into(),
            "target".into(),
            "--autoscaler-interval".into(),
            "1s".into(),
            "--scale-down-window".into(),
            "30s".into(),
        ],
    )?;
    let agent = agent();
    let labels = json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "10", "com.openfaas.scale.target": TARGET.to_string(), "com.openfaas.scale.target-proportion": "0.9"});
    deploy(
        &agent,
        &bench.url,
        &bench.auth,
        json!({"service": "step", "image": "bench/step", "envProcess": "./hello-rust", "envVars": {"mode": "http"}, "labels": labels}),
    )?;
    wrk::wait_ok(&agent, &format!("{}/function/step", bench.url))?;
    let url = format!("{}/function/step", bench.url);
    let start = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (url, agent) = (url.clone(), agent.clone());
            std::thread::spawn(move || {
                let every = Duration::from_secs_f64(SENDERS as f64 / RPS as f64);
                let (mut next, mut sent, mut failed) = (Instant::now(), 0u64, 0u64);
                while start.elapsed() < HOLD {
                    match agent.get(&url).call() {
                        Ok(r) if r.status() == 200 => sent += 1,
                        _ => failed += 1,
                    }
                    next += every;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                (sent, failed)
            })
        })
        .collect();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    while start.elapsed() < HOLD {
        let mut r = agent
            .get(&format!("{}/system/function/step", bench.url))
            .header("Authorization", &bench.auth)
            .call()?;
        let status: serde_json::Value = r.body_mut().read_json()?;
        samples.push((
            start.elapsed().as_secs_f64(),
            status["replicas"].as_u64().unwrap_or(0),
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
    let (mut sent, mut failed) = (0, 0);
    for s in senders {
        let (a, b) = s.join().map_err(|_| anyhow::anyhow!("a sender panicked"))?;
        sent += a;
        failed += b;
    }
    let achieved = sent as f64 / HOLD.as_secs_f64();
    let desired = (achieved / (TARGET * 0.9)).ceil() as u64;
    let reached = samples.iter().find(|(_, r)| *r >= desired).map(|(t, _)| *t);
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| reached.is_some_and(|r| *t > r))
        .map(|(_, r)| *r)
        .collect();
    let changes = after.windows(2).filter(|w| w[0] != w[1]).count();
    println!(
        "| target autoscaler, step to a paced {RPS} req/s for {}s | value |",
        HOLD.as_secs()
    );
    println!("|---|---|");
    println!("| achieved load | {achieved:.0} req/s ({failed} failed) |");
    println!("| desired replicas (ceil(load / ({TARGET} × 0.9))) | {desired} |");
    match reached {
        Some(t) => println!("| time from the step to {desired} replicas | {t:.1} s |"),
        None => println!(
            "| time from the step to {desired} replicas | not reached in {}s |",
            HOLD.as_secs()
        ),
    }
    println!(
        "| replica counts after that (min–max) | {}–{} |",
        after.iter().min().unwrap_or(&0),
        after.iter().max().unwrap_or(&0)
    );
    println!("| changes of the count during the steady load | {changes} |");
    Ok(())
}
