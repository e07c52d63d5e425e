//! `syscalls:sys_exit_accept{,4}` and `sys_enter_close` in http-mode replicas: a fresh
//! socket forgets any stale state of its fd number; a close ends the open exchange.

use agent_common::{conn, end};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{CONNS, http, watched};

const RET: usize = 16;
const FD: usize = 16;

#[inline(always)]
fn accepted(ctx: &TracePointContext) -> u32 {
    if watched().is_none() {
        return 0;
    }
    // SAFETY: reading the tracepoint record.
    let fd = unsafe { ctx.read_at::<i64>(RET).unwrap_or(-1) };
    if fd < 0 {
        return 0;
    }
    let key = (bpf_get_current_pid_tgid() & 0xffff_ffff_0000_0000) | fd as u64;
    let _ = CONNS.remove(key);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn tally_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn tally_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn tally_enter_close(ctx: TracePointContext) -> u32 {
    if watched().is_none() {
        return 0;
    }
    // SAFETY: reading the tracepoint record.
    let fd = unsafe { ctx.read_at::<u64>(FD).unwrap_or(0) };
    let key = (bpf_get_current_pid_tgid() & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
    let Some(c) = CONNS.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: `c` points into CONNS.
    let state = unsafe { (*c).state };
    if state == conn::REQUEST || state == conn::RESPONSE {
        http::finish(&ctx, c, end::CLOSE);
    }
    let _ = CONNS.remove(key);
    0
}
