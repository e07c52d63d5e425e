//! `syscalls:sys_{enter,exit}_{read,recvfrom,readv}` in http-mode replicas: a read whose
//! first bytes begin a request line opens an exchange on (tgid, fd) and copies its head.

use agent_common::{mode, stat};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{ARGS, SyscallArgs, conn_entry, count, http, watched};

/// Offsets shared by these syscalls' records: fd, buffer (or iovec array), return value.
const FD: usize = 16;
const BUF: usize = 24;
const RET: usize = 16;

/// Remembers fd and buffer of a read in an http-mode replica until the syscall returns.
#[inline(always)]
pub fn enter(ctx: &TracePointContext, vectored: u32) -> u32 {
    let Some((_, m)) = watched() else { return 0 };
    if m != mode::HTTP {
        return 0;
    }
    // SAFETY: reading the tracepoint record at offsets from its format file.
    let (fd, buf) = unsafe {
        (
            ctx.read_at::<u64>(FD).unwrap_or(0),
            ctx.read_at::<u64>(BUF).unwrap_or(0),
        )
    };
    let args = SyscallArgs {
        buf,
        fd: fd as u32,
        vectored,
    };
    let _ = ARGS.insert(bpf_get_current_pid_tgid(), args, 0);
    0
}

/// Looks at the bytes a read returned.
#[inline(always)]
pub fn exit(ctx: &TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: plain value copied out of the map.
    let Some(args) = (unsafe { ARGS.get(id) }).copied() else {
        return 0;
    };
    let _ = ARGS.remove(id);
    let Some((cgroup_id, _)) = watched() else {
        return 0;
    };
    // SAFETY: reading the tracepoint record.
    let ret = unsafe { ctx.read_at::<i64>(RET).unwrap_or(0) };
    if ret <= 0 {
        return 0;
    }
    let (data, len) = if args.vectored == 1 {
        // SAFETY: user memory is read through the checked helper only.
        let Ok(iov) = (unsafe { bpf_probe_read_user(args.buf as *const [u64; 2]) }) else {
            return 0;
        };
        (
            iov[0],
            if (ret as u64) < iov[1] {
                ret as u64
            } else {
                iov[1]
            },
        )
    } else {
        (args.buf, ret as u64)
    };
    if len < 8 {
        return 0;
    }
    // SAFETY: as above.
    let Ok(first) = (unsafe { bpf_probe_read_user(data as *const [u8; 8]) }) else {
        return 0;
    };
    if !http::is_request(&first) {
        return 0;
    }
    let key = (id & 0xffff_ffff_0000_0000) | args.fd as u64;
    let Some(c) = conn_entry(key) else {
        count(ctx, stat::CONN_MAP_FULL);
        return 0;
    };
    http::start_request(ctx, c, key, cgroup_id, data, len);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn tally_enter_read(ctx: TracePointContext) -> u32 {
    enter(&ctx, 0)
}

#[tracepoint(category = "syscalls", name = "sys_exit_read")]
pub fn tally_exit_read(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn tally_enter_recvfrom(ctx: TracePointContext) -> u32 {
    enter(&ctx, 0)
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvfrom")]
pub fn tally_exit_recvfrom(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_readv")]
pub fn tally_enter_readv(ctx: TracePointContext) -> u32 {
    enter(&ctx, 1)
}

#[tracepoint(category = "syscalls", name = "sys_exit_readv")]
pub fn tally_exit_readv(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}
