//! Replicas from the gateway's local provider: `GET {gateway}/system/replicas` with basic
//! auth, answering `{"cgroup": {...}, "replicas": [...]}`.

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::Deserialize;

use super::{Replica, WorkloadSource};
use crate::{auth::Credentials, error::Error};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// Polls the gateway for the replicas it runs on this node.
pub struct GatewayWorkloads {
    url: String,
    credentials: Option<Credentials>,
    client: HttpClient,
}

#[derive(Deserialize)]
struct Answer {
    replicas: Vec<Replica>,
}

impl GatewayWorkloads {
    pub fn new(gateway_url: &str, credentials: Option<Credentials>) -> Self {
        let url = format!("{}/system/replicas", gateway_url.trim_end_matches('/'));
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            url,
            credentials,
            client,
        }
    }
}

impl WorkloadSource for GatewayWorkloads {
    async fn replicas(&self) -> Result<Vec<Replica>, Error> {
        let mut req = Request::get(&self.url);
        if let Some(c) = &self.credentials {
            req = req.header(hyper::header::AUTHORIZATION, c.header_value());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| Error::Workloads(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| Error::Workloads(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Workloads(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(Error::Workloads(format!("{} answered {status}", self.url)));
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| Error::Workloads(format!("{}: bad JSON: {e}", self.url)))?;
        Ok(answer.replicas)
    }
}
