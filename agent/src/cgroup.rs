//! The node's cgroup layout (v2, v1, hybrid) and the two facts the agent reads from it: a
//! replica's cgroup id (the v2 directory's inode) and its memory limit.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::error::Error;

/// Where cgroup v2 lives on this node, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Pure v2 at `/sys/fs/cgroup`.
    V2(PathBuf),
    /// v1 controllers plus a v2 hierarchy (no controllers) at `/sys/fs/cgroup/unified`.
    Hybrid(PathBuf),
    /// v1 only: `bpf_get_current_cgroup_id` has nothing to report, the agent cannot filter.
    V1,
}

/// Looks at `/sys/fs/cgroup` to find which layout this node uses.
pub fn detect() -> Layout {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").is_file() {
        Layout::V2(root.into())
    } else if root.join("unified/cgroup.procs").is_file() {
        Layout::Hybrid(root.join("unified"))
    } else {
        Layout::V1
    }
}

/// The id `bpf_get_current_cgroup_id()` reports for tasks in the v2 cgroup at `path`.
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| Error::Cgroup {
            path: path.into(),
            source,
        })
}

/// Limits at or above this are "no limit" (the kernel reports PAGE_COUNTER_MAX rounded).
const UNLIMITED: u64 = 1 << 62;

/// The memory limit of a replica: v2 `memory.max` in its cgroup, else v1
/// `memory.limit_in_bytes` in its memory cgroup; `None` when unlimited or unknown.
pub fn memory_limit(cgroup: &Path, memory_cgroup: Option<&Path>) -> Option<u64> {
    let v2 = fs::read_to_string(cgroup.join("memory.max")).ok();
    let v1 =
        || memory_cgroup.and_then(|m| fs::read_to_string(m.join("memory.limit_in_bytes")).ok());
    parse_limit(&v2.or_else(v1)?)
}

/// Parses a limit file's content (`max`, or bytes).
pub fn parse_limit(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    s.parse::<u64>().ok().filter(|&v| v < UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("134217728\n"), Some(134_217_728));
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_limit("garbage"), None);
    }
}
