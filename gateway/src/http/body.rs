//! Body types and helpers: the boxed body every route answers with, bounded JSON
//! reads, a body that enforces an idle read timeout, and one that runs a guard at its end.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, Limited, combinators::BoxBody};
use serde::de::DeserializeOwned;

use crate::error::GatewayError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A request body the gateway forwards: streaming from a client, or buffered (a call
/// the queue-worker replays). One concrete type keeps the invoke path non-generic.
pub enum RequestBody {
    Client(hyper::body::Incoming),
    Buffered(Full<Bytes>),
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Client(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Buffered(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client(b) => b.is_end_stream(),
            Self::Buffered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client(b) => b.size_hint(),
            Self::Buffered(b) => b.size_hint(),
        }
    }
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Reads a whole response body of at most `limit` bytes.
pub async fn collect_capped(mut body: Body, limit: usize) -> Result<Bytes, String> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(format!("the response is larger than {limit} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The error a body gives when no data arrived for the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("read_timeout ({0:?}) fired while reading the request body")]
pub struct ReadTimedOut(pub Duration);

/// Reads a whole body of at most `limit` bytes within `timeout`.
pub async fn read_limited<B>(body: B, limit: u64, timeout: Duration) -> Result<Bytes, GatewayError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    match collected {
        Err(_) => Err(GatewayError::RequestTimeout(format!(
            "read_timeout ({timeout:?}) fired while reading the request body"
        ))),
        Ok(Err(e)) => Err(body_error(e, limit as u64)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Maps an error from reading a request body to the answer it deserves.
pub fn body_error(e: BoxError, limit: u64) -> GatewayError {
    if e.is::<http_body_util::LengthLimitError>() {
        too_large(limit)
    } else if let Some(t) = e.downcast_ref::<ReadTimedOut>() {
        GatewayError::RequestTimeout(t.to_string())
    } else {
        GatewayError::BadRequest(format!("could not read the request body: {e}"))
    }
}

pub fn too_large(limit: u64) -> GatewayError {
    GatewayError::PayloadTooLarge(format!(
        "request body is larger than the limit of {limit} bytes"
    ))
}

/// Parses JSON, naming the field when a value has the wrong type or is missing.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            GatewayError::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            GatewayError::BadRequest(format!("invalid JSON body: field `{path}`: {inner}"))
        }
    })
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`ReadTimedOut`] when no frame arrives for `timeout`.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
        timeout: Duration,
    }
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep(timeout),
            timeout,
        }
    }
}

impl<B> HttpBody for IdleTimeoutBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + *this.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ReadTimedOut(*this.timeout))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps `guard` alive until the body ends or is dropped, so
    /// in-flight counts and leases cover the whole streamed response.
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B, G> HttpBody for GuardedBody<B, G>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // Released before the last frame is handed on, so whatever the guard records
        // (the usage event) is spooled before the client can have the whole response.
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || (matches!(polled, Poll::Ready(Some(Ok(_)))) && this.inner.is_end_stream())
        {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        replicas: u64,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<T>(br#"{"replicas":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`replicas`"), "{e}");
        let e = parse_json::<T>(b"{").unwrap_err().to_string();
        assert!(e.contains("invalid JSON"), "{e}");
        let e = parse_json::<T>(b"{}").unwrap_err().to_string();
        assert!(e.contains("missing field `replicas`"), "{e}");
        assert!(parse_json::<T>(br#"{"replicas":1,"other":[1]}"#).is_ok());
    }

    #[tokio::test]
    async fn limited_reads_refuse_large_bodies() {
        let e = read_limited(
            Full::new(Bytes::from(vec![0u8; 11])),
            10,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        let ok = read_limited(
            Full::new(Bytes::from_static(b"abc")),
            10,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(&ok[..], b"abc");
    }
}
