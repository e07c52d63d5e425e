//! The webhook endpoint: `server` accepts connections with timeouts and a graceful stop;
//! `handler` turns one request into a status (`rescue` is the one place errors become statuses).

pub mod handler;
pub mod rescue;
pub mod server;
