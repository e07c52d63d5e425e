//! `syscalls:sys_enter_exit_group`: remembers a metered process's exit code (a process
//! killed by a signal never gets here and keeps -1). Rare, so a `syscalls:*` tracepoint of
//! its own rather than a program at the entry of every syscall.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::PROCS;

/// Offset of `error_code` in the tracepoint record (see its `format` file).
const ERROR_CODE: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_enter_exit_group")]
pub fn tally_exit_group(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Only metered (fork-mode) processes have an entry: no cgroup lookup needed.
    let Some(p) = PROCS.get_ptr_mut(tgid) else {
        return 0;
    };
    // SAFETY: reading the tracepoint record at an offset from its format file.
    let code = unsafe { ctx.read_at::<u64>(ERROR_CODE) }.unwrap_or(0);
    // SAFETY: `p` points into PROCS; only this process writes its exit code.
    unsafe { (*p).exit_code = (code & 0xff) as i32 };
    0
}
