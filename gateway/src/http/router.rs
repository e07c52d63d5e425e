//! Routing: which handler answers which path, with basic auth in front of /system.
//! Every error becomes its response here, in one place.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::{Body, RequestBody, full};
use super::{enqueue, invoke, system};
use crate::Gateway;
use crate::error::GatewayError;
use crate::proxy::headers::Peer;

pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
    let path = req.uri().path().to_string();
    let result = route(&gw, req, &path, peer).await;
    result.unwrap_or_else(GatewayError::into_response)
}

async fn route(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    path: &str,
    peer: &Peer,
) -> Result<Response<Body>, GatewayError> {
    if let Some(rest) = path.strip_prefix("/function/") {
        return invoke::invoke(gw, req.map(RequestBody::Client), rest, peer).await;
    }
    if let Some(rest) = path.strip_prefix("/async-function/") {
        return enqueue::enqueue(gw, req, rest, peer).await;
    }
    if let Some(rest) = path.strip_prefix("/system/") {
        if gw.config.basic_auth {
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            let ok = gw
                .credentials
                .as_ref()
                .is_some_and(|c| c.check_header(header));
            if !ok {
                return Err(GatewayError::Unauthorized);
            }
        }
        return system::route(gw, req, rest).await;
    }
    match (path, req.method()) {
        ("/healthz", &Method::GET | &Method::HEAD) => Ok(text(StatusCode::OK, "OK\n")),
        ("/metrics", &Method::GET) => {
            gw.refresh_service_counts();
            let mut r = Response::new(full(gw.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        ("/healthz" | "/metrics", m) => Err(GatewayError::MethodNotAllowed(m.clone())),
        _ => Err(GatewayError::NotFound(format!("no route for {path}"))),
    }
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}
