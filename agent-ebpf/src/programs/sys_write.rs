//! `syscalls:sys_{enter,exit}_{write,sendto,writev}` on connections of http-mode replicas:
//! the response's first write (status line), its bytes, and its last write.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};

use super::{ARGS, CONNS, SyscallArgs, http, watched};

const FD: usize = 16;
const BUF: usize = 24;
const RET: usize = 16;
/// iovecs walked to find where a writev's bytes end.
const MAX_IOV: usize = 16;

/// Remembers fd and buffer of a write on a known connection until the syscall returns.
#[inline(always)]
pub fn enter(ctx: &TracePointContext, vectored: u32) -> u32 {
    if watched().is_none() {
        return 0;
    }
    // SAFETY: reading the tracepoint record at offsets from its format file.
    let (fd, buf) = unsafe {
        (
            ctx.read_at::<u64>(FD).unwrap_or(0),
            ctx.read_at::<u64>(BUF).unwrap_or(0),
        )
    };
    let id = bpf_get_current_pid_tgid();
    let key = (id & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
    if CONNS.get_ptr(key).is_none() {
        return 0;
    }
    let _ = ARGS.insert(
        id,
        SyscallArgs {
            buf,
            fd: fd as u32,
            vectored,
        },
        0,
    );
    0
}

/// Accounts the bytes a write sent.
#[inline(always)]
pub fn exit(ctx: &TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: plain value copied out of the map.
    let Some(args) = (unsafe { ARGS.get(id) }).copied() else {
        return 0;
    };
    let _ = ARGS.remove(id);
    // SAFETY: reading the tracepoint record.
    let ret = unsafe { ctx.read_at::<i64>(RET).unwrap_or(0) };
    if ret <= 0 {
        return 0;
    }
    let written = ret as u64;
    let key = (id & 0xffff_ffff_0000_0000) | args.fd as u64;
    let Some(c) = CONNS.get_ptr_mut(key) else {
        return 0;
    };
    if args.vectored == 0 {
        let tail = if written >= 5 {
            args.buf + written - 5
        } else {
            0
        };
        http::on_write(ctx, c, args.buf, written, written, tail);
        return 0;
    }
    // writev: the first segment holds the status line; find where the written bytes end.
    let mut first = (0u64, 0u64);
    let mut tail = 0u64;
    let mut left = written;
    let mut i = 0;
    while i < MAX_IOV {
        // SAFETY: user memory is read through the checked helper only.
        let Ok(iov) =
            (unsafe { bpf_probe_read_user((args.buf as *const [u64; 2]).wrapping_add(i)) })
        else {
            break;
        };
        if i == 0 {
            first = (iov[0], iov[1]);
        }
        if left <= iov[1] {
            if left >= 5 {
                tail = iov[0] + left - 5;
            }
            break;
        }
        left -= iov[1];
        i += 1;
    }
    http::on_write(ctx, c, first.0, first.1, written, tail);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_write")]
pub fn tally_enter_write(ctx: TracePointContext) -> u32 {
    enter(&ctx, 0)
}

#[tracepoint(category = "syscalls", name = "sys_exit_write")]
pub fn tally_exit_write(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn tally_enter_sendto(ctx: TracePointContext) -> u32 {
    enter(&ctx, 0)
}

#[tracepoint(category = "syscalls", name = "sys_exit_sendto")]
pub fn tally_exit_sendto(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_writev")]
pub fn tally_enter_writev(ctx: TracePointContext) -> u32 {
    enter(&ctx, 1)
}

#[tracepoint(category = "syscalls", name = "sys_exit_writev")]
pub fn tally_exit_writev(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}
