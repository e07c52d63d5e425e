//! `sched:sched_process_exec`: a fork-mode process starts being metered at its first exec
//! inside a watched cgroup (the gateway moves it into the replica's cgroup before exec).

use agent_common::{mode, stat};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{count, now, proc_entry, watched_or_discover};

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn tally_exec(ctx: TracePointContext) -> u32 {
    let Some((cgroup_id, m)) = watched_or_discover(&ctx) else {
        return 0;
    };
    if m != mode::FORK {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(p) = proc_entry(tgid) else {
        count(&ctx, stat::PROCESS_MAP_FULL);
        return 0;
    };
    // SAFETY: `p` points into PROCS; only this process's own events touch its entry.
    unsafe {
        if (*p).start_ns == 0 {
            (*p).start_ns = now();
            (*p).cgroup_id = cgroup_id;
            (*p).cpu_ns = 0;
            super::cpu::settle(p, false);
        }
    }
    0
}
