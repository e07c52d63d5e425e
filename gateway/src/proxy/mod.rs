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
    /// The timeout that fires first: the function's `exec_timeout` or `upstream_timeout`.
    pub fn deadline(&self) -> Duration {
        match self.exec_timeout {
            Some(exec) if exec < self.upstream_timeout => exec,
            _ => self.upstream_timeout,
        }
    }

    /// Whether the deadline is the function's `exec_timeout`.
    pub fn exec_timeout_first(&self) -> bool {
        self.exec_timeout.is_some_and(|e| e < self.upstream_timeout)
    }

    /// The error for a request that reached its deadline (http mode: 504 or 502).
    pub fn timed_out(&self) -> GatewayError {
        if self.exec_timeout_first() {
            GatewayError::GatewayTimeout(format!(
                "exec_timeout ({:?}) of function {} fired before it answered",
                self.deadline(),
                self.function
            ))
        } else {
            GatewayError::BadGateway(format!(
                "upstream_timeout ({:?}) fired before function {} answered",
                self.upstream_timeout, self.function
            ))
        }
    }
}
