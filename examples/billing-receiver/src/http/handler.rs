//! One webhook request: limits → signature → parse and validate → batch insert → 200.
//! Order matters: the signature is checked before any JSON parsing, so unsigned junk costs little.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::rescue::RequestError;
use crate::db::{Pool, store};
use crate::event::{self, EVENT_TYPE};
use crate::signature::Secret;

/// What every request needs, shared by all connections.
pub struct State {
    pub pool: Pool,
    pub secret: Secret,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
}

/// Entry point for hyper: never fails, every error becomes a status with a JSON message.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let delivery = header_str(&req, "x-openfaas-delivery").map(str::to_owned);
    let response = match receive(&state, req, delivery.as_deref()).await {
        Ok(stored) => {
            tracing::info!(
                delivery = delivery.as_deref().unwrap_or("-"),
                inserted = stored.inserted,
                duplicates = stored.duplicates,
                "batch stored"
            );
            json(
                StatusCode::OK,
                serde_json::json!({"inserted": stored.inserted, "duplicates": stored.duplicates}),
            )
        }
        Err(e) => {
            let status = e.status();
            tracing::warn!(
                delivery = delivery.as_deref().unwrap_or("-"),
                status = status.as_u16(),
                error = %e,
                "batch refused"
            );
            json(status, serde_json::json!({"error": e.public_message()}))
        }
    };
    Ok(response)
}

async fn receive(
    state: &State,
    req: Request<Incoming>,
    delivery: Option<&str>,
) -> Result<store::Stored, RequestError> {
    if req.method() != http::Method::POST {
        return Err(RequestError::Method);
    }
    if let Some(kind) = header_str(&req, "x-openfaas-event")
        && kind != EVENT_TYPE
    {
        return Err(RequestError::EventType(kind.to_owned()));
    }
    let limit = state.max_body_bytes;
    let declared =
        header_str(&req, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(RequestError::TooLarge { limit });
    }
    let signature = req
        .headers()
        .get("x-openfaas-signature-256")
        .map(|v| v.as_bytes().to_vec());
    let body = read_body(req.into_body(), limit, state.body_timeout).await?;
    state.secret.verify(signature.as_deref(), &body)?;
    let events = event::parse_batch(&body)?;
    Ok(store::insert_batch(&state.pool, &events, delivery).await?)
}

async fn read_body(body: Incoming, limit: usize, timeout: Duration) -> Result<Bytes, RequestError> {
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| RequestError::BodyTimeout)?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(RequestError::TooLarge { limit }),
        Err(e) => Err(RequestError::Body(e.to_string())),
    }
}

fn header_str<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
