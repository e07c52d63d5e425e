//! A paced load of sync invocations from several client threads, with a ledger of every
//! attempt: its call id (fresh per attempt) and what the client saw. A failed attempt is
//! retried under a new call id until the target count of successful invocations is met.
//!
//! What the client saw decides what billing may do with an attempt:
//! - `Ok` (200, the whole body read): the function ran and the caller was served — billed
//!   exactly once.
//! - `Refused`: the connection was refused, the gateway never saw the request — never billed.
//! - `Status` (another answer) or `Broken` (reset, timeout, cut short): the caller cannot
//!   know whether the function ran to completion — billed at most once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Status(u16),
    Refused,
    Broken(String),
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub call_id: String,
    pub outcome: Outcome,
    /// When the attempt was sent and when it ended, since the load started.
    pub sent: Duration,
    pub ended: Duration,
}

struct Shared {
    url: String,
    target: usize,
    per_second: f64,
    started: Instant,
    /// Invocations claimed by a thread (successful, or being attempted).
    claimed: AtomicUsize,
    succeeded: AtomicUsize,
    failed: AtomicUsize,
    stop: AtomicBool,
    /// A slot that could not be served within `SLOT_LIMIT`: the load gives up.
    gave_up: Mutex<Option<String>>,
    ledger: Mutex<Vec<Attempt>>,
}

/// Longest one invocation may keep failing (a gateway restart takes a few seconds).
const SLOT_LIMIT: Duration = Duration::from_secs(90);

/// The running load; `finish` joins it.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `threads` clients POSTing to `url` until `target` invocations succeeded,
    /// paced at about `per_second` (slower if the stack cannot keep up).
    pub fn start(url: &str, target: usize, per_second: f64, threads: usize) -> Self {
        let shared = Arc::new(Shared {
            url: url.to_string(),
            target,
            per_second,
            started: Instant::now(),
            claimed: AtomicUsize::new(0),
            succeeded: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            gave_up: Mutex::new(None),
            ledger: Mutex::new(Vec::with_capacity(target + 1000)),
        });
        let threads = (0..threads)
            .map(|_| {
                let s = Arc::clone(&shared);
                std::thread::spawn(move || client_loop(&s))
            })
            .collect();
        Self { shared, threads }
    }

    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    pub fn succeeded(&self) -> usize {
        self.shared.succeeded.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> usize {
        self.shared.failed.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// One progress line.
    pub fn progress(&self) -> String {
        let t = self.elapsed().as_secs_f64();
        let ok = self.succeeded();
        format!(
            "load {t:6.1}s: {ok}/{} invocations served ({:.0}/s), {} failed attempts",
            self.shared.target,
            ok as f64 / t.max(0.001),
            self.failed()
        )
    }

    /// Waits for the clients (at most `limit`) and returns the ledger; panics if a client
    /// gave up or the load did not finish.
    pub fn finish(mut self, limit: Duration) -> Vec<Attempt> {
        let deadline = Instant::now() + limit;
        let mut last = Instant::now();
        while !self.done() {
            if Instant::now() > deadline {
                self.shared.stop.store(true, Ordering::Relaxed);
                panic!(
                    "the load did not finish within {limit:?}: {}",
                    self.progress()
                );
            }
            if last.elapsed() > Duration::from_secs(10) {
                eprintln!("{}", self.progress());
                last = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for t in std::mem::take(&mut self.threads) {
            t.join().expect("a load client panicked");
        }
        if let Some(why) = self
            .shared
            .gave_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            panic!("the load gave up: {why}");
        }
        std::mem::take(&mut *self.shared.ledger.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn client_loop(s: &Shared) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    loop {
        let slot = s.claimed.fetch_add(1, Ordering::Relaxed);
        if slot >= s.target || s.stop.load(Ordering::Relaxed) {
            return;
        }
        // Pacing: slot n is not started before n / rate seconds.
        let due = s.started + Duration::from_secs_f64(slot as f64 / s.per_second);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let slot_started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        for attempt in 0.. {
            let call_id = format!("bill-{slot}-{attempt}");
            let sent = s.started.elapsed();
            let outcome = invoke(&agent, &s.url, &call_id);
            let ok = outcome == Outcome::Ok;
            s.ledger
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Attempt {
                    call_id,
                    outcome,
                    sent,
                    ended: s.started.elapsed(),
                });
            if ok {
                s.succeeded.fetch_add(1, Ordering::Relaxed);
                break;
            }
            s.failed.fetch_add(1, Ordering::Relaxed);
            if slot_started.elapsed() > SLOT_LIMIT || s.stop.load(Ordering::Relaxed) {
                *s.gave_up.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                    "invocation {slot} still failing after {attempt} retries"
                ));
                s.stop.store(true, Ordering::Relaxed);
                return;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// One POST with `X-Call-Id`; the whole body is read so that success means served.
fn invoke(agent: &ureq::Agent, url: &str, call_id: &str) -> Outcome {
    match agent.post(url).header("X-Call-Id", call_id).send("x") {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let echoed = r
                .headers()
                .get("X-Call-Id")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let body = r.body_mut().read_to_string();
            match (status, body) {
                (200, Ok(_)) if echoed.as_deref() == Some(call_id) => Outcome::Ok,
                (200, Ok(_)) => Outcome::Broken(format!("X-Call-Id came back as {echoed:?}")),
                (200, Err(e)) => Outcome::Broken(format!("body: {e}")),
                (code, _) => Outcome::Status(code),
            }
        }
        Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Outcome::Refused
        }
        Err(ureq::Error::ConnectionFailed) => Outcome::Refused,
        Err(e) => Outcome::Broken(e.to_string()),
    }
}
