//! The ingest API's binary batch: the usage events an agent POSTs to `/system/usage` as
//! postcard (`Content-Type: application/x-tally-usage+postcard`) instead of a JSON array.
//! Same fields as the JSON event, decoded with the strings borrowed from the body.

use alloc::{borrow::Cow, vec::Vec};
use core::ops::Range;

use serde::{Deserialize, Serialize};

/// The content type of a postcard batch; any other body is read as a JSON array.
pub const CONTENT_TYPE: &str = "application/x-tally-usage+postcard";

/// One invocation, as the agent measured it (the JSON event's fields, in a fixed order:
/// postcard writes no field names, so none may be skipped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage<'a> {
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub call_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub namespace: Cow<'a, str>,
    #[serde(borrow)]
    pub function_name: Cow<'a, str>,
    #[serde(borrow)]
    pub replica: Option<Cow<'a, str>>,
    /// RFC 3339 with nanoseconds.
    #[serde(borrow)]
    pub started: Cow<'a, str>,
    pub duration_ns: u64,
    pub status_code: u16,
    pub memory_peak_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub cpu_ns: Option<u64>,
    pub exit_code: Option<i32>,
    #[serde(borrow)]
    pub source: Cow<'a, str>,
}

/// A batch as a request body.
pub fn encode(batch: &[Usage<'_>]) -> Result<Vec<u8>, postcard::Error> {
    write_batch(batch.len(), batch.iter())
}

/// A batch as a request body, from events made one by one (no slice of them collected
/// first); the bytes are those [`encode`] writes for the same events. An iterator that
/// yields another count than its `len()` is an error.
///
/// Written here field by field in postcard's format (what `postcard::to_allocvec` writes
/// for the slice, as the tests check): the agent encodes every invocation, and serde's
/// generic path cost ≈ 25 ns more of its ≈ 410 per event (`cargo run --release -p agent
/// --example event_path`, BENCHMARKS.md).
pub fn encode_each<'a>(
    batch: impl ExactSizeIterator<Item = Usage<'a>>,
) -> Result<Vec<u8>, postcard::Error> {
    write_batch(batch.len(), batch)
}

/// The body of `len` events, owned or borrowed (no event is cloned to be written).
fn write_batch<'a>(
    len: usize,
    batch: impl Iterator<Item = impl core::borrow::Borrow<Usage<'a>>>,
) -> Result<Vec<u8>, postcard::Error> {
    let mut out = body_buffer(len);
    put_varint(&mut out, len as u64);
    let mut n = 0;
    for u in batch {
        put_usage(&mut out, u.borrow());
        n += 1;
    }
    if n != len {
        // The batch iterator lied about its length.
        return Err(postcard::Error::SerializeSeqLengthUnknown);
    }
    Ok(out)
}

/// A body's buffer, sized for `events` (≈ 150 bytes each) so that it is not regrown
/// (postcard's own growing vector: ≈ 95 against 75 ns per event, BENCHMARKS.md).
fn body_buffer(events: usize) -> Vec<u8> {
    Vec::with_capacity(10 + events.saturating_mul(160))
}

/// One event as postcard writes the struct: its fields in order, without names.
fn put_usage(out: &mut Vec<u8>, u: &Usage<'_>) {
    put_opt_str(out, u.id.as_deref());
    put_opt_str(out, u.call_id.as_deref());
    put_str(out, &u.namespace);
    put_str(out, &u.function_name);
    put_opt_str(out, u.replica.as_deref());
    put_str(out, &u.started);
    put_varint(out, u.duration_ns);
    put_varint(out, u.status_code.into());
    put_varint(out, u.memory_peak_bytes);
    put_opt_varint(out, u.memory_limit_bytes);
    put_opt_varint(out, u.cpu_ns);
    // A signed integer is zigzagged first: 0, -1, 1, -2, ... as 0, 1, 2, 3, ...
    put_opt_varint(
        out,
        u.exit_code
            .map(|c| u64::from(((c << 1) ^ (c >> 31)) as u32)),
    );
    put_str(out, &u.source);
}

/// An unsigned integer (of any width) as a varint: 7 bits a byte, low first, the high bit
/// set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A string: its length as a varint, then its bytes.
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// An option: a 0 byte for `None`, a 1 byte and the value for `Some`.
fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_opt_varint(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_varint(out, v);
        }
    }
}

/// A request body as a batch, its strings borrowed from `body`; an error names what does
/// not read (the whole batch is refused: a binary batch has no readable neighbours).
pub fn decode(body: &[u8]) -> Result<Vec<Usage<'_>>, postcard::Error> {
    let mut batch = Vec::new();
    decode_each(body, |usage, _| batch.push(usage))?;
    Ok(batch)
}

/// Each event of a batch in order, borrowed, with where its own bytes lie in `body` (they
/// read alone with [`decode_one`], so a receiver can keep the body instead of copies of the
/// events); the number of events, or why the batch does not read. On an error `each` may
/// have seen some events already: a caller acts on them only once the whole batch has read.
pub fn decode_each<'a>(
    body: &'a [u8],
    mut each: impl FnMut(Usage<'a>, Range<usize>),
) -> Result<usize, postcard::Error> {
    // A sequence is its length (a varint, as a u64 is written) and then its elements.
    let (n, mut rest): (u64, &[u8]) = postcard::take_from_bytes(body)?;
    // Every event takes more than 8 bytes: a longer count is a lie, not work to do.
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n <= rest.len() / 8)
        .ok_or(postcard::Error::DeserializeBadEncoding)?;
    for _ in 0..n {
        let at = body.len() - rest.len();
        let (usage, after): (Usage<'a>, &[u8]) = postcard::take_from_bytes(rest)?;
        each(usage, at..body.len() - after.len());
        rest = after;
    }
    if !rest.is_empty() {
        return Err(postcard::Error::DeserializeUnexpectedEnd);
    }
    Ok(n)
}

