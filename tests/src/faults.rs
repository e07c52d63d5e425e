//! A switchable HTTP fault proxy between the event-worker and the billing receiver: it
//! passes webhook batches through, or answers a chosen status, or hangs without an
//! answer. It keeps every exchange (the raw batch body, the answer the sender got), so a
//! test can recompute the bill from exactly what was sent.
//!
//! One request per connection (`Connection: close` both ways): webhook batches are large
//! and few, so keep-alive buys nothing here and the framing stays simple.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request or response the proxy reads (the event-worker's batches are ≤ 1 MiB).
const MAX_MESSAGE: usize = 16 << 20;
/// Longest a hung request is held when the sender never gives up.
const MAX_HANG: Duration = Duration::from_secs(120);

/// What the proxy does with the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward to the receiver; no answer (connection closed) when it is unreachable.
    Pass,
    /// Answer this status without forwarding.
    Status(u16),
    /// Read the request, then never answer (until the sender closes the connection).
    Hang,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// When it was read, since the proxy started.
    pub at: Duration,
    pub mode: Mode,
    /// The status the sender got; 0 when it got none (receiver down, or a hang).
    pub status: u16,
    /// The request body as sent (a JSON array of usage events).
    pub body: Vec<u8>,
    /// For a hang: how long until the sender gave up.
    pub hung_for: Option<Duration>,
}

struct Shared {
    mode: Mutex<Mode>,
    upstream: String,
    started: Instant,
    exchanges: Mutex<Vec<Exchange>>,
    stop: AtomicBool,
}

/// The proxy, listening on a loopback port; stops on drop.
pub struct FaultProxy {
    pub url: String,
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultProxy {
    /// Starts in `Mode::Pass`, forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            upstream: upstream.to_string(),
            started: Instant::now(),
            exchanges: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&s);
                std::thread::spawn(move || serve(&s, conn));
            }
        });
        Ok(Self {
            url: format!("http://{addr}/"),
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
    }

    /// Since the proxy started (the clock of `Exchange::at`).
    pub fn now(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// A copy of every exchange so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.shared.exchanges).clone()
    }

    /// How many exchanges since `since` match `pred`.
    pub fn count_since(&self, since: Duration, pred: impl Fn(&Exchange) -> bool) -> usize {
        lock(&self.shared.exchanges)
            .iter()
            .filter(|e| e.at >= since && pred(e))
            .count()
    }

    /// Waits (at most `limit`) until `count_since(since, pred) >= n`; true if it got there.
    pub fn wait_for(
        &self,
        n: usize,
        since: Duration,
        limit: Duration,
        pred: impl Fn(&Exchange) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.count_since(since, &pred) >= n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A request or response as read: the head (start line and headers) and the body.
struct Message {
    head: String,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one message framed by `Content-Length` (or, with `to_eof`, by the end of stream).
fn read_message(conn: &mut TcpStream, to_eof: bool) -> io::Result<Message> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 << 10 {
            return Err(io::Error::other("header section too large"));
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut msg = Message {
        head,
        body: buf[head_end..].to_vec(),
    };
    let length = msg
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    match length {
        Some(len) if len > MAX_MESSAGE => Err(io::Error::other("message too large")),
        Some(len) => {
            while msg.body.len() < len {
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                msg.body.extend_from_slice(&chunk[..n]);
            }
            msg.body.truncate(len);
            Ok(msg)
        }
        None if to_eof => {
            loop {
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                msg.body.extend_from_slice(&chunk[..n]);
                if msg.body.len() > MAX_MESSAGE {
                    return Err(io::Error::other("message too large"));
                }
            }
            Ok(msg)
        }
        None => Ok(msg),
    }
}

fn serve(s: &Shared, mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(req) = read_message(&mut conn, false) else {
        return;
    };
    let at = s.started.elapsed();
    let mode = *lock(&s.mode);
    let mut hung_for = None;
    let status = match mode {
        Mode::Status(code) => {
            let body = format!("{{\"error\":\"fault proxy answers {code}\"}}");
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {code} Fault\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            code
        }
        Mode::Hang => {
            // Hold the connection without a word until the sender gives up.
            let started = Instant::now();
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut byte = [0u8; 1];
            while started.elapsed() < MAX_HANG && !s.stop.load(Ordering::Relaxed) {
                match conn.read(&mut byte) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            hung_for = Some(started.elapsed());
            0
        }
        Mode::Pass => forward(&s.upstream, &req, &mut conn).unwrap_or(0),
    };
    let _ = conn.shutdown(Shutdown::Both);
    lock(&s.exchanges).push(Exchange {
        at,
        mode,
        status,
        body: req.body,
        hung_for,
    });
}

/// Forwards the request on a fresh connection and relays the answer; its status.
fn forward(upstream: &str, req: &Message, conn: &mut TcpStream) -> Option<u16> {
    let addr = upstream.parse().ok()?;
    let mut up = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    up.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut head = String::new();
    for (i, line) in req.head.trim_end().lines().enumerate() {
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0 && name.eq_ignore_ascii_case("connection") {
            continue;
        }
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).ok()?;
    up.write_all(&req.body).ok()?;
    let resp = read_message(&mut up, true).ok()?;
    let status = resp
        .head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())?;
    // A chunked body is relayed as read (still chunked); any other gets its length.
    let chunked = resp.header("transfer-encoding").is_some();
    let mut out = String::new();
    for (i, line) in resp.head.trim_end().lines().enumerate() {
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0
            && (name.eq_ignore_ascii_case("connection")
                || (!chunked && name.eq_ignore_ascii_case("content-length")))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    if !chunked {
        out.push_str(&format!("content-length: {}\r\n", resp.body.len()));
    }
    out.push_str("connection: close\r\n\r\n");
    conn.write_all(out.as_bytes()).ok()?;
    conn.write_all(&resp.body).ok()?;
    Some(status)
}
