//! `syscalls:sys_enter_execve`: reads the call id the gateway put in the new program's
//! environment (`Http_X_Call_Id=`), so each fork-mode process carries its invocation. (A
//! `syscalls:*` tracepoint rather than a program at the entry of every syscall: execs are
//! rare, and any other syscall pays only the kernel's test of its own number.)

use agent_common::{CALL_ID_ENV, CALL_ID_LEN, ProcessRecord, mode, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_probe_read_user_str},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{count, proc_entry, watched_or_discover};

/// Environment entries looked at.
const MAX_ENV: usize = 128;

/// Offset of `envp` in the tracepoint record (see its `format` file).
const ENVP: usize = 32;

/// An execve: in a fork-mode replica (a new one is discovered here), the call id in the
/// environment it is handed.
#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn tally_execve(ctx: TracePointContext) -> u32 {
    let Some((_, m)) = watched_or_discover(&ctx) else {
        return 0;
    };
    if m != mode::FORK {
        return 0;
    }
    // SAFETY: reading the tracepoint record at an offset from its format file.
    let envp = unsafe { ctx.read_at::<u64>(ENVP) }.unwrap_or(0);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(p) = proc_entry(tgid) else {
        count(&ctx, stat::PROCESS_MAP_FULL);
        return 0;
    };
    read_call_id(p, envp);
    0
}

/// Copies the value of `Http_X_Call_Id=` in the environment `envp` into `p`.
#[inline(always)]
fn read_call_id(p: *mut ProcessRecord, envp: u64) {
    if envp == 0 {
        return;
    }
    for i in 0..MAX_ENV {
        // SAFETY: user memory is read through the checked helper only.
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
