//! `sched:sched_switch`: on-CPU time of metered fork-mode processes. Each CPU remembers which
//! thread it switched to and when; when a metered thread is switched out, the slice is added
//! to its process. Everyone else pays the cgroup lookup and one per-CPU write.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{ONCPU, PROCS, now, watched};

/// Offsets in the tracepoint record (see its `format` file).
const PREV_PID: usize = 24;
const NEXT_PID: usize = 56;

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn tally_switch(ctx: TracePointContext) -> u32 {
    let Some(slot) = ONCPU.get_ptr_mut(0) else {
        return 0;
    };
    let t = now();
    // SAFETY: reading the tracepoint record; `slot` is this CPU's own entry.
    unsafe {
        let prev = ctx.read_at::<i32>(PREV_PID).unwrap_or(-1) as u32;
        if watched().is_some() && (*slot).tid == prev && (*slot).since != 0 {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if let Some(p) = PROCS.get_ptr_mut(tgid) {
                (*p).cpu_ns += t - (*slot).since;
            }
        }
        (*slot).tid = ctx.read_at::<i32>(NEXT_PID).unwrap_or(-1) as u32;
        (*slot).since = t;
    }
    0
}

/// Closes the running slice of the current thread into its process (at exit), or restarts it
/// (at exec, so that time before the exec is not counted).
#[inline(always)]
pub fn settle(p: *mut agent_common::ProcessRecord, count_it: bool) {
    let Some(slot) = ONCPU.get_ptr_mut(0) else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    let t = now();
    // SAFETY: `slot` is this CPU's entry; `p` points into PROCS.
    unsafe {
        if count_it && (*slot).tid == tid && (*slot).since != 0 {
            (*p).cpu_ns += t - (*slot).since;
        }
        (*slot).tid = tid;
        (*slot).since = t;
    }
}
