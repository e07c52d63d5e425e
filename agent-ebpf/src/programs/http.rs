//! The HTTP/1.x exchange state machine shared by the read/write/close programs: a request
//! starts at a read that begins with a method, a response at a write that begins `HTTP/1.`,
//! and ends when its length is reached, at a chunked terminator, or at the next request/close.

use agent_common::{HEAD_LEN, HttpRecord, conn, end, stat};
use core::ptr::{read_unaligned, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_user, generated::bpf_probe_read_user as read_user_raw},
};

use super::{
    BPF_RB_NO_WAKEUP, CGROUP_MEM, HTTP_EVENTS, HTTP_WAKE_AT, SCAN_LEN, SCRATCH, Scratch, count,
    now, wakeup_flags,
};

/// Where the request head begins in an [`HttpRecord`]: the bytes before it always go out.
const RECORD_HEAD_AT: usize = core::mem::offset_of!(HttpRecord, head);

/// Method tokens (first four bytes) that begin an HTTP/1.x request line.
const METHODS: [[u8; 4]; 9] = [
    *b"GET ", *b"POST", *b"PUT ", *b"HEAD", *b"DELE", *b"PATC", *b"OPTI", *b"CONN", *b"TRAC",
];

/// First bytes of a read: does it begin a request line?
#[inline(always)]
pub fn is_request(first: &[u8; 8]) -> bool {
    let mut i = 0;
    while i < METHODS.len() {
        if first[..4] == METHODS[i] {
            return true;
        }
        i += 1;
    }
    false
}

/// Opens an exchange on `c` for a request whose first `len` bytes are at `data`, after
/// sending the exchange still open on it (a pipelined request), if any.
#[inline(always)]
pub fn start_request<C: EbpfContext>(
    ctx: &C,
    c: *mut HttpRecord,
    tgid: u32,
    fd: u32,
    cgroup_id: u64,
    data: u64,
    len: u64,
) {
    // SAFETY: `c` points into CONNS; one thread drives one connection at a time.
    unsafe {
        match (*c).state {
            conn::RESPONSE => finish(ctx, c, end::NEXT_REQUEST),
            conn::REQUEST => finish(ctx, c, end::NEXT_REQUEST),
            _ => {}
        }
    }
    let n = copy_head(c, data, len);
    begin(c, tgid, fd, cgroup_id, n);
}

/// `n`, already at most `max` (a power of two), with that bound spelled out for the
/// verifier, which does not carry it through a branch: a mask, then a clamp.
#[inline(always)]
pub fn verifier_bound(n: u32, max: u32) -> u32 {
    let n = n & (2 * max - 1);
    if n > max { max } else { n }
}

/// Copies the first `len` bytes at `data` (at most [`HEAD_LEN`]) into `c`'s head; how many,
/// 0 if they could not be read.
#[inline(always)]
pub fn copy_head(c: *mut HttpRecord, data: u64, len: u64) -> u32 {
    let n = if len > HEAD_LEN as u64 {
        HEAD_LEN as u32
    } else {
        len as u32
    };
    let n = verifier_bound(n, HEAD_LEN as u32);
    // SAFETY: `c` points into CONNS; user memory is read through the checked helper.
    if unsafe { read_user_raw((*c).head.as_mut_ptr().cast(), n, data as *const _) } < 0 {
        return 0;
    }
    n
}

/// The first bytes of `c`'s head.
#[inline(always)]
pub fn head_start(c: *mut HttpRecord) -> [u8; 8] {
    // SAFETY: `c` points into CONNS; the head is far longer than 8 bytes.
    unsafe { read_unaligned((*c).head.as_ptr().cast::<[u8; 8]>()) }
}

/// Opens an exchange on `c`, whose head already holds the request's first `head_len` bytes.
#[inline(always)]
pub fn begin(c: *mut HttpRecord, tgid: u32, fd: u32, cgroup_id: u64, head_len: u32) {
    // SAFETY: `c` points into CONNS; one thread drives one connection at a time.
    unsafe {
        (*c).cgroup_id = cgroup_id;
        (*c).tgid = tgid;
        (*c).fd = fd;
        (*c).request_ns = now();
        (*c).response_ns = 0;
        (*c).end_ns = 0;
        (*c).bytes_out = 0;
        (*c).expected_out = 0;
        (*c).status = 0;
        (*c).chunked = 0;
        (*c).end_reason = 0;
        (*c).state = conn::REQUEST;
        (*c).head_len = head_len;
    }
    if let Some(cg) = CGROUP_MEM.get_ptr_mut(cgroup_id) {
        // SAFETY: `cg` points into CGROUP_MEM.
        unsafe {
            if (*cg).active == 0 {
                (*cg).peak = if (*cg).current > 0 {
                    (*cg).current as u64
                } else {
                    0
                };
            }
            (*cg).active += 1;
        }
    }
}

