//! accept/accept4 and close in http-mode replicas (entered through [`super::syscalls`]): a
//! fresh socket forgets any stale state of its fd number; a close ends the open exchange.

use agent_common::{conn, end, mode};
use aya_ebpf::EbpfContext;

use super::{CONNS, SyscallArgs, call, http, keep_args};

/// An accept in an http-mode replica: its exit is wanted (the new fd).
#[inline(always)]
pub fn accept_enter(pid_tgid: u64, cgroup_id: u64, m: u32) {
    if m != mode::HTTP {
        return;
    }
    keep_args(
        pid_tgid,
        &SyscallArgs::new(call::ACCEPT, cgroup_id, 0, 0, 0),
    );
}

/// The socket `ret` is new: whatever an earlier socket of that number left is stale.
#[inline(always)]
pub fn accepted(pid_tgid: u64, ret: i64) {
    if ret < 0 {
        return;
    }
    let key = (pid_tgid & 0xffff_ffff_0000_0000) | (ret as u64 & 0xffff_ffff);
    let _ = CONNS.remove(key);
}

/// `close(fd)`: ends the exchange open on it, if any, and forgets the connection.
#[inline(always)]
pub fn close<C: EbpfContext>(ctx: &C, pid_tgid: u64, fd: u64) {
    let key = (pid_tgid & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
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
