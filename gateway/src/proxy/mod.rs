//! Forwarding an invocation to its replica: over a pooled keep-alive connection to an
//! http-mode server, or by forking a process (classic watchdog) in fork mode.

pub mod fork;
pub mod headers;
pub mod http;

use std::time::Duration;

use crate::error::GatewayError;

/// What a forward needs besides the request itself.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub call_id: String,
    /// Unix nanoseconds when the gateway received the request.
    pub start_nanos: u128,
    /// The path after `/function/NAME` (always starts with `/`).
    pub path: String,
    pub query: Option<String>,
    pub function: String,
    pub max_body_bytes: u64,
    pub read_timeout: Duration,
    pub upstream_timeout: Duration,
    pub exec_timeout: Option<Duration>,
}

impl CallContext {
    /// The timeout that fires first, and the error it gives.
    pub fn deadline(&self) -> (Duration, GatewayError) {
        match self.exec_timeout {
            Some(exec) if exec < self.upstream_timeout => (
                exec,
                GatewayError::GatewayTimeout(format!(
                    "exec_timeout ({exec:?}) of function {} fired before it answered",
                    self.function
                )),
            ),
            _ => (
                self.upstream_timeout,
                GatewayError::BadGateway(format!(
                    "upstream_timeout ({:?}) fired before function {} answered",
                    self.upstream_timeout, self.function
                )),
            ),
        }
    }
}
