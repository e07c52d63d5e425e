//! Fixtures for the end-to-end tests in `tests/tests/`: running the project's own
//! commands (`cargo xtask ...`) from the workspace root and reading what they print,
//! (`stack`) a real gateway and node agent as processes, and for the exactly-once billing
//! run (`billing`) PostgreSQL, the billing receiver and NATS as processes, (`faults`) a
//! switchable fault proxy in front of the receiver, (`load`) a paced invocation load and
//! (`http1`) a minimal keep-alive HTTP/1.1 client for load generators.

pub mod billing;
pub mod faults;
pub mod http1;
pub mod load;
pub mod postgres;
pub mod stack;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The workspace root.
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A running command whose stdout lines arrive on a channel; SIGTERM on drop.
pub struct Running {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn cargo(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(root())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run cargo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    /// Lines up to and including the first that contains `needle`.
    pub fn until(&self, needle: &str, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within {limit:?}; saw {seen:#?}"),
            }
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}
