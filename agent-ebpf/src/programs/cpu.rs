//! `sched:sched_switch`: on-CPU time of metered fork-mode processes. Each CPU remembers which
//! marked thread it switched to and when; when a metered thread is switched out, the slice is
//! added to its process. A switch between two threads not marked in `TGIDS` (every other
//! process of the node) costs two bytes of that map and no clock read or hash lookup.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{ONCPU, PROCS, now, tgids};

/// Offsets in the tracepoint record (see its `format` file).
const PREV_PID: usize = 24;
const NEXT_PID: usize = 56;

/// A pid of the record, loaded from the context itself (a tracepoint program may): no
/// helper call on the path every context switch of the node takes.
#[inline(always)]
fn pid_at(ctx: &TracePointContext, offset: usize) -> u32 {
    // SAFETY: an aligned 4-byte field inside the record, as its format file lays it out.
    let pid =
        unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<i32>()) };
    pid.max(0) as u32
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn tally_switch(ctx: TracePointContext) -> u32 {
    // Threads are marked by their tid (at their clone), processes by their tgid (= the tid
    // of their first thread): both pids of the record can be looked up as they are.
    let prev = pid_at(&ctx, PREV_PID);
    let next = pid_at(&ctx, NEXT_PID);
    let prev_marked = prev != 0 && tgids::marked(prev);
    let next_marked = next != 0 && tgids::marked(next);
    if !prev_marked && !next_marked {
        return 0;
    }
    let Some(slot) = ONCPU.get_ptr_mut(0) else {
        return 0;
    };
    let t = now();
    // SAFETY: `slot` is this CPU's own entry; `p` points into PROCS.
    unsafe {
        // The tracepoint runs in the context of the thread switched out.
        if prev_marked
            && (*slot).tid == prev
            && (*slot).since != 0
            && let Some(p) = PROCS.get_ptr_mut((bpf_get_current_pid_tgid() >> 32) as u32)
        {
            (*p).cpu_ns += t - (*slot).since;
        }
        // Only a marked thread's slice can be counted: for any other, no start is kept.
        (*slot).tid = if next_marked { next } else { 0 };
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
