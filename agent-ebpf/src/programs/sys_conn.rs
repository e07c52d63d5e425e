//! accept/accept4 and close in http-mode replicas (at their exit, through
//! [`super::syscalls`]): a fresh socket's fd number forgets what an earlier socket of that
//! number left; a close ends the exchange open on it.

use agent_common::{conn, end};
use aya_ebpf::EbpfContext;

use super::{CONNS, http};

/// `EBADF`: a close of an fd that was not open (anything else releases the fd number).
const EBADF: i64 = 9;

/// An accept returned `ret`, a new socket's fd.
///
/// An exchange still open under that number belongs to the socket it replaced. It is ended
/// here, as its close would have: seen at the exit, a close of one thread may come after
/// another thread's accept that got the freed number back.
#[inline(always)]
pub fn accepted<C: EbpfContext>(ctx: &C, pid_tgid: u64, ret: i64) {
    if ret < 0 {
        return;
    }
    end_conn(
        ctx,
        (pid_tgid & 0xffff_ffff_0000_0000) | (ret as u64 & 0xffff_ffff),
    );
}

/// `close(fd)` returned `ret`.
#[inline(always)]
pub fn closed<C: EbpfContext>(ctx: &C, pid_tgid: u64, fd: u64, ret: i64) {
    if ret == -EBADF {
        return;
    }
    end_conn(ctx, (pid_tgid & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff));
}

/// Ends the exchange open on connection `key`, if any, and forgets the connection.
#[inline(always)]
fn end_conn<C: EbpfContext>(ctx: &C, key: u64) {
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
