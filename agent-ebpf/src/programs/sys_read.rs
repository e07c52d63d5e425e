//! read/recvfrom/readv in http-mode replicas (entered through [`super::syscalls`]): a read
//! whose first bytes begin a request line opens an exchange on (tgid, fd) and copies its head.

use agent_common::{mode, stat};
use aya_ebpf::{EbpfContext, helpers::bpf_probe_read_user};

use super::{SyscallArgs, call, conn_entry, count, http, keep_args};

/// Remembers fd and buffer (or iovec array) of a read in an http-mode replica until the
/// syscall returns.
#[inline(always)]
pub fn enter(pid_tgid: u64, cgroup_id: u64, m: u32, fd: u64, buf: u64, vectored: u16) {
    if m != mode::HTTP {
        return;
    }
    keep_args(
        pid_tgid,
        &SyscallArgs::new(call::READ, cgroup_id, fd, buf, vectored),
    );
}

/// Looks at the `ret` bytes a read returned.
#[inline(always)]
pub fn exit<C: EbpfContext>(ctx: &C, pid_tgid: u64, args: &SyscallArgs, ret: i64) {
    if ret <= 0 {
        return;
    }
    let (data, len) = if args.vectored == 1 {
        // SAFETY: user memory is read through the checked helper only.
        let Ok(iov) = (unsafe { bpf_probe_read_user(args.buf as *const [u64; 2]) }) else {
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
        (args.buf, ret as u64)
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
    let key = (pid_tgid & 0xffff_ffff_0000_0000) | args.fd as u64;
    let Some(c) = conn_entry(key) else {
        count(ctx, stat::CONN_MAP_FULL);
        return;
    };
    http::start_request(ctx, c, key, args.cgroup_id, data, len);
}
