//! Socket writes (write/sendto/writev) of http-mode replicas, through [`super::sock_io`]:
//! the response's first write (status line), its bytes, and its last write.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_probe_read_user as read_user_raw};

use agent_common::HttpRecord;

use super::{MAX_IOV, SCRATCH, http};

/// Accounts the `ret` bytes a write of `buf` (an array of `count` iovecs when `vectored`)
/// sent on the connection `c` (its CONNS entry).
#[inline(always)]
pub fn exit<C: EbpfContext>(
    ctx: &C,
    c: *mut HttpRecord,
    buf: u64,
    count: u64,
    vectored: u8,
    ret: i64,
) {
    if ret <= 0 {
        return;
    }
    let written = ret as u64;
    if vectored == 0 {
        let tail = if written >= 5 { buf + written - 5 } else { 0 };
        http::on_write(ctx, c, buf, written, written, tail);
        return;
    }
    // writev: the first segment holds the status line; find where the written bytes end.
    // The iovecs (at most MAX_IOV) are copied in one helper call, not one per segment.
    let n = if count > MAX_IOV as u64 {
        MAX_IOV as u32
    } else {
        count as u32
    };
    if n == 0 {
        return;
    }
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let size = http::verifier_bound(n * 16, (MAX_IOV * 16) as u32);
    // SAFETY: the scratch slot is this CPU's; user memory is read through the helper.
    if unsafe { read_user_raw((*sc).iov.as_mut_ptr().cast(), size, buf as *const _) } < 0 {
        return;
    }
    let mut tail = 0u64;
    let mut left = written;
    let mut i = 0;
    while i < MAX_IOV && i < n as usize {
        // SAFETY: as above; `i < MAX_IOV`.
        let iov = unsafe { (*sc).iov[i] };
        if left <= iov[1] {
            if left >= 5 {
                tail = iov[0] + left - 5;
            }
            break;
        }
        left -= iov[1];
        i += 1;
    }
    // SAFETY: as above.
    let first = unsafe { (*sc).iov[0] };
    http::on_write(ctx, c, first[0], first[1], written, tail);
}
