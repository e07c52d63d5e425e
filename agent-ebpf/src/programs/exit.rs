//! `sched:sched_process_exit`: when the last thread of a metered process exits, its record
//! (exec → exit, peak RSS of its address space, exit code) goes to user space; an http-mode
//! replica's exit is noted for the sweep of its connections. The exit code is the argument
//! of the `exit_group(2)` (or last thread's `exit(2)`) the task is in, still in its saved
//! user registers; a process killed by a signal keeps -1.

use agent_common::{ProcessRecord, mode, stat};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{
    EXITED, MMS, PROCESS_EVENTS, PROCESS_WAKE_AT, PROCS, count, now, regs, tgids, wakeup_flags,
    watched,
};

/// x86_64 syscall numbers of `exit` and `exit_group`.
const NR_EXIT: u64 = 60;
const NR_EXIT_GROUP: u64 = 231;

/// Offsets in the tracepoint record (see its `format` file).
const PID: usize = 24;
const GROUP_DEAD: usize = 32;

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn tally_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: reading the tracepoint record at offsets from its format file.
    let (pid, group_dead) = unsafe {
        (
            ctx.read_at::<i32>(PID).unwrap_or(0) as u32,
            ctx.read_at::<u8>(GROUP_DEAD).unwrap_or(0),
        )
    };
    // The number is free for a process that may have nothing to do with the replicas: the
    // tgid of a whole process, the tid of a thread (marked at its clone, see `fork`).
    let freed = if group_dead != 0 { tgid } else { pid };
    if tgids::marked(freed) {
        tgids::mark(freed, false);
    }
    let Some((_, m)) = watched() else { return 0 };
    if m == mode::FORK
        && let Some(p) = PROCS.get_ptr_mut(tgid)
        && let Some(r) = regs::current(pid_tgid)
        && (r.orig_ax == NR_EXIT_GROUP || (r.orig_ax == NR_EXIT && group_dead != 0))
    {
        // SAFETY: `p` points into PROCS; only this process writes its exit code.
        unsafe { (*p).exit_code = (r.di & 0xff) as i32 };
    }
    if group_dead == 0 {
        // A thread: drop the entry sched_process_fork made for it, if any.
        if pid != tgid {
            let _ = PROCS.remove(pid);
        }
        return 0;
    }
    if m == mode::HTTP {
        // Its sockets close without close(2): user space ends their open exchanges then.
        let _ = EXITED.insert(tgid, now(), 0);
        return 0;
    }
    let Some(p) = PROCS.get_ptr_mut(tgid) else {
        return 0;
    };
    // SAFETY: `p` points into PROCS and the process is exiting: nothing else writes it.
    unsafe {
        super::cpu::settle(p, true);
        (*p).end_ns = now();
        if let Some(mm) = MMS.get((*p).mm_id) {
            (*p).peak_rss_bytes = mm.peak;
        }
        if PROCESS_EVENTS
            .output::<ProcessRecord>(&*p, wakeup_flags(&PROCESS_EVENTS, PROCESS_WAKE_AT))
            .is_err()
        {
            count(&ctx, stat::PROCESS_RINGBUF_FULL);
        }
    }
    let _ = PROCS.remove(tgid);
    0
}
