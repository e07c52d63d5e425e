//! `syscalls:sys_enter_execve`: reads the call id the gateway put in the new program's
//! environment (`Http_X_Call_Id=`), so each fork-mode process carries its invocation.

use agent_common::{CALL_ID_ENV, CALL_ID_LEN, mode, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_probe_read_user_str},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{count, proc_entry, watched_or_discover};

/// Offset of `envp` in the tracepoint record (see its `format` file).
const ENVP: usize = 32;
/// Environment entries looked at.
const MAX_ENV: usize = 128;

#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn tally_execve(ctx: TracePointContext) -> u32 {
    let Some((_, m)) = watched_or_discover(&ctx) else {
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
    // SAFETY: reading the tracepoint record at an offset from its format file.
    let Ok(envp) = (unsafe { ctx.read_at::<u64>(ENVP) }) else {
        return 0;
    };
    if envp == 0 {
        return 0;
    }
    for i in 0..MAX_ENV {
        // SAFETY: user memory is read through the checked helper only.
        let Ok(s) = (unsafe { bpf_probe_read_user((envp as *const u64).wrapping_add(i)) }) else {
            return 0;
        };
        if s == 0 {
            return 0;
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
        return 0;
    }
    0
}
