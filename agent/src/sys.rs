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
    if bytes.len() < mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the slice holds at least size_of::<T>() bytes, read_unaligned has no alignment
    // requirement, and `Record` types are #[repr(C)] integers/byte arrays (any bits valid).
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
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
