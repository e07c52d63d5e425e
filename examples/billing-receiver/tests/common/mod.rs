//! Test fixtures: a throwaway PostgreSQL 15 cluster (run as the `postgres` user, loopback only)
//! and the receiver itself on port 0; both are stopped and cleaned up on drop.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use billing_receiver::db::{self, Pool};
use billing_receiver::signature::Secret;
use billing_receiver::{ServerConfig, run};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster in a temp dir owned by `postgres`, listening on 127.0.0.1:`port`.
pub struct TestPg {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl TestPg {
    /// Returns `None` (and says why) when PostgreSQL 15 is not installed.
    pub fn start() -> Option<Self> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            eprintln!("SKIP: {PG_BIN}/initdb not found (apt-get install postgresql)");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("billing-pg-")
            .tempdir()
            .expect("create temp dir");
        let pg_uid = uid_of("postgres");
        chown(dir.path(), Some(pg_uid.0), Some(pg_uid.1)).expect("chown temp dir to postgres");
        let data = dir.path().join("data");
        run_as_postgres(
            "initdb",
            &[
                "-D",
                path(&data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-N",
                "-E",
                "UTF8",
            ],
        );
        let port = free_port();
        let pg = Self { dir, port };
        pg.start_server();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts after `stop`) the server on the same port; waits until ready.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        run_as_postgres(
            "pg_ctl",
            &[
                "-D",
                path(&self.data()),
                "-o",
                &opts,
                "-l",
                path(&log),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// Fast shutdown: terminates sessions, like a PostgreSQL restart in production.
    pub fn stop_server(&self) {
        run_as_postgres(
            "pg_ctl",
            &["-D", path(&self.data()), "-m", "fast", "-w", "stop"],
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A fresh pool for direct queries from the test.
    pub fn pool(&self) -> Pool {
        Pool::new(&self.url(), 2).expect("valid url")
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .args(["-D", path(&self.data()), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // TempDir removes the directory (we are root, so ownership does not matter).
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn run_as_postgres(tool: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join(tool))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn uid_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("id {flag} {user}"))
    };
    (id("-u"), id("-g"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("pick a free port")
}

/// The receiver running in this process on 127.0.0.1:0.
pub struct TestReceiver {
    pub addr: SocketAddr,
    pub secret: Secret,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub const SECRET: &[u8] = b"test-secret-0123456789\n";

impl TestReceiver {
    pub async fn start(pg: &TestPg) -> Self {
        Self::start_with(pg, ServerConfig::default()).await
    }

    pub async fn start_with(pg: &TestPg, config: ServerConfig) -> Self {
        let pool = Pool::new(&pg.url(), 4).expect("valid url");
        db::migrate::run(&pool).await.expect("migrations apply");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let secret = Secret::from_file_bytes(SECRET);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, pool, secret.clone(), config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            secret,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Posts a correctly signed body on a fresh connection.
    pub async fn post(&self, body: impl Into<Bytes>) -> (u16, Value) {
        self.post_signed(body.into(), None).await
    }

    /// Posts with an explicit signature header (`None` = omit it).
    pub async fn post_signed(
        &self,
        body: Bytes,
        signature: Option<Option<String>>,
    ) -> (u16, Value) {
        let mut client = billing_receiver::client::WebhookClient::connect(&self.url())
            .await
            .expect("connect to receiver");
        let reply = client
            .post(body, &self.secret, signature)
            .await
            .expect("receiver answers");
        let body = serde_json::from_slice(&reply.body)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&reply.body)}));
        (reply.status.as_u16(), body)
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("receiver stops within its grace")
                .expect("receiver task did not panic");
        }
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A plausible event; `i` varies duration, memory and peak so sums are non-trivial.
pub fn event(id: &str, namespace: &str, function: &str, started: &str, i: i64) -> Value {
    let duration = 1_000_000 + i * 7_654_321;
    let memory = [134_217_728_i64, 268_435_456, 1_073_741_824][(i % 3) as usize];
    json!({
        "event": "function_usage", "id": id, "namespace": namespace, "function_name": function,
        "started": started, "duration": duration,
        "memory_bytes": memory,
        "call_id": format!("call-{id}"), "status_code": 200,
        "memory_peak_bytes": if i % 4 == 0 { Value::Null } else { json!(10_000_000 + (i % 97) * 1_234_567) },
        "cpu_ns": null, "cold_start": i % 5 == 0,
        "init_duration_ns": if i % 5 == 0 { json!(250_000_000) } else { Value::Null },
        "billed_duration_ms": (duration + 999_999) / 1_000_000,
        "source": if i % 4 == 0 { "gateway" } else { "kernel" },
        "future_field": "ignored"
    })
}

/// `n` events with ids `{prefix}-{i}` in `openfaas-fn`/`env`.
pub fn batch(prefix: &str, n: i64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                "openfaas-fn",
                "env",
                "2026-11-22T10:00:00.123456789Z",
                i,
            )
        })
        .collect()
}

pub fn body(events: &[Value]) -> Bytes {
    Bytes::from(serde_json::to_vec(events).expect("serialize events"))
}

/// Rows in `function_usage`.
pub async fn count_rows(pool: &Pool) -> i64 {
    let mut conn = pool.get().await.expect("db connection");
    conn.client()
        .query_one("SELECT count(*) FROM function_usage", &[])
        .await
        .expect("count")
        .get(0)
}
