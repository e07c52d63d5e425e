//! The billing side of the metering end-to-end tests, as real processes: a throwaway
//! PostgreSQL 15 cluster (run as the `postgres` user, loopback only), the
//! `billing-receiver` binary, and an external `nats-server -js` whose store survives its
//! restarts. Everything is stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::postgres::Postgres;
use crate::root;
use crate::stack::client;

/// Builds the binaries these tests run (debug) once per test process: the gateway, the
/// billing receiver and the tiny http-mode function `hello-rust`.
pub fn build() -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet"])
            .args([
                "-p",
                "gateway",
                "-p",
                "billing-receiver",
                "-p",
                "hello-rust",
            ])
            .current_dir(root())
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "building gateway, billing-receiver and hello-rust failed"
        );
    });
    root().join("target/debug")
}

/// True when PostgreSQL 15 and nats-server are installed; otherwise says why not.
pub fn can_bill(test: &str) -> bool {
    if let Some(why) = crate::postgres::missing() {
        eprintln!("SKIPPED {test}: {why}");
        return false;
    }
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED {test}: nats-server not found (cargo xtask setup installs it)");
        return false;
    }
    true
}

/// A free loopback port (bound and released: a race is possible but unlikely here).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("pick a free port")
}

/// Waits until `127.0.0.1:port` accepts connections.
pub fn wait_listening(port: u16, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `billing-receiver serve` process on a fixed loopback port.
pub struct Receiver {
    pub port: u16,
    database_url: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Receiver {
    /// Starts it with `secret_file`, logging to `log`; waits until it listens.
    pub fn start(database_url: &str, secret_file: &Path, log: &Path) -> Self {
        let mut r = Self {
            port: free_port(),
            database_url: database_url.to_string(),
            log: log.to_path_buf(),
            child: None,
        };
        r.spawn(secret_file);
        r
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) on the same port with `secret_file`.
    pub fn spawn(&mut self, secret_file: &Path) {
        assert!(self.child.is_none(), "the receiver is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("receiver log");
        let child = Command::new(build().join("billing-receiver"))
            .arg("serve")
            .args([
                "--listen",
                &self.addr(),
                "--database-url",
                &self.database_url,
            ])
            .arg("--secret-file")
            .arg(secret_file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start billing-receiver");
        self.child = Some(child);
        wait_listening(self.port, Duration::from_secs(30), "billing-receiver");
    }

    /// SIGTERM and wait (it finishes in-flight batches within its grace).
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            crate::stack::terminate(c, Duration::from_secs(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An external `nats-server -js` with its store in a temp dir and a monitoring port.
pub struct Nats {
    pub port: u16,
    monitor_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tally-e2e-nats-")
            .tempdir()
            .expect("temp dir");
        let mut n = Self {
            port: free_port(),
            monitor_port: free_port(),
            dir,
            child: None,
        };
        n.spawn();
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log");
        let child = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(self.dir.path().join("store"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        wait_listening(self.port, Duration::from_secs(30), "nats-server");
    }

    /// A clean restart on the same port with the same store.
    pub fn restart(&mut self, down_for: Duration) {
        if let Some(c) = self.child.take() {
            crate::stack::terminate(c, Duration::from_secs(20));
        }
        std::thread::sleep(down_for);
        self.spawn();
    }

    /// JetStream's view of `stream`: (messages stored, messages its consumers have not
    /// acked yet). `None` while the server or the stream is not there.
    pub fn stream_state(&self, stream: &str) -> Option<(u64, u64)> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?streams=true&consumers=true",
            self.monitor_port
        );
        let mut r = client().get(&url).call().ok()?;
        let jsz: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
        let accounts = jsz["account_details"].as_array()?;
        let s = accounts
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == stream)?;
        let messages = s["state"]["messages"].as_u64().unwrap_or(0);
        let unacked = s["consumer_detail"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                c["num_pending"].as_u64().unwrap_or(0) + c["num_ack_pending"].as_u64().unwrap_or(0)
            })
            .sum();
        Some((messages, unacked))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One row of `function_usage`, the columns the test checks.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub id: String,
    pub call_id: String,
    pub function_name: String,
    pub duration_ns: u64,
    pub billed_duration_ms: u64,
    pub memory_bytes: u64,
    pub source: String,
}

/// Every row of `function_usage`.
pub fn usage_rows(pg: &Postgres) -> Vec<UsageRow> {
    let text = pg.query(
        "SELECT id, coalesce(call_id, ''), function_name, duration_ns, billed_duration_ms, \
         memory_bytes, source FROM function_usage",
    );
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            assert_eq!(c.len(), 7, "unexpected psql row {l:?}");
            let num = |s: &str| -> u64 {
                s.parse()
                    .unwrap_or_else(|_| panic!("not a number {s:?} in row {l:?}"))
            };
            UsageRow {
                id: c[0].to_string(),
                call_id: c[1].to_string(),
                function_name: c[2].to_string(),
                duration_ns: num(c[3]),
                billed_duration_ms: num(c[4]),
                memory_bytes: num(c[5]),
                source: c[6].to_string(),
            }
        })
        .collect()
}

/// Rows in `function_usage` (`None` while PostgreSQL does not answer).
pub fn row_count(pg: &Postgres) -> Option<u64> {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &pg.port.to_string()])
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-c",
            "SELECT count(*) FROM function_usage",
        ])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `billing-receiver report` over `[from, to)`: its TOTAL line's columns after the label
/// (invocations, duration s, billed s, GB-s limit, GB-s peak, peak measured), and the
/// whole table.
pub fn report_total(database_url: &str, from: &str, to: &str) -> (Vec<String>, String) {
    let out = Command::new(build().join("billing-receiver"))
        .args([
            "report",
            "--database-url",
            database_url,
            "--from",
            from,
            "--to",
            to,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run billing-receiver report");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "billing-receiver report failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = text
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL line in the report:\n{text}"));
    let cols = total.split_whitespace().skip(1).map(String::from).collect();
    (cols, text)
}

/// `n / 1024³ / 1000` as a decimal with `places` digits, rounded half up — GB-seconds
/// from a sum of `billed_ms × memory_bytes`, in integers only.
pub fn gb_s_decimal(ms_bytes: u128, places: u32) -> String {
    let denom: u128 = 1000 * (1u128 << 30);
    let scale = 10u128.pow(places);
    let scaled = (ms_bytes * scale * 2 + denom) / (denom * 2);
    format!(
        "{}.{:0width$}",
        scaled / scale,
        scaled % scale,
        width = places as usize
    )
}

#[cfg(test)]
mod tests {
    use super::gb_s_decimal;

    #[test]
    fn gb_seconds_in_integers() {
        // 1 s at 1 GiB is 1 GB-s; 1 ms at 128 MiB is 0.000125 GB-s.
        assert_eq!(gb_s_decimal(1000 * (1 << 30), 6), "1.000000");
        assert_eq!(gb_s_decimal(128 << 20, 6), "0.000125");
        assert_eq!(gb_s_decimal(128 << 20, 3), "0.000");
        assert_eq!(gb_s_decimal(3 * 1000 * (1 << 30) / 2, 1), "1.5");
    }
}
