//! `syscalls:sys_enter_exit_group`: remembers a metered process's exit code (a process
//! killed by a signal never gets here and keeps -1).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{PROCS, watched};

const ERROR_CODE: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_enter_exit_group")]
pub fn tally_exit_group(ctx: TracePointContext) -> u32 {
    if watched().is_none() {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(p) = PROCS.get_ptr_mut(tgid) else {
        return 0;
    };
    // SAFETY: reading the tracepoint record; `p` points into PROCS.
    unsafe {
        let code = ctx.read_at::<i64>(ERROR_CODE).unwrap_or(0);
        (*p).exit_code = (code & 0xff) as i32;
    }
    0
}
