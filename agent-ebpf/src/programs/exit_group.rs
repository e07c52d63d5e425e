//! exit_group entry (through [`super::syscalls`]): remembers a metered process's exit code (a
//! process killed by a signal never gets here and keeps -1).

use super::PROCS;

/// `exit_group(code)` in a watched replica.
#[inline(always)]
pub fn enter(pid_tgid: u64, code: u64) {
    let tgid = (pid_tgid >> 32) as u32;
    let Some(p) = PROCS.get_ptr_mut(tgid) else {
        return;
    };
    // SAFETY: `p` points into PROCS; only this process writes its exit code.
    unsafe { (*p).exit_code = (code & 0xff) as i32 };
}
