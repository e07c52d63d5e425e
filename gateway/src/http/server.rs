//! The listener: HTTP/1.1 with keep-alive, a header read timeout, a bounded number of
//! connections, and graceful shutdown (stop accepting, drain, stop replicas).

use std::future::Future;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Gateway;
use crate::proxy::headers::Peer;

/// Connections served at once; further ones wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16_384;

pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let gw2 = gw.clone();
        let peer = Arc::new(Peer::new(remote));
        let service = service_fn(move |req| {
            let (gw, peer) = (gw2.clone(), peer.clone());
            async move { Ok::<_, std::convert::Infallible>(super::handle(gw, req, &peer).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(gw.config.read_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection from {remote}: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining connections");
    gw.stopping.send_replace(true);
    if tokio::time::timeout(gw.config.write_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after write_timeout; closing them");
    }
    gw.provider.shutdown().await;
    // The drained requests have produced their usage events: publish them before NATS goes.
    if let Some(meter) = gw.meter.get() {
        meter
            .flush_all(&gw, std::time::Duration::from_secs(5))
            .await;
    }
    gw.finished.send_replace(true);
    tracing::info!("stopped");
}
