//! Batches the webhook refused (4xx), kept in `TALLY_USAGE_PARKED` for inspection: list
//! them, and — once the receiver is fixed — put them back on the usage stream.

use async_nats::jetstream;
use serde::Serialize;

use super::flush::{PARKED_STREAM, SUBJECT};
use super::message;

/// At most this many parked batches are read or re-queued per call.
const PER_CALL: u64 = 10_000;

#[derive(Debug, Serialize)]
pub struct ParkedBatch {
    pub sequence: u64,
    pub parked_at: String,
    /// The receiver's status code (0: the message itself could not be read).
    pub status: u16,
    pub answer: String,
    pub events: usize,
}

async fn stream(js: &jetstream::Context) -> Option<jetstream::stream::Stream> {
    js.get_stream(PARKED_STREAM).await.ok()
}

async fn sequences(stream: &mut jetstream::stream::Stream) -> Result<std::ops::Range<u64>, String> {
    let state = &stream.info().await.map_err(|e| e.to_string())?.state;
    if state.messages == 0 {
        return Ok(0..0);
    }
    Ok(state.first_sequence..state.last_sequence.min(state.first_sequence + PER_CALL - 1) + 1)
}

pub async fn list(js: &jetstream::Context) -> Result<Vec<ParkedBatch>, String> {
    let Some(mut stream) = stream(js).await else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for seq in sequences(&mut stream).await? {
        // Sequences of removed (re-queued) batches are gaps: skip them.
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let header = |k: &str| {
            m.headers
                .get(k)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        out.push(ParkedBatch {
            sequence: seq,
            parked_at: m.time.to_string(),
            status: header("Tally-Webhook-Status").parse().unwrap_or(0),
            answer: header("Tally-Webhook-Answer"),
            events: message::text(Some(&m.headers), &m.payload)
                .ok()
                .and_then(|t| serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&t).ok())
                .map_or(0, |v| v.len()),
        });
    }
    Ok(out)
}

/// Moves every parked batch back onto the usage stream; returns how many.
pub async fn requeue(js: &jetstream::Context) -> Result<usize, String> {
    let Some(mut stream) = stream(js).await else {
        return Ok(0);
    };
    let mut moved = 0;
    for seq in sequences(&mut stream).await? {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        // A batch goes back as it was parked (compressed: its encoding goes with it).
        let publish = jetstream::message::PublishMessage::build()
            .payload(m.payload.clone())
            .headers(message::encoding_of(Some(&m.headers)))
            .message_id(format!("parked-{seq}"));
        let ack = js
            .send_publish(SUBJECT, publish)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())?;
        // Only once the batch is back on the usage stream is it removed from the parked one.
        stream
            .delete_message(seq)
            .await
            .map_err(|e| e.to_string())?;
        moved += 1;
    }
    Ok(moved)
}
