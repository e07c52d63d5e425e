//! http mode: the request streams to the replica's server over a pooled keep-alive
//! connection and the response streams back, unbuffered.

use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::CallContext;
use super::headers::{self, Peer};
use crate::error::GatewayError;
use crate::http::body::{Body, BoxError, IdleTimeoutBody, RequestBody, empty, too_large};

pub type HttpClient = Client<HttpConnector, Body>;

/// A client with a keep-alive pool sized for many concurrent requests per replica.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

pub async fn forward(
    client: &HttpClient,
    authority: Authority,
    req: Request<RequestBody>,
    peer: &Peer,
    ctx: &CallContext,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let path_and_query = match &ctx.query {
        Some(q) => format!("{}?{q}", ctx.path),
        None => ctx.path.clone(),
    };
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| GatewayError::BadRequest(format!("invalid path: {e}")))?;
    parts.version = http::Version::HTTP_11;
    headers::to_function(&mut parts.headers, peer, &ctx.call_id, ctx.start_nanos);
    // A request without a body needs neither the size limit nor the idle timer.
    let body = if body.is_end_stream() {
        empty()
    } else {
        let limit = usize::try_from(ctx.max_body_bytes).unwrap_or(usize::MAX);
        IdleTimeoutBody::new(Limited::new(body, limit), ctx.read_timeout).boxed()
    };
    let request = client.request(Request::from_parts(parts, body));
    let response = match tokio::time::timeout(ctx.deadline(), request).await {
        Err(_) => return Err(ctx.timed_out()),
        Ok(Err(e)) => return Err(upstream_error(e, ctx)),
        Ok(Ok(r)) => r,
    };
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

/// A failed request is the caller's fault when it was our limit or read timeout on
/// its body; otherwise the function could not be reached.
fn upstream_error(e: hyper_util::client::legacy::Error, ctx: &CallContext) -> GatewayError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return too_large(ctx.max_body_bytes);
        }
        if let Some(t) = s.downcast_ref::<crate::http::body::ReadTimedOut>() {
            return GatewayError::RequestTimeout(t.to_string());
        }
        source = s.source();
    }
    GatewayError::BadGateway(format!(
        "function {} could not be reached: {e}",
        ctx.function
    ))
}
