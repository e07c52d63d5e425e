//! `raw_syscalls:sys_exit` as a raw tracepoint: the one program run for every syscall of the
//! node, handing each syscall of interest of a watched replica to its file (`sys_read`,
//! `sys_write`, `sys_conn`).
//!
//! Exit only: a syscall's arguments are still in its saved user registers when it returns
//! (x86_64 `pt_regs`: di, si, dx; the number in `orig_ax`), so nothing needs keeping from
//! the entry, and no program runs at the entry of every syscall. (Before, a `sys_enter`
//! program kept each read's and write's arguments in a per-thread map: a second program
//! call on every syscall of the node, ≈ 50 ns, and a map store per syscall of a replica.)
//! The two syscalls whose entry matters, `execve` (the environment it is handed) and
//! `exit_group` (its code), are rare and have their own `syscalls:*` tracepoints
//! (`execve.rs`, `exit_group.rs`). For every other process the program returns after the
//! process's byte in [`TGIDS`](super::TGIDS): no register read, no cgroup lookup.
//!
//! Syscall numbers are x86_64's; a 32-bit (compat) syscall of a replica is not looked at
//! (its numbers differ), as the `syscalls:*` tracepoints did not either.

use agent_common::mode;
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use super::{sys_conn, sys_read, sys_write, tgids, watched_marked};

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
    pub const ACCEPT4: u64 = 288;
}

/// The syscalls below 64 whose exit is looked at, one bit each.
const WANTED_LOW: u64 = 1 << nr::READ
    | 1 << nr::WRITE
    | 1 << nr::CLOSE
    | 1 << nr::READV
    | 1 << nr::WRITEV
    | 1 << nr::ACCEPT
    | 1 << nr::SENDTO
    | 1 << nr::RECVFROM;

/// The user registers a syscall entered with: `struct pt_regs` from `dx` to `cs` (x86_64
/// layout, `arch/x86/include/asm/ptrace.h`). Arguments go in di, si, dx, r10, r8, r9; the
/// kernel leaves them as they were (the result goes to `ax`).
#[repr(C)]
struct Regs {
    _dx: u64,
    si: u64,
    di: u64,
    /// The syscall number.
    orig_ax: u64,
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

/// Whether syscall `id`'s exit is looked at.
#[inline(always)]
fn wanted(id: u64) -> bool {
    if id < 64 {
        (WANTED_LOW >> id) & 1 == 1
    } else {
        id == nr::ACCEPT4
    }
}

/// `sys_exit(struct pt_regs *regs, long ret)`.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn tally_sys_exit(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !tgids::marked(tgid) {
        return 0;
    }
    let Some(r) = regs(ctx.arg(0)) else {
        return 0;
    };
    if !wanted(r.orig_ax) {
        return 0;
    }
    let Some((cgroup_id, m)) = watched_marked(tgid) else {
        return 0;
    };
    if m != mode::HTTP {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    match r.orig_ax {
        nr::READ | nr::RECVFROM => sys_read::exit(&ctx, pid_tgid, cgroup_id, r.di, r.si, 0, ret),
        nr::READV => sys_read::exit(&ctx, pid_tgid, cgroup_id, r.di, r.si, 1, ret),
        nr::WRITE | nr::SENDTO => sys_write::exit(&ctx, pid_tgid, r.di, r.si, 0, ret),
        nr::WRITEV => sys_write::exit(&ctx, pid_tgid, r.di, r.si, 1, ret),
        nr::ACCEPT | nr::ACCEPT4 => sys_conn::accepted(&ctx, pid_tgid, ret),
        nr::CLOSE => sys_conn::closed(&ctx, pid_tgid, r.di, ret),
        _ => {}
    }
    0
}
