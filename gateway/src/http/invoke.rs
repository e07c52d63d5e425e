//! `/function/NAME[.NAMESPACE][/path]`: sync invocation. Holds the request while a
//! function scales from zero, leases a replica, forwards, and counts what happened.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;

use super::body::{Body, GuardedBody, RequestBody};
use crate::Gateway;
use crate::error::GatewayError;
use crate::names::FunctionRef;
use crate::provider::{AcquireError, Lease, Upstream};
use crate::proxy::headers::{self, Peer};
use crate::proxy::{self, CallContext};

pub async fn invoke(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
    rest: &str,
    peer: &Peer,
) -> Result<Response<Body>, GatewayError> {
    let received = Instant::now();
    let received_at = SystemTime::now();
    let start_nanos = received_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    if !matches!(
        *req.method(),
        Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
            | Method::HEAD
    ) {
        return Err(GatewayError::MethodNotAllowed(req.method().clone()));
    }
    let (function, path) = split_target(rest, &gw.config.function_namespace)?;
    if let Some(len) = content_length(&req)
        && len > gw.config.max_body_bytes
    {
        return Err(GatewayError::PayloadTooLarge(format!(
            "request body of {len} bytes is larger than the limit of {} bytes",
            gw.config.max_body_bytes
        )));
    }
    let call_id = headers::call_id(req.headers());
    let label = function.metric_label();
    let lease = acquire(gw, &function, &label).await;
    let (lease, waited) = match lease {
        Ok(l) => l,
        Err(e) => {
            if !matches!(e, GatewayError::NotFound(_)) {
                gw.metrics.started.with_label_values(&[&label]).inc();
                record(gw, &label, e.status().as_u16(), received);
            }
            return Err(e);
        }
    };
    gw.metrics.started.with_label_values(&[&label]).inc();
    let inflight = InflightGauge::new(gw, &label);
    let ctx = CallContext {
        call_id: call_id.clone(),
        start_nanos,
        path: path.to_string(),
        query: req.uri().query().map(String::from),
        function: function.to_string(),
        max_body_bytes: gw.config.max_body_bytes,
        read_timeout: gw.config.read_timeout,
        upstream_timeout: gw.config.upstream_timeout,
        exec_timeout: lease.exec_timeout,
    };
    let memory_limit = lease.memory_limit;
    let Lease {
        upstream, guard, ..
    } = lease;
    let outcome = match upstream {
        Upstream::Http(authority) => {
            proxy::http::forward(&gw.client, authority, req, peer, &ctx).await
        }
        Upstream::Fork(launcher) => proxy::fork::run(launcher, req, &ctx).await,
    };
    let mut response = outcome.unwrap_or_else(GatewayError::into_response);
    record(gw, &label, response.status().as_u16(), received);
    let h = response.headers_mut();
    headers::set_call_headers(h, &call_id, start_nanos);
    let micros = received.elapsed().as_micros();
    let seconds = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    if let Ok(v) = HeaderValue::from_str(&seconds) {
        h.insert(headers::X_DURATION_SECONDS, v);
    }
    let meter = gw.meter.get().is_some().then(|| MeterGuard {
        gw: gw.clone(),
        function,
        call_id,
        received,
        received_at,
        status: response.status().as_u16(),
        memory_limit,
        waited,
    });
    Ok(response.map(|b| GuardedBody::new(b, (guard, inflight, meter)).boxed()))
}

/// Leases a replica, holding the request (bounded by `ready_wait`) while none is ready;
/// a function at zero replicas is scaled up once for all the requests that wait.
/// Also returns how long the request waited for a replica, if it had to (a cold start).
async fn acquire(
    gw: &Gateway,
    f: &FunctionRef,
    label: &str,
) -> Result<(Lease, Option<std::time::Duration>), GatewayError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + gw.config.ready_wait;
    let mut readiness = gw.provider.readiness();
    let mut waited = false;
    loop {
        readiness.borrow_and_update();
        match gw.provider.acquire(f) {
            Ok(lease) => return Ok((lease, waited.then(|| started.elapsed()))),
            Err(AcquireError::NotFound(_)) => {
                return Err(GatewayError::NotFound(format!("function {f} not found")));
            }
            Err(e @ AcquireError::AtCapacity(_)) => {
                return Err(GatewayError::TooManyRequests(e.to_string()));
            }
            Err(AcquireError::NotReady { desired }) => {
                if desired == 0 {
                    if !gw.config.scale_from_zero {
                        return Err(GatewayError::Unavailable(format!(
                            "function {f} has 0 replicas and scale_from_zero is off"
                        )));
                    }
                    if gw.provider.scale_from_zero(f).await? {
                        gw.metrics.scale_from_zero.inc();
                        tracing::info!(function = %label, "scaling from zero for a held request");
                    }
                }
                waited = true;
                if tokio::time::timeout_at(deadline, readiness.changed())
                    .await
                    .is_err()
                {
                    return Err(GatewayError::Unavailable(format!(
                        "no replica of function {f} became ready within {:?}",
                        gw.config.ready_wait
                    )));
                }
            }
        }
    }
}

fn record(gw: &Gateway, label: &str, code: u16, received: Instant) {
    let code = code.to_string();
    gw.metrics
        .completed
        .with_label_values(&[label, &code])
        .inc();
    gw.metrics
        .seconds
        .with_label_values(&[label, &code])
        .observe(received.elapsed().as_secs_f64());
}

/// `NAME[.NAMESPACE][/path]` → the function and the path for it (at least `/`).
pub fn split_target<'a>(
    rest: &'a str,
    default_ns: &crate::names::Namespace,
) -> Result<(FunctionRef, &'a str), GatewayError> {
    let (name, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((FunctionRef::parse_qualified(name, default_ns)?, path))
}

pub fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `gateway_function_invocation_inflight` for one request, until its body ends.
struct InflightGauge(prometheus::IntGauge);

impl InflightGauge {
    fn new(gw: &Gateway, label: &str) -> Self {
        let g = gw.metrics.inflight.with_label_values(&[label]);
        g.inc();
        Self(g)
    }
}

impl Drop for InflightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Records the gateway's usage event when the response has been sent in full.
struct MeterGuard {
    gw: Arc<Gateway>,
    function: FunctionRef,
    call_id: String,
    received: Instant,
    received_at: SystemTime,
    status: u16,
    memory_limit: Option<u64>,
    waited: Option<std::time::Duration>,
}

impl Drop for MeterGuard {
    fn drop(&mut self) {
        if let Some(meter) = self.gw.meter.get() {
            meter.gateway(
                &self.gw,
                crate::metering::meter::Measured {
                    namespace: self.function.namespace.as_str(),
                    function: self.function.name.as_str(),
                    call_id: &self.call_id,
                    started: self.received_at,
                    duration: self.received.elapsed(),
                    status: self.status,
                    memory_limit: self.memory_limit,
                    cold_start: self.waited,
                },
            );
        }
    }
}
