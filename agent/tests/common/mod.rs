//! Fixtures for the agent's integration tests: a root check that says why it skips, test
//! cgroups (v2 + v1 memory) that clean up after themselves, fixture programs compiled on
//! the fly, and a running agent with the real eBPF programs attached.
#![allow(dead_code)]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
        mpsc as std_mpsc,
    },
    time::Duration,
};

use agent::{
    event::UsageEvent,
    forward::ChannelSink,
    metrics::Metrics,
    run::{RunOptions, run},
    workloads::{FixedWorkloads, Mode, Replica},
};
use tokio::sync::{mpsc, watch};

pub const V2_ROOT: &str = "/sys/fs/cgroup/unified";
pub const MEM_ROOT: &str = "/sys/fs/cgroup/memory";

/// Serialises the measuring tests of one test binary: two agents and two servers fighting
/// for 2 cores would make the handlers' own timings (the ground truth) noisy.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// True when the test can run; otherwise prints why it is skipped.
pub fn can_run(test: &str) -> bool {
    if agent::sys::euid() != 0 {
        eprintln!("SKIPPED {test}: needs root to load eBPF programs (run the tests as root)");
        return false;
    }
    if !Path::new(V2_ROOT).join("cgroup.procs").is_file() {
        eprintln!("SKIPPED {test}: no cgroup v2 hierarchy at {V2_ROOT} (hybrid layout expected)");
        return false;
    }
    assert!(
        agent::ebpf_object::is_real(),
        "{test}: this build has only the stub eBPF object: run `cargo xtask setup` (installs the eBPF toolchain) and rebuild"
    );
    true
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 directory (what the kernel filters on) plus a v1 memory cgroup (the limit),
/// removed with every process in them on drop.
pub struct TestCgroup {
    pub name: String,
    pub v2: PathBuf,
    pub mem: Option<PathBuf>,
}

impl TestCgroup {
    pub fn new(limit: Option<u64>) -> Self {
        let name = format!(
            "tally-agent-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let v2 = Path::new(V2_ROOT).join(&name);
        fs::create_dir(&v2).expect("create v2 cgroup");
        let mem = Path::new(MEM_ROOT).is_dir().then(|| {
            let m = Path::new(MEM_ROOT).join(&name);
            fs::create_dir(&m).expect("create memory cgroup");
            if let Some(l) = limit {
                fs::write(m.join("memory.limit_in_bytes"), l.to_string()).expect("set limit");
            }
            m
        });
        Self { name, v2, mem }
    }

    /// A cgroup at `rel` under the v2 root (and the v1 memory root), whose parent
    /// directories must exist: a replica under a function's cgroup, as the gateway lays them
    /// out. Only the leaf is removed on drop.
    pub fn at(rel: &str) -> Self {
        let v2 = Path::new(V2_ROOT).join(rel);
        fs::create_dir(&v2).expect("create v2 cgroup");
        let mem = Path::new(MEM_ROOT).is_dir().then(|| {
            let m = Path::new(MEM_ROOT).join(rel);
            fs::create_dir(&m).expect("create memory cgroup");
            m
        });
        let name = v2
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .expect("cgroup name");
        Self { name, v2, mem }
    }

    pub fn replica(&self, mode: Mode) -> Replica {
        Replica {
            namespace: "tally-test".into(),
            function: self.name.clone(),
            replica: format!("{}-0", self.name),
            mode,
            cgroup_path: self.v2.clone(),
            cgroup_id: None,
            memory_cgroup_path: self.mem.clone(),
            memory_limit_bytes: None,
            pids: vec![],
            port: None,
            ready: true,
        }
    }

    /// A command whose process moves itself into this cgroup, then execs `program` — as
    /// the gateway starts fork-mode processes (moved in before exec).
    pub fn command(&self, program: &Path, args: &[String]) -> Command {
        self.command_via(None, program, args)
    }

    /// [`command`](Self::command) at SCHED_FIFO priority 1, set before the move (so the
    /// first exec inside the cgroup is still `program`'s): keeps the handler's own clock —
    /// the ground truth — free of run-queue waits when other work competes for the CPUs.
    pub fn command_fifo(&self, program: &Path, args: &[String]) -> Command {
        self.command_via(Some("/usr/bin/chrt"), program, args)
    }

    fn command_via(&self, chrt: Option<&str>, program: &Path, args: &[String]) -> Command {
        let mut script = format!("echo $$ > {}/cgroup.procs", self.v2.display());
        if let Some(m) = &self.mem {
            script += &format!(" && echo $$ > {}/cgroup.procs", m.display());
        }
        script += " && exec \"$0\" \"$@\"";
        let mut c = match chrt {
            Some(chrt) => {
                let mut c = Command::new(chrt);
                c.args(["-f", "1", "/bin/sh"]);
                c
            }
            None => Command::new("/bin/sh"),
        };
        c.arg("-c").arg(script).arg(program).args(args);
        c
    }

    fn pids(dir: &Path) -> Vec<i32> {
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = Self::pids(&self.v2);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir(&self.v2);
        if let Some(m) = &self.mem {
            for _ in 0..50 {
                if fs::remove_dir(m).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A child process killed on drop, with its stdout lines arriving on a channel.
pub struct Proc {
    pub child: Child,
    pub lines: std_mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    pub fn line(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .expect("fixture printed nothing in time")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Compiles a C fixture (static, optimised) once per test process.
pub fn fixture_c(name: &str) -> PathBuf {
    build_fixture(name, "c", |src, out| {
        let mut c = Command::new("cc");
        c.args(["-O2", "-static", "-o"]).arg(out).arg(src);
        c
    })
}

/// Compiles a std-only Rust fixture once per test process (static, optimised).
pub fn fixture_binary(name: &str) -> PathBuf {
    build_fixture(name, "rs", |src, out| {
        let mut c = Command::new("rustc");
        c.args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(out)
        .arg(src);
        c
    })
}

/// Builds `tests/fixtures/<name>.<ext>` with `compiler(src, out)` once per test process, into
/// a file of this process's own that is then renamed into place: a binary another test
/// process is executing is never rewritten under it (exec would fail with ETXTBSY).
fn build_fixture(name: &str, ext: &str, compiler: impl Fn(&Path, &Path) -> Command) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let src = fixture_path(&format!("{name}.{ext}"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    fs::create_dir_all(&out_dir).expect("fixture dir");
    let out = out_dir.join(name);
    let tmp = out_dir.join(format!("{name}.{}.tmp", std::process::id()));
    let status = compiler(&src, &tmp).status().expect("run the compiler");
    assert!(status.success(), "compiling fixture {name} failed");
    fs::rename(&tmp, &out).expect("install the fixture");
    built.push((name.into(), out.clone()));
    out
}

pub fn fixture_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file)
}

/// The agent with its real eBPF programs, fed by a fixed replica list, events to a channel.
pub struct TestAgent {
    pub workloads: FixedWorkloads,
    pub metrics: Arc<Metrics>,
    pub events: mpsc::UnboundedReceiver<UsageEvent>,
    synced: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), agent::Error>>>,
}

impl TestAgent {
    pub async fn start(replicas: Vec<Replica>) -> Self {
        Self::start_with(replicas, true).await
    }

    /// [`start`](Self::start), with or without the CPU-time (`sched_switch`) program.
    pub async fn start_with(replicas: Vec<Replica>, cpu_time: bool) -> Self {
        let kernel = agent::loader::load_with(cpu_time).expect("load and attach the eBPF programs");
        let workloads = FixedWorkloads::new(replicas);
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let (synced_tx, synced) = watch::channel(0);
        let options = RunOptions {
            poll_interval: Duration::from_millis(100),
            synced: Some(synced_tx),
            stats_interval: Duration::from_millis(500),
            bpf_stats: true,
        };
        let task = tokio::spawn(run(
            kernel,
            workloads.clone(),
            Arc::new(ChannelSink(tx)),
            metrics.clone(),
            options,
            stop_rx,
        ));
        let mut a = Self {
            workloads,
            metrics,
            events,
            synced,
            stop,
            task: Some(task),
        };
        a.wait_synced().await;
        a
    }

    /// Waits until the agent has applied the current replica list.
    pub async fn wait_synced(&mut self) {
        let now = *self.synced.borrow();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.synced.wait_for(|&n| n > now + 1),
        )
        .await;
    }

    /// The next event, or a panic after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> UsageEvent {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .expect("no usage event in time")
            .expect("agent stopped")
    }

    /// Events until `n` arrived or `timeout` passed.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<UsageEvent> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => out.push(ev),
                _ => break,
            }
        }
        out
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.await.expect("agent task").expect("agent run");
        }
    }
}

