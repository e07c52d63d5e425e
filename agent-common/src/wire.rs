//! The ingest API's binary batch: the usage events an agent POSTs to `/system/usage` as
//! postcard (`Content-Type: application/x-tally-usage+postcard`) instead of a JSON array.
//! Same fields as the JSON event, decoded with the strings borrowed from the body.

use alloc::{borrow::Cow, vec::Vec};

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
    fn truncated_or_trailing_bytes_are_refused() {
        let body = encode(&[usage(1)]).unwrap();
        assert!(decode(&body[..body.len() - 1]).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(b"[{\"json\":1}]").is_err());
    }
}