/// Accounts `written` bytes (the first segment at `seg`, `seg_len` long) of a write on `c`.
#[inline(always)]
pub fn on_write<C: EbpfContext>(
    ctx: &C,
    c: *mut HttpRecord,
    seg: u64,
    seg_len: u64,
    written: u64,
    tail: u64,
) {
    // SAFETY: `c` points into CONNS; user memory is read through checked helpers.
    unsafe {
        if (*c).state == conn::IDLE {
            return; // no exchange open: a write outside any response
        }
        // One clock read: the write's exit is the response's start and, so far, its end.
        let t = now();
        if (*c).state == conn::REQUEST {
            // The first bytes (up to SCAN_LEN, at least the status line's 12) in one copy:
            // the status line is read there, and then the headers.
            let Some(sc) = SCRATCH.get_ptr_mut(0) else {
                return;
            };
            let valid = if seg_len < written { seg_len } else { written };
            if !read_response_start(sc, seg, valid) {
                return;
            }
            let first = read_unaligned((*sc).buf.as_ptr().cast::<[u8; 12]>());
            if first[..7] != *b"HTTP/1." || first[9] == b'1' {
                return; // not a response, or an interim 1xx
            }
            (*c).status = (first[9].wrapping_sub(b'0') as u16) * 100
                + (first[10].wrapping_sub(b'0') as u16) * 10
                + first[11].wrapping_sub(b'0') as u16;
            (*c).response_ns = t;
            (*c).state = conn::RESPONSE;
            scan_headers(sc, c);
        }
        if (*c).state != conn::RESPONSE {
            return;
        }
        (*c).bytes_out += written;
        (*c).end_ns = t;
        if (*c).expected_out > 0 && (*c).bytes_out >= (*c).expected_out {
            finish(ctx, c, end::CONTENT_LENGTH);
        } else if (*c).chunked == 1 && tail != 0 {
            if let Ok(t) = bpf_probe_read_user(tail as *const [u8; 5]) {
                if t == *b"0\r\n\r\n" {
                    finish(ctx, c, end::CHUNKED);
                }
            }
        }
    }
}

/// Eight copies of a byte, for word-at-a-time (SWAR) searches.
const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}
/// Header names as little-endian words, lower case (`| 0x20` folds ASCII letters and leaves
/// `-` and `:` as they are).
const CONTENT_: u64 = u64::from_le_bytes(*b"content-");
const LENGTH: u64 = u64::from_le_bytes(*b"length:\0");
const TRANSFER: u64 = u64::from_le_bytes(*b"transfer");
const ENCODIN: u64 = u64::from_le_bytes(*b"-encodin");
const LOWER: u64 = splat(0x20);

/// Handles the line that begins at `s` (just after a `\n` at `s - 1`): the blank line ends
/// the header block; `Content-Length:` and `Transfer-Encoding:` are noted. Returns true at
/// the header end.
#[inline(always)]
unsafe fn header_line(sc: *mut Scratch, c: *mut HttpRecord, s: usize) -> bool {
    let s = s & (SCAN_LEN - 1);
    // SAFETY: `s < SCAN_LEN` and the buffer has 32 bytes beyond SCAN_LEN: both 8-byte loads
    // are in bounds; unaligned reads of plain bytes.
    unsafe {
        let p = (*sc).buf.as_ptr().add(s);
        if *p == b'\r' {
            write_volatile(&mut (*sc).header_end, (s + 2) as u64);
            return true;
        }
        let w1 = read_unaligned(p.cast::<u64>()) | LOWER;
        let w2 = read_unaligned(p.add(8).cast::<u64>()) | LOWER;
        if w1 == CONTENT_ && w2 & 0x00ff_ffff_ffff_ffff == LENGTH {
            write_volatile(&mut (*sc).length_at, (s + 15) as u64);
        } else if w1 == TRANSFER && w2 == ENCODIN {
            write_volatile(&mut (*c).chunked, 1);
        }
    }
    false
}

/// Copies a response's first bytes at `seg` into the scratch buffer: the `valid` bytes the
/// write sent (at most [`SCAN_LEN`]), and at least 12 so that the status line can be read
/// (as a 12-byte read would, past a shorter write). False if the memory could not be read.
#[inline(always)]
unsafe fn read_response_start(sc: *mut Scratch, seg: u64, valid: u64) -> bool {
    let n = if valid > SCAN_LEN as u64 {
        SCAN_LEN
    } else {
        valid as usize
    };
    // Only the bytes written (a short response need not pay for SCAN_LEN); the bound is
    // spelled out for the verifier.
    let size = verifier_bound(if n < 12 { 12 } else { n as u32 }, SCAN_LEN as u32);
    // SAFETY: the scratch slot is this CPU's; user memory is read through the helper.
    unsafe {
        if read_user_raw((*sc).buf.as_mut_ptr().cast(), size, seg as *const _) < 0 {
            return false;
        }
        // Compared against fresh loads of this, not `n`: what a branch learns about `n`
        // would differ between the paths of each word and multiply the verifier's states.
        write_volatile(&mut (*sc).valid, n as u64);
    }
    true
}

