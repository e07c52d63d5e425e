//! The process filter in front of the cgroup lookup: [`TGIDS`](super::TGIDS) holds a byte
//! per tgid, set for every process that may be in a watched replica's cgroup.
//!
//! Who marks a process: the exec that starts a replica (`watched_or_discover`), the fork of
//! a marked process's child (`sched_process_fork`), a move into a watched cgroup
//! (`cgroup:cgroup_attach_task`, this file), and user space for the processes already in a
//! cgroup when it starts watching it. Who unmarks: the process's exit, and a hot hook that
//! finds a marked process outside every watched cgroup. One byte per tgid, so that the
//! kernel and user space (through `mmap`) each store whole bytes and never lose each other's
//! updates.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{TGIDS, WATCHED};

/// Whether `tgid` may be in a watched cgroup (a tgid past the map's end always may).
#[inline(always)]
pub fn marked(tgid: u32) -> bool {
    match TGIDS.get(tgid >> 3) {
        Some(bytes) => bytes[(tgid & 7) as usize] != 0,
        None => true,
    }
}

#[inline(always)]
pub fn mark(tgid: u32, on: bool) {
    if let Some(bytes) = TGIDS.get_ptr_mut(tgid >> 3) {
        // SAFETY: a one-byte store into map memory; other bytes of the element are other
        // processes', stored on their own.
        unsafe { core::ptr::write_volatile(&mut (*bytes)[(tgid & 7) as usize], u8::from(on)) };
    }
}

/// Marks the current process.
#[inline(always)]
pub fn mark_current() {
    mark((bpf_get_current_pid_tgid() >> 32) as u32, true);
}

/// Offsets in the `cgroup_attach_task` record (see its `format` file).
const DST_ID: usize = 16;
const PID: usize = 24;

/// `cgroup:cgroup_attach_task`: a process (its leader's pid, i.e. its tgid, for a move
/// through `cgroup.procs`) moved into a cgroup; marked if that cgroup is watched.
#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn tally_attach(ctx: TracePointContext) -> u32 {
    // SAFETY: reading the tracepoint record at offsets from its format file.
    let (dst, pid) = unsafe {
        (
            ctx.read_at::<u64>(DST_ID).unwrap_or(0),
            ctx.read_at::<i32>(PID).unwrap_or(0),
        )
    };
    // SAFETY: plain u32 values.
    if pid > 0 && unsafe { WATCHED.get(&dst) }.is_some() {
        mark(pid as u32, true);
    }
    0
}
