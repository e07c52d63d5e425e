//! execve entry (through [`super::syscalls`]): reads the call id the gateway put in the new
//! program's environment (`Http_X_Call_Id=`), so each fork-mode process carries its
//! invocation.

use agent_common::{CALL_ID_ENV, CALL_ID_LEN, mode, stat};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_user, generated::bpf_probe_read_user_str},
};

use super::{count, proc_entry};

/// Environment entries looked at.
const MAX_ENV: usize = 128;

/// An execve in a fork-mode replica (`m`), `envp` its third argument.
#[inline(always)]
pub fn enter<C: EbpfContext>(ctx: &C, pid_tgid: u64, m: u32, envp: u64) {
    if m != mode::FORK {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = proc_entry(tgid) else {
        count(ctx, stat::PROCESS_MAP_FULL);
        return;
    };
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
