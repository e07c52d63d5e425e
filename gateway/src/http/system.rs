//! The authenticated /system API: deploy, update, delete, list, describe, scale,
//! namespaces, info, logs, and the replica map the node agent reads.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::body::{Body, BoxError, full, parse_json, read_limited};
use super::router::text;
use crate::Gateway;
use crate::error::GatewayError;
use crate::logs::Filter;
use crate::metering::ingest::{self, Stored};
use crate::names::{FunctionName, FunctionRef, Namespace};
use crate::types::{DeleteRequest, FunctionDeployment, ScaleRequest};

pub async fn route(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    rest: &str,
) -> Result<Response<Body>, GatewayError> {
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    match (rest, &method) {
        ("functions", &Method::GET) => list(gw, &query),
        ("functions", &Method::POST) => {
            let d: FunctionDeployment = read_json(gw, req).await?;
            gw.provider.deploy(d).await?;
            Ok(accepted())
        }
        ("functions", &Method::PUT) => {
            let d: FunctionDeployment = read_json(gw, req).await?;
            gw.provider.update(d).await?;
            Ok(accepted())
        }
        ("functions", &Method::DELETE) => {
            let d: DeleteRequest = read_json(gw, req).await?;
            let namespace = match d.namespace {
                Some(ns) => ns,
                None => query.namespace(gw)?,
            };
            let f = FunctionRef {
                namespace,
                name: d.function_name,
            };
            gw.provider.delete(&f).await?;
            Ok(accepted())
        }
        ("namespaces", &Method::GET) => {
            let names: Vec<String> = gw
                .provider
                .namespaces()
                .iter()
                .map(|n| n.to_string())
                .collect();
            Ok(json(StatusCode::OK, &names))
        }
        ("info", &Method::GET) => Ok(json(StatusCode::OK, &info(gw))),
        ("logs", &Method::GET) => logs(gw, &query),
        ("replicas", &Method::GET) => {
            // The node agent polls this: while it does, kernel events are preferred.
            if let Some(meter) = gw.meter.get() {
                meter.agent_polled();
            }
            Ok(json(StatusCode::OK, &gw.provider.replicas()))
        }
        ("usage", &Method::POST) => ingest_usage(gw, req).await,
        ("usage", &Method::GET) => {
            let limit = query
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(1000);
            let (function, namespace, call_id) = (
                query.get("function"),
                query.get("namespace"),
                query.get("call_id"),
            );
            let events = gw.usage.query(
                |e| {
                    function.is_none_or(|f| *f == e.function_name)
                        && namespace.is_none_or(|n| *n == e.namespace)
                        && call_id.is_none_or(|c| e.call_id.as_deref() == Some(c))
                },
                limit,
            );
            Ok(json(StatusCode::OK, &events))
        }
        ("metering/parked", &Method::GET) => {
            let queue = gw.queue()?;
            let parked = crate::metering::parked::list(&queue.js)
                .await
                .map_err(unavailable)?;
            Ok(json(StatusCode::OK, &parked))
        }
        ("metering/parked/requeue", &Method::POST) => {
            let queue = gw.queue()?;
            let n = crate::metering::parked::requeue(&queue.js)
                .await
                .map_err(unavailable)?;
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"requeued": n}),
            ))
        }
        ("async-dead-letters", &Method::GET) => {
            let queue = gw.queue()?;
            let letters = queue
                .store
                .dead_letters(10_000)
                .await
                .map_err(unavailable)?;
            Ok(json(StatusCode::OK, &letters))
        }
        ("alert", &Method::POST) => alert(gw, req).await,
        ("secrets", _) => Err(GatewayError::NotImplemented(
            "secrets are not supported by the local provider yet".into(),
        )),
        ("functions" | "namespaces" | "info" | "logs" | "replicas" | "alert" | "usage", m) => {
            Err(GatewayError::MethodNotAllowed(m.clone()))
        }
        _ => {
            if let Some(name) = rest.strip_prefix("function/") {
                if method != Method::GET {
                    return Err(GatewayError::MethodNotAllowed(method));
                }
                return describe(gw, name, &query).await;
            }
            if let Some(id) = rest.strip_prefix("async/") {
                if method != Method::GET {
                    return Err(GatewayError::MethodNotAllowed(method));
                }
                let queue = gw.queue()?;
                return match queue.store.get(id).await.map_err(unavailable)? {
                    Some(status) => Ok(json(StatusCode::OK, &status)),
                    None => Err(GatewayError::NotFound(format!(
                        "no async call {id:?} (unknown, or older than the retention)"
                    ))),
                };
            }
            if let Some(id) = rest
                .strip_prefix("async-dead-letters/")
                .and_then(|r| r.strip_suffix("/requeue"))
            {
                if method != Method::POST {
                    return Err(GatewayError::MethodNotAllowed(method));
                }
                return requeue(gw, id).await;
            }
            if let Some(name) = rest.strip_prefix("async-queues/") {
                if method != Method::DELETE {
                    return Err(GatewayError::MethodNotAllowed(method));
                }
                let queue = gw.queue()?;
                let purged = crate::queue::worker::purge(queue, name)
                    .await
                    .map_err(|e| GatewayError::NotFound(format!("queue {name:?}: {e}")))?;
                return Ok(json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"queue": name, "purged": purged}),
                ));
            }
            if let Some(name) = rest.strip_prefix("scale-function/") {
                if method != Method::POST {
                    return Err(GatewayError::MethodNotAllowed(method));
                }
                return scale(gw, name, &query, req).await;
            }
            Err(GatewayError::NotFound(format!(
                "no route for /system/{rest}"
            )))
        }
    }
}

