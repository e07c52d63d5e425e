//! A real gateway and a real node agent as processes, for the metering end-to-end tests:
//! debug binaries built on demand, loopback ports, a data directory, cgroups and a spool
//! that are all removed on drop.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::root;

/// The Python http-mode function the tests deploy (`ok_server.py` in the functions dir).
pub const OK_SERVER_PY: &str = include_str!("fixtures/ok_server.py");

/// True when the metering tests can run here; otherwise prints why they skip.
pub fn can_meter(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED {test}: needs root (the agent loads eBPF programs; replicas get cgroups)"
        );
        return false;
    }
    true
}

static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`binaries`] build and run optimized binaries in this test process: for load
/// tests, where a debug gateway (several times the CPU per call) would be what is measured.
pub fn use_release_binaries() {
    RELEASE.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Builds the gateway and the agent once per test process; their paths. Debug builds,
/// unless [`use_release_binaries`] or `TALLY_E2E_RELEASE=1` asks for optimized ones.
pub fn binaries() -> (PathBuf, PathBuf) {
    static BUILT: [std::sync::OnceLock<()>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let release = RELEASE.load(std::sync::atomic::Ordering::SeqCst)
        || std::env::var("TALLY_E2E_RELEASE").is_ok_and(|v| v == "1");
    BUILT[usize::from(release)].get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "gateway", "-p", "agent"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(root()).status().expect("run cargo build");
        assert!(
            status.success(),
            "building the gateway and the agent failed"
        );
    });
    let bin = root().join(if release {
        "target/release"
    } else {
        "target/debug"
    });
    (bin.join("gateway"), bin.join("agent"))
}

/// A ureq agent that returns non-2xx statuses instead of failing on them.
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

/// A gateway process with its own data directory and cgroup parent.
pub struct Gateway {
    pub url: String,
    pub listen: String,
    pub data: tempfile::TempDir,
    pub cgroup_parent: String,
    pub auth: String,
    /// Further flags given at every (re)start.
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl Gateway {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts with further flags (kept for restarts), e.g. `--nats-url`.
    pub fn start_with(name: &str, extra_args: &[String]) -> Self {
        let data = tempfile::Builder::new()
            .prefix("tally-e2e-gw-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod data dir");
        let functions = data.path().join("functions");
        std::fs::create_dir_all(&functions).expect("functions dir");
        std::fs::write(functions.join("ok_server.py"), OK_SERVER_PY).expect("write server");
        let mut gw = Self {
            url: String::new(),
            listen: "127.0.0.1:0".into(),
            data,
            cgroup_parent: format!("tally-e2e-{name}-{}", std::process::id()),
            auth: String::new(),
            extra_args: extra_args.to_vec(),
            child: None,
        };
        gw.spawn();
        gw
    }

    /// Starts the process (again, on the same address and data directory).
    pub fn spawn(&mut self) {
        let (gateway, _) = binaries();
        let mut child = Command::new(gateway)
            .args(["--listen", &self.listen, "--data-dir"])
            .arg(self.data.path())
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start gateway");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines
            .next()
            .expect("gateway printed nothing")
            .expect("read");
        self.url = first
            .strip_prefix("tally gateway listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        self.listen = self.url.trim_start_matches("http://").to_string();
        std::thread::spawn(move || lines.for_each(drop));
        let password =
            std::fs::read_to_string(self.data.path().join("secrets/basic-auth-password"))
                .expect("admin password");
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("admin:{}", password.trim()));
        self.auth = format!("Basic {token}");
        self.child = Some(child);
    }

    pub fn secrets(&self) -> PathBuf {
        self.data.path().join("secrets")
    }

    /// `kill -9`: its replicas keep running (a clean stop would retire them).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (it retires its replicas).
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, Duration::from_secs(30));
        }
    }

    /// A `/system/...` call with admin auth; (status, JSON body or Null).
    pub fn system(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let c = client();
        let url = format!("{}{path}", self.url);
        let resp = match (method, body) {
            ("GET", _) => c.get(&url).header("Authorization", &self.auth).call(),
            (_, b) => c
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(b.unwrap_or(Value::Null)),
        };
        let mut r = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn deploy(&self, body: Value) {
        let (status, _) = self.system("POST", "/system/functions", Some(body.clone()));
        assert_eq!(status, 202, "deploy {body}");
    }

    /// Waits until `/function/{name}` answers 200.
    pub fn wait_ready(&self, name: &str) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = c
                .get(&format!("{}/function/{name}", self.url))
                .header("X-Call-Id", format!("warmup-{name}"))
                .call()
                .is_ok_and(|r| r.status() == 200);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "{name} never answered 200");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Usage events the gateway holds for `query` (e.g. `function=f&limit=10`).
    pub fn usage(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.system("GET", &format!("/system/usage?{query}"), None);
        assert_eq!(status, 200, "GET /system/usage?{query}");
        body.as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.crash();
        } else {
            self.stop();
        }
        remove_cgroups(&self.cgroup_parent);
        // A crashed gateway leaves its embedded nats-server behind.
        let pid_file = self.data.path().join("nats/nats-server.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.contains(self.data.path().to_str().unwrap_or("-")) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// SIGTERM, then `kill -9` if `c` has not exited within `grace`; reaps it.
pub fn terminate(mut c: Child, grace: Duration) {
    signal(&c, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while c.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.wait();
}

fn signal(c: &Child, s: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), s);
}

