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
    postcard::to_allocvec(batch)
}

/// A request body as a batch, its strings borrowed from `body`; an error names what does
/// not read (the whole batch is refused: a binary batch has no readable neighbours).
pub fn decode(body: &[u8]) -> Result<Vec<Usage<'_>>, postcard::Error> {
    let (batch, rest): (Vec<Usage<'_>>, &[u8]) = postcard::take_from_bytes(body)?;
    if rest.is_empty() {
        Ok(batch)
    } else {
        Err(postcard::Error::DeserializeUnexpectedEnd)
    }
}

/// Each event of a batch, borrowed, with where its own bytes lie in `body` (they decode
/// alone with [`decode_one`]: a receiver can keep an event's bytes instead of its copy).
#[allow(clippy::type_complexity)]
pub fn decode_each(body: &[u8]) -> Result<Vec<(Usage<'_>, Range<usize>)>, postcard::Error> {
    // A sequence is its length (a varint, as a u64 is written) and then its elements.
    let (n, mut rest): (u64, &[u8]) = postcard::take_from_bytes(body)?;
    // Every event takes more than 8 bytes: a length beyond that is a lie, not a reservation.
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n <= rest.len() / 8)
        .ok_or(postcard::Error::DeserializeBadEncoding)?;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let at = body.len() - rest.len();
        let (usage, after): (Usage<'_>, &[u8]) = postcard::take_from_bytes(rest)?;
        events.push((usage, at..body.len() - after.len()));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(postcard::Error::DeserializeUnexpectedEnd);
    }
    Ok(events)
}

/// One event's bytes (as [`decode_each`] located them), borrowed.
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
    fn each_event_is_located_and_decodes_alone() {
        let batch: Vec<Usage<'_>> = (0..5).map(usage).collect();
        let body = encode(&batch).unwrap();
        let each = decode_each(&body).unwrap();
        assert_eq!(each.len(), 5);
        for ((read, at), sent) in each.iter().zip(&batch) {
            assert_eq!(read, sent);
            assert_eq!(&decode_one(&body[at.clone()]).unwrap(), sent);
        }
        assert!(decode_each(&body[..body.len() - 1]).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode_each(&longer).is_err());
        // A length of a billion events in a few bytes is refused before anything is reserved.
        let lie = postcard::to_allocvec(&1_000_000_000u64).unwrap();
        assert!(decode_each(&lie).is_err());
        assert_eq!(decode_each(&encode(&[]).unwrap()).unwrap(), []);
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
