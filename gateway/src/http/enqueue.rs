//! `POST /async-function/NAME[.NAMESPACE][/path]`: checks the function, the body and the
//! callback URL, stores the whole request in JetStream and answers 202 with `X-Call-Id`.

use std::sync::Arc;

use chrono::Utc;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::{Body, empty, read_limited};
use super::invoke::{content_length, split_target};
use crate::Gateway;
use crate::error::GatewayError;
use crate::proxy::headers::{self, Peer};
use crate::queue::status::CallStatus;
use crate::queue::{ANN_QUEUE, AsyncCall};

const X_CALLBACK_URL: &str = "x-callback-url";

pub async fn enqueue(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    rest: &str,
    peer: &Peer,
) -> Result<Response<Body>, GatewayError> {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed(req.method().clone()));
    }
    let (function, path) = split_target(rest, &gw.config.function_namespace)?;
    let status = gw.provider.get(&function)?;
    let queue = gw.queue()?;
    let limit = gw.config.queue.async_max_body_bytes;
    if content_length(&req).is_some_and(|len| len > limit) {
        return Err(GatewayError::PayloadTooLarge(format!(
            "async request body is larger than the limit of {limit} bytes"
        )));
    }
    let callback_url = match req.headers().get(X_CALLBACK_URL) {
        None => None,
        Some(v) => Some(check_callback(v, &gw.config.queue.callback_allowed_hosts)?),
    };
    let call_id = headers::call_id(req.headers());
    let queue_name = status
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_QUEUE))
        .filter(|q| valid_queue_name(q))
        .cloned()
        .unwrap_or_else(|| gw.config.queue.queue_name.clone());
    let (mut parts, body) = req.into_parts();
    let body = read_limited(body, limit, gw.config.read_timeout).await?;
    parts.headers.remove(X_CALLBACK_URL);
    headers::to_function(&mut parts.headers, peer, &call_id, 0);
    parts.headers.remove(headers::X_START_TIME);
    let call = AsyncCall {
        call_id: call_id.clone(),
        function: function.name.to_string(),
        namespace: function.namespace.to_string(),
        method: parts.method.to_string(),
        path: path.to_string(),
        query: parts.uri.query().map(String::from),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
        callback_url,
        queued_at: Utc::now(),
        queue: queue_name,
        requeues: 0,
    };
    let (policy, _) = queue
        .default_policy
        .with_annotations(status.annotations.as_ref());
    let queued = CallStatus::queued(&call, policy.attempts);
    // Both writes at once. "queued" is only created, never overwritten, so a worker that
    // already wrote "running" (or the result) wins whichever write lands first.
    let timeout = std::time::Duration::from_secs(10);
    // Run to the end even if the client goes away meanwhile: a call that reached JetStream
    // is counted and gets its consumer, whether or not the 202 was read.
    let task = {
        let (gw, queue, call_id) = (gw.clone(), queue.clone(), call_id.clone());
        tokio::spawn(async move {
            let stored = tokio::time::timeout(timeout, async {
                let (status, published) =
                    tokio::join!(queue.store.create(&queued), queue.publish(&call));
                published.map_err(|e| e.to_string())?;
                status.map_err(|e| e.to_string())
            })
            .await;
            let failure = match stored {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("could not queue the call: {e}")),
                Err(_) => Some("NATS did not confirm the call within 10 s".to_string()),
            };
            if let Some(why) = failure {
                // Nothing half-written: no status for a call that was not queued.
                let _ = queue.store.forget(&call_id).await;
                return Err(GatewayError::Unavailable(why));
            }
            gw.metrics.queue_submitted.inc();
            if let Some(worker) = gw.queue_worker.get() {
                worker.ensure_consumer(&call.queue, &call.namespace, &call.function);
            }
            Ok(())
        })
    };
    task.await
        .map_err(|e| GatewayError::Internal(format!("queueing task: {e}")))??;
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::ACCEPTED;
    if let Ok(v) = HeaderValue::from_str(&call_id) {
        response.headers_mut().insert(headers::X_CALL_ID, v);
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    Ok(response)
}

/// An absolute http(s) URL whose host is allowed; else a 400 that says why.
fn check_callback(value: &HeaderValue, allowed: &[String]) -> Result<String, GatewayError> {
    let bad = |why: &str| GatewayError::BadRequest(format!("X-Callback-Url {value:?} {why}"));
    let text = value.to_str().map_err(|_| bad("is not valid text"))?;
    let uri: http::Uri = text.parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("must be an absolute http:// or https:// URL"));
    }
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return Err(bad(
            "points to a host that is not in the callback allow-list",
        ));
    }
    Ok(text.to_string())
}

/// Queue names become subjects and stream names: letters, digits, `-` and `_` only.
fn valid_queue_name(q: &str) -> bool {
    !q.is_empty()
        && q.len() <= 64
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls() {
        let ok = |s: &'static str, allowed: &[String]| {
            check_callback(&HeaderValue::from_static(s), allowed)
        };
        assert!(ok("http://127.0.0.1:9000/cb", &[]).is_ok());
        assert!(ok("https://example.com/cb", &[]).is_ok());
        assert!(ok("/relative", &[]).is_err());
        assert!(ok("ftp://x/y", &[]).is_err());
        assert!(ok("not a url", &[]).is_err());
        let allowed = vec!["127.0.0.1".to_string()];
        assert!(ok("http://127.0.0.1:9/x", &allowed).is_ok());
        assert!(ok("http://169.254.169.254/latest", &allowed).is_err());
        assert!(
            valid_queue_name("faas-request") && !valid_queue_name("a.b") && !valid_queue_name("")
        );
    }
}