/// Ticks of time the hypervisor stole from every CPU so far (`/proc/stat`).
pub fn steal_ticks() -> u64 {
    fs::read_to_string("/proc/stat")
        .expect("read /proc/stat")
        .lines()
        .next()
        .and_then(|cpu| cpu.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .expect("steal column in /proc/stat")
}

/// Time stolen from every CPU since `steal_ticks()` read `since`, in ns, rounded up: steal
/// moves in whole ticks, so a run that saw any is granted one more tick per CPU.
pub fn stolen_since(since: u64) -> u64 {
    let ticks = steal_ticks().saturating_sub(since);
    if ticks == 0 {
        return 0;
    }
    // SAFETY: sysconf reads a constant and has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    (ticks + cpus) * (1_000_000_000 / hz)
}

/// Fails unless `got` is within `max(200 µs, 1 %)` of `want` (ns).
pub fn assert_duration(what: &str, got: u64, want: u64) {
    let tol = (want / 100).max(200_000);
    let diff = got.abs_diff(want);
    assert!(
        diff <= tol,
        "{what}: kernel {got} ns vs handler {want} ns: off by {diff} ns (> {tol})"
    );
}

/// Fails unless `got` is within 5 % of `want` (bytes).
pub fn assert_memory(what: &str, got: u64, want: u64) {
    let diff = got.abs_diff(want);
    assert!(
        diff * 20 <= want,
        "{what}: kernel peak {got} B vs VmHWM {want} B: off by {diff} B (> 5%)"
    );
}

/// CLOCK_MONOTONIC ns of an event's RFC 3339 `started` (the kernel's own clock).
pub fn mono_ns(started: &str) -> u64 {
    let wall = chrono::DateTime::parse_from_rfc3339(started)
        .expect("started is RFC 3339")
        .timestamp_nanos_opt()
        .expect("in range") as i128;
    (wall - agent::sys::realtime_offset_ns()) as u64
}

/// A minimal HTTP/1.1 keep-alive client: sends `GET path` with `X-Call-Id` on `s` and reads
/// the whole response (Content-Length or chunked). Returns (status, body bytes).
pub fn http_get(s: &mut std::net::TcpStream, path: &str, call_id: &str) -> (u16, usize) {
    use std::io::{Read as _, Write as _};
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Call-Id: {call_id}\r\n\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let fill = |s: &mut std::net::TcpStream, buf: &mut Vec<u8>, chunk: &mut Vec<u8>| {
        let n = s.read(chunk).expect("read response");
        assert!(n > 0, "server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        fill(s, &mut buf, &mut chunk);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .get(9..12)
        .and_then(|v| v.parse().ok())
        .expect("status line");
    let mut body = buf.split_off(head_end);
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while body.len() < len {
            fill(s, &mut body, &mut chunk);
        }
        return (status, len);
    }
    assert!(
        head.contains("transfer-encoding: chunked"),
        "neither length nor chunked"
    );
    let mut total = 0;
    let mut pos = 0;
    loop {
        let line_end = loop {
            if let Some(p) = body[pos..].windows(2).position(|w| w == b"\r\n") {
                break pos + p;
            }
            fill(s, &mut body, &mut chunk);
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[pos..line_end]).trim(), 16)
            .expect("chunk size");
        let need = line_end + 2 + size + 2;
        while body.len() < need {
            fill(s, &mut body, &mut chunk);
        }
        total += size;
        pos = need;
        if size == 0 {
            return (status, total);
        }
    }
}
