//! The HTTP side: the listener (timeouts, limits, graceful shutdown), the router, and
//! the handlers for invocations and the /system API.

pub mod body;
mod enqueue;
pub(crate) mod invoke;
pub mod outbound;
mod router;
pub mod server;
mod system;

pub use router::handle;
