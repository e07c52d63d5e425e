//! The kernel's process filter (`TGIDS`, one byte per tgid), mapped into user space: marks
//! the processes already in a cgroup when the agent starts watching it (see
//! `agent-ebpf/src/programs/tgids.rs` for who else marks and unmarks).

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{Map, MapData};
use memmap2::{MmapMut, MmapOptions};

use crate::error::Error;

/// The map's name in the object.
pub const MAP: &str = "TGIDS";
/// Highest `pid_max` there can be (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u32 = 4_194_304;

/// Elements (8 tgids each) the map needs for this node's `pid_max`.
pub fn slots() -> u32 {
    let pid_max = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(PID_MAX_LIMIT)
        .clamp(8, PID_MAX_LIMIT);
    pid_max.div_ceil(8)
}

/// The map, writable a byte at a time.
pub struct Tgids {
    bytes: MmapMut,
    /// Keeps the map (and so the mapping's object) alive with the agent.
    _map: MapData,
}

impl Tgids {
    pub fn new(map: Map) -> Result<Self, Error> {
        let Map::Array(data) = map else {
            return Err(Error::MissingMap(MAP));
        };
        let len = data.info()?.max_entries() as usize * 8;
        // SAFETY: the map is an mmap-able array of `len` bytes (BPF_F_MMAPABLE, value size
        // 8); the kernel programs store whole bytes, as `mark` does, and nothing truncates it.
        let bytes = unsafe {
            MmapOptions::new()
                .len(len)
                .map_mut(data.fd().as_fd().as_raw_fd())?
        };
        Ok(Self { bytes, _map: data })
    }

    /// Marks `tgid` as a process that may be in a watched cgroup.
    pub fn mark(&mut self, tgid: u32) {
        if let Some(b) = self.bytes.get_mut(tgid as usize) {
            // SAFETY: a one-byte store into the mapping; volatile, as the kernel reads it.
            unsafe { std::ptr::write_volatile(b, 1) };
        }
    }

    /// Marks every process in the cgroup directory `path` (its `cgroup.procs`; a cgroup
    /// gone meanwhile has none to mark).
    pub fn mark_cgroup(&mut self, path: &Path) {
        let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) else {
            return;
        };
        for tgid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            self.mark(tgid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_pid_max() {
        let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(slots() * 8 >= pid_max);
        assert!(slots() * 8 < pid_max + 8);
    }
}
