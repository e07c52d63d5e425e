//! Producing one usage event per invocation: the gateway measures every call it
//! forwards; while a node agent is active, that event waits (`--metering-grace`) for the
//! agent's kernel event of the same call, which replaces its measurements. Never both.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::event::{FunctionUsage, UsageLine, rfc3339_fast};
use super::flush::{self, Flusher};
use super::ingest::UsageEvent;
use crate::Gateway;
use crate::config::MeteringConfig;

/// An agent counts as active while it polled the replica map this recently.
const AGENT_ACTIVE_FOR: Duration = Duration::from_secs(5);
/// Call ids remembered as settled by the gateway alone (late kernel events are dropped).
const SETTLED_MEMORY: usize = 200_000;

struct Held {
    until: Instant,
    event: FunctionUsage,
}

#[derive(Default)]
struct Pending {
    /// Gateway events waiting for their kernel twin, by call id, oldest first.
    by_call: HashMap<String, VecDeque<Held>>,
    /// Call ids in the order their events were held (for the sweep).
    order: VecDeque<(Instant, String)>,
    /// Call ids settled from the gateway's side only, oldest first (bounded).
    settled: HashSet<String>,
    settled_order: VecDeque<String>,
    /// Kernel events already metered (call id and start), oldest first (bounded): an agent
    /// that re-sends a batch it thought lost must not bill a call twice.
    kernel_seen: HashSet<(Option<String>, String)>,
    kernel_order: VecDeque<(Option<String>, String)>,
}

pub struct Meter {
    config: MeteringConfig,
    default_memory: u64,
    flusher: Flusher,
    pending: Mutex<Pending>,
    /// Unix ms of the last replica-map poll by an agent.
    agent_seen_ms: AtomicU64,
}

/// What the gateway measured for one invocation.
pub struct Measured<'a> {
    pub namespace: &'a str,
    pub function: &'a str,
    pub call_id: &'a str,
    pub started: SystemTime,
    pub duration: Duration,
    pub status: u16,
    pub memory_limit: Option<u64>,
    pub cold_start: Option<Duration>,
}

impl Meter {
    pub fn new(config: MeteringConfig, flusher: Flusher) -> Result<Self, String> {
        let default_memory = crate::quantity::parse_memory(&config.default_memory)
            .map_err(|e| format!("default_memory: {e}"))?;
        Ok(Self {
            config,
            default_memory,
            flusher,
            pending: Mutex::default(),
            agent_seen_ms: AtomicU64::new(0),
        })
    }