/// One event's bytes, as [`decode_each`] located them, borrowed.
pub fn decode_one(bytes: &[u8]) -> Result<Usage<'_>, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(i: u64) -> Usage<'static> {
        Usage {
            id: Some(Cow::Owned(alloc::format!("id-{i}"))),
            call_id: i.is_multiple_of(2).then_some(Cow::Borrowed("call")),
            namespace: Cow::Borrowed("openfaas-fn"),
            function_name: Cow::Borrowed("env"),
            replica: Some(Cow::Borrowed("env-abcde")),
            started: Cow::Borrowed("2026-11-22T10:00:00.123456789Z"),
            duration_ns: 1_500_000 + i,
            status_code: 200,
            memory_peak_bytes: 1 << 20,
            memory_limit_bytes: None,
            cpu_ns: Some(41_000),
            exit_code: None,
            source: Cow::Borrowed("kernel"),
        }
    }

    #[test]
    fn a_batch_round_trips_with_borrowed_strings() {
        let batch: Vec<Usage<'_>> = (0..3).map(usage).collect();
        let body = encode(&batch).unwrap();
        let read = decode(&body).unwrap();
        assert_eq!(read, batch);
        assert!(matches!(read[0].namespace, Cow::Borrowed(_)), "not copied");
        assert_eq!(decode(&encode(&[]).unwrap()).unwrap(), []);
    }

    #[test]
    fn batches_are_postcards_bytes_however_made() {
        let mut t = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            t ^= t << 13;
            t ^= t >> 7;
            t ^= t << 17;
            t
        };
        let mut batch = Vec::new();
        for i in 0..500u64 {
            let mut u = usage(i);
            // Every varint width, both signs and the extremes, long and empty strings.
            let bits = next() % 65;
            let wide = if bits == 64 {
                u64::MAX
            } else {
                next() & ((1 << bits) - 1)
            };
            u.duration_ns = wide;
            u.memory_peak_bytes = next() >> (next() % 64);
            u.status_code = next() as u16;
            u.memory_limit_bytes = (i % 3 != 0).then_some(wide.rotate_left(7));
            u.cpu_ns = (i % 4 == 1).then_some(next());
            u.exit_code = match i % 5 {
                0 => None,
                1 => Some(i32::MIN),
                2 => Some(i32::MAX),
                3 => Some(-1),
                _ => Some(next() as i32),
            };
            u.id = (i % 7 != 0).then(|| Cow::Owned("x".repeat((next() % 300) as usize)));
            u.replica = (i % 2 == 0).then_some(Cow::Borrowed(""));
            batch.push(u);
        }
        for n in [0, 1, 2, 127, 128, 500] {
            let body = encode(&batch[..n]).unwrap();
            assert_eq!(
                body,
                postcard::to_allocvec(&batch[..n]).unwrap(),
                "{n} events"
            );
            let each = encode_each(batch[..n].iter().cloned()).unwrap();
            assert_eq!(each, body, "{n} events, one by one");
            assert_eq!(decode(&body).unwrap(), batch[..n]);
        }
    }

    #[test]
    fn a_short_iterator_is_an_error() {
        struct Lies(u32);
        impl Iterator for Lies {
            type Item = Usage<'static>;
            fn next(&mut self) -> Option<Self::Item> {
                self.0 = self.0.checked_sub(1)?;
                Some(usage(1))
            }
        }
        impl ExactSizeIterator for Lies {
            fn len(&self) -> usize {
                5
            }
        }
        assert!(encode_each(Lies(2)).is_err());
    }

    #[test]
    fn each_event_is_located_and_reads_alone() {
        let batch: Vec<Usage<'_>> = (0..5).map(usage).collect();
        let body = encode(&batch).unwrap();
        let mut seen = Vec::new();
        assert_eq!(decode_each(&body, |u, at| seen.push((u, at))).unwrap(), 5);
        assert_eq!(seen.len(), 5);
        for ((read, at), sent) in seen.iter().zip(&batch) {
            assert_eq!(read, sent);
            assert_eq!(&decode_one(&body[at.clone()]).unwrap(), sent);
        }
        assert_eq!(decode(&body).unwrap(), batch, "the same events as a whole");
        assert!(decode_each(&body[..body.len() - 1], |_, _| {}).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode_each(&longer, |_, _| {}).is_err());
        // A count of a billion events in a few bytes is refused before any is read.
        let lie = postcard::to_allocvec(&1_000_000_000u64).unwrap();
        assert!(decode_each(&lie, |_, _| panic!("no event")).is_err());
        assert_eq!(decode_each(&encode(&[]).unwrap(), |_, _| {}).unwrap(), 0);
    }

    #[test]
    fn truncated_or_trailing_bytes_are_refused() {
        let body = encode(&[usage(1)]).unwrap();
        assert!(decode(&body[..body.len() - 1]).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(b"[{\"json\":1}]").is_err());
    }
}
