//! A throwaway PostgreSQL 15 cluster for tests and benchmarks: a temp dir owned by the
//! `postgres` user (commands run through `runuser`), loopback only, trust auth.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Why PostgreSQL cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    (!Path::new(PG_BIN).join("initdb").exists())
        .then(|| format!("{PG_BIN}/initdb not found (cargo xtask setup installs it)"))
}

/// What a commit promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synchronous commits, fsync off: an acknowledged commit survives a PostgreSQL crash,
    /// not a machine crash. Fast; what tests use.
    Test,
    /// PostgreSQL's defaults (fsync on): what benchmarks measure.
    Default,
}

/// A PostgreSQL cluster in a temp dir owned by `postgres`, on 127.0.0.1:`port`, trust auth.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    durability: Durability,
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(Durability::Test)
    }

    pub fn start_with(durability: Durability) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tally-e2e-pg-")
            .tempdir()
            .expect("temp dir");
        // `postgres` must be able to reach its directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod pg dir");
        let data = dir.path().join("data");
        run_as_postgres(
            "initdb",
            &[
                "-D",
                utf8(&data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-N",
                "-E",
                "UTF8",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let pg = Self {
            dir,
            port: crate::billing::free_port(),
            durability,
        };
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts) the server on the same port; waits until it is ready.
    /// Commits are synchronous (an acknowledged batch is in the WAL before the receiver
    /// answers 200); fsync is off, which only matters if the machine itself crashes.
    pub fn start_server(&self) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        if self.durability == Durability::Test {
            opts.push_str(" -c fsync=off -c full_page_writes=off");
        }
        let log = self.dir.path().join("server.log");
        run_as_postgres(
            "pg_ctl",
            &[
                "-D",
                utf8(&self.data()),
                "-o",
                &opts,
                "-l",
                utf8(&log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Fast shutdown: sessions are terminated, like a PostgreSQL restart in production.
    pub fn stop_server(&self) {
        run_as_postgres(
            "pg_ctl",
            &["-D", utf8(&self.data()), "-m", "fast", "-w", "stop"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Immediate stop: every backend dies mid-transaction, like a crash; the next start
    /// runs crash recovery from the WAL.
    pub fn crash_server(&self) {
        run_as_postgres(
            "pg_ctl",
            &["-D", utf8(&self.data()), "-m", "immediate", "-w", "stop"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql; the rows, one line each, columns separated by tabs.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .args(["-p", &self.port.to_string()])
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-F",
                "\t",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 from psql")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = run_as_postgres(
            "pg_ctl",
            &["-D", utf8(&self.data()), "-m", "immediate", "-w", "stop"],
        );
    }
}

fn run_as_postgres(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join(tool))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {tool}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
