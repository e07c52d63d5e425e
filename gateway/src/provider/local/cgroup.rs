//! cgroups for replicas: detects the layout (v2, v1 or hybrid), creates one directory
//! per replica in every hierarchy, applies limits, reads usage and cleans up.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// v1 controllers a replica joins (and whose files it uses).
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    V2,
    V1,
    Hybrid,
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::V2 => "v2",
            Mode::V1 => "v1",
            Mode::Hybrid => "hybrid",
            Mode::None => "none",
        }
    }
}

/// Where each hierarchy is mounted, and the name of our parent directory in each.
#[derive(Debug, Clone)]
pub struct Layout {
    unified: Option<PathBuf>,
    v1: Vec<(Vec<String>, PathBuf)>,
    parent: String,
    mode: Mode,
}

/// Limits applied to a replica's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
}

impl Layout {
    /// Reads the mounts, then checks that a directory can be made under `parent`.
    pub fn detect(parent: &str) -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut layout = Self::from_mountinfo(&mountinfo, parent);
        let probe = layout.hierarchy_roots();
        let writable =
            !probe.is_empty() && probe.iter().all(|root| fs::create_dir_all(root).is_ok());
        if !writable {
            layout.unified = None;
            layout.v1.clear();
            layout.mode = Mode::None;
        }
        layout
    }

    fn from_mountinfo(mountinfo: &str, parent: &str) -> Self {
        let mut unified = None;
        let mut v1: Vec<(Vec<String>, PathBuf)> = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or_default();
            let options = right.nth(1).unwrap_or_default();
            match fstype {
                "cgroup2" => unified = Some(PathBuf::from(mount_point)),
                "cgroup" => {
                    let controllers: Vec<String> = options
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(String::from)
                        .collect();
                    if !controllers.is_empty()
                        && !v1.iter().any(|(_, p)| p == Path::new(mount_point))
                    {
                        v1.push((controllers, PathBuf::from(mount_point)));
                    }
                }
                _ => {}
            }
        }
        let mode = match (&unified, v1.is_empty()) {
            (Some(_), true) => Mode::V2,
            (Some(_), false) => Mode::Hybrid,
            (None, false) => Mode::V1,
            (None, true) => Mode::None,
        };
        Self {
            unified,
            v1,
            parent: parent.to_string(),
            mode,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn unified_root(&self) -> Option<&Path> {
        self.unified.as_deref()
    }

    /// Our parent directory in every hierarchy.
    fn hierarchy_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.unified.iter().map(|u| u.join(&self.parent)).collect();
        roots.extend(self.v1.iter().map(|(_, p)| p.join(&self.parent)));
        roots
    }

    fn v1_dir(&self, controller: &str, rel: &Path) -> Option<PathBuf> {
        self.v1
            .iter()
            .find(|(cs, _)| cs.iter().any(|c| c == controller))
            .map(|(_, p)| p.join(&self.parent).join(rel))
    }

    /// Creates `<parent>/<rel>` in every hierarchy and applies `limits`.
    pub fn create(&self, rel: &Path, limits: Limits) -> io::Result<ReplicaCgroup> {
        let mut cg = ReplicaCgroup::default();
        if self.mode == Mode::None {
            return Ok(cg);
        }
        if let Some(root) = &self.unified {
            let dir = root.join(&self.parent).join(rel);
            enable_v2_controllers(root, &self.parent, rel);
            fs::create_dir_all(&dir)?;
            cg.id = Some(fs::metadata(&dir)?.ino());
            if self.v1.is_empty() {
                cg.memory = Some((dir.clone(), true));
                cg.cpu = Some((dir.clone(), true));
            }
            cg.unified = Some(dir.clone());
            cg.dirs.push(dir);
        }
        for (_, mount) in &self.v1 {
            let dir = mount.join(&self.parent).join(rel);
            fs::create_dir_all(&dir)?;
            cg.dirs.push(dir);
        }
        if let Some(dir) = self.v1_dir("memory", rel) {
            cg.memory = Some((dir, false));
        }
        if let Some(dir) = self.v1_dir("cpuacct", rel) {
            cg.cpu = Some((dir, false));
        }
        cg.limits = limits;
        cg.apply_limits(self.v1_dir("cpu", rel))?;
        Ok(cg)
    }

    /// Kills every process left under our parent and removes its directories
    /// (orphans of a gateway that crashed). Returns how many processes it killed.
    pub fn clean_up_all(&self) -> usize {
        self.hierarchy_roots()
            .iter()
            .map(|root| remove_tree(root, false))
            .sum()
    }
}

