//! Records of running replica processes in the data directory, so a gateway that
//! crashed can find and stop its orphans at the next start even without cgroups.

use std::fs;
use std::path::PathBuf;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub struct PidFiles {
    dir: PathBuf,
}

impl PidFiles {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Notes that `replica` runs as process (group) `pid`, with the process's start time.
    pub fn record(&self, replica: &str, pid: u32) {
        if let Some(start) = start_time(pid) {
            let _ = fs::write(self.dir.join(replica), format!("{pid} {start}\n"));
        }
    }

    pub fn remove(&self, replica: &str) {
        let _ = fs::remove_file(self.dir.join(replica));
    }

    /// Kills every recorded process group whose leader is still the same process
    /// (same start time), and forgets all records. Returns how many it killed.
    pub fn clean_up_all(&self) -> usize {
        let mut killed = 0;
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut parts = text.split_whitespace();
            let pid: Option<u32> = parts.next().and_then(|p| p.parse().ok());
            let start: Option<u64> = parts.next().and_then(|s| s.parse().ok());
            if let (Some(pid), Some(start)) = (pid, start)
                && start_time(pid) == Some(start)
                && let Ok(raw) = i32::try_from(pid)
                && killpg(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
            {
                killed += 1;
            }
            let _ = fs::remove_file(entry.path());
        }
        killed
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let p = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    Some(p.stat().ok()?.starttime)
}
