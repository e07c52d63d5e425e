//! The agent's only `unsafe` code: decoding kernel records, reading the two clocks the
//! kernel and user space share, and mounting tracefs. Each block says why it is sound.

use std::{ffi::CString, io, mem, path::Path};

use agent_common::{HttpRecord, NewCgroup, ProcessRecord};

/// Types the kernel sends through ring buffers; any bit pattern is a valid value.
pub trait Record: Copy {}
impl Record for HttpRecord {}
impl Record for ProcessRecord {}
impl Record for NewCgroup {}

/// Decodes one ring-buffer item; `None` if it is shorter than `T`.
pub fn decode<T: Record>(bytes: &[u8]) -> Option<T> {
    decode_prefix(bytes, mem::size_of::<T>())
}

/// A record of zeros.
pub fn zeroed<T: Record>() -> T {
    // SAFETY: `Record` types are #[repr(C)] integers/byte arrays: all zeros is valid.
    unsafe { mem::MaybeUninit::<T>::zeroed().assume_init() }
}

/// Decodes a ring-buffer item that may stop short of `T`'s end (the kernel sends an
/// [`HttpRecord`] only up to the request head bytes it holds): the missing tail reads as
/// zeros. `None` if the item is shorter than `min_len`.
pub fn decode_prefix<T: Record>(bytes: &[u8], min_len: usize) -> Option<T> {
    if bytes.len() < min_len {
        return None;
    }
    let mut value = zeroed();
    decode_prefix_into(bytes, min_len, &mut value);
    Some(value)
}

/// [`decode_prefix`] into `value`, whose bytes past the item's end stay as they were (no
/// zero-fill and move of a whole `T` per record, ≈ 1 KiB for an [`HttpRecord`]); how many
/// bytes the item gave, 0 (and `value` untouched) if it is shorter than `min_len`.
pub fn decode_prefix_into<T: Record>(bytes: &[u8], min_len: usize, value: &mut T) -> usize {
    if bytes.len() < min_len {
        return 0;
    }
    let n = bytes.len().min(mem::size_of::<T>());
    // SAFETY: at most size_of::<T>() bytes are copied into a valid `T`'s own storage, from a
    // slice holding at least that many; `Record` types are #[repr(C)] integers/byte arrays,
    // for which any bits are valid.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (value as *mut T).cast::<u8>(), n);
    }
    n
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used are always supported.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC in ns, to turn kernel times into wall-clock times.
pub fn realtime_offset_ns() -> i128 {
    let mono = monotonic_ns();
    let real = clock_ns(libc::CLOCK_REALTIME);
    let mono2 = monotonic_ns();
    real as i128 - ((mono as i128 + mono2 as i128) / 2)
}

/// Effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `mount -t tracefs tracefs <path>`.
pub fn mount_tracefs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration and
    // no data argument is passed.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers `inner`'s fd with tokio for readability.
pub fn readable<T: std::os::fd::AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the AsyncFd takes ownership of `inner`, so the fd it registers stays open (and
    // is not reused for another file) for as long as the registration exists.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use agent_common::HttpRecord;

    use super::*;

    #[test]
    fn a_short_http_record_decodes_with_a_zeroed_tail() {
        let head_at = mem::offset_of!(HttpRecord, head);
        let mut bytes = vec![0u8; head_at + 5];
        bytes[..8].copy_from_slice(&42u64.to_ne_bytes()); // cgroup_id
        bytes[head_at..].copy_from_slice(b"GET /");
        let r: HttpRecord = decode_prefix(&bytes, head_at).expect("long enough");
        assert_eq!(r.cgroup_id, 42);
        assert_eq!(&r.head[..5], b"GET /");
        assert!(r.head[5..].iter().all(|&b| b == 0));
        assert!(decode_prefix::<HttpRecord>(&bytes[..head_at - 1], head_at).is_none());
        // A full record (and anything longer) still decodes whole.
        let full = vec![1u8; mem::size_of::<HttpRecord>() + 8];
        let r: HttpRecord = decode_prefix(&full, head_at).expect("full");
        assert_eq!(r.head[HEAD_LEN_LAST], 1);
    }

    #[test]
    fn decoding_into_a_record_keeps_its_tail() {
        let head_at = mem::offset_of!(HttpRecord, head);
        let mut r: HttpRecord = decode(&vec![7u8; mem::size_of::<HttpRecord>()]).expect("full");
        let mut bytes = vec![0u8; head_at + 3];
        bytes[..8].copy_from_slice(&42u64.to_ne_bytes());
        bytes[head_at..].copy_from_slice(b"GET");
        assert_eq!(decode_prefix_into(&bytes, head_at, &mut r), head_at + 3);
        assert_eq!(r.cgroup_id, 42);
        assert_eq!(
            &r.head[..4],
            b"GET\x07",
            "the bytes past the item are the old ones"
        );
        assert_eq!(
            decode_prefix_into(&bytes[..head_at - 1], head_at, &mut r),
            0
        );
        assert_eq!(r.cgroup_id, 42, "a short item leaves the record as it was");
    }

    const HEAD_LEN_LAST: usize = agent_common::HEAD_LEN - 1;
}