/// Runs [`remove_cgroups`] on drop: declared before the gateway given that parent, it goes
/// after it, whether the test or benchmark passed or not.
pub struct RemoveCgroups(pub String);

impl Drop for RemoveCgroups {
    fn drop(&mut self) {
        remove_cgroups(&self.0);
    }
}

/// Removes whatever is left of a cgroup tree (after a crash, say), killing its processes.
pub fn remove_cgroups(parent: &str) {
    for root in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ] {
        let dir = Path::new(root).join(parent);
        if dir.exists() {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
    {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node agent as a process beside `gateway`, with its own spool directory and
/// `/metrics` port; SIGTERM on drop.
pub struct Agent {
    pub metrics_url: String,
    pub spool: tempfile::TempDir,
    child: Option<Child>,
}

impl Agent {
    /// Starts the agent with `extra` flags and waits until its programs are attached.
    pub fn start(gateway: &Gateway, extra: &[&str]) -> Self {
        Self::start_polling(gateway, 200, extra)
    }

    /// [`start`](Self::start), polling the gateway's replica list every `poll_ms`.
    pub fn start_polling(gateway: &Gateway, poll_ms: u64, extra: &[&str]) -> Self {
        let (_, agent) = binaries();
        let spool = tempfile::Builder::new()
            .prefix("tally-e2e-spool-")
            .tempdir()
            .expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(agent)
            .args(["--gateway-url", &gateway.url])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .arg("--secret-mount-path")
            .arg(gateway.secrets())
            .arg("--spool-dir")
            .arg(spool.path())
            .args(["--poll-interval-ms", &poll_ms.to_string()])
            .args(extra)
            // Not the warning at each failed replica poll (every 200 ms in an outage).
            .env("RUST_LOG", "warn,agent::run=error")
            .spawn()
            .expect("start agent");
        let a = Self {
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            spool,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while a.metrics_text().is_none() {
            assert!(
                Instant::now() < deadline,
                "the agent did not serve /metrics within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        a
    }

    pub fn metrics_text(&self) -> Option<String> {
        let mut r = client().get(&self.metrics_url).call().ok()?;
        r.body_mut().read_to_string().ok()
    }

    /// The sum of every sample of metric `name` (all label sets).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().expect("agent /metrics");
        sum_metric(&text, name)
    }

    /// SIGTERM and wait: the agent flushes (or spools) its last events.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The sum of every sample of `name` in a Prometheus text exposition.
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
