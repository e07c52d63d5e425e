//! Per-replica load accounting: a lease counts one request in flight on a replica
//! until it is dropped, and wakes whoever waits for the replica to drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::Upstream;

/// Requests in flight on one replica.
#[derive(Debug, Default)]
pub struct ReplicaLoad {
    inflight: AtomicUsize,
    idle: Notify,
}

impl ReplicaLoad {
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Counts one more request unless `max` (0 = unlimited) is reached.
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<LoadGuard> {
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| LoadGuard(self.clone()))
    }

    /// Waits until no request is in flight, at most `limit`; returns whether it drained.
    pub async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.inflight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// One request in flight; dropping it releases the slot.
#[derive(Debug)]
pub struct LoadGuard(Arc<ReplicaLoad>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A replica leased for one request.
pub struct Lease {
    pub upstream: Upstream,
    pub replica: String,
    /// The function's `exec_timeout`, when it has one.
    pub exec_timeout: Option<Duration>,
    /// The function's `limits.memory`, in bytes.
    pub memory_limit: Option<u64>,
    pub guard: LoadGuard,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_and_drains() {
        let load = Arc::new(ReplicaLoad::default());
        let a = load.try_acquire(2).unwrap();
        let b = load.try_acquire(2).unwrap();
        assert!(load.try_acquire(2).is_none());
        assert_eq!(load.inflight(), 2);
        assert!(!load.drained(Duration::from_millis(20)).await);
        drop(a);
        let l2 = load.clone();
        let waiter = tokio::spawn(async move { l2.drained(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(b);
        assert!(waiter.await.unwrap());
        assert!(load.try_acquire(0).is_some());
    }
}
