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
        self.get_sys("/system/replicas")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
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
