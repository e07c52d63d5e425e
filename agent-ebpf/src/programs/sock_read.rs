//! Socket reads (read/recvfrom/readv) of http-mode replicas, through [`super::sock_io`]: a
//! read whose first bytes begin a request line opens an exchange on its socket and copies
//! the request's head.

use agent_common::{HttpRecord, conn, stat};
use aya_ebpf::{EbpfContext, helpers::bpf_probe_read_user};

use super::{conn_entry, count, http};

/// Who read: the replica's process and cgroup, the fd and socket, and the socket's CONNS
/// entry if it has one.
pub struct Read {
    pub tgid: u32,
    pub fd: u64,
    pub cgroup_id: u64,
    pub sk: u64,
    pub known: Option<*mut HttpRecord>,
}

/// Looks at the `ret` bytes a read into `buf` (an iovec array when `vectored`) returned.
#[inline(always)]
pub fn exit<C: EbpfContext>(ctx: &C, at: &Read, buf: u64, vectored: u8, ret: i64) {
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
    // A connection between exchanges (keep-alive, the usual case): the read is copied
    // straight into its head buffer, which no exchange holds now, and looked at there: one
    // copy instead of a peek and a copy. What is not a request leaves it idle.
    if let Some(c) = at.known
        // SAFETY: `c` points into CONNS.
        && unsafe { (*c).state } == conn::IDLE
    {
        let n = http::copy_head(c, data, len);
        if n >= 8 && http::is_request(&http::head_start(c)) {
            http::begin(c, at.tgid, at.fd as u32, at.cgroup_id, n);
        }
        return;
    }
    // SAFETY: as above.
    let Ok(first) = (unsafe { bpf_probe_read_user(data as *const [u8; 8]) }) else {
        return;
    };
    if !http::is_request(&first) {
        return;
    }
    let Some(c) = at.known.or_else(|| conn_entry(at.sk)) else {
        count(ctx, stat::CONN_MAP_FULL);
        return;
    };
    http::start_request(ctx, c, at.tgid, at.fd as u32, at.cgroup_id, data, len);
}
