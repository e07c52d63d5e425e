//! `sched:sched_process_exec`: a fork-mode process starts being metered at its first exec
//! inside a watched cgroup (the gateway moves it into the replica's cgroup before exec), and
//! the call id the gateway put in its environment (`Http_X_Call_Id=`) is read off the new
//! program's stack, where the exec has just laid out `argc`, `argv` and `envp`.

use agent_common::{CALL_ID_ENV, CALL_ID_LEN, ProcessRecord, mode, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_probe_read_user_str},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{count, now, proc_entry, regs, watched_or_discover};

/// Environment entries looked at.
const MAX_ENV: usize = 128;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn tally_exec(ctx: TracePointContext) -> u32 {
    let Some((cgroup_id, m)) = watched_or_discover(&ctx) else {
        return 0;
    };
    if m != mode::FORK {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
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
        if (*p).call_id_len == 0
            && let Some(r) = regs::current(pid_tgid)
        {
            read_call_id(p, r.sp);
        }
    }
    0
}

/// Copies the value of `Http_X_Call_Id=` in the environment of a program whose stack
/// pointer is `sp` right after its exec (`argc`, `argv[argc]`, NULL, then `envp`) into `p`.
#[inline(always)]
fn read_call_id(p: *mut ProcessRecord, sp: u64) {
    // SAFETY: user memory is read through the checked helper only.
    let Ok(argc) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else {
        return;
    };
    let envp = sp.wrapping_add(argc.wrapping_add(2).wrapping_mul(8));
    for i in 0..MAX_ENV {
        // SAFETY: as above.
        let Ok(s) = (unsafe { bpf_probe_read_user((envp as *const u64).wrapping_add(i)) }) else {
            return;
        };
        if s == 0 {
            return;
        }
        // SAFETY: as above.
        let Ok(head) = (unsafe { bpf_probe_read_user(s as *const [u8; 16]) }) else {
            continue;
        };
        if head[..CALL_ID_ENV.len()] != *CALL_ID_ENV {
            continue;
        }
        let value = s + CALL_ID_ENV.len() as u64;
        // SAFETY: `p` points into PROCS; the helper writes at most CALL_ID_LEN bytes into
        // the entry's call_id array and returns the length including the NUL.
        unsafe {
            let n = bpf_probe_read_user_str(
                (*p).call_id.as_mut_ptr().cast(),
                CALL_ID_LEN as u32,
                value as *const _,
            );
            (*p).call_id_len = if n > 1 { (n - 1) as u32 } else { 0 };
        }
        return;
    }
}
