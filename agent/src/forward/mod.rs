//! Where usage events go: the `EventSink` trait, a channel sink (tests, embedding) and the
//! HTTP forwarder that batches them to the gateway's ingest API, spooling to disk meanwhile.

mod http;
mod retry;
mod spool;

pub use http::{ForwarderConfig, HttpForwarder};
pub use retry::{Retry, decide};
pub use spool::{Evicted, Spool, SpoolError};

use tokio::sync::mpsc;

use crate::event::UsageEvent;

/// Takes usage events without blocking the agent's read loop.
pub trait EventSink: Send + Sync + 'static {
    fn submit(&self, event: UsageEvent);

    /// Takes every event of `events` (leaving it empty), in order; by default one by one.
    fn submit_all(&self, events: &mut Vec<UsageEvent>) {
        for e in events.drain(..) {
            self.submit(e);
        }
    }
}

/// Hands every event to an unbounded channel.
pub struct ChannelSink(pub mpsc::UnboundedSender<UsageEvent>);

impl EventSink for ChannelSink {
    fn submit(&self, event: UsageEvent) {
        let _ = self.0.send(event);
    }
}
