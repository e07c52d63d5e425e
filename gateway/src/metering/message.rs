//! The JetStream message that carries usage events: a JSON array with one event per line
//! and the count in a header (the event-worker finds the events without parsing them),
//! LZ4-compressed: NATS stores, copies and hashes a quarter of the bytes.

use async_nats::HeaderMap;
use bytes::Bytes;

/// How many events the message holds; present only on messages written by [`encode`].
pub const EVENTS_HEADER: &str = "Tally-Events";

/// Set to `lz4` when the payload is an LZ4 block (its length first, 4 bytes LE).
pub const ENCODING_HEADER: &str = "Tally-Encoding";

/// A message's JSON is at most this long once decompressed (NATS's payload limit is
/// 1 MiB and the compressed form is smaller than the text): bounds what a corrupt or
/// hostile length prefix can make the worker allocate.
pub const MAX_TEXT: usize = 16 << 20;

/// Separates two events in the array: no event's JSON holds a raw newline.
const SEPARATOR: &[u8] = b",\n";

/// A chunk of event lines (each ending with `\n`) as one message's payload and headers.
pub fn encode(lines: &[Bytes]) -> (Bytes, HeaderMap) {
    let len = lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2;
    let mut payload = Vec::with_capacity(len);
    payload.push(b'[');
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            payload.extend_from_slice(SEPARATOR);
        }
        payload.extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
    }
    payload.push(b']');
    let (compressed, mut headers) = compress(&payload);
    headers.insert(EVENTS_HEADER, lines.len().to_string().as_str());
    (compressed, headers)
}

/// Headers holding only `headers`' encoding, if any: what a payload moved to another
/// stream as it is (parked, re-queued) needs so that [`text`] can still read it.
pub fn encoding_of(headers: Option<&HeaderMap>) -> HeaderMap {
    let mut kept = HeaderMap::new();
    if let Some(v) = headers.and_then(|h| h.get(ENCODING_HEADER)) {
        kept.insert(ENCODING_HEADER, v.clone());
    }
    kept
}

/// JSON text LZ4-compressed, with the header [`text`] reads it back by.
pub fn compress(text: &[u8]) -> (Bytes, HeaderMap) {
    let mut headers = HeaderMap::new();
    headers.insert(ENCODING_HEADER, "lz4");
    (
        Bytes::from(lz4_flex::block::compress_prepend_size(text)),
        headers,
    )
}

/// `lines` as messages whose payloads are at most `max` bytes each: one message when the
/// compressed chunk fits, else its two halves in turn (one event goes alone whatever its
/// size). Deterministic, so a replayed chunk is split the same way.
pub fn encode_within(lines: &[Bytes], max: usize) -> Vec<(&[Bytes], Bytes, HeaderMap)> {
    let (payload, headers) = encode(lines);
    if payload.len() <= max || lines.len() < 2 {
        return vec![(lines, payload, headers)];
    }
    let (a, b) = lines.split_at(lines.len() / 2);
    let mut parts = encode_within(a, max);
    parts.extend(encode_within(b, max));
    parts
}

/// A message's JSON text: its payload, decompressed if [`encode`] compressed it.
pub fn text(headers: Option<&HeaderMap>, payload: &Bytes) -> Result<Bytes, String> {
    match headers
        .and_then(|h| h.get(ENCODING_HEADER))
        .map(|v| v.as_str())
    {
        None => Ok(payload.clone()),
        Some("lz4") => {
            let (len, block) = payload
                .split_first_chunk::<4>()
                .ok_or("an lz4 payload without its length")?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > MAX_TEXT {
                return Err(format!("an lz4 payload of {len} bytes once decompressed"));
            }
            let text = lz4_flex::block::decompress(block, len)
                .map_err(|e| format!("an unreadable lz4 payload: {e}"))?;
            Ok(Bytes::from(text))
        }
        Some(other) => Err(format!("an unknown encoding {other:?}")),
    }
}

