//! Billing receiver: verifies the gateway's signed `function_usage` webhooks and bills them.
//! Data flow: `http` (limits, signature, parse) → `event` (validate) → `db` (batch insert, report).
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod db;
pub mod event;
pub mod http;
pub mod signature;

pub use http::server::{ServerConfig, run};
