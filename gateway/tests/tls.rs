//! https webhooks and callbacks: delivered over TLS to a receiver whose certificate chains
//! to `--tls-ca-file`, and refused (retried, never sent in clear) when it does not.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a certificate it signed for IP 127.0.0.1 (openssl, not our code).
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tally test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// Requests received over TLS: (path, headers, body).
type Got = Arc<Mutex<Vec<(String, http::HeaderMap, bytes::Bytes)>>>;

/// An https server on 127.0.0.1 that answers 200 and records each request.
async fn tls_sink(dir: &Path) -> (u16, Got) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Got = Arc::default();
    let got2 = got.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, got) = (acceptor.clone(), got2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let got = got.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body: hyper::body::Incoming = body;
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        got.lock().unwrap().push((
                            parts.uri.path().to_string(),
                            parts.headers,
                            body,
                        ));
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::new()),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, got)
}

fn gateway_with(dir: &Path, port: u16, ca: bool) -> TestGateway {
    let secret = dir.join("webhook-secret");
    std::fs::write(&secret, "tls-secret\n").unwrap();
    let endpoint = format!("https://127.0.0.1:{port}/usage");
    let mut args = vec![
        "--webhook-endpoint",
        &endpoint,
        "--webhook-secret-file",
        secret.to_str().unwrap(),
        "--metering-flush-interval",
        "50ms",
    ];
    let ca_file = dir.join("ca.pem");
    if ca {
        args.extend(["--tls-ca-file", ca_file.to_str().unwrap()]);
    }
    TestGateway::start(&args)
}

#[tokio::test]
async fn webhooks_and_callbacks_go_over_verified_https() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let (port, got) = tls_sink(dir.path()).await;

    let gw = gateway_with(dir.path(), port, true);
    gw.deploy_ok(http_fn("web")).await;
    gw.wait_available("web", 1).await;
    gw.wait_async_ready().await;
    let r = gw.invoke("web/echo").await;
    assert_eq!(r.status(), 200);
    let cb = format!("https://127.0.0.1:{port}/callback");
    let r = gw.enqueue("web/echo", Some(&cb), "over tls").await;
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let paths: Vec<String> = got.lock().unwrap().iter().map(|g| g.0.clone()).collect();
        if paths.iter().any(|p| p == "/callback") && paths.iter().any(|p| p == "/usage") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "over https within 20 s: {paths:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = got.lock().unwrap().clone();
    let usage = all.iter().find(|g| g.0 == "/usage").unwrap();
    assert_eq!(usage.1["x-openfaas-event"], "function_usage");
    assert!(usage.1.contains_key("x-openfaas-signature-256"));
    let callback = all.iter().find(|g| g.0 == "/callback").unwrap();
    let echoed: serde_json::Value = serde_json::from_slice(&callback.2).unwrap();
    assert_eq!(
        echoed["body"], "over tls",
        "the function's response, over TLS"
    );

    // Without the CA the receiver's certificate is unknown: nothing is sent, the
    // webhook is retried (the events wait in JetStream), never posted in clear.
    let before = got.lock().unwrap().len();
    let untrusting = gateway_with(dir.path(), port, false);
    untrusting.deploy_ok(http_fn("web")).await;
    untrusting.wait_available("web", 1).await;
    untrusting.wait_async_ready().await;
    assert_eq!(untrusting.invoke("web/echo").await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = untrusting.metrics().await;
        if metric(&m, "gateway_metering_webhook_retries_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no failed delivery counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        got.lock().unwrap().len(),
        before,
        "nothing reached the receiver"
    );
}