fn list(gw: &Gateway, query: &Query) -> Result<Response<Body>, GatewayError> {
    let ns = query.namespace(gw)?;
    let mut all = gw.provider.list(&ns)?;
    for f in &mut all {
        f.invocation_count = gw
            .metrics
            .invocation_count(&format!("{}.{}", f.name, f.namespace));
    }
    Ok(json(StatusCode::OK, &all))
}

async fn describe(gw: &Gateway, name: &str, query: &Query) -> Result<Response<Body>, GatewayError> {
    let f = FunctionRef {
        name: FunctionName::new(name)?,
        namespace: query.namespace(gw)?,
    };
    let mut status = gw.provider.get(&f)?;
    status.invocation_count = gw.metrics.invocation_count(&f.metric_label());
    if query.flag("usage") {
        status.usage = Some(gw.provider.usage(&f).await?);
    }
    Ok(json(StatusCode::OK, &status))
}

async fn scale(
    gw: &Gateway,
    name: &str,
    query: &Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let name = FunctionName::new(name)?;
    let body: ScaleRequest = read_json(gw, req).await?;
    if let Some(service) = body.service_name.as_deref().filter(|s| !s.is_empty())
        && service != name.as_str()
    {
        return Err(GatewayError::BadRequest(format!(
            "serviceName {service:?} does not match the function in the path {name:?}"
        )));
    }
    let namespace = match body.namespace.as_deref().filter(|s| !s.is_empty()) {
        Some(ns) => Namespace::new(ns)?,
        None => query.namespace(gw)?,
    };
    let f = FunctionRef { namespace, name };
    gw.provider.scale(&f, body.replicas).await?;
    Ok(accepted())
}

