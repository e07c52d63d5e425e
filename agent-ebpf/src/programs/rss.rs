//! `kmem:rss_stat`: keeps each watched address space's RSS (file + anon + shmem) and its
//! peak, and each watched cgroup's resident total with the peak over open exchanges.

use agent_common::{MmState, stat};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use super::{CGROUP_MEM, MMS, PROCS, count, watched_process};

/// Offsets in the tracepoint record (see its `format` file).
const MM_ID: usize = 8;
const CURR: usize = 12;
const MEMBER: usize = 16;
const SIZE: usize = 24;

#[tracepoint(category = "kmem", name = "rss_stat")]
pub fn tally_rss(ctx: TracePointContext) -> u32 {
    let Some((cgroup_id, _)) = watched_process(bpf_get_current_pid_tgid()) else {
        return 0;
    };
    // SAFETY: reading the tracepoint record at offsets from its format file.
    let (mm_id, curr, member, size) = unsafe {
        (
            ctx.read_at::<u32>(MM_ID).unwrap_or(0),
            ctx.read_at::<u32>(CURR).unwrap_or(0),
            ctx.read_at::<i32>(MEMBER).unwrap_or(2),
            ctx.read_at::<i64>(SIZE).unwrap_or(0),
        )
    };
    let idx = match member {
        0 => 0,
        1 => 1,
        3 => 3,
        _ => return 0, // swap is not resident
    };
    let mm = match MMS.get_ptr_mut(mm_id) {
        Some(mm) => mm,
        None => {
            if MMS.insert(mm_id, MmState::default(), 0).is_err() {
                count(&ctx, stat::MM_MAP_FULL);
                return 0;
            }
            let Some(mm) = MMS.get_ptr_mut(mm_id) else {
                return 0;
            };
            mm
        }
    };
    // SAFETY: `mm` points into MMS; concurrent updates of one mm from two CPUs can race,
    // which at worst skews one sample (the next event for the member corrects it).
    let (delta, rss) = unsafe {
        let old = (*mm).members[idx];
        (*mm).members[idx] = size;
        let rss = (*mm).members[0] + (*mm).members[1] + (*mm).members[3];
        if rss > 0 && rss as u64 > (*mm).peak {
            (*mm).peak = rss as u64;
        }
        (size - old, rss)
    };
    if curr == 1 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if let Some(p) = PROCS.get_ptr_mut(tgid) {
            // SAFETY: `p` and `mm` point into their maps.
            unsafe {
                if (*p).mm_id != mm_id {
                    // First event of a new address space (after exec or fork). mm_ids are
                    // hashes of mm pointers and get reused: start its peak afresh.
                    (*p).mm_id = mm_id;
                    (*mm).peak = if rss > 0 { rss as u64 } else { 0 };
                }
            }
        }
    }
    if let Some(cg) = CGROUP_MEM.get_ptr_mut(cgroup_id) {
        // SAFETY: `cg` points into CGROUP_MEM; same benign race as above.
        unsafe {
            (*cg).current += delta;
            if (*cg).current > 0 && (*cg).current as u64 > (*cg).peak {
                (*cg).peak = (*cg).current as u64;
            }
        }
    }
    0
}
