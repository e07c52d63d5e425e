//! The maps every program shares, the cgroup filter they all check first, and the drop
//! counter. Each tracepoint program lives in its own file below; socket reads, writes and
//! closes are seen through the raw tracepoints of [`sock_io`], never a syscall hook.

mod cpu;
mod exec;
mod exit;
mod fork;
mod http;
mod regs;
mod rss;
mod sock_io;
mod sock_read;
mod sock_write;
mod tgids;

use agent_common::{CgroupMem, HttpRecord, MmState, NewCgroup, ProcessRecord, stat};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_ktime_get_ns, generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

/// One byte per process, by tgid (8 to an element): not 0 when the process may be in a
/// watched cgroup. See [`tgids`]: the filter every process pays before any cgroup lookup.
/// User space sizes it from `pid_max` before loading and writes it through `mmap`.
#[map]
pub static TGIDS: Array<[u8; 8]> = Array::with_max_entries(
    agent_common::TGIDS_DEFAULT_SLOTS,
    agent_common::BPF_F_MMAPABLE,
);
/// cgroup v2 id (directory inode) → `agent_common::mode`; filled by user space.
#[map]
pub static WATCHED: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);
/// Function cgroup id (the parent of its replicas' cgroups) → `agent_common::mode`; filled by
/// user space, so that a new replica is watched from its first exec (see [`discover`]).
#[map]
pub static FUNCTIONS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);
/// Replica cgroups [`discover`] began to watch, for user space to name.
#[map]
pub static NEW_CGROUPS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
/// Fork-mode processes being metered, by tgid.
#[map]
pub static PROCS: HashMap<u32, ProcessRecord> = HashMap::with_max_entries(16384, 0);
/// HTTP connections of http-mode replicas, by `tgid << 32 | fd`.
#[map]
pub static CONNS: HashMap<u64, HttpRecord> = HashMap::with_max_entries(16384, 0);
/// RSS counters per address space (`kmem:rss_stat` mm_id); LRU so dead ones age out.
#[map]
pub static MMS: LruHashMap<u32, MmState> = LruHashMap::with_max_entries(16384, 0);
/// Per CPU: the thread last switched in and when (for on-CPU time).
#[map]
pub static ONCPU: PerCpuArray<OnCpu> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct OnCpu {
    pub since: u64,
    pub tid: u32,
    pub _pad: u32,
}

/// Exit time of http-mode processes (tgid), for the user-space sweep of their connections.
#[map]
pub static EXITED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);
/// Resident memory per watched cgroup; user space creates the entry with the watch.
#[map]
pub static CGROUP_MEM: HashMap<u64, CgroupMem> = HashMap::with_max_entries(4096, 0);
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
pub static HTTP_EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);
/// Things the kernel side had to give up on, by `agent_common::stat` slot.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
/// Never written: a zeroed record to insert from (BPF stacks are too small to build one).
#[map]
pub static ZERO_CONN: PerCpuArray<HttpRecord> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static ZERO_PROC: PerCpuArray<ProcessRecord> = PerCpuArray::with_max_entries(1, 0);
/// Scratch space for scanning response headers.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU working memory of the response-header scan.
#[repr(C)]
pub struct Scratch {
    /// The response's first bytes, plus room so that 16-byte loads at any line start within
    /// `SCAN_LEN` stay inside the buffer.
    pub buf: [u8; SCAN_LEN + 32],
    /// Offset of the `Content-Length` value, 0 if not seen.
    pub length_at: u64,
    /// Length of the header block including the blank line, 0 if not seen.
    pub header_end: u64,
    /// Bytes of `buf` that the write really sent (the rest is whatever followed in memory).
    pub valid: u64,
    /// A writev's iovec array, copied in one helper call.
    pub iov: [[u64; 2]; MAX_IOV],
}

/// iovecs of a writev looked at to find where its bytes end.
pub const MAX_IOV: usize = 16;

/// Response bytes scanned for `Content-Length` / `Transfer-Encoding`.
pub const SCAN_LEN: usize = 512;

/// [`watched`] for the hot hooks (every socket read and write, `rss_stat`): every process not
/// marked in [`TGIDS`] — all but the replicas — returns after one array load, without the
/// cgroup helper or a hash lookup.
#[inline(always)]
pub fn watched_process(pid_tgid: u64) -> Option<(u64, u32)> {
    let tgid = (pid_tgid >> 32) as u32;
    if !tgids::marked(tgid) {
        return None;
    }
    // SAFETY: the helper has no preconditions.
    let id = unsafe { bpf_get_current_cgroup_id() };
    Some((id, watched_marked_in(tgid, id)?))
}

/// The mode of cgroup `id`, which the process `tgid`, found marked in [`TGIDS`], is in. A
/// marked process whose cgroup is not watched (it left its replica's cgroup, or its tgid
/// was reused) is unmarked here.
#[inline(always)]
pub fn watched_marked_in(tgid: u32, id: u64) -> Option<u32> {
    let mode = watched_id(id);
    if mode.is_none() {
        tgids::mark(tgid, false);
    }
    mode
}

/// The replica the current task belongs to: `(cgroup id, mode)`, or `None` for every
/// other process on the node.
#[inline(always)]
pub fn watched() -> Option<(u64, u32)> {
    // SAFETY: the helper has no preconditions.
    let id = unsafe { bpf_get_current_cgroup_id() };
    Some((id, watched_id(id)?))
}

/// The mode of cgroup `id` if it is a watched replica's.
#[inline(always)]
pub fn watched_id(id: u64) -> Option<u32> {
    // SAFETY: values are plain u32s that user space only replaces whole.
    unsafe { WATCHED.get(&id) }.copied()
}

