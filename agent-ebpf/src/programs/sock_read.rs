//! Socket reads (read/recvfrom/readv) of http-mode replicas, through [`super::sock_io`]: a
//! read whose first bytes begin a request line opens an exchange on its socket and copies
//! the request's head.

use agent_common::stat;
use aya_ebpf::{EbpfContext, helpers::bpf_probe_read_user};

use super::{conn_entry, count, http};

/// Looks at the `ret` bytes a read of socket `sk` (fd `fd` of process `tgid`) into `buf`
/// (an iovec array when `vectored`) returned.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn exit<C: EbpfContext>(
    ctx: &C,
    tgid: u32,
    fd: u64,
    cgroup_id: u64,
    sk: u64,
    buf: u64,
    vectored: u8,
    ret: i64,
) {
    if ret <= 0 {
        return;
    }
    let (data, len) = if vectored == 1 {
        // SAFETY: user memory is read through the checked helper only.
        let Ok(iov) = (unsafe { bpf_probe_read_user(buf as *const [u64; 2]) }) else {
            return;
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
        (buf, ret as u64)
    };
    if len < 8 {
        return;
    }
    // SAFETY: as above.
    let Ok(first) = (unsafe { bpf_probe_read_user(data as *const [u8; 8]) }) else {
        return;
    };
    if !http::is_request(&first) {
        return;
    }
    let Some(c) = conn_entry(sk) else {
        count(ctx, stat::CONN_MAP_FULL);
        return;
    };
    http::start_request(ctx, c, tgid, fd as u32, cgroup_id, data, len);
}