    /// The agent just read the replica map: it is alive and covers the local functions.
    pub fn agent_polled(&self) {
        self.agent_seen_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Whether an agent polled within AGENT_ACTIVE_FOR before `now` (an invocation's end,
    /// which the caller knows: no clock read per event).
    fn agent_active(&self, now: SystemTime) -> bool {
        let seen = self.agent_seen_ms.load(Ordering::Relaxed);
        seen != 0 && unix_ms(now).saturating_sub(seen) < AGENT_ACTIVE_FOR.as_millis() as u64
    }

    /// Records the gateway's own measurement of an invocation.
    pub fn gateway(&self, gw: &Gateway, m: Measured<'_>) {
        if self.config.excluded(m.namespace) {
            return;
        }
        let duration = m.duration.as_nanos() as u64;
        let mut id = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id);
        let fast = rfc3339_fast(m.started);
        let slow;
        let started = match &fast {
            Some(s) => s.as_str(),
            None => {
                slow = rfc3339(m.started);
                &slow
            }
        };
        let line = UsageLine {
            id,
            namespace: m.namespace,
            function_name: m.function,
            started,
            duration,
            memory_bytes: m.memory_limit.unwrap_or(self.default_memory),
            call_id: Some(m.call_id),
            status_code: m.status,
            memory_peak_bytes: None,
            cpu_ns: None,
            cold_start: m.cold_start.is_some(),
            init_duration_ns: m.cold_start.map(|d| d.as_nanos() as u64),
            billed_duration_ms: FunctionUsage::billed_ms(duration),
            source: "gateway",
        };
        if !self.agent_active(m.started + m.duration) {
            // The common case writes the line straight from the measurements, into this
            // thread's scratch buffer: no allocation per event.
            LINE.with_borrow_mut(|buf| {
                buf.clear();
                flush::write_line(&line, buf);
                self.flusher.send_line(gw, buf);
            });
            return;
        }
        let event = line.to_event();
        let now = Instant::now();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.order.push_back((now, m.call_id.to_string()));
        p.by_call
            .entry(m.call_id.to_string())
            .or_default()
            .push_back(Held {
                until: now + self.config.metering_grace,
                event,
            });
    }

    /// Records the kernel measurements of one ingested batch (spooled together).
    pub fn kernel(&self, gw: &Gateway, batch: impl IntoIterator<Item = UsageEvent>) {
        let events: Vec<FunctionUsage> = batch
            .into_iter()
            .filter_map(|k| self.kernel_event(gw, k))
            .collect();
        self.flusher.send_all(gw, events);
    }

    /// A kernel measurement from the agent: it replaces the gateway's event of the same
    /// call, or stands alone for a call the gateway did not see; `None` when not billed.
    fn kernel_event(&self, gw: &Gateway, k: UsageEvent) -> Option<FunctionUsage> {
        if self.config.excluded(&k.namespace) {
            return None;
        }
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let key = (k.call_id.clone(), k.started.clone());
            if !p.kernel_seen.insert(key.clone()) {
                gw.metrics
                    .metering
                    .with_label_values(&["kernel_duplicate"])
                    .inc();
                return None;
            }
            p.kernel_order.push_back(key);
            if p.kernel_order.len() > SETTLED_MEMORY
                && let Some(old) = p.kernel_order.pop_front()
            {
                p.kernel_seen.remove(&old);
            }
        }
        let held = k.call_id.as_ref().and_then(|id| {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(queue) = p.by_call.get_mut(id) {
                let first = queue.pop_front();
                if queue.is_empty() {
                    p.by_call.remove(id);
                }
                return first.map(Some);
            }
            // The gateway already sent its own event for this call: do not bill twice.
            p.settled.contains(id).then_some(None)
        });
        let base = match held {
            Some(None) => {
                gw.metrics
                    .metering
                    .with_label_values(&["kernel_late"])
                    .inc();
                tracing::warn!(call_id = ?k.call_id, "kernel event after the gateway's own was sent: dropped, not billed twice");
                return None;
            }
            Some(Some(h)) => Some(h.event),
            None => None,
        };
        let memory_bytes = k
            .memory_limit_bytes
            .or(base.as_ref().map(|b| b.memory_bytes))
            .unwrap_or(self.default_memory);
        Some(FunctionUsage {
            event: "function_usage".into(),
            id: k.id.clone().unwrap_or_else(|| {
                base.as_ref()
                    .map_or_else(|| uuid::Uuid::new_v4().to_string(), |b| b.id.clone())
            }),
            namespace: k.namespace,
            function_name: k.function_name,
            started: k.started,
            duration: k.duration_ns,
            memory_bytes,
            call_id: k.call_id,
            status_code: base.as_ref().map_or(k.status_code, |b| b.status_code),
            memory_peak_bytes: Some(k.memory_peak_bytes),
            cpu_ns: k.cpu_ns,
            cold_start: base.as_ref().is_some_and(|b| b.cold_start),
            init_duration_ns: base.as_ref().and_then(|b| b.init_duration_ns),
            billed_duration_ms: FunctionUsage::billed_ms(k.duration_ns),
            source: "kernel".into(),
        })
    }

    /// At shutdown: sends every held event now, then publishes the buffer.
    pub async fn flush_all(&self, gw: &Gateway, limit: Duration) {
        let held: Vec<FunctionUsage> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.order.clear();
            p.by_call
                .drain()
                .flat_map(|(_, q)| q.into_iter().map(|h| h.event))
                .collect()
        };
        for event in held {
            self.flusher.send(gw, event);
        }
        if self.flusher.flush(limit).await {
            self.flusher.close_spool();
        } else {
            tracing::warn!("usage events still unflushed at shutdown after {limit:?}");
        }
    }

    /// Sends the gateway's events whose grace ran out without a kernel twin.
    pub fn sweep(&self, gw: &Gateway) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            while let Some((at, id)) = p.order.front().cloned() {
                if at + self.config.metering_grace > now {
                    break;
                }
                p.order.pop_front();
                let Some(queue) = p.by_call.get_mut(&id) else {
                    continue;
                };
                if queue.front().is_none_or(|h| h.until > now) {
                    continue;
                }
                let Some(h) = queue.pop_front() else { continue };
                expired.push(h.event);
                if queue.is_empty() {
                    p.by_call.remove(&id);
                }
                if p.settled.insert(id.clone()) {
                    p.settled_order.push_back(id);
                    if p.settled_order.len() > SETTLED_MEMORY
                        && let Some(old) = p.settled_order.pop_front()
                    {
                        p.settled.remove(&old);
                    }
                }
            }
        }
        for event in expired {
            self.flusher.send(gw, event);
        }
    }
}

thread_local! {
    /// The invocation path's event line, reused.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}
