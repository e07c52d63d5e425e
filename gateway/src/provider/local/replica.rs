//! One replica: its cgroup, its load, and (in http mode) the supervisor that starts the
//! process on a fresh PORT, waits until it listens, and restarts it with backoff.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncRead;
use tokio::process::Child;
use tokio::sync::watch;

use super::Shared;
use super::cgroup::ReplicaCgroup;
use super::spawn;
use super::spec::{RunMode, RunSpec};
use crate::names::FunctionRef;
use crate::provider::{ForkLauncher, ReplicaLoad};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run this long counts as healthy: the next crash starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
/// Time between SIGTERM and SIGKILL when a replica stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct Replica {
    pub name: String,
    pub function: FunctionRef,
    pub spec: Arc<RunSpec>,
    pub cgroup: ReplicaCgroup,
    procs: Arc<spawn::CgroupProcs>,
    pub load: Arc<ReplicaLoad>,
    ready: AtomicBool,
    draining: AtomicBool,
    port: AtomicU16,
    /// `127.0.0.1:PORT` of the running process, made once per start.
    authority: Mutex<http::uri::Authority>,
    pid: AtomicU32,
    restarts: AtomicU64,
    message: Mutex<Option<String>>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// The http-mode supervisor, awaited when the replica retires.
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Replica {
    /// Creates the replica's cgroup; a fork-mode replica is ready at once.
    pub fn new(
        shared: Arc<Shared>,
        function: FunctionRef,
        name: String,
        spec: Arc<RunSpec>,
    ) -> std::io::Result<Arc<Self>> {
        let rel = std::path::Path::new(function.namespace.as_str())
            .join(function.name.as_str())
            .join(&name);
        let cgroup = shared.layout.create(&rel, spec.limits)?;
        let procs = Arc::new(spawn::CgroupProcs {
            files: cgroup.procs_files()?,
            paths: cgroup.procs_paths(),
        });
        let replica = Arc::new(Self {
            name,
            function,
            ready: AtomicBool::new(spec.mode == RunMode::Fork),
            spec,
            cgroup,
            procs,
            load: Arc::default(),
            draining: AtomicBool::new(false),
            port: AtomicU16::new(0),
            authority: Mutex::new(http::uri::Authority::from_static("127.0.0.1")),
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            message: Mutex::new(None),
            shared,
            stop: watch::channel(false).0,
            supervisor: Mutex::new(None),
        });
        if replica.spec.mode == RunMode::Http {
            let task = tokio::spawn(replica.clone().supervise());
            *replica.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        } else {
            replica.shared.tick();
        }
        Ok(replica)
    }

    /// Ready and not draining: may take new requests.
    pub fn routable(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn authority(&self) -> http::uri::Authority {
        self.authority
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn port(&self) -> Option<u16> {
        Some(self.port.load(Ordering::Acquire))
            .filter(|p| *p != 0 && self.spec.mode == RunMode::Http)
    }

    pub fn message(&self) -> Option<String> {
        self.message
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn set_message(&self, text: Option<String>) {
        if let Some(t) = &text {
            tracing::warn!(function = %self.function, replica = %self.name, "{t}");
            self.shared
                .logs
                .push(&self.function, &self.name, &format!("[tally] {t}"));
        }
        *self.message.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.shared.tick();
    }

    /// Stops routing to the replica, waits up to `grace` for its requests to finish,
    /// then stops its process and removes its cgroup.
    pub async fn retire(self: Arc<Self>, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        self.shared.tick();
        if !self.load.drained(grace).await {
            tracing::warn!(replica = %self.name, "requests still in flight after {grace:?}; stopping anyway");
        }
        self.stop.send_replace(true);
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match supervisor {
            Some(task) => {
                let _ = task.await;
            }
            None => self.finish(),
        }
    }

    fn finish(&self) {
        self.ready.store(false, Ordering::Release);
        self.cgroup.remove();
        self.shared.pidfiles.remove(&self.name);
        self.shared.tick();
    }

    async fn supervise(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = BACKOFF_START;
        while !*stop.borrow() {
            let started = Instant::now();
            let outcome = self.run_once(&mut stop).await;
            self.set_ready(false);
            self.port.store(0, Ordering::Release);
            self.pid.store(0, Ordering::Release);
            self.shared.pidfiles.remove(&self.name);
            match outcome {
                None => break,
                Some(why) => {
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    if started.elapsed() > HEALTHY_RUN {
                        backoff = BACKOFF_START;
                    }
                    self.set_message(Some(format!("{why}; restarting in {backoff:?}")));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                () = crate::until_true(&mut stop) => break,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.finish();
    }

    /// Runs the process once. `None` when asked to stop; otherwise why it ended.
    async fn run_once(&self, stop: &mut watch::Receiver<bool>) -> Option<String> {
        let port = match free_port() {
            Ok(p) => p,
            Err(e) => return Some(format!("no free port for the replica: {e}")),
        };
        let env = self
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain([("PORT".to_string(), port.to_string())]);
        let mut cmd = spawn::command(
            &self.spec.argv,
            &self.shared.cwd,
            env,
            self.shared.run_as,
            self.procs.clone(),
        );
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Some(format!("could not start {:?}: {e}", self.spec.argv[0])),
        };
        let pid = child.id().unwrap_or(0);
        self.pid.store(pid, Ordering::Release);
        self.shared.pidfiles.record(&self.name, pid);
        self.pipe_output(&mut child);

        let deadline = self.shared.startup_timeout;
        tokio::select! {
            listening = wait_listening(port, deadline) => {
                if !listening {
                    stop_child(&mut child).await;
                    return Some(format!("did not listen on PORT {port} within {deadline:?}"));
                }
            }
            status = child.wait() => {
                return Some(format!("exited at start ({}) before listening on PORT", describe(status)));
            }
            () = crate::until_true(stop) => {
                stop_child(&mut child).await;
                return None;
            }
        }
        self.port.store(port, Ordering::Release);
        if let Ok(a) = http::uri::Authority::try_from(format!("127.0.0.1:{port}")) {
            *self.authority.lock().unwrap_or_else(|p| p.into_inner()) = a;
        }
        self.set_message(None);
        self.set_ready(true);
        tokio::select! {
            status = child.wait() => Some(format!("exited ({})", describe(status))),
            () = crate::until_true(stop) => {
                stop_child(&mut child).await;
                None
            }
        }
    }

    fn pipe_output(&self, child: &mut Child) {
        if let Some(out) = child.stdout.take() {
            self.forward_lines(out);
        }
        if let Some(err) = child.stderr.take() {
            self.forward_lines(err);
        }
    }

    fn forward_lines(&self, stream: impl AsyncRead + Unpin + Send + 'static) {
        let (shared, function, name) = (
            self.shared.clone(),
            self.function.clone(),
            self.name.clone(),
        );
        tokio::spawn(crate::logs::pump_lines(stream, move |line| {
            shared.logs.push(&function, &name, line);
        }));
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Acquire)).filter(|p| *p != 0)
    }
}

impl ForkLauncher for Replica {
    fn command(&self, cgi_env: &[(String, String)]) -> tokio::process::Command {
        let env = self
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(cgi_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        spawn::per_request_command(
            &self.spec.argv,
            &self.shared.cwd,
            env,
            self.shared.run_as,
            self.procs.clone(),
        )
    }

    fn log_stderr(&self, text: &str) {
        self.shared.logs.push(&self.function, &self.name, text);
    }

    fn content_type(&self) -> Option<&str> {
        self.spec.env.get("content_type").map(String::as_str)
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}

/// SIGTERM to the process group, then SIGKILL after the grace period.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return;
        }
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Polls until something accepts connections on `port` (1 ms at first, then up to 20 ms apart).
async fn wait_listening(port: u16, limit: Duration) -> bool {
    let probe = async {
        let mut delay = Duration::from_millis(1);
        loop {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    };
    tokio::time::timeout(limit, probe).await.is_ok()
}
