//! Accept loop: each connection gets read/write timeouts and HTTP/1 keep-alive; on shutdown
//! the listener stops, in-flight requests finish (bounded grace), then `run` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;

use super::handler::{State, handle};
use crate::db::Pool;
use crate::signature::Secret;

/// Server knobs; plain data.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    /// No byte read for this long closes the connection (also the keep-alive idle limit).
    pub read_timeout: Duration,
    /// A write blocked for this long closes the connection (a client that stopped reading).
    pub write_timeout: Duration,
    /// Whole-body read deadline per request.
    pub body_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(10),
        }
    }
}

/// Serves the webhook on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    pool: Pool,
    secret: Secret,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(State {
        pool,
        secret,
        max_body_bytes: config.max_body_bytes,
        body_timeout: config.body_timeout,
    });
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(config.read_timeout));
        stream.set_write_timeout(Some(config.write_timeout));
        let io = TokioIo::new(Box::pin(stream));
        let state = Arc::clone(&state);
        let service = service_fn(move |req| handle(Arc::clone(&state), req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(config.read_timeout)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight requests");
    if tokio::time::timeout(config.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.grace, "grace period over; closing remaining connections");
    }
}
