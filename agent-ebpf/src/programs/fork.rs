//! `sched:sched_process_fork`: a child of a metered fork-mode process is metered too, as
//! part of the same invocation (flagged CHILD, carrying its parent's call id). Every child of
//! a watched replica is marked in `TGIDS`.

use agent_common::{mode, proc_flag, stat};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{PROCS, count, now, proc_entry, tgids, watched};

/// Offset of `child_pid` in the tracepoint record.
const CHILD_PID: usize = 20;

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn tally_fork(ctx: TracePointContext) -> u32 {
    let Some((cgroup_id, m)) = watched() else {
        return 0;
    };
    // SAFETY: reading the tracepoint record at an offset from its format file.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(CHILD_PID) }) else {
        return 0;
    };
    // A new process (or thread: its tid is marked too, and unmarked at its first hot hook
    // should that number ever be a tgid outside the replicas) of a watched replica.
    tgids::mark(child as u32, true);
    if m != mode::FORK {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(parent) = PROCS.get_ptr(tgid) else {
        return 0;
    };
    let Some(c) = proc_entry(child as u32) else {
        count(&ctx, stat::PROCESS_MAP_FULL);
        return 0;
    };
    // SAFETY: both pointers come from PROCS lookups; the child has not run yet.
    unsafe {
        (*c).flags |= proc_flag::CHILD;
        (*c).cgroup_id = cgroup_id;
        (*c).start_ns = now();
        (*c).cpu_ns = 0;
        (*c).call_id = (*parent).call_id;
        (*c).call_id_len = (*parent).call_id_len;
    }
    0
}