fn logs(gw: &Gateway, query: &Query) -> Result<Response<Body>, GatewayError> {
    let name = query
        .get("name")
        .ok_or_else(|| GatewayError::BadRequest("query parameter `name` is required".into()))?;
    let function = FunctionRef {
        name: FunctionName::new(name)?,
        namespace: query.namespace(gw)?,
    };
    gw.provider.get(&function)?;
    let tail = match query.get("tail") {
        None | Some("") => None,
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n < 0 => None,
            Ok(n) => Some(n as usize),
            Err(_) => {
                return Err(GatewayError::BadRequest(format!(
                    "tail {t:?} must be a whole number"
                )));
            }
        },
    };
    let since = match query.get("since").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    GatewayError::BadRequest(format!("since {s:?} is not an RFC3339 time: {e}"))
                })?
                .with_timezone(&Utc),
        ),
    };
    let filter = Filter {
        function,
        instance: query
            .get("instance")
            .filter(|s| !s.is_empty())
            .map(String::from),
        since,
    };
    let follow = query.flag("follow");
    let live = follow.then(|| gw.provider.logs().subscribe());
    let mut stopping = gw.stopping.subscribe();
    let history = gw.provider.logs().history(&filter, tail);
    let ndjson = |e: &crate::logs::Entry| {
        let mut line = serde_json::to_vec(&e.to_line()).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    };
    let body = match live {
        None => full(
            history
                .iter()
                .flat_map(|e| ndjson(e).to_vec())
                .collect::<Vec<u8>>(),
        ),
        Some(mut live) => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
            tokio::spawn(async move {
                for e in &history {
                    if tx.send(ndjson(e)).await.is_err() {
                        return;
                    }
                }
                loop {
                    tokio::select! {
                        received = live.recv() => match received {
                            Ok(e) if filter.matches(&e) => {
                                if tx.send(ndjson(&e)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        },
                        () = tx.closed() => return,
                        () = crate::until_true(&mut stopping) => return,
                    }
                }
            });
            let stream = ReceiverStream::new(rx).map(|b| Ok::<_, BoxError>(Frame::data(b)));
            BodyExt::boxed(StreamBody::new(stream))
        }
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

/// `POST /system/usage`: a JSON array of events from the node agent, or the same as a
/// postcard batch (`Content-Type: application/x-tally-usage+postcard`, what the agent
/// sends). Valid events are kept, invalid ones counted and reported by index; the batch as
/// a whole is accepted.
async fn ingest_usage(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    // The media type without its parameters, in any case.
    let postcard = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case(agent_common::wire::CONTENT_TYPE)
        });
    let bytes = read_limited(req.into_body(), 16 << 20, gw.config.read_timeout).await?;
    // The agent's postcard batch reads whole or not at all, each event checked as it is
    // read. A JSON batch is read in one pass when every event reads; otherwise each event
    // on its own, so one unreadable event is refused and named without refusing the rest.
    // An event that reads can still be absurd (a duration of a year, say): refused too.
    let (accepted, refused) = if postcard {
        ingest::check_wire(&bytes).map_err(GatewayError::BadRequest)?
    } else {
        let mut refused = Vec::new();
        let accepted = match ingest::parse_batch(&bytes) {
            Some(mut events) => {
                let mut i = 0;
                events.retain(|e| {
                    i += 1;
                    e.problem().map(|why| refused.push((i - 1, why))).is_none()
                });
                events
            }
            None => {
                let raws = parse_json::<Vec<Box<serde_json::value::RawValue>>>(&bytes)?;
                let mut accepted = Vec::with_capacity(raws.len());
                for (i, raw) in raws.iter().enumerate() {
                    match parse_json::<ingest::UsageEvent>(raw.get().as_bytes())
                        .map_err(|e| e.to_string())
                        .and_then(|e| e.problem().map_or(Ok(e), Err))
                    {
                        Ok(e) => accepted.push(e),
                        Err(why) => refused.push((i, why)),
                    }
                }
                accepted
            }
        };
        (Stored::Parsed(accepted), refused)
    };
    let rejected: Vec<serde_json::Value> = refused
        .into_iter()
        .map(|(i, why)| {
            tracing::warn!(index = i, "usage event refused: {why}");
            serde_json::json!({"index": i, "error": why})
        })
        .collect();
    gw.metrics.usage_rejected.inc_by(rejected.len() as u64);
    gw.metrics
        .usage_events
        .with_label_values(&["kernel"])
        .inc_by(accepted.len() as u64);
    let n = accepted.len();
    if let Some(meter) = gw.meter.get() {
        meter.kernel(gw, accepted.iter().map(ingest::UsageEvent::from));
    }
    gw.usage.push(accepted);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"accepted": n, "rejected": rejected}),
    ))
}

