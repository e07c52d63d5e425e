//! Fixtures for the gateway's integration tests: a real `gateway` process on a loopback
//! port with its own data directory and cgroup parent, and a client that knows its
//! credentials. Every gateway, process and cgroup a test starts is cleaned up on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub const SERVER_PY: &str = include_str!("../fixtures/server.py");

pub struct TestGateway {
    pub url: String,
    pub data: tempfile::TempDir,
    pub cgroup_parent: String,
    pub args: Vec<String>,
    child: Option<Child>,
    pub http: reqwest::Client,
    password: String,
}

impl TestGateway {
    /// Starts a gateway with short timeouts suited to tests, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let data = tempfile::Builder::new()
            .prefix("tally-gw-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let cgroup_parent = format!("tally-test-{}-{n}", std::process::id());
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let functions = data.path().join("functions");
        std::fs::create_dir_all(&functions).unwrap();
        write_exec(&functions.join("server.py"), SERVER_PY);
        let mut gw = Self {
            url: String::new(),
            data,
            cgroup_parent,
            args,
            child: None,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            password: String::new(),
        };
        gw.spawn();
        gw
    }

    /// Starts the gateway process (again) on the same data directory.
    pub fn spawn(&mut self) {
        let listen = if self.url.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.url.trim_start_matches("http://").to_string()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &listen, "--data-dir"])
            .arg(self.data.path())
            .args(["--cgroup-parent", &self.cgroup_parent])
            .args(&self.args)
            .env("RUST_LOG", "warn")
            // Short defaults for tests; flags in `args` override them.
            .env("read_timeout", "5s")
            .env("write_timeout", "10s")
            .env("upstream_timeout", "8s")
            .env("TALLY_READY_WAIT", "10s")
            .env("TALLY_STARTUP_TIMEOUT", "10s")
            // Tests that are not about autoscaling must not see replica counts move.
            .env("TALLY_AUTOSCALER", "off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gateway");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("gateway printed nothing").unwrap();
        let url = first
            .strip_prefix("tally gateway listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        std::thread::spawn(move || for _ in lines {});
        self.url = url;
        self.child = Some(child);
        // A fresh pool: connections to an earlier gateway process are dead.
        self.http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        self.password =
            std::fs::read_to_string(self.data.path().join("secrets/basic-auth-password"))
                .unwrap_or_default()
                .trim()
                .to_string();
    }

    pub fn functions_dir(&self) -> PathBuf {
        self.data.path().join("functions")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("gateway did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// `kill -9`: no chance to clean up.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.basic_auth("admin", Some(&self.password))
    }

    pub fn get_sys(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.get(self.url(path)))
    }

    pub async fn deploy(&self, body: Value) -> reqwest::Response {
        self.auth(self.http.post(self.url("/system/functions")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Deploys and asserts 202.
    pub async fn deploy_ok(&self, body: Value) {
        let r = self.deploy(body.clone()).await;
        let status = r.status();
        assert_eq!(
            status,
            202,
            "deploy {body}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    pub async fn scale(&self, name: &str, replicas: u64) -> reqwest::Response {
        self.auth(
            self.http
                .post(self.url(&format!("/system/scale-function/{name}"))),
        )
        .json(&json!({"serviceName": name, "replicas": replicas}))
        .send()
        .await
        .unwrap()
    }

    pub async fn describe(&self, name: &str) -> Value {
        let r = self
            .get_sys(&format!("/system/function/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "describe {name}");
        r.json().await.unwrap()
    }

    /// Waits until `name` has `n` available replicas.
    pub async fn wait_available(&self, name: &str, n: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = self.describe(name).await;
            if status["availableReplicas"] == n {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {n} available: {status}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn invoke(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/function/{path}")))
            .send()
            .await
            .unwrap()
    }

    /// `POST /system/usage` with `events` as a JSON array (as an agent with
    /// `--ingest-format json` sends them).
    pub async fn post_usage(&self, events: &Value) -> reqwest::Response {
        self.auth(self.http.post(self.url("/system/usage")))
            .json(events)
            .send()
            .await
            .unwrap()
    }

    /// `GET {path}` with credentials, its body as JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.get_sys(path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /system/usage?{query}`: the kept usage events.
    pub async fn usage(&self, query: &str) -> Vec<Value> {
        self.get_json(&format!("/system/usage?{query}")).await
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn replicas(&self) -> Value {
        self.get_json("/system/replicas").await
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.crash();
        } else {
            self.stop();
        }
        remove_cgroups(&self.cgroup_parent);
        // A gateway killed with -9 leaves its embedded nats-server behind.
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

/// Removes whatever is left of a test's cgroup tree (after a crash, say).
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
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
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

pub fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A fork-mode function running `script` with sh.
pub fn fork_fn(name: &str, script: &str) -> Value {
    json!({"service": name, "image": format!("test/{name}:1"), "envProcess": format!("sh -c '{script}'")})
}

/// An http-mode function running the fixture server.
pub fn http_fn(name: &str) -> Value {
    json!({"service": name, "image": format!("test/{name}:1"), "envProcess": "/usr/bin/python3 server.py",
           "envVars": {"mode": "http"}})
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The value of a metric line with exactly these labels, e.g. `name{a="b"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// A real nats-server with JetStream on a loopback port (one node, or one of a cluster).
pub struct TestNats {
    pub url: String,
    pub port: u16,
    args: Vec<String>,
    pub store: tempfile::TempDir,
    child: Option<Child>,
}

impl TestNats {
    pub fn start() -> Self {
        Self::start_with(free_port(), Vec::new())
    }

    fn start_with(port: u16, extra: Vec<String>) -> Self {
        let store = tempfile::Builder::new()
            .prefix("tally-nats-")
            .tempdir()
            .unwrap();
        let mut n = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            args: extra,
            store,
            child: None,
        };
        n.spawn();
        n
    }

    /// Three nodes clustered on loopback; returns them and the URL list for clients.
    pub fn cluster() -> (Vec<TestNats>, String) {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r)| format!("nats://127.0.0.1:{r}"))
            .collect();
        let nodes: Vec<TestNats> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, route))| {
                let extra = vec![
                    "-n".into(),
                    format!("node{i}"),
                    "--cluster_name".into(),
                    "tally-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    routes.join(","),
                ];
                Self::start_with(*client, extra)
            })
            .collect();
        let urls = nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",");
        (nodes, urls)
    }

    pub fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (run `cargo xtask setup`)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A callback received by [`CallbackSink`].
#[derive(Debug, Clone)]
pub struct Received {
    pub call_id: String,
    pub status: String,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub at: Instant,
}

/// An HTTP server on loopback that records every callback POSTed to it.
pub struct CallbackSink {
    pub url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    /// Status the sink answers with (to test callback retries).
    pub answer: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl CallbackSink {
    pub async fn start() -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/callback", listener.local_addr().unwrap());
        let got: std::sync::Arc<std::sync::Mutex<Vec<Received>>> = Default::default();
        let answer = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (got2, answer2) = (got.clone(), answer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (got, answer) = (got2.clone(), answer2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (got, answer) = (got.clone(), answer.clone());
                            async move {
                                let at = Instant::now();
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let h = |k: &str| {
                                    parts
                                        .headers
                                        .get(k)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_string()
                                };
                                let code = answer.load(std::sync::atomic::Ordering::SeqCst);
                                got.lock().unwrap().push(Received {
                                    call_id: h("x-call-id"),
                                    status: h("x-function-status"),
                                    headers: parts.headers.clone(),
                                    body,
                                    at,
                                });
                                let mut r = http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { url, got, answer }
    }

    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until callbacks for `n` distinct call ids arrived.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let all = self.all();
            let ids: std::collections::HashSet<&str> =
                all.iter().map(|r| r.call_id.as_str()).collect();
            if ids.len() >= n {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} callbacks within {limit:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_call(&self, call_id: &str, limit: Duration) -> Received {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.all().into_iter().find(|r| r.call_id == call_id) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no callback for {call_id} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl TestGateway {
    /// `POST /async-function/{path}` with a callback to `callback`.
    pub async fn enqueue(
        &self,
        path: &str,
        callback: Option<&str>,
        body: &'static str,
    ) -> reqwest::Response {
        let mut rb = self
            .http
            .post(self.url(&format!("/async-function/{path}")))
            .body(body);
        if let Some(cb) = callback {
            rb = rb.header("X-Callback-Url", cb);
        }
        rb.send().await.unwrap()
    }

    pub async fn call_status(&self, call_id: &str) -> Value {
        let r = self
            .get_sys(&format!("/system/async/{call_id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "status of {call_id}");
        r.json().await.unwrap()
    }

    /// Waits until the async API answers (the gateway connects to NATS in the background).
    pub async fn wait_async_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self
                .get_sys("/system/async-dead-letters")
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "async API never became ready: {}",
                r.text().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl CallbackSink {
    pub async fn wait_call_where(
        &self,
        f: impl Fn(&Received) -> bool,
        limit: Duration,
    ) -> Received {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.all().into_iter().find(|r| f(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no matching callback within {limit:?}: {:?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
