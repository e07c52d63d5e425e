//! Records shared by the kernel programs (`agent-ebpf`) and the agent's user space.
//! Every type is `#[repr(C)]` plain data; `aya::Pod` comes with the `user` feature, and
//! the usage event's shared forms (the ingest API's binary batch, agent → gateway, and its
//! RFC 3339 times) with the `wire` feature.
#![no_std]
#![deny(unsafe_code)]

#[cfg(feature = "wire")]
extern crate alloc;
#[cfg(feature = "wire")]
pub mod rfc3339;
#[cfg(feature = "wire")]
pub mod wire;

/// Bytes of each request head copied to user space (enough for the request line and the
/// headers that carry `X-Call-Id`). A power of two so the kernel side can mask sizes.
pub const HEAD_LEN: usize = 1024;
/// Longest call id the kernel copies out of a fork-mode process's environment.
pub const CALL_ID_LEN: usize = 64;
/// The environment variable the gateway sets on fork-mode processes.
pub const CALL_ID_ENV: &[u8] = b"Http_X_Call_Id=";

/// Elements of the `TGIDS` map (8 tgids each) as compiled: enough for the default
/// `pid_max` of 4,194,304 (`PID_MAX_LIMIT`, 4 MiB). User space sets the real size from
/// `/proc/sys/kernel/pid_max` before loading.
pub const TGIDS_DEFAULT_SLOTS: u32 = 4_194_304 / 8;
/// `BPF_F_MMAPABLE`: an array map user space can `mmap`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Value of the watched-cgroup map: how the replica in that cgroup serves requests.
pub mod mode {
    /// A process per request: metered from exec to exit.
    pub const FORK: u32 = 1;
    /// A long-running HTTP/1.x server: metered per request on its accepted sockets.
    pub const HTTP: u32 = 2;
}

/// Slots of the per-CPU `STATS` array: things the kernel side had to give up on.
pub mod stat {
    pub const PROCESS_RINGBUF_FULL: u32 = 0;
    pub const HTTP_RINGBUF_FULL: u32 = 1;
    pub const CONN_MAP_FULL: u32 = 2;
    pub const PROCESS_MAP_FULL: u32 = 3;
    pub const MM_MAP_FULL: u32 = 4;
    pub const CGROUP_MEM_MAP_FULL: u32 = 5;
    pub const WATCHED_MAP_FULL: u32 = 6;
    pub const CGROUP_RINGBUF_FULL: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Why an HTTP exchange was considered finished.
pub mod end {
    /// The bytes written reached the header length plus `Content-Length`.
    pub const CONTENT_LENGTH: u8 = 1;
    /// A write ended with the chunked terminator `0\r\n\r\n`.
    pub const CHUNKED: u8 = 2;
    /// Length unknown: closed when the next request arrived (end = last write).
    pub const NEXT_REQUEST: u8 = 3;
    /// Length unknown or incomplete: closed when the socket was closed (end = last write).
    pub const CLOSE: u8 = 4;
}

/// Connection states kept in [`HttpRecord::state`].
pub mod conn {
    pub const IDLE: u8 = 0;
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
}

/// Process flags in [`ProcessRecord::flags`].
pub mod proc_flag {
    /// Forked by a process that was already being metered (a function's child).
    pub const CHILD: u32 = 1;
}

/// One process of a fork-mode replica, from its first exec to the exit of its last thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessRecord {
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at `sched_process_exec`; 0 until exec.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC at `sched_process_exit` of the last thread.
    pub end_ns: u64,
    /// Peak of file + anon + shmem RSS of the exec'd address space, from `kmem:rss_stat`.
    pub peak_rss_bytes: u64,
    /// On-CPU time of all its threads (sched_switch accounting); 0 when unknown.
    pub cpu_ns: u64,
    pub tgid: u32,
    /// `exit_group` code; -1 when the process died without calling it (a signal).
    pub exit_code: i32,
    pub flags: u32,
    /// Last `mm_id` (kmem:rss_stat hash) seen for this process as `current`.
    pub mm_id: u32,
    pub call_id_len: u32,
    pub _pad: u32,
    pub call_id: [u8; CALL_ID_LEN],
}

/// Per-connection state of an http-mode replica; the same bytes go to user space when a
/// request/response exchange completes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HttpRecord {
    pub cgroup_id: u64,
    /// Exit of the read that returned the request line.
    pub request_ns: u64,
    /// Exit of the write that began with `HTTP/1.`.
    pub response_ns: u64,
    /// Exit of the last write of the response.
    pub end_ns: u64,
    /// Response bytes written so far.
    pub bytes_out: u64,
    /// Header length + Content-Length when known, else 0.
    pub expected_out: u64,
    /// Peak RSS of the replica's cgroup over the exchange (see the `rss` program).
    pub peak_rss_bytes: u64,
    /// Exchanges completed on this connection before this one.
    pub seq: u64,
    pub tgid: u32,
    pub fd: u32,
    pub status: u16,
    pub state: u8,
    pub end_reason: u8,
    pub chunked: u8,
    pub _pad: [u8; 3],
    pub head_len: u32,
    pub _pad2: u32,
    pub head: [u8; HEAD_LEN],
}

/// A replica cgroup the kernel began watching by itself: the first exec in a new child of a
/// function's cgroup (a replica that just started), so it is metered before user space knew.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NewCgroup {
    /// The replica's cgroup v2 id, now in the watched map.
    pub cgroup_id: u64,
    /// Its parent: the function's cgroup, as user space registered it.
    pub function_cgroup_id: u64,
    /// `mode::FORK` or `mode::HTTP`, from the function.
    pub mode: u32,
    pub _pad: u32,
}

/// Resident-set counters of one address space (`mm_id`), as `kmem:rss_stat` reports them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmState {
    /// Bytes per member: 0 file, 1 anon, 2 swap (ignored), 3 shmem.
    pub members: [i64; 4],
    pub peak: u64,
}

/// Resident memory of a replica's cgroup, with the peak since the oldest open exchange.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CgroupMem {
    pub current: i64,
    pub peak: u64,
    /// Exchanges (requests or fork-mode processes) open right now.
    pub active: u64,
}

/// Words of the agent's own `task_struct` the calibration program copies out.
pub const CALIBRATION_WORDS: usize = 128;

/// What the calibration program (at one syscall exit of the agent's own thread) reports, so
/// user space can find where a task's saved user registers are: the kernel passes
/// `sys_exit` the address of `struct pt_regs`, and one of the task's first words is its
/// kernel stack, a little below it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    /// The thread group to calibrate on (the agent); set by user space.
    pub tgid: u32,
    /// Set to 1 by the program once the fields below are filled.
    pub done: u32,
    /// The `struct pt_regs *` of the syscall.
    pub regs: u64,
    /// The first words of the task's `task_struct`.
    pub task: [u64; CALIBRATION_WORDS],
}

/// Where a task's saved user registers are, from [`Calibration`]: `pt_regs` is at
/// `*(task + task_stack) + regs_at`. Zero until user space has calibrated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegsLayout {
    /// Offset of `stack` (the kernel stack's base) in `struct task_struct`.
    pub task_stack: u64,
    /// Offset of `struct pt_regs` from the kernel stack's base.
    pub regs_at: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], Copy, made only of integers and byte arrays,
    // with explicit padding fields, so any bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Calibration {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::RegsLayout {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ProcessRecord {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::HttpRecord {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::MmState {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::CgroupMem {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::NewCgroup {}
}