/// On pure v2, turns on memory and cpu for children along `parent/rel`, where offered.
fn enable_v2_controllers(root: &Path, parent: &str, rel: &Path) {
    let mut dir = root.to_path_buf();
    let mut steps: Vec<PathBuf> = vec![PathBuf::from(parent)];
    let mut acc = PathBuf::new();
    for c in rel.components() {
        acc.push(c);
        steps.push(Path::new(parent).join(&acc));
    }
    steps.pop();
    let wanted = ["memory", "cpu"];
    for step in std::iter::once(None).chain(steps.iter().map(Some)) {
        if let Some(step) = step {
            dir = root.join(step);
            let _ = fs::create_dir_all(&dir);
        }
        let offered = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for c in wanted {
            if offered.split_whitespace().any(|o| o == c) {
                let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
            }
        }
    }
}

/// One replica's directories, in every hierarchy.
#[derive(Debug, Default)]
pub struct ReplicaCgroup {
    dirs: Vec<PathBuf>,
    unified: Option<PathBuf>,
    id: Option<u64>,
    /// The directory with memory files, and whether it is v2.
    memory: Option<(PathBuf, bool)>,
    /// The directory with CPU usage, and whether it is v2.
    cpu: Option<(PathBuf, bool)>,
    limits: Limits,
}

impl ReplicaCgroup {
    /// The v2 directory (what the agent matches with `bpf_get_current_cgroup_id`).
    pub fn unified_path(&self) -> Option<&Path> {
        self.unified.as_deref()
    }

    /// The v2 directory's inode number: the kernel's cgroup id.
    pub fn id(&self) -> Option<u64> {
        self.id
    }

    pub fn memory_path(&self) -> Option<&Path> {
        self.memory.as_ref().map(|(p, _)| p.as_path())
    }

    fn apply_limits(&self, v1_cpu: Option<PathBuf>) -> io::Result<()> {
        if let (Some(bytes), Some((dir, v2))) = (self.limits.memory_bytes, &self.memory) {
            let file = if *v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            write_if_present(&dir.join(file), &bytes.to_string())?;
        }
        if let Some(millis) = self.limits.cpu_millis {
            let quota = millis * CPU_PERIOD_US / 1000;
            match (&v1_cpu, &self.cpu) {
                (Some(dir), _) => {
                    write_if_present(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write_if_present(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                (None, Some((dir, true))) => {
                    write_if_present(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The memory limit in force, as the kernel reports it (None when unlimited).
    pub fn memory_limit(&self) -> Option<u64> {
        let (dir, v2) = self.memory.as_ref()?;
        let file = if *v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let value: u64 = fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // v1 reports "unlimited" as a huge page-aligned number.
        (value < (1 << 62)).then_some(value)
    }

    /// Memory charged to the replica now, in bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        let (dir, v2) = self.memory.as_ref()?;
        let file = if *v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    }

    /// CPU time used by the replica's processes so far, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        let (dir, v2) = self.cpu.as_ref()?;
        if *v2 {
            let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(usec * 1000)
        } else {
            fs::read_to_string(dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok()
        }
    }

    /// Process ids in the replica (from its first hierarchy).
    pub fn pids(&self) -> Vec<u32> {
        self.dirs.first().map(|d| read_pids(d)).unwrap_or_default()
    }

    /// `cgroup.procs` of every hierarchy, opened for writing by the gateway, so a child
    /// can move itself in before exec (the kernel checks the opener's credentials).
    pub fn procs_files(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// The paths of those files.
    pub fn procs_paths(&self) -> Vec<std::path::PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Kills whatever still runs in the replica and removes its directories, then the
    /// function's and namespace's directories if they became empty.
    pub fn remove(&self) {
        for dir in &self.dirs {
            remove_tree(dir, true);
            let mut up = dir.parent();
            for _ in 0..2 {
                match up {
                    Some(p) if fs::remove_dir(p).is_ok() => up = p.parent(),
                    _ => break,
                }
            }
        }
    }
}

fn write_if_present(path: &Path, value: &str) -> io::Result<()> {
    match fs::write(path, value) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn read_pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills the processes in `dir` and below, then removes the directories bottom-up;
/// `dir` itself only when `remove_top`.
fn remove_tree(dir: &Path, remove_top: bool) -> usize {
    let mut killed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                killed += remove_tree(&entry.path(), true);
            }
        }
    }
    for _ in 0..100 {
        let pids = read_pids(dir);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if let Ok(raw) = i32::try_from(pid)
                && kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
            {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if remove_top {
        let _ = fs::remove_dir(dir);
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
37 25 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
38 25 0:33 / /sys/fs/cgroup/devices rw,relatime shared:13 - cgroup cgroup rw,devices
";

    #[test]
    fn detects_hybrid_layout() {
        let l = Layout::from_mountinfo(HYBRID, "tally");
        assert_eq!(l.mode(), Mode::Hybrid);
        assert_eq!(l.unified_root(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(l.v1.len(), 2, "devices is not used");
        assert_eq!(
            l.v1_dir("cpuacct", Path::new("ns/f/r")),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/tally/ns/f/r"))
        );
    }

    #[test]
    fn detects_pure_v2() {
        let l = Layout::from_mountinfo(
            "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
            "tally",
        );
        assert_eq!(l.mode(), Mode::V2);
    }
}
