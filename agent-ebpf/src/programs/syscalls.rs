//! `raw_syscalls:sys_enter` and `sys_exit` as raw tracepoints: the two programs that see the
//! syscalls, handing each one of interest to its file (`sys_read`, `sys_write`, `sys_conn`,
//! `execve`, `exit_group`).
//!
//! Why raw tracepoints rather than the `syscalls:sys_{enter,exit}_*` tracepoints: those run
//! through the kernel's perf glue (a perf trace buffer per event, the arguments copied into
//! it) before a program can return at its cgroup check, and every process on the node pays
//! it on every traced syscall. A raw tracepoint calls the program with the syscall's
//! registers and nothing more. Both programs run for *every* syscall of the node, so each
//! begins with its cheapest test: `sys_enter` looks at the syscall number (an argument, no
//! helper call), then the process's byte in [`TGIDS`](super::TGIDS), before any cgroup lookup; `sys_exit` first loads [`PENDING`](super::PENDING), 0 unless a
//! watched replica is inside a syscall whose exit matters, then looks in [`ARGS`](super::ARGS).
//!
//! Syscall numbers are x86_64's; a 32-bit (compat) syscall of a replica is not looked at
//! (its numbers differ), as the `syscalls:*` tracepoints did not either.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use super::{
    SyscallArgs, call, execve, exit_group, sys_conn, sys_read, sys_write, take_args,
    watched_or_discover, watched_process,
};

/// x86_64 syscall numbers (`arch/x86/entry/syscalls/syscall_64.tbl`).
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const CLOSE: u64 = 3;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const ACCEPT: u64 = 43;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const EXECVE: u64 = 59;
    pub const EXIT_GROUP: u64 = 231;
    pub const ACCEPT4: u64 = 288;
}

/// The syscalls below 64 whose entry is looked at, one bit each.
const ENTER_LOW: u64 = 1 << nr::READ
    | 1 << nr::WRITE
    | 1 << nr::CLOSE
    | 1 << nr::READV
    | 1 << nr::WRITEV
    | 1 << nr::ACCEPT
    | 1 << nr::SENDTO
    | 1 << nr::RECVFROM
    | 1 << nr::EXECVE;

/// The user registers a syscall entered with: `struct pt_regs` from `dx` to `cs` (x86_64
/// layout, `arch/x86/include/asm/ptrace.h`). Arguments go in di, si, dx, r10, r8, r9.
#[repr(C)]
struct Regs {
    dx: u64,
    si: u64,
    di: u64,
    _orig_ax: u64,
    _ip: u64,
    /// Code segment (low 16 bits): `__USER_CS` for a 64-bit syscall.
    cs: u64,
}

/// Offset of `dx` in `struct pt_regs`.
const REGS_DX: usize = 96;
/// `__USER_CS`: a 64-bit process's code segment.
const USER_CS: u64 = 0x33;

/// The registers of the syscall `regs` (a kernel `struct pt_regs *`) of a 64-bit process.
#[inline(always)]
fn regs(regs: u64) -> Option<Regs> {
    // SAFETY: kernel memory is read through the checked helper only.
    let r = unsafe { bpf_probe_read_kernel((regs as usize + REGS_DX) as *const Regs) }.ok()?;
    (r.cs & 0xffff == USER_CS).then_some(r)
}

/// `sys_enter(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn tally_sys_enter(ctx: RawTracePointContext) -> u32 {
    let id: u64 = ctx.arg(1);
    let wanted = if id < 64 {
        (ENTER_LOW >> id) & 1 == 1
    } else {
        id == nr::EXIT_GROUP || id == nr::ACCEPT4
    };
    if !wanted {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let watched = if id == nr::EXECVE {
        watched_or_discover(&ctx)
    } else {
        watched_process(pid_tgid)
    };
    let Some((cgroup_id, m)) = watched else {
        return 0;
    };
    let Some(r) = regs(ctx.arg(0)) else {
        return 0;
    };
    match id {
        nr::READ | nr::RECVFROM => sys_read::enter(pid_tgid, cgroup_id, m, r.di, r.si, 0),
        nr::READV => sys_read::enter(pid_tgid, cgroup_id, m, r.di, r.si, 1),
        nr::WRITE | nr::SENDTO => sys_write::enter(pid_tgid, cgroup_id, r.di, r.si, 0),
        nr::WRITEV => sys_write::enter(pid_tgid, cgroup_id, r.di, r.si, 1),
        nr::ACCEPT | nr::ACCEPT4 => sys_conn::accept_enter(pid_tgid, cgroup_id, m),
        nr::CLOSE => sys_conn::close(&ctx, pid_tgid, r.di),
        nr::EXECVE => execve::enter(&ctx, pid_tgid, m, r.dx),
        nr::EXIT_GROUP => exit_group::enter(pid_tgid, r.di),
        _ => {}
    }
    0
}

/// `sys_exit(struct pt_regs *regs, long ret)`.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn tally_sys_exit(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(args) = take_args(pid_tgid) else {
        return 0;
    };
    let ret: i64 = ctx.arg(1);
    exit(&ctx, pid_tgid, &args, ret);
    0
}

#[inline(always)]
fn exit(ctx: &RawTracePointContext, pid_tgid: u64, args: &SyscallArgs, ret: i64) {
    match args.call {
        call::READ => sys_read::exit(ctx, pid_tgid, args, ret),
        call::WRITE => sys_write::exit(ctx, pid_tgid, args, ret),
        call::ACCEPT => sys_conn::accepted(pid_tgid, ret),
        _ => {}
    }
}
