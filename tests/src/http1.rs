//! A minimal HTTP/1.1 keep-alive client over a std `TcpStream`, for load generators whose
//! own CPU must stay small beside the stack they load: one request at a time per
//! connection (no pipelining), the request built in one buffer and sent in one write, the
//! response read into a reused buffer. Bodies are framed by `Content-Length` or chunked;
//! a response without either (read until close) is refused as unsupported. A failed
//! request is never resent: the caller decides (a resend could run the function twice).

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::Duration;

/// What one exchange got: the status and the body.
#[derive(Debug)]
pub struct Reply<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// One keep-alive connection to `addr`, opened on first use and again after an error or a
/// `Connection: close`.
pub struct Conn {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    buf: Vec<u8>,
    body: Vec<u8>,
}

impl Conn {
    /// A connection to the server of `url` (`http://host:port`, a path is ignored).
    pub fn new(url: &str, timeout: Duration) -> io::Result<Self> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| bad(format!("not an http:// URL: {url}")))?;
        let host = host.split('/').next().unwrap_or(host).to_string();
        let addr = host
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| bad(format!("no address for {host}")))?;
        Ok(Self {
            addr,
            host,
            timeout,
            stream: None,
            request: Vec::with_capacity(512),
            buf: Vec::with_capacity(4096),
            body: Vec::with_capacity(256),
        })
    }

    /// `method path` with the headers given (name, value) and `body`; the reply, its body
    /// borrowed from this connection until the next request.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Reply<'_>> {
        self.request.clear();
        let r = &mut self.request;
        r.extend_from_slice(method.as_bytes());
        r.push(b' ');
        r.extend_from_slice(path.as_bytes());
        r.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        r.extend_from_slice(self.host.as_bytes());
        for (k, v) in headers {
            r.extend_from_slice(b"\r\n");
            r.extend_from_slice(k.as_bytes());
            r.extend_from_slice(b": ");
            r.extend_from_slice(v.as_bytes());
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            r.extend_from_slice(b"\r\nContent-Length: ");
            r.extend_from_slice(body.len().to_string().as_bytes());
        }
        r.extend_from_slice(b"\r\n\r\n");
        r.extend_from_slice(body);
        match self.exchange() {
            Ok((status, keep)) => {
                if !keep {
                    self.stream = None;
                }
                Ok(Reply {
                    status,
                    body: &self.body,
                })
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// Writes the built request, reads one response; (status, keep the connection).
    fn exchange(&mut self) -> io::Result<(u16, bool)> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(bad("no connection".into()));
        };
        stream.write_all(&self.request)?;
        self.body.clear();
        // The head.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            fill(stream, &mut self.buf)?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| bad("response head is not UTF-8".into()))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|s| s.get(2..5))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked, mut keep) = (None, false, true);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| bad(format!("bad Content-Length {value:?}")))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                keep = !value.eq_ignore_ascii_case("close");
            }
        }
        self.buf.drain(..head_end);
        // The body.
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    fill(stream, &mut self.buf)?;
                };
                let size_text = std::str::from_utf8(&self.buf[..line_end]).unwrap_or("");
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers (none expected) end at an empty line.
                    loop {
                        if self.buf.starts_with(b"\r\n") {
                            self.buf.drain(..2);
                            break;
                        }
                        if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                            self.buf.drain(..i + 4);
                            break;
                        }
                        fill(stream, &mut self.buf)?;
                    }
                    break;
                }
                while self.buf.len() < size + 2 {
                    fill(stream, &mut self.buf)?;
                }
                self.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        } else if let Some(n) = length {
            while self.buf.len() < n {
                fill(stream, &mut self.buf)?;
            }
            self.body.extend_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
        } else if status >= 200 && status != 204 && status != 304 {
            return Err(bad("a response body without a length".into()));
        }
        Ok((status, keep))
    }
}

/// Reads what the socket has into `buf`; end of stream is an error (mid-response).
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
