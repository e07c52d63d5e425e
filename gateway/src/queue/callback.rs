//! The callback of a finished async call: a POST of the function's response to the
//! caller's `X-Callback-Url`, with its own bounded retries and backoff.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};

use super::status::CallbackOutcome;
use crate::proxy::headers;

/// What the callback carries besides the body.
pub struct Callback<'a> {
    pub url: &'a str,
    pub call_id: &'a str,
    pub function: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub attempt: u32,
    pub max_attempts: u32,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

pub use crate::http::outbound::OutboundClient as CallbackClient;

/// Delivers `cb`, retrying connection failures, timeouts, 429 and 5xx up to `attempts`
/// times (200 ms, 400 ms, ... at most 5 s apart).
pub async fn deliver(
    client: &CallbackClient,
    cb: &Callback<'_>,
    attempts: u32,
    timeout: Duration,
) -> CallbackOutcome {
    let mut outcome = CallbackOutcome {
        url: cb.url.to_string(),
        attempts: 0,
        status_code: None,
        error: None,
    };
    let mut wait = Duration::from_millis(200);
    for attempt in 1..=attempts.max(1) {
        outcome.attempts = attempt;
        match tokio::time::timeout(timeout, post(client, cb)).await {
            Ok(Ok(status)) => {
                outcome.status_code = Some(status);
                outcome.error = None;
                if status < 500 && status != 429 {
                    return outcome;
                }
                outcome.error = Some(format!("callback answered {status}"));
            }
            Ok(Err(e)) => outcome.error = Some(e),
            Err(_) => outcome.error = Some(format!("callback did not answer within {timeout:?}")),
        }
        if attempt < attempts {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
    outcome
}

async fn post(client: &CallbackClient, cb: &Callback<'_>) -> Result<u16, String> {
    let uri: http::Uri = cb.url.parse().map_err(|e| format!("callback URL: {e}"))?;
    let mut req = Request::post(uri);
    let h = req.headers_mut().ok_or("invalid callback request")?;
    for (k, v) in cb.headers {
        h.append(k, v.clone());
    }
    headers::strip_hop_by_hop(h);
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::HOST);
    let set = |h: &mut HeaderMap, k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(h, "x-call-id", cb.call_id.to_string());
    set(h, "x-function-name", cb.function.to_string());
    set(h, "x-function-status", cb.status.to_string());
    set(
        h,
        "x-duration-seconds",
        format!("{:.6}", cb.duration.as_secs_f64()),
    );
    set(h, "x-retry", cb.attempt.saturating_sub(1).to_string());
    set(
        h,
        "x-retry-max",
        cb.max_attempts.saturating_sub(1).to_string(),
    );
    let req = req
        .body(Full::new(cb.body.clone()))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("callback failed: {e}"))?;
    let status = resp.status().as_u16();
    // Read (and drop) the answer so the connection can be reused.
    let _ = resp.into_body().collect().await;
    Ok(status)
}