/// Finds the header end, `Content-Length` and `Transfer-Encoding` in a response's first
/// bytes, which [`read_response_start`] put in the scratch buffer.
///
/// Eight bytes at a time: a word without a `\n` (most of them) costs a handful of
/// instructions; only line starts are looked at. Written for the verifier: findings go to
/// map memory (volatile stores), so the states of successive iterations differ only in the
/// index and stay few; the number itself is parsed once after the loop.
#[inline(always)]
unsafe fn scan_headers(sc: *mut Scratch, c: *mut HttpRecord) {
    // SAFETY: the scratch slot is this CPU's.
    unsafe {
        let buf = (*sc).buf.as_mut_ptr();
        write_volatile(&mut (*sc).length_at, 0);
        write_volatile(&mut (*sc).header_end, 0);
        let mut k = 0usize;
        'words: while k < SCAN_LEN / 8 {
            let base = k * 8;
            if base as u64 >= read_volatile(&(*sc).valid) {
                break;
            }
            // SAFETY: base + 8 <= SCAN_LEN.
            let w = read_unaligned(buf.add(base).cast::<u64>());
            let x = w ^ splat(b'\n');
            // Non-zero iff some byte of `w` is '\n' (the classic "has a zero byte" test).
            if x.wrapping_sub(splat(1)) & !x & splat(0x80) != 0 {
                let mut j = 0usize;
                while j < 8 {
                    let i = base + j;
                    if i as u64 + 2 >= read_volatile(&(*sc).valid) {
                        break 'words; // buf[i..=i + 2] must lie within the written bytes
                    }
                    // Re-read from memory rather than shift `w`: what a branch learns about
                    // a dead temporary does not split the verifier's states.
                    if *buf.add(i) == b'\n' && header_line(sc, c, i + 1) {
                        break 'words;
                    }
                    j += 1;
                }
            }
            k += 1;
        }
        let header_end = read_volatile(&(*sc).header_end);
        let at = read_volatile(&(*sc).length_at) as usize;
        if header_end == 0 || at == 0 {
            return; // header end or length not within the first write: length unknown
        }
        let mut value: u64 = 0;
        let mut digits = 0;
        let mut k = 0;
        while k < 24 {
            let d = *buf.add((at + k) & (SCAN_LEN - 1));
            if d.is_ascii_digit() {
                value = value * 10 + (d - b'0') as u64;
                digits += 1;
            } else if d != b' ' || digits > 0 {
                break;
            }
            k += 1;
        }
        if digits > 0 {
            (*c).expected_out = header_end + value;
        }
    }
}

/// Sends the exchange on `c` to user space and makes the connection idle again.
#[inline(always)]
pub fn finish<C: EbpfContext>(ctx: &C, c: *mut HttpRecord, reason: u8) {
    // SAFETY: `c` points into CONNS.
    unsafe {
        (*c).end_reason = reason;
        if (*c).end_ns == 0 {
            (*c).end_ns = now();
        }
        if let Some(cg) = CGROUP_MEM.get_ptr_mut((*c).cgroup_id) {
            (*c).peak_rss_bytes = (*cg).peak;
            if (*cg).active > 0 {
                (*cg).active -= 1;
            }
        }
        // Only the head bytes the request really had: with a typical head of a few hundred
        // bytes the record is a third of the struct, for the copy here, the ring's room,
        // and user space's copy out of it (which zero-fills the rest).
        let n = verifier_bound((*c).head_len, HEAD_LEN as u32);
        let record = core::slice::from_raw_parts(c.cast::<u8>(), RECORD_HEAD_AT + n as usize);
        // How full the ring is (a helper call) only at every 16th exchange of a connection:
        // the wakeup guards a stalled agent, with 7 MiB of ring left when it is asked for.
        let flags = if (*c).seq & 15 == 0 {
            wakeup_flags(&HTTP_EVENTS, HTTP_WAKE_AT)
        } else {
            BPF_RB_NO_WAKEUP
        };
        if HTTP_EVENTS.output::<[u8]>(record, flags).is_err() {
            count(ctx, stat::HTTP_RINGBUF_FULL);
        }
        (*c).seq += 1;
        (*c).state = conn::IDLE;
    }
}