/// Puts a dead-lettered call back on its queue (a fresh set of attempts).
async fn requeue(gw: &Gateway, id: &str) -> Result<Response<Body>, GatewayError> {
    let queue = gw.queue()?;
    let letter = queue
        .store
        .take_dead_letter(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| GatewayError::NotFound(format!("no dead letter {id:?}")))?;
    let Some(mut call) = letter.call.clone() else {
        queue
            .store
            .dead_letter(&letter)
            .await
            .map_err(unavailable)?;
        return Err(GatewayError::BadRequest(format!(
            "dead letter {id:?} holds a message that could not be read; it cannot be re-queued"
        )));
    };
    call.requeues += 1;
    let mut status = crate::queue::status::CallStatus::queued(&call, queue.default_policy.attempts);
    status.error = Some(format!(
        "re-queued from the dead letters ({})",
        letter.reason
    ));
    let stored = async {
        queue.store.put(&status).await.map_err(|e| e.to_string())?;
        queue.publish(&call).await.map_err(|e| e.to_string())
    };
    if let Err(e) = stored.await {
        // Keep the dead letter: nothing is lost when the re-queue fails.
        let _ = queue.store.dead_letter(&letter).await;
        return Err(GatewayError::Unavailable(format!(
            "could not re-queue: {e}"
        )));
    }
    if let Some(worker) = gw.queue_worker.get() {
        worker.ensure_consumer(&call.queue, &call.namespace, &call.function);
    }
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({"call_id": call.call_id, "requeues": call.requeues}),
    ))
}

fn unavailable(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Unavailable(format!("async call store: {e}"))
}

/// `POST /system/alert`: AlertManager's webhook, scaling each alert's function.
async fn alert(gw: &Gateway, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
    use crate::scaling::alerts::{AlertBody, BAD_FORMAT, replicas_for};
    let bytes = read_limited(
        req.into_body(),
        gw.config.max_api_body_bytes,
        gw.config.read_timeout,
    )
    .await?;
    let body: AlertBody =
        serde_json::from_slice(&bytes).map_err(|_| GatewayError::BadRequest(BAD_FORMAT.into()))?;
    let count = |result: &str| gw.metrics.alerts.with_label_values(&[result]).inc();
    if gw.config.autoscaler != crate::config::Autoscaler::Alerts {
        body.alerts.iter().for_each(|_| count("ignored"));
        tracing::info!(autoscaler = ?gw.config.autoscaler, "alerts ignored: alert scaling is not the active autoscaler");
        return Ok(text(StatusCode::OK, "OK\n"));
    }
    for a in &body.alerts {
        let firing = a.status == "firing";
        let Some(name) = a.labels.get("function_name") else {
            count("ignored");
            continue;
        };
        let Ok(function) = FunctionRef::parse_qualified(name, &gw.config.function_namespace) else {
            count("ignored");
            continue;
        };
        let Ok(status) = gw.provider.get(&function) else {
            tracing::info!(function = %name, "alert for an unknown function ignored");
            count("ignored");
            continue;
        };
        let labels = match crate::scaling::labels::ScaleLabels::parse(status.labels.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(function = %function, "alert ignored: {e}");
                count("ignored");
                continue;
            }
        };
        match replicas_for(firing, status.replicas, &labels) {
            None => count("unchanged"),
            Some(n) => match gw.provider.scale(&function, n).await {
                Ok(()) => {
                    tracing::info!(function = %function, from = status.replicas, to = n, firing, "scaled by an alert");
                    count("scaled");
                }
                Err(e) => {
                    tracing::warn!(function = %function, "scaling on an alert failed: {e}");
                    count("failed");
                }
            },
        }
    }
    Ok(text(StatusCode::OK, "OK\n"))
}

fn info(gw: &Gateway) -> serde_json::Value {
    let (provider, orchestration) = gw.provider.name();
    let release = env!("CARGO_PKG_VERSION");
    let sha = option_env!("TALLY_GIT_SHA").unwrap_or("unknown");
    serde_json::json!({
        "provider": {
            "provider": provider,
            "orchestration": orchestration,
            "version": {"sha": sha, "release": release},
        },
        "version": {"commit_message": "", "sha": sha, "release": release},
        "arch": std::env::consts::ARCH,
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<T, GatewayError> {
    let bytes = read_limited(
        req.into_body(),
        gw.config.max_api_body_bytes,
        gw.config.read_timeout,
    )
    .await?;
    parse_json(&bytes)
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn accepted() -> Response<Body> {
    text(StatusCode::ACCEPTED, "")
}

/// Query parameters, last value wins.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "yes"))
    }

    /// `?namespace=`, or the default namespace when absent or empty.
    fn namespace(&self, gw: &Gateway) -> Result<Namespace, GatewayError> {
        match self.get("namespace").filter(|s| !s.is_empty()) {
            Some(ns) => Ok(Namespace::new(ns)?),
            None => Ok(gw.config.function_namespace.clone()),
        }
    }
}
