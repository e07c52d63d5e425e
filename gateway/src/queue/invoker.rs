//! How the queue-worker reaches functions: in process, through this gateway's own
//! routing; or, for a queue-worker run on its own, over HTTP through the gateway at
//! `--invoke-url` (so it scales separately and sees the same functions).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, header};
use http_body_util::{BodyExt, Full};

use super::AsyncCall;
use crate::Gateway;
use crate::http::body::{RequestBody, collect_capped};
use crate::names::FunctionRef;
use crate::proxy::headers::Peer;

/// What the worker learns about a call's function before running it.
pub enum Lookup {
    /// It exists; these are its annotations (retry policy, queue).
    Found(Option<BTreeMap<String, String>>),
    /// It does not exist (any more).
    Gone(String),
    /// It could not be asked now; try again later.
    Unavailable(String),
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub enum Invoker {
    InProcess,
    Remote {
        base: String,
        auth: Option<String>,
        client: Box<Client>,
    },
}

impl Invoker {
    pub fn for_gateway(gw: &Gateway) -> Self {
        match &gw.config.queue.invoke_url {
            None => Self::InProcess,
            Some(base) => Self::Remote {
                base: base.trim_end_matches('/').to_string(),
                auth: gw.credentials.as_ref().map(|c| c.header_value()),
                client: Box::new(
                    hyper_util::client::legacy::Client::builder(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build_http(),
                ),
            },
        }
    }

    pub async fn lookup(&self, gw: &Gateway, f: &FunctionRef) -> Lookup {
        match self {
            Self::InProcess => match gw.provider.get(f) {
                Ok(s) => Lookup::Found(s.annotations),
                Err(e) => Lookup::Gone(e.to_string()),
            },
            Self::Remote { base, auth, client } => {
                let url = format!(
                    "{base}/system/function/{}?namespace={}",
                    f.name, f.namespace
                );
                let mut req = Request::get(url);
                if let Some(a) = auth {
                    req = req.header(header::AUTHORIZATION, a);
                }
                let Ok(req) = req.body(Full::new(Bytes::new())) else {
                    return Lookup::Unavailable("invalid lookup request".into());
                };
                match client.request(req).await {
                    Err(e) => Lookup::Unavailable(format!("gateway at {base}: {e}")),
                    Ok(resp) if resp.status() == 404 => {
                        Lookup::Gone(format!("function {f} not found"))
                    }
                    Ok(resp) if !resp.status().is_success() => {
                        Lookup::Unavailable(format!("gateway at {base} answered {}", resp.status()))
                    }
                    Ok(resp) => match resp.into_body().collect().await {
                        Err(e) => Lookup::Unavailable(e.to_string()),
                        Ok(b) => match serde_json::from_slice::<crate::types::FunctionStatus>(
                            &b.to_bytes(),
                        ) {
                            Ok(s) => Lookup::Found(s.annotations),
                            Err(e) => {
                                Lookup::Unavailable(format!("unexpected function status: {e}"))
                            }
                        },
                    },
                }
            }
        }
    }

    /// Runs the call with its original method, path, query, headers and body.
    pub async fn invoke(&self, gw: &Arc<Gateway>, call: &AsyncCall) -> (u16, HeaderMap, Bytes) {
        let limit = usize::try_from(gw.config.max_body_bytes).unwrap_or(usize::MAX);
        let target = format!("{}.{}{}", call.function, call.namespace, call.path);
        let uri = match (self, &call.query) {
            (Self::InProcess, Some(q)) => format!("/?{q}"),
            (Self::InProcess, None) => "/".to_string(),
            (Self::Remote { base, .. }, Some(q)) => format!("{base}/function/{target}?{q}"),
            (Self::Remote { base, .. }, None) => format!("{base}/function/{target}"),
        };
        let mut builder = Request::builder().method(call.method.as_str()).uri(uri);
        for (k, v) in &call.headers {
            if !(matches!(self, Self::Remote { .. }) && k.eq_ignore_ascii_case("host")) {
                builder = builder.header(k, v);
            }
        }
        let failed = |code: u16, why: String| (code, HeaderMap::new(), Bytes::from(why + "\n"));
        let body = Bytes::from(call.body.clone());
        match self {
            Self::InProcess => {
                let req = match builder.body(RequestBody::Buffered(Full::new(body))) {
                    Ok(r) => r,
                    Err(e) => return failed(400, format!("invalid stored request: {e}")),
                };
                let peer = Peer::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
                match crate::http::invoke::invoke(gw, req, &target, &peer).await {
                    Err(e) => failed(e.status().as_u16(), e.to_string()),
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        match collect_capped(body, limit).await {
                            Ok(b) => (parts.status.as_u16(), parts.headers, b),
                            Err(e) => failed(502, format!("reading the function's response: {e}")),
                        }
                    }
                }
            }
            Self::Remote { client, base, .. } => {
                let req = match builder.body(Full::new(body)) {
                    Ok(r) => r,
                    Err(e) => return failed(400, format!("invalid stored request: {e}")),
                };
                match client.request(req).await {
                    // The gateway is unreachable: a 503, which the retry policy retries.
                    Err(e) => failed(503, format!("gateway at {base} unreachable: {e}")),
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        match collect_capped(body.map_err(Into::into).boxed(), limit).await {
                            Ok(b) => (parts.status.as_u16(), parts.headers, b),
                            Err(e) => failed(502, format!("reading the function's response: {e}")),
                        }
                    }
                }
            }
        }
    }
}
