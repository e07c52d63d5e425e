//! A minimal webhook sender over one HTTP/1 keep-alive connection, signing like the gateway.
//! Used by the `bench` subcommand and the integration tests; plain `http://` only.

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::signature::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid webhook URL {0:?}: expected http://host:port/path")]
    Url(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("building request: {0}")]
    Request(#[from] http::Error),
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

pub struct WebhookClient {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
    path: String,
}

impl WebhookClient {
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let uri: Uri = url.parse().map_err(|_| ClientError::Url(url.to_owned()))?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::Url(url.to_owned()));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| ClientError::Url(url.to_owned()))?
            .to_string();
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let stream =
            TcpStream::connect(&authority)
                .await
                .map_err(|source| ClientError::Connect {
                    addr: authority.clone(),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            authority,
            path,
        })
    }

    /// POSTs `body` with the gateway's headers; `signature` overrides (or with `Some(None)`
    /// omits) the computed `X-Openfaas-Signature-256`, for negative tests.
    pub async fn post(
        &mut self,
        body: Bytes,
        secret: &Secret,
        signature: Option<Option<String>>,
    ) -> Result<Reply, ClientError> {
        let signature = signature.unwrap_or_else(|| Some(secret.sign(&body)));
        let mut req = Request::post(&self.path)
            .header("host", &self.authority)
            .header("content-type", "application/json")
            .header("x-openfaas-event", "function_usage")
            .header("x-openfaas-delivery", uuid::Uuid::new_v4().to_string());
        if let Some(sig) = signature {
            req = req.header("x-openfaas-signature-256", sig);
        }
        let req = req.body(Full::new(body))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply { status, body })
    }
}