/// Deepest cgroup level looked at for a function's cgroup.
const MAX_LEVEL: i32 = 12;
/// `BPF_NOEXIST`: insert only if absent.
const NOEXIST: u64 = 1;

/// [`watched`], and for an exec in a cgroup not (yet) watched: is it a new replica, a child
/// cgroup of a function's cgroup? Then it is watched from now on, with the function's mode,
/// and user space is told. Runs at exec only (`sched_process_exec`): the
/// gateway moves a replica's process into its cgroup before the exec, so the replica is
/// watched before its program runs, however quickly it serves its first request.
#[inline(always)]
pub fn watched_or_discover<C: EbpfContext>(ctx: &C) -> Option<(u64, u32)> {
    // SAFETY: the helper has no preconditions.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: values are plain u32s that user space only replaces whole.
    if let Some(mode) = unsafe { WATCHED.get(&id) } {
        tgids::mark_current();
        return Some((id, *mode));
    }
    let mut level = 1;
    while level < MAX_LEVEL {
        // SAFETY: the helper has no preconditions; 0 means "no cgroup at that level".
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == id {
            return None;
        }
        // SAFETY: plain u32 values.
        if let Some(mode) = unsafe { FUNCTIONS.get(&ancestor) } {
            let mode = *mode;
            // Only the function's direct children are its replicas.
            // SAFETY: as above.
            if unsafe { bpf_get_current_ancestor_cgroup_id(level + 1) } != id {
                return None;
            }
            if WATCHED.insert(&id, &mode, NOEXIST).is_err() && unsafe { WATCHED.get(&id) }.is_none()
            {
                count(ctx, stat::WATCHED_MAP_FULL);
                return None;
            }
            if CGROUP_MEM
                .insert(&id, &CgroupMem::default(), NOEXIST)
                .is_err()
                && CGROUP_MEM.get_ptr(&id).is_none()
            {
                count(ctx, stat::CGROUP_MEM_MAP_FULL);
            }
            let new = NewCgroup {
                cgroup_id: id,
                function_cgroup_id: ancestor,
                mode,
                _pad: 0,
            };
            if NEW_CGROUPS.output::<NewCgroup>(&new, 0).is_err() {
                count(ctx, stat::CGROUP_RINGBUF_FULL);
            }
            tgids::mark_current();
            return Some((id, mode));
        }
        level += 1;
    }
    None
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Ring-buffer flags: no wakeup of user space per record.
pub const BPF_RB_NO_WAKEUP: u64 = 1;
/// Wake user space now.
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query` flag: bytes written but not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Unread bytes in [`HTTP_EVENTS`] past which user space is woken at once. Below it, user
/// space drains on its own timer (`DRAIN_INTERVAL` in `agent/src/run.rs`), so a busy node
/// does not pay a wakeup (an IPI, a context switch) per record. An eighth of the ring: at
/// ≈ 200–400 bytes a record that is ≈ 3,000 records, more than 10 ms hold at 100,000
/// invocations/s, so the timer does all the draining and a wakeup only guards a stalled
/// agent against a full ring. (It was 64 KiB: with 1.1 KiB records at 17,000 req/s every
/// 10 ms tick passed it several times over, each time with a wakeup.)
pub const HTTP_WAKE_AT: u64 = 1024 * 1024;
/// The same for [`PROCESS_EVENTS`] (a quarter of it; fork-mode rates are far lower).
pub const PROCESS_WAKE_AT: u64 = 64 * 1024;

/// The flags for the next output to `ring`: wake user space only once `wake_at` bytes wait.
#[inline(always)]
pub fn wakeup_flags(ring: &RingBuf, wake_at: u64) -> u64 {
    if ring.query(BPF_RB_AVAIL_DATA) >= wake_at {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Counts a give-up in `STATS` and says so through aya-log.
#[inline(always)]
pub fn count<C: EbpfContext>(ctx: &C, slot: u32) {
    if let Some(v) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, written only by this CPU.
        unsafe { *v += 1 };
    }
    aya_log_ebpf::warn!(ctx, "tally: dropped (stat slot {})", slot);
}

/// The PROCS entry of `tgid`, created (exit code -1 = "no exit_group or exit seen") if absent;
/// `None` only when the map is full.
#[inline(always)]
pub fn proc_entry(tgid: u32) -> Option<*mut ProcessRecord> {
    if let Some(p) = PROCS.get_ptr_mut(tgid) {
        return Some(p);
    }
    let zero = ZERO_PROC.get_ptr(0)?;
    // SAFETY: `zero` points at a map value of the right type that nothing writes.
    PROCS.insert(tgid, unsafe { &*zero }, 0).ok()?;
    let p = PROCS.get_ptr_mut(tgid)?;
    // SAFETY: `p` was just returned by the map for this key.
    unsafe {
        (*p).tgid = tgid;
        (*p).exit_code = -1;
    }
    Some(p)
}

/// The CONNS entry of `key`, created zeroed if absent; `None` only when the map is full.
#[inline(always)]
pub fn conn_entry(key: u64) -> Option<*mut HttpRecord> {
    if let Some(c) = CONNS.get_ptr_mut(key) {
        return Some(c);
    }
    let zero = ZERO_CONN.get_ptr(0)?;
    // SAFETY: `zero` points at a map value of the right type that nothing writes.
    CONNS.insert(key, unsafe { &*zero }, 0).ok()?;
    CONNS.get_ptr_mut(key)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
