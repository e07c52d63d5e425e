//! The socket hooks of http-mode replicas, as raw tracepoints: `sock_recv_length` and
//! `sock_send_length` (the end of every socket read and write) and `inet_sock_set_state`
//! (a TCP connection closing).
//!
//! No syscall hook: any `raw_syscalls`/`syscalls:*` program switches on the kernel's
//! syscall-tracing slow path for every task of the node, so every syscall of every process
//! paid for it. These fire on socket I/O only, in the reader's or writer's context, after
//! the copy; a process not marked in [`TGIDS`](super::TGIDS) returns after its byte. For a
//! replica the syscall's arguments (fd, buffer) come from its saved user registers
//! ([`regs`]); connections are keyed by the socket (`struct sock *`), so an fd number's
//! reuse does not matter, and a close is seen as the socket's state change.
//!
//! Syscall numbers are x86_64's; a 32-bit (compat) syscall of a replica is not looked at.

use agent_common::{conn, end, mode};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use super::{CONNS, http, regs, sock_read, sock_write, tgids, watched_marked_in};

/// x86_64 syscall numbers (`arch/x86/entry/syscalls/syscall_64.tbl`).
mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
}

/// `MSG_PEEK`: a read that leaves the bytes queued (the real read follows).
const MSG_PEEK: u32 = 2;

/// TCP states (`include/net/tcp_states.h`) in which a socket has been closed on this side
/// (`FIN_WAIT1`: closed first; `LAST_ACK`: closed after the peer) or is gone (`CLOSE`: reset,
/// aborted, done).
const TCP_FIN_WAIT1: u32 = 4;
const TCP_CLOSE: u32 = 7;
const TCP_LAST_ACK: u32 = 9;

/// An `int` argument of a raw tracepoint: the kernel widens it without sign extension.
#[inline(always)]
fn int_arg(ctx: &RawTracePointContext, n: usize) -> i64 {
    ctx.arg::<u64>(n) as u32 as i32 as i64
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`. Every other process returns
/// after one byte of [`TGIDS`](super::TGIDS). A replica's connection it already served
/// from the same cgroup skips the cgroup lookup (the cgroup was watched, in http mode, when
/// that exchange began); any other read is checked against [`WATCHED`](super::WATCHED).
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn tally_sock_recv(ctx: RawTracePointContext) -> u32 {
    let ret = int_arg(&ctx, 1);
    if ret <= 0 || int_arg(&ctx, 2) as u32 & MSG_PEEK != 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !tgids::marked(tgid) {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let known = CONNS.get_ptr_mut(sk);
    // SAFETY: the helper has no preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: `c` points into CONNS.
    let seen_here =
        known.is_some_and(|c| unsafe { (*c).cgroup_id == cgroup_id && (*c).tgid == tgid });
    if !seen_here && watched_marked_in(tgid, cgroup_id) != Some(mode::HTTP) {
        return 0;
    }
    let Some(r) = regs::current(pid_tgid) else {
        return 0;
    };
    let vectored = match r.orig_ax {
        nr::READ | nr::RECVFROM => 0,
        nr::READV => 1,
        _ => return 0,
    };
    let at = sock_read::Read {
        tgid,
        fd: r.di,
        cgroup_id,
        sk,
        known,
    };
    sock_read::exit(&ctx, &at, r.si, vectored, ret);
    0
}

/// `sock_send_length(struct sock *sk, int ret, int flags)`. A write matters only on a
/// connection with an exchange open, which a read of the replica opened (with the cgroup
/// check): so the socket is looked up first, and the registers are read only for a write
/// that belongs to a response (no cgroup lookup on this path).
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn tally_sock_send(ctx: RawTracePointContext) -> u32 {
    let ret = int_arg(&ctx, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    if ret <= 0 || !tgids::marked((pid_tgid >> 32) as u32) {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let Some(c) = CONNS.get_ptr_mut(sk) else {
        return 0;
    };
    // SAFETY: `c` points into CONNS.
    if unsafe { (*c).state } == conn::IDLE {
        return 0; // no exchange open: a write outside any response
    }
    let Some(r) = regs::current(pid_tgid) else {
        return 0;
    };
    let vectored = match r.orig_ax {
        nr::WRITE | nr::SENDTO => 0,
        nr::WRITEV => 1,
        _ => return 0,
    };
    sock_write::exit(&ctx, c, r.si, r.dx, vectored, ret);
    0
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`: a connection
/// closed on the replica's side (or reset) ends the exchange open on it, as the close of
/// its fd would have, and is forgotten. Only connections in CONNS are looked at, whoever's
/// context this is (a reset arrives in softirq).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tally_sock_state(ctx: RawTracePointContext) -> u32 {
    let new = int_arg(&ctx, 2) as u32;
    if new != TCP_FIN_WAIT1 && new != TCP_LAST_ACK && new != TCP_CLOSE {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    closed(&ctx, sk);
    0
}

/// Ends the exchange open on connection `key`, if any, and forgets the connection.
#[inline(always)]
fn closed<C: EbpfContext>(ctx: &C, key: u64) {
    let Some(c) = CONNS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: `c` points into CONNS.
    let state = unsafe { (*c).state };
    if state == conn::REQUEST || state == conn::RESPONSE {
        http::finish(ctx, c, end::CLOSE);
    }
    let _ = CONNS.remove(key);
}
