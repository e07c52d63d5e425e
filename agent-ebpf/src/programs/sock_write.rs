//! Socket writes (write/sendto/writev) of http-mode replicas, through [`super::sock_io`]:
//! the response's first write (status line), its bytes, and its last write.

use aya_ebpf::{EbpfContext, helpers::bpf_probe_read_user};

use agent_common::HttpRecord;

use super::http;

/// iovecs walked to find where a writev's bytes end.
const MAX_IOV: usize = 16;

/// Accounts the `ret` bytes a write of `buf` (an iovec array when `vectored`) sent on the
/// connection `c` (its CONNS entry).
#[inline(always)]
pub fn exit<C: EbpfContext>(ctx: &C, c: *mut HttpRecord, buf: u64, vectored: u8, ret: i64) {
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
    let mut first = (0u64, 0u64);
    let mut tail = 0u64;
    let mut left = written;
    let mut i = 0;
    while i < MAX_IOV {
        // SAFETY: user memory is read through the checked helper only.
        let Ok(iov) = (unsafe { bpf_probe_read_user((buf as *const [u64; 2]).wrapping_add(i)) })
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
}
