//! fork mode, the classic watchdog: one process per request, the body on stdin, stdout
//! is the response; `exec_timeout` kills it (408), a non-zero exit is a 500.

use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::CallContext;
use super::headers;
use crate::error::GatewayError;
use crate::http::body::{Body, RequestBody, full, read_limited};
use crate::provider::ForkLauncher;

pub async fn run(
    launcher: Arc<dyn ForkLauncher>,
    req: Request<RequestBody>,
    ctx: &CallContext,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let input = read_limited(body, ctx.max_body_bytes, ctx.read_timeout).await?;
    headers::set_call_headers(&mut parts.headers, &ctx.call_id, ctx.start_nanos);
    let env = headers::cgi_env(
        &parts.headers,
        &parts.method,
        &ctx.path,
        ctx.query.as_deref(),
    );
    let mut cmd = launcher.command(&env);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        GatewayError::Internal(format!(
            "could not start the process of function {}: {e}",
            ctx.function
        ))
    })?;
    let pgid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);

    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A process that does not read its input closes the pipe: not an error.
            let _ = stdin.write_all(&input).await;
        }
    };
    let stdout = child.stdout.take();
    let limit = ctx.max_body_bytes;
    let collect = async move {
        let mut out = Vec::new();
        if let Some(stdout) = stdout {
            stdout.take(limit + 1).read_to_end(&mut out).await?;
        }
        Ok::<_, std::io::Error>(out)
    };
    if let Some(stderr) = child.stderr.take() {
        let launcher = launcher.clone();
        tokio::spawn(crate::logs::pump_lines(stderr, move |line| {
            launcher.log_stderr(line);
        }));
    }
    let work = async {
        let ((), out) = tokio::join!(feed, collect);
        let status = child.wait().await;
        (out, status)
    };
    let deadline = ctx.deadline();
    let (out, status) = match tokio::time::timeout(deadline, work).await {
        Ok(done) => done,
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            return Err(if ctx.exec_timeout_first() {
                GatewayError::RequestTimeout(format!(
                    "exec_timeout ({deadline:?}) of function {} fired: the process was killed",
                    ctx.function
                ))
            } else {
                ctx.timed_out()
            });
        }
    };
    if let Some(pgid) = pgid {
        // Anything the process left behind in its group goes with it.
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let out = out.map_err(|e| GatewayError::Internal(format!("reading function output: {e}")))?;
    if out.len() as u64 > limit {
        return Err(GatewayError::Internal(format!(
            "function {} wrote more than {limit} bytes to stdout",
            ctx.function
        )));
    }
    let status =
        status.map_err(|e| GatewayError::Internal(format!("waiting for function: {e}")))?;
    if !status.success() {
        launcher.log_stderr(&format!("[tally] call {} {status}", ctx.call_id));
        let mut response = Response::new(full(format!("{status}\n")));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(response);
    }
    let content_type = launcher
        .content_type()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .or_else(|| parts.headers.get(header::CONTENT_TYPE).cloned())
        .unwrap_or(HeaderValue::from_static("text/plain; charset=utf-8"));
    let mut response = Response::new(full(Bytes::from(out)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    Ok(response)
}
