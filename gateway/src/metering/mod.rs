//! Metering: one usage event per invocation — measured in the kernel by the node agent
//! where it covers the function, else by the gateway — flushed to JetStream and delivered
//! to the billing webhook in signed batches by the event-worker.

pub mod event;
pub mod flush;
pub mod ingest;
pub mod message;
pub mod meter;
pub mod parked;
pub mod sign;
pub mod spool;
pub mod webhook;

pub use ingest::{Recent, UsageEvent};