/// The events of a message [`encode`] wrote, each as its JSON text, without a parse;
/// `None` for any other message (the caller parses those), or one whose lines do not
/// match its header.
pub fn events<'a>(headers: Option<&HeaderMap>, payload: &'a [u8]) -> Option<Vec<&'a str>> {
    let count: usize = headers?.get(EVENTS_HEADER)?.as_str().parse().ok()?;
    let inner = payload.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let inner = std::str::from_utf8(inner).ok()?;
    if inner.is_empty() {
        return (count == 0).then(Vec::new);
    }
    let mut events = Vec::with_capacity(count);
    for line in inner.split('\n') {
        let event = line.strip_suffix(',').unwrap_or(line);
        if !(event.starts_with('{') && event.ends_with('}')) || events.len() == count {
            return None;
        }
        events.push(event);
    }
    (events.len() == count).then_some(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!("{{\"id\":\"e{i}\",\"call_id\":\"a,\\nb\"}}\n")))
            .collect()
    }

    #[test]
    fn a_message_is_a_json_array_whose_events_are_found_by_line() {
        for n in [1, 2, 1000] {
            let sent = lines(n);
            let (payload, headers) = encode(&sent);
            let payload = text(Some(&headers), &payload).expect("decompressed");
            let parsed: Vec<serde_json::Value> =
                serde_json::from_slice(&payload).expect("a JSON array");
            assert_eq!(parsed.len(), n);
            let found = events(Some(&headers), &payload).expect("found by line");
            assert_eq!(found.len(), n);
            for (event, line) in found.iter().zip(&sent) {
                assert_eq!(event.as_bytes(), line.strip_suffix(b"\n").unwrap_or(line));
            }
        }
    }

    #[test]
    fn a_chunk_that_does_not_compress_below_the_limit_is_halved() {
        // Repetitive events compress: a 1000-event chunk of ~40 KB fits 20 KB as one message.
        let sent = lines(1000);
        let parts = encode_within(&sent, 20_000);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0.len(), 1000);
        // Random ids barely compress: the chunk is split until every part fits.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let noisy: Vec<Bytes> = (0..1000)
            .map(|_| {
                let id: String = (0..64)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        char::from(b'a' + (seed % 26) as u8)
                    })
                    .collect();
                Bytes::from(format!("{{\"id\":\"{id}\"}}\n"))
            })
            .collect();
        let parts = encode_within(&noisy, 20_000);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|(_, payload, _)| payload.len() <= 20_000));
        let rejoined: Vec<Bytes> = parts
            .iter()
            .flat_map(|(c, _, _)| c.iter().cloned())
            .collect();
        assert_eq!(rejoined, noisy, "every event once, in order");
        for (chunk, payload, headers) in &parts {
            let text = text(Some(headers), payload).expect("decompressed");
            assert_eq!(
                events(Some(headers), &text).map(|e| e.len()),
                Some(chunk.len())
            );
        }
        // One event bigger than the limit still goes, alone.
        let huge = vec![noisy.concat().into()];
        assert_eq!(encode_within(&huge, 20_000).len(), 1);
    }

    #[test]
    fn anything_else_is_left_to_the_parser() {
        let (payload, headers) = encode(&lines(3));
        let payload = text(Some(&headers), &payload).expect("decompressed");
        // No header: an older gateway's message, or a parked batch put back.
        assert!(events(None, &payload).is_none());
        // A count that does not match.
        let mut wrong = HeaderMap::new();
        wrong.insert(EVENTS_HEADER, "4");
        assert!(events(Some(&wrong), &payload).is_none());
        wrong.insert(EVENTS_HEADER, "2");
        assert!(events(Some(&wrong), &payload).is_none());
        // Not one event per line.
        let spaced = Bytes::from_static(b"[{\"a\":1}, {\"b\":2}]");
        wrong.insert(EVENTS_HEADER, "2");
        assert!(events(Some(&wrong), &spaced).is_none());
        assert!(events(Some(&headers), b"{\"a\":1}").is_none());
    }

    #[test]
    fn compressed_payloads_are_smaller_and_bad_ones_are_refused() {
        let sent = lines(1000);
        let (payload, headers) = encode(&sent);
        let plain: usize = sent.iter().map(Bytes::len).sum();
        assert!(payload.len() * 2 < plain, "{} vs {plain}", payload.len());
        // Without the header the bytes are taken as they are (an older message).
        assert_eq!(text(None, &payload).expect("as is"), payload);
        let bad = |bytes: &'static [u8]| text(Some(&headers), &Bytes::from_static(bytes));
        assert!(bad(b"").unwrap_err().contains("without its length"));
        assert!(
            bad(&[0xff, 0xff, 0xff, 0x7f, 0])
                .unwrap_err()
                .contains("once decompressed")
        );
        assert!(
            bad(&[10, 0, 0, 0, 0xf0])
                .unwrap_err()
                .contains("unreadable")
        );
        let mut unknown = HeaderMap::new();
        unknown.insert(ENCODING_HEADER, "zstd");
        assert!(
            text(Some(&unknown), &payload)
                .unwrap_err()
                .contains("unknown encoding")
        );
    }
}
