//! The current task's saved user registers (x86_64 `struct pt_regs`), found from the task
//! through the layout user space calibrated, so hooks other than the syscall tracepoints
//! (the socket and sched ones) can read a syscall's arguments or a new program's stack.
//!
//! This kernel has no BTF-typed programs (`bpf_task_pt_regs`), so the layout is measured
//! once at start-up instead: [`tally_calibrate`] runs at one syscall exit of the agent's
//! own thread, where the kernel hands it the `pt_regs` address, and copies the first words
//! of the task; user space finds the word that is the kernel stack's base (see
//! `agent/src/regs.rs`) and writes [`LAYOUT`]. The calibration program is detached at once.

use agent_common::{Calibration, RegsLayout};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel,
        generated::bpf_probe_read_kernel as read_kernel_raw,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, PerCpuArray},
    programs::RawTracePointContext,
};

/// Where `pt_regs` is, from the task; written once by user space after calibration.
#[map]
pub static LAYOUT: Array<RegsLayout> = Array::with_max_entries(1, 0);
/// The calibration's request (`tgid`) and result.
#[map]
pub static CALIBRATION: Array<Calibration> = Array::with_max_entries(1, 0);

/// The user registers a syscall entered with, from `dx` to `sp` (`struct pt_regs`,
/// `arch/x86/include/asm/ptrace.h`). Arguments go in di, si, dx, r10, r8, r9; the kernel
/// leaves them as they were (the result goes to `ax`).
#[repr(C)]
pub struct UserRegs {
    pub dx: u64,
    pub si: u64,
    pub di: u64,
    /// The syscall number (-1 outside a syscall).
    pub orig_ax: u64,
    pub ip: u64,
    /// Code segment (low 16 bits): `__USER_CS` for a 64-bit process.
    pub cs: u64,
    pub flags: u64,
    /// The user stack pointer (after an exec: `argc`, then `argv`, then `envp`).
    pub sp: u64,
}

/// Offset of `dx` in `struct pt_regs`.
const REGS_DX: u64 = 96;
/// `__USER_CS`: a 64-bit process's code segment.
const USER_CS: u64 = 0x33;

/// Per CPU, where the user registers of the last few threads that got here are: a thread
/// keeps its kernel stack for life, so its next syscall on this CPU skips reading
/// `task->stack` (one `bpf_probe_read_kernel` fewer per socket call of a replica).
#[map]
pub static REGS_CACHE: PerCpuArray<RegsCache> = PerCpuArray::with_max_entries(1, 0);

/// Threads remembered per CPU, by the low bits of their tid.
const CACHED: usize = 8;

#[repr(C)]
pub struct RegsCache {
    pub entries: [CachedRegs; CACHED],
}

/// One thread's registers address. Both the task and its pid must match: a task struct
/// freed and reused holds another thread (another stack), which a new pid gives away.
#[repr(C)]
pub struct CachedRegs {
    pub task: u64,
    pub pid_tgid: u64,
    /// Address of `UserRegs` (`pt_regs` + `dx`'s offset).
    pub at: u64,
}

/// The current task's user registers, if calibrated and the task is a 64-bit process.
/// `pid_tgid` is the current task's (`bpf_get_current_pid_tgid`, which the caller has).
#[inline(always)]
pub fn current(pid_tgid: u64) -> Option<UserRegs> {
    let layout = LAYOUT.get(0)?;
    if layout.regs_at == 0 {
        return None;
    }
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let cache = REGS_CACHE.get_ptr_mut(0)?;
    let slot = (pid_tgid as usize) & (CACHED - 1);
    // SAFETY: `cache` is this CPU's entry, written only here; kernel memory is read
    // through the checked helper only.
    let r = unsafe {
        let e = &mut (*cache).entries[slot];
        let at = if e.task == task && e.pid_tgid == pid_tgid && e.at != 0 {
            e.at
        } else {
            let stack: u64 =
                bpf_probe_read_kernel((task + layout.task_stack) as *const u64).ok()?;
            let at = stack + layout.regs_at + REGS_DX;
            e.task = task;
            e.pid_tgid = pid_tgid;
            e.at = at;
            at
        };
        bpf_probe_read_kernel(at as *const UserRegs).ok()?
    };
    (r.cs & 0xffff == USER_CS).then_some(r)
}

/// `sys_exit(struct pt_regs *regs, long ret)`, attached only while user space calibrates:
/// reports `regs` and the task's first words for a syscall of the thread group asked for.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn tally_calibrate(ctx: RawTracePointContext) -> u32 {
    let Some(c) = CALIBRATION.get_ptr_mut(0) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: `c` points into CALIBRATION; the task is read through the checked helper.
    unsafe {
        if (*c).tgid != tgid || (*c).done != 0 {
            return 0;
        }
        let task = bpf_get_current_task();
        // Straight into the map value: the words do not fit the program's stack.
        if read_kernel_raw(
            (*c).task.as_mut_ptr().cast(),
            core::mem::size_of_val(&(*c).task) as u32,
            task as *const _,
        ) != 0
        {
            return 0;
        }
        (*c).regs = ctx.arg(0);
        (*c).done = 1;
    }
    0
}
